"""Django admin for deployments: lists, filters, and the rollback and stop actions."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from rest_framework.exceptions import APIException

from portal.deployments import services
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import AsyncCallbackSecret, BatchJob, Deployment, Replica, Revision
from portal.registry.choices import VersionStatus
from portal.registry.models import ModelVersion


class RevisionInline(admin.TabularInline):
    model = Revision
    extra = 0
    fields = ("version", "kind", "status", "requested_by", "live_from", "live_until", "error")
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class VersionChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: Any) -> str:
        return f"v{obj.number} ({obj.file_name}, {obj.created_at:%Y-%m-%d})"


class RollbackForm(forms.Form):
    version = VersionChoiceField(queryset=ModelVersion.objects.none(), label="Roll back to")

    def __init__(self, *args: Any, deployment: Deployment, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        versions = ModelVersion.objects.filter(model=deployment.model, status=VersionStatus.READY)
        if deployment.current_revision is not None:
            versions = versions.exclude(pk=deployment.current_revision.version_id)
        field = self.fields["version"]
        assert isinstance(field, forms.ModelChoiceField)
        field.queryset = versions.order_by("-number")


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["name", "model", "team", "status", "device", "serving", "updated_at"]
    list_filter = ["status", "device", "model__team"]
    search_fields = ["name", "model__name", "endpoint_url"]
    list_select_related = ["model__team", "current_revision__version"]
    readonly_fields = ["status", "current_revision", "endpoint_url", "error", "created_at"]
    inlines = [RevisionInline]
    actions = ["rollback_action", "stop_action"]

    @admin.display(description="team", ordering="model__team__slug")
    def team(self, obj: Deployment) -> str:
        return obj.model.team.slug

    @admin.display(description="serving")
    def serving(self, obj: Deployment) -> str:
        return f"v{obj.current_revision.version.number}" if obj.current_revision else "—"

    @admin.action(description="Roll back the selected deployment to a chosen version")
    def rollback_action(
        self, request: HttpRequest, queryset: QuerySet[Deployment]
    ) -> HttpResponse | None:
        if queryset.count() != 1:
            self.message_user(
                request, "Select exactly one deployment to roll back.", messages.ERROR
            )
            return None
        deployment = queryset.select_related("model", "current_revision__version").get()
        form = RollbackForm(
            request.POST if "confirm" in request.POST else None, deployment=deployment
        )
        if "confirm" in request.POST and form.is_valid():
            version = form.cleaned_data["version"]
            try:
                services.deployment_rollback(
                    deployment=deployment,
                    to_version=version,
                    user=request.user,  # type: ignore[arg-type]
                )
            except APIException as exc:
                self.message_user(request, str(exc.detail), messages.ERROR)
            else:
                self.message_user(
                    request, f"Rolling {deployment} back to v{version.number}.", messages.SUCCESS
                )
            return HttpResponseRedirect(request.get_full_path())
        context = {
            **self.admin_site.each_context(request),
            "title": f"Roll back {deployment}",
            "deployment": deployment,
            "form": form,
            "queryset": queryset,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/deployments/rollback.html", context)

    @admin.action(description="Stop the selected deployments")
    def stop_action(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        stopped = 0
        for deployment in queryset.exclude(
            status__in=[DeploymentStatus.STOPPED, DeploymentStatus.STOPPING]
        ):
            services.deployment_stop(deployment=deployment, user=request.user, delete=False)  # type: ignore[arg-type]
            stopped += 1
        self.message_user(request, f"Stopping {stopped} deployment(s).", messages.SUCCESS)


@admin.register(Revision)
class RevisionAdmin(admin.ModelAdmin):
    list_display = [
        "deployment",
        "version",
        "kind",
        "status",
        "requested_by",
        "live_from",
        "live_until",
    ]
    list_filter = ["status", "kind", "deployment__model__team"]
    search_fields = ["deployment__name", "deployment__model__name", "error"]
    list_select_related = ["deployment__model", "version", "requested_by"]
    readonly_fields = [f.name for f in Revision._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class _ReadOnlyAdmin(admin.ModelAdmin):
    """Rows the engine and the portal's services write; the admin only shows them."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Replica)
class ReplicaAdmin(_ReadOnlyAdmin):
    list_display = ("deployment", "revision", "slot", "state", "restarts", "started_at", "ended_at")
    list_filter = ("state",)
    search_fields = ("deployment__name", "handle", "cause")


@admin.register(BatchJob)
class BatchJobAdmin(_ReadOnlyAdmin):
    list_display = ("pk", "version", "status", "input_name", "input_format", "rows_per_s")
    list_filter = ("status", "input_format")
    search_fields = ("input_name", "version__model__name")


@admin.register(AsyncCallbackSecret)
class AsyncCallbackSecretAdmin(_ReadOnlyAdmin):
    # The secret itself is never shown here: team admins read and rotate it in the API.
    list_display = ("team", "created_at", "rotated_at")
    fields = ("team", "created_at", "rotated_at")
    readonly_fields = fields
