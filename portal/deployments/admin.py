from django.contrib import admin

from portal.deployments.models import Deployment, Revision


class RevisionInline(admin.TabularInline):
    model = Revision
    extra = 0
    fields = ("version", "kind", "status", "requested_by", "live_from", "live_until", "error")
    readonly_fields = fields
    can_delete = False


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["name", "model", "status", "device", "current_revision", "updated_at"]
    list_filter = ["status", "device", "model__team"]
    search_fields = ["name", "model__name"]
    inlines = [RevisionInline]


@admin.register(Revision)
class RevisionAdmin(admin.ModelAdmin):
    list_display = ["deployment", "version", "kind", "status", "requested_by", "live_from"]
    list_filter = ["status", "kind"]
