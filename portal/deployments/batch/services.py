"""Creating, running, cancelling and resuming batch jobs.

The engine (``deployer.batch``) does the work; these functions keep the row in
step with it. A run holds an exclusive lock on the job's folder for as long as it
lives (the kernel drops it when the process dies), so a redelivered task never runs
beside a live one, and a run after a crash resumes from the engine's checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.files.uploadedfile import TemporaryUploadedFile, UploadedFile
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from deployer.batch import (
    DEFAULT_CHUNK_ROWS,
    OUTPUT_SUFFIX,
    BatchCancelled,
    BatchFailed,
    BatchInputError,
    BatchProgress,
    BatchRequest,
    BatchResult,
    InstanceRequest,
    MappingError,
    V2Scorer,
    detect_format,
    plan_batch,
    probe_chunk_rows,
    run_batch,
    serving_instance,
)
from deployer.errors import DeployerError, TrackingError
from deployer.images.build import image_get
from deployer.runtimes.base import Runtime
from deployer.runtimes.docker import DockerRuntime
from deployer.signature import Signature
from deployer.tracking import BatchRunRecord, record_batch_run
from portal.core import engine
from portal.core.api import ApiError, Conflict
from portal.deployments.batch.models import BatchJob
from portal.deployments.choices import BatchJobStatus
from portal.registry.models import ModelVersion
from portal.registry.uploads import upload_sha256

if TYPE_CHECKING:
    from django.contrib.auth.models import User

log = logging.getLogger(__name__)
# Least time between two reads of the cancel flag, and between two progress writes.
_POLL_S = 0.5


def batch_job_create(
    *,
    version: ModelVersion,
    user: User,
    file: UploadedFile | None = None,
    source_job: BatchJob | None = None,
    mapping: Mapping[str, str | Sequence[str]] | None = None,
    chunk_rows: int | None = None,
    max_errors: int | None = None,
) -> BatchJob:
    """Store the input (an upload, or the input of an earlier job), check it against the
    version's signature, and queue the job. A mismatch is refused here, before any job."""
    from portal.deployments.tasks import batch_job_run as run_task
    from portal.registry.services import safe_file_name

    if not version.is_ready or version.served_model_path is None:
        raise Conflict(
            f"Version {version.number} is not ready (status {version.status}); only a ready "
            "version can score a batch.",
            code="version_not_ready",
        )
    if (file is None) == (source_job is None):
        raise ApiError("Give either a file or input_job (a stored input).", code="input_required")
    name = safe_file_name(
        file.name or "" if file is not None else source_job.input_name,  # type: ignore[union-attr]
        default="input.csv",
    )
    try:
        fmt = detect_format(name)
    except BatchInputError as exc:
        raise ApiError(exc.message, code=exc.code) from None
    job = BatchJob(
        version=version,
        input_name=name,
        input_format=str(fmt),
        chunk_rows=chunk_rows or settings.MODELPORT_BATCH_CHUNK_ROWS,
        max_errors=settings.MODELPORT_BATCH_MAX_ERRORS if max_errors is None else max_errors,
        created_by=user,
    )
    try:
        job.input_path.parent.mkdir(parents=True, exist_ok=True)
        if file is not None:
            job.input_sha256 = upload_sha256(file)
            _store(file, job.input_path)
        else:
            assert source_job is not None
            os.link(source_job.input_path, job.input_path)  # same bytes, no copy
            job.input_sha256 = source_job.input_sha256
        job.input_size = job.input_path.stat().st_size
        signature = Signature.from_dict(version.signature)
        plan = plan_batch(
            signature, job.input_path, fmt, mapping, chunk_rows=job.chunk_rows or DEFAULT_CHUNK_ROWS
        )
    except (MappingError, BatchInputError) as exc:
        shutil.rmtree(job.storage_dir, ignore_errors=True)
        raise ApiError(exc.message, code=exc.code) from None
    except BaseException:
        shutil.rmtree(job.storage_dir, ignore_errors=True)
        raise
    job.columns = [c.to_dict() for c in plan.columns]
    job.mapping = plan.mapping.as_dict()
    job.total_rows = plan.total_rows
    with transaction.atomic():
        job.save()
        transaction.on_commit(partial(run_task.delay, job.pk))
    return job


def _store(uploaded: UploadedFile, target: Path) -> None:
    if isinstance(uploaded, TemporaryUploadedFile):
        uploaded.flush()
        os.replace(uploaded.temporary_file_path(), target)
        return
    with target.open("wb") as out:
        for chunk in uploaded.chunks():
            out.write(chunk)


