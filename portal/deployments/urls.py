from django.urls import path

from portal.deployments import views
from portal.deployments.batch import views as batch_views

app_name = "deployments"
urlpatterns = [
    path("", views.deployment_list, name="list"),
    path("<int:deployment_id>/", views.deployment_detail, name="detail"),
    path("<int:deployment_id>/try", views.deployment_try, name="try"),
    path("<int:deployment_id>/rollback", views.deployment_rollback, name="rollback"),
    path("<int:deployment_id>/stop", views.deployment_stop, name="stop"),
    path("<int:deployment_id>/public", views.deployment_public, name="public"),
    path("batch/", batch_views.batch_job_list, name="batch_list"),
    path("batch/<int:job_id>/", batch_views.batch_job_detail, name="batch_detail"),
    path("batch/<int:job_id>/cancel", batch_views.batch_job_cancel, name="batch_cancel"),
    path("batch/<int:job_id>/output", batch_views.batch_job_output, name="batch_output"),
    path("<int:deployment_id>/scale", views.deployment_scale, name="scale"),
]
