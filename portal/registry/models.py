"""Models and their versions."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

if TYPE_CHECKING:
    from django.contrib.auth.models import User

from portal.accounts.models import Team
from portal.registry.choices import FINAL_VERSION_STATUSES, SourceFormat, VersionStatus

# Lower-case DNS-label-like names: safe in URLs, MLflow names, image tags and routes.
NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
name_validator = RegexValidator(
    NAME_RE,
    "Use 1-63 lower-case letters, digits and hyphens, starting and ending with a letter "
    "or digit (for example fraud-detector).",
    code="invalid_name",
)


class Model(models.Model):
    """A named model owned by a team; its uploads are its versions."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="models")
    name = models.CharField(max_length=63, validators=[name_validator])
    description = models.TextField(blank=True, max_length=4000)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="model_unique_name_per_team"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def mlflow_name(self) -> str:
        """The registered model's name in MLflow, unique across teams."""
        return f"{self.team.slug}.{self.name}"


class ModelVersion(models.Model):
    """One upload of a model and the row that tracks its pipeline."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # Blank until the pipeline's detect step reads the file (unless the uploader stated it).
    source_format = models.CharField(max_length=32, choices=SourceFormat.choices, blank=True)
    file_name = models.CharField(max_length=255)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64, db_index=True)
    sample_file_name = models.CharField(max_length=255, blank=True)
    # The ONNX file deployments serve, relative to the version's storage folder.
    served_file = models.CharField(max_length=255, blank=True)

    status = models.CharField(
        max_length=16, choices=VersionStatus.choices, default=VersionStatus.UPLOADED
    )
    step = models.CharField(max_length=32, blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    error_code = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)

    signature = models.JSONField(default=dict, blank=True)
    report = models.JSONField(default=dict, blank=True)
    # The uploader's conversion options (deployer.convert.report.ConversionOptions fields).
    options = models.JSONField(default=dict, blank=True)
    mlflow_run_id = models.CharField(max_length=64, blank=True)
    mlflow_version = models.CharField(max_length=32, blank=True)
    image_ref = models.CharField(max_length=255, blank=True)

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Set by version_delete; purged_at once storage GC removed its files and image.
    deleted_at = models.DateTimeField(null=True, blank=True)
    deleted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    purged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["model", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["model", "number"], name="version_unique_number"),
            models.CheckConstraint(
                condition=models.Q(progress__lte=100), name="version_progress_max"
            ),
        ]
        indexes = [models.Index(fields=["status", "updated_at"])]

    def __str__(self) -> str:
        return f"{self.model.name} v{self.number}"

    # ------------------------------------------------------------ storage
    @property
    def storage_dir(self) -> Path:
        """The folder holding everything of this version, and nothing else."""
        return Path(settings.MODELPORT_STORAGE_DIR) / "versions" / str(self.uid)

    @property
    def upload_path(self) -> Path:
        return self.storage_dir / "upload" / self.file_name

    @property
    def sample_path(self) -> Path | None:
        if not self.sample_file_name:
            return None
        return self.storage_dir / "sample" / self.sample_file_name

    @property
    def served_model_path(self) -> Path | None:
        """The ONNX file that deployments serve, once the pipeline has produced it."""
        return self.storage_dir / self.served_file if self.served_file else None

    @property
    def known_answer_path(self) -> Path:
        return self.storage_dir / "known_answer.npz"

    @property
    def warmup_sample_path(self) -> Path | None:
        """The recorded sample the serving instance warms up with (None before validation)."""
        path = self.known_answer_path
        return path if path.is_file() else None

    # ------------------------------------------------------------ state
    @property
    def is_final(self) -> bool:
        return self.status in FINAL_VERSION_STATUSES

    @property
    def is_ready(self) -> bool:
        return self.status == VersionStatus.READY

    def advance(self, *, status: str, step: str, progress: int) -> None:
        """Move to a working step of the pipeline."""
        self.status, self.step, self.progress = status, step, progress
        self.save(update_fields=["status", "step", "progress", "updated_at"])

    def mark_ready(self) -> None:
        """Finish the pipeline successfully."""
        self.status, self.step, self.progress = VersionStatus.READY, "", 100
        self.error_code, self.error, self.finished_at = "", "", timezone.now()
        self.save(
            update_fields=[
                "status",
                "step",
                "progress",
                "error_code",
                "error",
                "finished_at",
                "updated_at",
            ]
        )

    @property
    def is_deleted(self) -> bool:
        return self.status == VersionStatus.DELETED

    def mark_deleted(self, *, user: User | None) -> None:
        """Hide the version for good; storage GC removes what it stored."""
        self.status, self.deleted_at, self.deleted_by = VersionStatus.DELETED, timezone.now(), user
        self.save(update_fields=["status", "deleted_at", "deleted_by", "updated_at"])

    def mark_failed(self, *, code: str, message: str) -> None:
        """Finish the pipeline with an error a user can act on; the failed step stays visible."""
        self.status, self.error_code, self.error = VersionStatus.FAILED, code, message
        self.finished_at = timezone.now()
        self.save(update_fields=["status", "error_code", "error", "finished_at", "updated_at"])