def batch_job_cancel(*, job: BatchJob, user: User) -> BatchJob:
    """Cancel a queued job at once, or ask a running one to stop after its chunk."""
    del user  # any member may cancel; recorded by the caller's access check
    now = timezone.now()
    BatchJob.objects.filter(pk=job.pk, status=BatchJobStatus.QUEUED).update(
        status=BatchJobStatus.CANCELLED, finished_at=now, cancel_requested=True
    )
    BatchJob.objects.filter(pk=job.pk, status=BatchJobStatus.RUNNING).update(cancel_requested=True)
    job.refresh_from_db()
    return job


@contextlib.contextmanager
def _job_lock(job: BatchJob) -> Iterator[bool]:
    """Whether this process holds the job's lock (held until the block ends or it dies)."""
    job.storage_dir.mkdir(parents=True, exist_ok=True)
    handle = (job.storage_dir / "run.lock").open("a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        handle.close()


def batch_job_running_elsewhere(job: BatchJob) -> bool:
    """Whether a live process holds the job's lock."""
    with _job_lock(job) as mine:
        return not mine


def batch_job_run(*, job_id: int) -> bool:
    """Run (or resume) a job; False when another live process runs it now."""
    job = BatchJob.objects.select_related("version__model__team").filter(pk=job_id).first()
    if job is None or job.is_final:
        return True
    with _job_lock(job) as mine:
        if not mine:
            return False
        claimed = BatchJob.objects.filter(
            pk=job_id, status__in=[BatchJobStatus.QUEUED, BatchJobStatus.RUNNING]
        ).update(
            status=BatchJobStatus.RUNNING,
            attempts=F("attempts") + 1,
            worker_pid=os.getpid(),
            started_at=job.started_at or timezone.now(),
        )
        if not claimed:
            return True
        job.refresh_from_db()
        if job.cancel_requested:
            _finish(job, BatchJobStatus.CANCELLED)
            return True
        _run(job)
    return True


def _run(job: BatchJob) -> None:
    version = job.version
    runtime = engine.batch_runtime()
    BatchJob.objects.filter(pk=job.pk).update(runtime=runtime.name)
    served = version.served_model_path
    assert served is not None
    fmt = detect_format(job.input_name)
    output = job.storage_dir / "output" / f"{Path(job.input_name).stem}-predictions"
    output = output.with_suffix(OUTPUT_SUFFIX[fmt])
    output.parent.mkdir(parents=True, exist_ok=True)
    request = BatchRequest(
        input_path=job.input_path,
        input_format=fmt,
        work_dir=job.work_dir,
        output_path=output,
        chunk_rows=job.chunk_rows,
        mapping=job.mapping,
        max_errors=job.max_errors,
    )
    signature = Signature.from_dict(version.signature)
    try:
        image = _image_for(version, runtime)
        instance = InstanceRequest(
            job_id=job.pk,
            model_name=version.model.name,
            model_version=str(version.number),
            model_path=served,
            image=image,
            work_dir=job.work_dir,
            cpus=float(settings.MODELPORT_BATCH_CPUS),
            memory_mb=settings.MODELPORT_BATCH_MEMORY_MB,
            ready_timeout_s=float(settings.MODELPORT_READY_TIMEOUT_S),
        )
        with serving_instance(runtime, instance) as (launch, headers):
            scorer = V2Scorer(launch.url, version.model.name, signature, headers=headers)
            try:
                if not job.chunk_rows:
                    request = replace(request, chunk_rows=_chunk_rows_probe(job, request, scorer))
                result = run_batch(
                    request,
                    scorer,
                    on_progress=partial(_record_progress, job.pk),
                    should_stop=_cancel_flag(job.pk),
                )
            finally:
                scorer.close()
    except BatchCancelled:
        _finish(job, BatchJobStatus.CANCELLED)
        return
    except BatchFailed as exc:
        BatchJob.objects.filter(pk=job.pk).update(first_errors=exc.first_errors)
        _finish(job, BatchJobStatus.FAILED, code=exc.code, message=exc.message)
        return
    except DeployerError as exc:
        _finish(job, BatchJobStatus.FAILED, code=exc.code, message=exc.message)
        return
    _succeeded(job, result)


def _chunk_rows_probe(job: BatchJob, request: BatchRequest, scorer: V2Scorer) -> int:
    """Try a few chunk sizes on the job's first rows; record and return the fastest (a
    resumed job keeps it: its checkpoint is only valid for that size)."""
    probe = probe_chunk_rows(request, scorer)
    job.chunk_rows = probe.chosen
    job.chunk_probe = {
        "chosen": probe.chosen,
        "rows_per_s": {str(rows): round(rate, 1) for rows, rate in probe.rows_per_s.items()},
    }
    BatchJob.objects.filter(pk=job.pk).update(
        chunk_rows=job.chunk_rows, chunk_probe=job.chunk_probe
    )
    log.info("batch job %s: %s", job.pk, probe.describe())
    return probe.chosen


def _image_for(version: ModelVersion, runtime: Runtime) -> str:
    """The version's serving image (containers only), built now if the engine lacks it."""
    if not isinstance(runtime, DockerRuntime):
        return ""
    from portal.registry.services import version_image_ensure

    known = version.image_ref or str(version.report.get("images", {}).get("cpu", ""))
    if known and image_get(runtime.client, known) is not None:
        return known
    return version_image_ensure(version=version, device="cpu", on_line=lambda _line: None).ref


def _record_progress(job_id: int, progress: BatchProgress) -> None:
    BatchJob.objects.filter(pk=job_id).update(
        rows_done=progress.rows_done,
        chunks_done=progress.chunks_done,
        total_rows=max(progress.total_rows, progress.rows_done),
        errors=progress.errors,
        rows_per_s=round(progress.rows_per_s, 1),
        eta_s=None if progress.eta_s is None else round(progress.eta_s, 1),
        first_errors=progress.first_errors,
        updated_at=Now(),
    )


def _cancel_flag(job_id: int) -> Any:
    last = [0.0, False]

    def should_stop() -> bool:
        if time.monotonic() - float(last[0]) >= _POLL_S:
            last[0] = time.monotonic()
            last[1] = BatchJob.objects.filter(pk=job_id, cancel_requested=True).exists()
        return bool(last[1])

    return should_stop


def _finish(job: BatchJob, status: str, *, code: str = "", message: str = "") -> None:
    BatchJob.objects.filter(pk=job.pk).update(
        status=status,
        error_code=code,
        error=message,
        worker_pid=0,
        eta_s=None,
        finished_at=timezone.now(),
    )
    if status == BatchJobStatus.CANCELLED:
        shutil.rmtree(job.work_dir, ignore_errors=True)


def _succeeded(job: BatchJob, result: BatchResult) -> None:
    version = job.version
    run_id = ""
    try:
        run_id = record_batch_run(
            BatchRunRecord(
                target=engine.tracking_target(),
                registered_model=version.model.mlflow_name,
                job_uid=str(job.uid),
                run_name=f"batch {job.pk}: {job.input_name} with v{version.number}",
                parent_run_id=version.mlflow_run_id,
                params={
                    "input_name": job.input_name,
                    "input_format": job.input_format,
                    "input_sha256": result.input_sha256,
                    "output_sha256": result.output_sha256,
                    "chunk_rows": str(job.chunk_rows),
                    "max_errors": str(job.max_errors),
                    "mapping": str(result.mapping)[:500],
                    "model_version": str(version.number),
                },
                metrics={
                    "rows": float(result.rows),
                    "errors": float(result.errors),
                    "rows_per_s": result.rows_per_s,
                    "seconds": result.seconds,
                },
                tags={"modelport_kind": "batch", "modelport_team": version.model.team.slug},
            )
        )
    except TrackingError as exc:
        log.warning("batch job %s: %s", job.pk, exc.message)
    BatchJob.objects.filter(pk=job.pk).update(
        status=BatchJobStatus.SUCCEEDED,
        rows_done=result.rows,
        total_rows=result.rows,
        errors=result.errors,
        first_errors=result.first_errors,
        rows_per_s=round(result.rows_per_s, 1),
        eta_s=None,
        output_name=result.output_path.name,
        output_size=result.output_path.stat().st_size,
        output_sha256=result.output_sha256,
        input_sha256=result.input_sha256,
        mlflow_run_id=run_id,
        worker_pid=0,
        finished_at=timezone.now(),
    )
    shutil.rmtree(job.work_dir, ignore_errors=True)


def batch_jobs_resume() -> int:
    """Hand running jobs that lost their worker (row untouched, lock free) back to one."""
    from portal.deployments.tasks import batch_job_run as run_task

    stale = timezone.now() - timedelta(seconds=settings.MODELPORT_BATCH_STALE_S)
    handed = 0
    for job in BatchJob.objects.filter(status=BatchJobStatus.RUNNING, updated_at__lt=stale):
        if batch_job_running_elsewhere(job):
            continue
        BatchJob.objects.filter(pk=job.pk).update(updated_at=Now(), worker_pid=0)
        run_task.delay(job.pk)
        handed += 1
    return handed
