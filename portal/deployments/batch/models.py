"""The row behind every batch job: its input, mapping, live progress and outcome."""

from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings
from django.db import models

from portal.deployments.choices import FINAL_BATCH_STATUSES, BatchJobStatus
from portal.registry.models import ModelVersion


class BatchJob(models.Model):
    """One dataset scored with one model version, chunk by chunk, in a batch worker."""

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="batch_jobs")
    status = models.CharField(
        max_length=16, choices=BatchJobStatus.choices, default=BatchJobStatus.QUEUED
    )
    cancel_requested = models.BooleanField(default=False)

    input_name = models.CharField(max_length=255)
    input_format = models.CharField(max_length=16)
    input_size = models.BigIntegerField(default=0)
    input_sha256 = models.CharField(max_length=64, blank=True)
    # The file's columns (deployer.batch.formats.Column.to_dict) and input -> columns.
    columns = models.JSONField(default=list, blank=True)
    mapping = models.JSONField(default=dict, blank=True)
    # Rows per chunk; 0 until the job starts and tries a few sizes on its first rows.
    chunk_rows = models.PositiveIntegerField(default=0)
    # What that try measured ({"chosen": rows, "rows_per_s": {rows: rate}}); empty when
    # the job was given its chunk size.
    chunk_probe = models.JSONField(default=dict, blank=True)
    # Rows allowed to fail before the job fails; -1: any number.
    max_errors = models.IntegerField(default=100)

    total_rows = models.BigIntegerField(default=0)
    rows_done = models.BigIntegerField(default=0)
    chunks_done = models.PositiveIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    rows_per_s = models.FloatField(default=0)
    eta_s = models.FloatField(null=True, blank=True)
    first_errors = models.JSONField(default=list, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)

    runtime = models.CharField(max_length=16, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    # The process running it now (a batch worker's pool process); 0 when none.
    worker_pid = models.PositiveIntegerField(default=0)
    output_name = models.CharField(max_length=255, blank=True)
    output_size = models.BigIntegerField(default=0)
    output_sha256 = models.CharField(max_length=64, blank=True)
    mlflow_run_id = models.CharField(max_length=64, blank=True)

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # Touched after every chunk: a running job whose row stops changing lost its worker.
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(rows_done__lte=models.F("total_rows")),
                name="batch_job_rows_done_max",
            ),
        ]
        indexes = [models.Index(fields=["status", "updated_at"])]

    def __str__(self) -> str:
        return f"batch job {self.pk} ({self.version})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_BATCH_STATUSES

    @property
    def percent(self) -> int:
        return int(100 * self.rows_done / self.total_rows) if self.total_rows else 0

    @property
    def storage_dir(self) -> Path:
        return Path(settings.MODELPORT_STORAGE_DIR) / "batch" / str(self.uid)

    @property
    def input_path(self) -> Path:
        return self.storage_dir / "input" / self.input_name

    @property
    def work_dir(self) -> Path:
        return self.storage_dir / "work"

    @property
    def output_path(self) -> Path | None:
        return self.storage_dir / "output" / self.output_name if self.output_name else None
