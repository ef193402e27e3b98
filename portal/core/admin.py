from django.contrib import admin
from django.http import HttpRequest

from portal.core.models import Event, IdempotencyRecord


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


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(admin.ModelAdmin):
    """Results kept for Idempotency-Key retries (read-only)."""

    list_display = ["created_at", "user", "method", "path", "key", "state", "response_status"]
    list_filter = ["state", "method"]
    search_fields = ["key", "path", "user__username"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: IdempotencyRecord | None = None
    ) -> bool:
        return False
