from django.contrib import admin
from django.http import HttpRequest

from portal.monitoring.models import MetricSample


@admin.register(MetricSample)
class MetricSampleAdmin(admin.ModelAdmin):
    """Scraped counters (read-only)."""

    list_display = ["taken_at", "deployment", "revision", "success", "failure"]
    list_filter = ["deployment__model__team"]
    date_hierarchy = "taken_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: MetricSample | None = None) -> bool:
        return False
