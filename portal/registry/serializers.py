"""API shapes for models and versions. Serializers validate shape only."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from deployer.tracking import model_version_url, run_url
from portal.registry.choices import SourceFormat, VersionStatus
from portal.registry.models import NAME_RE, Model, ModelVersion


class LatestVersionSerializer(serializers.Serializer[Any]):
    number = serializers.IntegerField()
    status = serializers.CharField()


class ModelSerializer(serializers.ModelSerializer[Model]):
    version_count = serializers.SerializerMethodField()
    latest_version = serializers.SerializerMethodField()

    class Meta:
        model = Model
        fields = [
            "name",
            "description",
            "version_count",
            "latest_version",
            "created_at",
            "updated_at",
        ]

    def get_version_count(self, obj: Model) -> int:
        count = getattr(obj, "version_count", None)
        if count is not None:
            return int(count)
        return obj.versions.exclude(status=VersionStatus.DELETED).count()

    def get_latest_version(self, obj: Model) -> dict[str, Any] | None:
        number = getattr(obj, "latest_number", None)
        if number is not None:
            return {"number": number, "status": obj.latest_status}  # type: ignore[attr-defined]
        latest = obj.versions.exclude(status=VersionStatus.DELETED).order_by("-number").first()
        return {"number": latest.number, "status": latest.status} if latest else None


class ModelCreateSerializer(serializers.Serializer[Any]):
    name = serializers.RegexField(
        NAME_RE,
        max_length=63,
        error_messages={
            "invalid": "Use 1-63 lower-case letters, digits and hyphens, starting and ending "
            "with a letter or digit (for example fraud-detector)."
        },
    )
    description = serializers.CharField(
        required=False, allow_blank=True, max_length=4000, default=""
    )


class ModelUpdateSerializer(serializers.Serializer[Any]):
    description = serializers.CharField(allow_blank=True, max_length=4000)


class MlflowSerializer(serializers.Serializer[Any]):
    registered_model = serializers.CharField()
    run_id = serializers.CharField()
    version = serializers.CharField()
    run_url = serializers.CharField(allow_blank=True)
    version_url = serializers.CharField(allow_blank=True)


class VersionSerializer(serializers.ModelSerializer[ModelVersion]):
    model = serializers.CharField(source="model.name", read_only=True)
    created_by = serializers.CharField(
        source="created_by.username", default=None, read_only=True, allow_null=True
    )
    mlflow = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields = [
            "model", "number", "status", "step", "progress", "error_code", "error",
            "source_format", "file_name", "size_bytes", "sha256", "signature", "report",
            "mlflow", "image_ref", "attempts", "created_by", "created_at", "started_at",
            "finished_at",
        ]  # fmt: skip

    def get_mlflow(self, obj: ModelVersion) -> dict[str, str] | None:
        if not obj.mlflow_run_id:
            return None
        ui = settings.MLFLOW_UI_URL
        experiment = str(obj.report.get("mlflow", {}).get("experiment_id", ""))
        name = obj.model.mlflow_name
        return {
            "registered_model": name,
            "run_id": obj.mlflow_run_id,
            "version": obj.mlflow_version,
            "run_url": run_url(ui, experiment, obj.mlflow_run_id) if ui else "",
            "version_url": model_version_url(ui, name, obj.mlflow_version)
            if ui and obj.mlflow_version
            else "",
        }


class VersionUploadSerializer(serializers.Serializer[Any]):
    file = serializers.FileField(allow_empty_file=True, use_url=False)
    format = serializers.ChoiceField(
        choices=SourceFormat.choices,
        required=False,
        allow_blank=True,
        help_text="Leave empty to detect the format from the file's content.",
    )
    sample_input = serializers.FileField(required=False, use_url=False)
    # Conversion options (stored on the version as ``options``).
    opset = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=7,
        max_value=30,
        help_text="ONNX opset to convert to; empty: the newest the serving onnxruntime and the "
        "converter share.",
    )
    atol = serializers.FloatField(
        required=False,
        allow_null=True,
        min_value=0,
        help_text="Absolute tolerance of the check for float outputs (default per datatype).",
    )
    rtol = serializers.FloatField(
        required=False,
        allow_null=True,
        min_value=0,
        help_text="Relative tolerance of the check for float outputs (default per datatype).",
    )
    quantize = serializers.ChoiceField(
        choices=[("", "none"), ("dynamic_int8", "dynamic int8")],
        required=False,
        allow_blank=True,
        help_text="Also try dynamic int8 quantization, served when it passes its own check.",
    )
    optimize = serializers.BooleanField(
        required=False,
        default=True,
        help_text="Serve onnxruntime's optimized model when it passes the same check.",
    )
    dynamic_batch = serializers.BooleanField(
        required=False, default=True, help_text="Export PyTorch models with a free batch axis."
    )
    override_reason = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=2000,
        help_text="Register the model even if its check fails, for this written reason.",
    )

    OPTION_FIELDS = ("opset", "atol", "rtol", "quantize", "optimize", "dynamic_batch")

    def options(self) -> dict[str, Any]:
        """The conversion options given (defaults left out)."""
        data: dict[str, Any] = self.validated_data
        options = {k: data[k] for k in self.OPTION_FIELDS if k in self.initial_data}
        if data.get("override_reason"):
            options["override_reason"] = data["override_reason"]
        return {k: v for k, v in options.items() if v not in (None, "")}
