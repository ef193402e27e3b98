"""API shapes for batch jobs."""

from __future__ import annotations

import json
from typing import Any

from rest_framework import serializers

from portal.deployments.batch.models import BatchJob
from portal.registry.models import NAME_RE


class BatchJobCreateSerializer(serializers.Serializer[Any]):
    model = serializers.RegexField(NAME_RE, max_length=63)
    version = serializers.IntegerField(min_value=1)
    file = serializers.FileField(
        required=False,
        use_url=False,
        help_text="The dataset: .csv, .parquet, .jsonl, .npy or .npz (streamed to disk).",
    )
    input_job = serializers.IntegerField(
        required=False, help_text="Instead of a file: score the stored input of this earlier job."
    )
    mapping = serializers.CharField(
        required=False,
        allow_blank=True,
        help_text="JSON object, input name -> column or list of columns, e.g. "
        '{"input": ["a", "b", "c", "d"]}. Default: columns named as the inputs, or all '
        "columns for a model with one input.",
    )
    chunk_rows = serializers.IntegerField(required=False, min_value=1, max_value=1_000_000)
    max_errors = serializers.IntegerField(
        required=False, min_value=-1, help_text="Rows allowed to fail; -1: any number."
    )

    def validate_mapping(self, value: str) -> dict[str, Any] | None:
        if not value.strip():
            return None
        try:
            loaded = json.loads(value)
        except ValueError as exc:
            raise serializers.ValidationError(f"mapping is not JSON: {exc}") from None
        if not isinstance(loaded, dict) or not all(
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(c, str) for c in v))
            for v in loaded.values()
        ):
            raise serializers.ValidationError(
                "mapping must be an object of input name -> column name or list of column names."
            )
        return loaded

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("file" in attrs) == ("input_job" in attrs):
            raise serializers.ValidationError("Give either file or input_job.")
        return attrs


class BatchJobSerializer(serializers.ModelSerializer[BatchJob]):
    model = serializers.CharField(source="version.model.name", read_only=True)
    version = serializers.IntegerField(source="version.number", read_only=True)
    percent = serializers.IntegerField(read_only=True)
    created_by = serializers.CharField(
        source="created_by.username", default=None, read_only=True, allow_null=True
    )
    output_url = serializers.SerializerMethodField()

    class Meta:
        model = BatchJob
        fields = [
            "id", "model", "version", "status", "cancel_requested", "input_name",
            "input_format", "input_size", "input_sha256", "columns", "mapping", "chunk_rows",
            "chunk_probe",
            "max_errors", "total_rows", "rows_done", "percent", "chunks_done", "errors",
            "rows_per_s", "eta_s", "first_errors", "error_code", "error", "runtime",
            "attempts", "output_name", "output_size", "output_sha256", "output_url",
            "mlflow_run_id", "created_by", "created_at", "updated_at", "started_at",
            "finished_at",
        ]  # fmt: skip

    def get_output_url(self, job: BatchJob) -> str | None:
        if not job.output_name:
            return None
        return f"/api/v1/batch-jobs/{job.pk}/output"
