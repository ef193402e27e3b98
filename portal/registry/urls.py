from django.urls import path

from portal.registry import views

app_name = "registry"
urlpatterns = [
    path("", views.model_list, name="model_list"),
    path("models/<slug:name>/", views.model_detail, name="model_detail"),
    path("models/<slug:name>/upload/", views.version_upload, name="version_upload"),
    path("models/<slug:name>/versions/<int:number>/", views.version_detail, name="version_detail"),
    path(
        "models/<slug:name>/versions/<int:number>/deploy",
        views.version_deploy,
        name="version_deploy",
    ),
]
