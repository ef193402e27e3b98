"""URL configuration: pages, the REST API under /api/v1/, its schema and docs, the admin."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from portal.accounts import api as accounts_api
from portal.deployments import api as deployments_api
from portal.deployments import async_api
from portal.deployments.batch import api as batch_api
from portal.registry import api as registry_api

api_v1 = [
    path("keys/", accounts_api.KeyListView.as_view(), name="key-list"),
    path("keys/<int:key_id>/", accounts_api.KeyDetailView.as_view(), name="key-detail"),
    path("models/", registry_api.ModelListView.as_view(), name="model-list"),
    path("models/<slug:name>/", registry_api.ModelDetailView.as_view(), name="model-detail"),
    path(
        "models/<slug:name>/versions/",
        registry_api.VersionListView.as_view(),
        name="version-list",
    ),
    path(
        "models/<slug:name>/versions/<int:number>/",
        registry_api.VersionDetailView.as_view(),
        name="version-detail",
    ),
    path(
        "models/<slug:name>/versions/<int:number>/deploy",
        deployments_api.DeployView.as_view(),
        name="version-deploy",
    ),
    path("deployments/", deployments_api.DeploymentListView.as_view(), name="deployment-list"),
    path(
        "async/callback-secret",
        async_api.CallbackSecretView.as_view(),
        name="async-callback-secret",
    ),
    path(
        "deployments/<int:deployment_id>/",
        deployments_api.DeploymentDetailView.as_view(),
        name="deployment-detail",
    ),
    path(
        "deployments/<int:deployment_id>/revisions/",
        deployments_api.RevisionListView.as_view(),
        name="revision-list",
    ),
    path(
        "deployments/<int:deployment_id>/rollback",
        deployments_api.RollbackView.as_view(),
        name="deployment-rollback",
    ),
    path(
        "deployments/<int:deployment_id>/logs",
        deployments_api.DeploymentLogsView.as_view(),
        name="deployment-logs",
    ),
    path("batch-jobs/", batch_api.BatchJobListView.as_view(), name="batch-job-list"),
    path(
        "batch-jobs/<int:job_id>/", batch_api.BatchJobDetailView.as_view(), name="batch-job-detail"
    ),
    path(
        "batch-jobs/<int:job_id>/cancel",
        batch_api.BatchJobCancelView.as_view(),
        name="batch-job-cancel",
    ),
    path(
        "batch-jobs/<int:job_id>/output",
        batch_api.BatchJobOutputView.as_view(),
        name="batch-job-output",
    ),
]

urlpatterns = [
    path("api/v1/", include((api_v1, "api"), namespace="api")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("admin/", admin.site.urls),
    path("accounts/", include("portal.accounts.urls")),
    path("deployments/", include("portal.deployments.urls")),
    path("", include("portal.registry.urls")),
]

handler400 = "portal.core.views.bad_request"
handler404 = "portal.core.views.not_found"
handler500 = "portal.core.views.server_error"
