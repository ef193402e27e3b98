from django.contrib import admin

from portal.registry.models import Model, ModelVersion


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
    readonly_fields = ["uid", "sha256", "signature", "report", "created_at", "updated_at"]
