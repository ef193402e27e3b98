"""API shapes for deployments and revisions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rest_framework import serializers

from portal.deployments.choices import Device
from portal.deployments.models import Deployment, Revision
from portal.registry.models import NAME_RE


class DeploymentSerializer(serializers.ModelSerializer[Deployment]):
    model = serializers.CharField(source="model.name", read_only=True)
    current_version = serializers.IntegerField(
        source="current_revision.version.number", default=None, read_only=True, allow_null=True
    )

    class Meta:
        model = Deployment
        fields = [
            "id", "model", "name", "status", "device", "cpus", "memory_mb", "endpoint_url",
            "current_version", "error", "created_at", "updated_at",
        ]  # fmt: skip


class RevisionSerializer(serializers.ModelSerializer[Revision]):
    version = serializers.IntegerField(source="version.number", read_only=True)
    requested_by = serializers.CharField(
        source="requested_by.username", default=None, read_only=True, allow_null=True
    )

    class Meta:
        model = Revision
        fields = [
            "id", "version", "kind", "status", "requested_by", "error", "attempts",
            "ready_seconds", "created_at", "live_from", "live_until",
        ]  # fmt: skip


class DeployRequestSerializer(serializers.Serializer[Any]):
    deployment = serializers.RegexField(NAME_RE, max_length=63, default="production")
    device = serializers.ChoiceField(choices=Device.choices, default=Device.CPU)
    cpus = serializers.DecimalField(
        max_digits=5,
        decimal_places=2,
        min_value=Decimal("0.1"),
        max_value=Decimal(64),
        required=False,
    )
    memory_mb = serializers.IntegerField(min_value=128, max_value=262144, required=False)


class DeployResponseSerializer(serializers.Serializer[Any]):
    deployment = DeploymentSerializer()
    revision = RevisionSerializer()


class RollbackRequestSerializer(serializers.Serializer[Any]):
    version = serializers.IntegerField(min_value=1)


class LogsSerializer(serializers.Serializer[Any]):
    revision = serializers.IntegerField(allow_null=True)
    lines = serializers.CharField()
