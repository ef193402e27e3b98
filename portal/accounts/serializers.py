"""API shapes for inference keys."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from portal.accounts.models import InferenceKey


class KeySerializer(serializers.ModelSerializer[InferenceKey]):
    key_id = serializers.CharField(read_only=True)
    deployment = serializers.IntegerField(source="deployment_id", read_only=True, allow_null=True)
    created_by = serializers.CharField(
        source="created_by.username", default=None, read_only=True, allow_null=True
    )
    state = serializers.SerializerMethodField()

    class Meta:
        model = InferenceKey
        fields = [
            "id", "key_id", "name", "prefix", "deployment", "expires_at", "rate_per_s", "burst",
            "created_by", "created_at", "last_used_at", "revoked_at", "state",
        ]  # fmt: skip

    def get_state(self, key: InferenceKey) -> str:
        return key.state()


class KeyCreatedSerializer(KeySerializer):
    key = serializers.CharField(read_only=True, help_text="The key itself; shown only once.")

    class Meta(KeySerializer.Meta):
        fields = [*KeySerializer.Meta.fields, "key"]


class KeyCreateSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=80)
    deployment = serializers.IntegerField(
        min_value=1, required=False, allow_null=True, help_text="Only this deployment."
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    rate_per_s = serializers.FloatField(
        min_value=0.001, max_value=1_000_000, required=False, allow_null=True
    )
    burst = serializers.IntegerField(
        min_value=1, max_value=1_000_000, required=False, allow_null=True
    )
