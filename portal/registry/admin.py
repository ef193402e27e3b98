from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from portal.registry.models import Model, ModelVersion
from portal.registry.selectors import storage_by_team


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "created_by", "created_at"]
    list_filter = ["team"]
    search_fields = ["name", "description"]


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["model", "number", "status", "step", "progress", "source_format", "created_at"]
    list_filter = ["status", "source_format", "model__team"]
    search_fields = ["model__name", "sha256", "mlflow_run_id"]
    readonly_fields = [
        "uid",
        "sha256",
        "signature",
        "report",
        "created_at",
        "updated_at",
        "deleted_at",
        "deleted_by",
        "purged_at",
    ]
    change_list_template = "admin/registry/modelversion_changelist.html"

    def get_urls(self) -> list[URLPattern]:
        storage = path(
            "storage/",
            self.admin_site.admin_view(self.storage_view),
            name="registry_modelversion_storage",
        )
        return [storage, *super().get_urls()]

    def storage_view(self, request: HttpRequest) -> HttpResponse:
        """Disk usage per team: version files and model image layers (staff with view rights)."""
        if not self.has_view_permission(request):
            from django.core.exceptions import PermissionDenied

            raise PermissionDenied
        rows = storage_by_team()
        context = {
            **self.admin_site.each_context(request),
            "title": "Storage per team",
            "rows": rows,
            "total_files": sum(r.file_bytes for r in rows),
            "total_images": sum(r.image_bytes for r in rows),
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/registry/storage.html", context)
