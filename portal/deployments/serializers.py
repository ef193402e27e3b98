"""API shapes for deployments and revisions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from deployer.runtimes.gpus import MAX_GPUS, GpuPlacementError, GpuRequest
from portal.deployments.async_inference import deployment_async_queue
from portal.deployments.choices import Device
from portal.deployments.models import MAX_REPLICAS, Deployment, Replica, Revision
from portal.deployments.selectors import replica_list
from portal.registry.models import NAME_RE


class AsyncQueueSerializer(serializers.Serializer[Any]):
    depth = serializers.IntegerField()
    oldest_age_s = serializers.FloatField(allow_null=True)
    results = serializers.IntegerField()
    callbacks_pending = serializers.IntegerField()


class ReplicaSerializer(serializers.ModelSerializer[Replica]):
    address = serializers.CharField(source="internal_url", read_only=True)
    grpc_address = serializers.CharField(source="internal_grpc", read_only=True)
    version = serializers.IntegerField(source="revision.version.number", read_only=True)

    class Meta:
        model = Replica
        fields = [
            "id", "slot", "state", "version", "address", "grpc_address", "started_at",
            "ready_at", "ended_at", "restarts", "cause", "rate_per_s", "p99_ms", "metrics_at",
            "inflight", "gpus",
        ]  # fmt: skip


class DeploymentSerializer(serializers.ModelSerializer[Deployment]):
    model = serializers.CharField(source="model.name", read_only=True)
    current_version = serializers.IntegerField(
        source="current_revision.version.number", default=None, read_only=True, allow_null=True
    )
    async_queue = serializers.SerializerMethodField(
        help_text="Async requests waiting or running, the oldest one's age, answers kept."
    )
    replicas = serializers.SerializerMethodField()
    replicas_wanted = serializers.IntegerField(
        read_only=True, help_text="replicas it runs now (min_replicas, or autoscaling's choice)"
    )

    class Meta:
        model = Deployment
        fields = [
            "id", "model", "name", "status", "device", "cpus", "memory_mb", "endpoint_url",
            "grpc_address", "public", "min_replicas", "max_replicas", "gpu_count", "gpu_ids",
            "autoscale_target_inflight", "autoscale_cooldown_s", "replicas_wanted", "scaled_at",
            "replicas", "current_version", "error", "created_at", "updated_at", "async_queue",
        ]  # fmt: skip

    @extend_schema_field(ReplicaSerializer(many=True))
    def get_replicas(self, deployment: Deployment) -> list[dict[str, Any]]:
        """The live revision's replicas: those serving or starting, then the last ended."""
        rows = replica_list(deployment=deployment)
        return list(ReplicaSerializer(rows, many=True).data)

    @extend_schema_field(AsyncQueueSerializer)
    def get_async_queue(self, deployment: Deployment) -> dict[str, Any]:
        stats = deployment_async_queue(deployment=deployment)
        return {
            "depth": stats.depth,
            "oldest_age_s": None if stats.oldest_age_s is None else round(stats.oldest_age_s, 3),
            "results": stats.results,
            "callbacks_pending": stats.callbacks_pending,
        }


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
    min_replicas = serializers.IntegerField(
        min_value=1, max_value=MAX_REPLICAS, required=False, help_text="instances that serve"
    )
    max_replicas = serializers.IntegerField(
        min_value=1, max_value=MAX_REPLICAS, required=False, help_text="upper bound"
    )
    gpu_count = serializers.IntegerField(
        min_value=1, max_value=MAX_GPUS, required=False, help_text="GPUs per replica (device gpu)"
    )
    gpu_ids = serializers.CharField(
        max_length=400,
        required=False,
        allow_blank=True,
        help_text="exactly these GPUs, comma-separated device ids (device gpu)",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        asked = [name for name in ("gpu_count", "gpu_ids") if attrs.get(name)]
        if asked and attrs["device"] != Device.GPU:
            raise serializers.ValidationError(
                {asked[0]: f"{asked[0]} applies to device gpu only; this deploy is on the cpu."}
            )
        try:
            GpuRequest.parse(attrs.get("gpu_count") or 1, attrs.get("gpu_ids") or "")
        except GpuPlacementError as exc:
            raise serializers.ValidationError({"gpu_ids": exc.message}) from exc
        return attrs


class DeploymentUpdateSerializer(serializers.Serializer[Any]):
    public = serializers.BooleanField(
        required=False, help_text="true: calls need no inference key."
    )
    min_replicas = serializers.IntegerField(min_value=1, max_value=MAX_REPLICAS, required=False)
    max_replicas = serializers.IntegerField(min_value=1, max_value=MAX_REPLICAS, required=False)
    autoscale_target_inflight = serializers.FloatField(
        min_value=0,
        max_value=1000,
        required=False,
        allow_null=True,
        help_text="autoscaling: requests in flight per replica to aim at; 0 or null: off",
    )
    autoscale_cooldown_s = serializers.IntegerField(
        min_value=0, max_value=3600, required=False, help_text="no scale-down within this"
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if not attrs:
            raise serializers.ValidationError(
                "Give at least one of public, min_replicas, max_replicas, "
                "autoscale_target_inflight, autoscale_cooldown_s."
            )
        return attrs


class DeployResponseSerializer(serializers.Serializer[Any]):
    deployment = DeploymentSerializer()
    revision = RevisionSerializer()


class RollbackRequestSerializer(serializers.Serializer[Any]):
    version = serializers.IntegerField(min_value=1)


class LogsSerializer(serializers.Serializer[Any]):
    revision = serializers.IntegerField(allow_null=True)
    lines = serializers.CharField()
