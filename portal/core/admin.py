from django.contrib import admin
from django.http import HttpRequest

from portal.core.models import Event


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    """The audit log: read-only."""

    list_display = ["created_at", "team", "actor", "subject", "step", "level", "message"]
    list_filter = ["level", "step", "team"]
    search_fields = ["subject", "message", "actor__username"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Event | None = None) -> bool:
        return False
