from django.urls import path

from portal.deployments import views

app_name = "deployments"
urlpatterns = [
    path("", views.deployment_list, name="list"),
    path("<int:deployment_id>/", views.deployment_detail, name="detail"),
    path("<int:deployment_id>/try", views.deployment_try, name="try"),
    path("<int:deployment_id>/rollback", views.deployment_rollback, name="rollback"),
    path("<int:deployment_id>/stop", views.deployment_stop, name="stop"),
]
