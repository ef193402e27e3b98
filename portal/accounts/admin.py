from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from portal.accounts.models import ApiToken, InferenceKey, Invitation, Membership, Team


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "created_at"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "team", "role", "created_at"]
    list_filter = ["role", "team"]
    search_fields = ["user__username", "team__slug"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = [
        "name", "prefix", "user", "team", "created_at", "expires_at", "last_used_at", "revoked_at",
    ]  # fmt: skip
    list_filter = ["team", "revoked_at"]
    search_fields = ["name", "prefix", "user__username"]
    readonly_fields = ["prefix", "key_hash", "created_at", "last_used_at"]


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = ["team", "role", "created_by", "created_at", "expires_at", "accepted_by"]
    list_filter = ["team", "role"]
    readonly_fields = ["key_hash", "created_at", "accepted_by", "accepted_at"]


@admin.register(InferenceKey)
class InferenceKeyAdmin(admin.ModelAdmin):
    """Keys are created on the Inference keys page (shown once); here they are revoked."""

    list_display = [
        "name", "prefix", "team", "deployment", "expires_at", "rate_per_s", "last_used_at",
        "revoked_at",
    ]  # fmt: skip
    list_filter = ["team", "revoked_at"]
    search_fields = ["name", "prefix"]
    readonly_fields = [
        "prefix",
        "key_hash",
        "created_by",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[InferenceKey]) -> None:
        from portal.accounts.services import key_revoke

        for key in queryset.select_related("team", "deployment"):
            key_revoke(key=key, user=request.user)  # type: ignore[arg-type]
