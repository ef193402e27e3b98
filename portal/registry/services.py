"""Writing models and versions, and the version pipeline (validate, register, ready)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import TemporaryUploadedFile, UploadedFile
from django.db import IntegrityError, transaction
from django.db.models import F, Max, Q
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from deployer.convert.report import InvalidOptions
from deployer.errors import DeployerError, TrackingError
from deployer.images.build import BuiltImage, EngineUnavailable
from deployer.tracking import TrackingRequest, record_build, track_version
from portal.core import engine
from portal.core.api import Conflict
from portal.core.choices import EventLevel
from portal.core.services import StepTimer, event_record
from portal.registry import conversion
from portal.registry.choices import (
    FINAL_VERSION_STATUSES,
    WORKING_VERSION_STATUSES,
    SourceFormat,
    VersionStatus,
)
from portal.registry.models import Model, ModelVersion
from portal.registry.uploads import upload_sha256

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from portal.accounts.models import Team

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(name: str, *, default: str) -> str:
    """A file name that cannot leave its folder: base name only, safe characters only."""
    base = os.path.basename(name.replace("\\", "/")).strip()
    cleaned = _SAFE_NAME.sub("_", base).strip("._")[:100]
    return cleaned or default


# ---------------------------------------------------------------- models


def model_create(*, team: Team, name: str, description: str = "", user: User) -> Model:
    """Create a model in ``team``; names are unique within a team."""
    model = Model(team=team, name=name, description=description, created_by=user)
    model.full_clean(exclude=["team", "created_by"], validate_unique=False)
    try:
        with transaction.atomic():
            model.save()
            event_record(team=team, actor=user, model=model, step="model", message="Model created")
    except IntegrityError:
        raise ValidationError(
            {"name": f"A model named {name!r} already exists in this team."}, code="exists"
        ) from None
    return model


def model_update(*, model: Model, description: str, user: User) -> Model:
    """Change a model's description."""
    model.description = description
    model.full_clean(exclude=["team", "created_by"], validate_unique=False)
    model.save(update_fields=["description", "updated_at"])
    event_record(
        team=model.team, actor=user, model=model, step="model", message="Description changed"
    )
    return model


def model_delete(*, model: Model, user: User) -> None:
    """Delete a model, its versions and their files; refused while anything is deployed.

    Its images and containers, and the MLflow mark, are left to storage GC, which is
    queued once the deletion is committed.
    """
    from portal.deployments.choices import DeploymentStatus
    from portal.deployments.models import Revision
    from portal.registry.tasks import storage_collect

    if model.deployments.exclude(status=DeploymentStatus.STOPPED).exists():
        raise Conflict(
            f"{model.name} still has deployments. Stop or delete them first.",
            code="model_deployed",
        )
    folders = [version.storage_dir for version in model.versions.all()]
    with transaction.atomic():
        event_record(
            team=model.team,
            actor=user,
            step="model",
            level=EventLevel.WARNING,
            message=f"Model {model.name} deleted with {len(folders)} version(s)",
        )
        mlflow_name = model.mlflow_name
        # Revisions protect their versions: Django's collector does not see that the
        # same delete removes them through the deployments, so they go first.
        Revision.objects.filter(deployment__model=model).delete()
        model.delete()
        transaction.on_commit(partial(_remove_folders, folders))
        transaction.on_commit(partial(storage_collect.delay, [mlflow_name]))


def version_delete(*, version: ModelVersion, user: User) -> ModelVersion:
    """Delete one version; storage GC then removes its files and image and marks it in MLflow.

    Refused while a deployment serves it, is rolling it out, or could roll back to it
    (the retention policy), and while its pipeline is still running. The number is
    never reused.
    """
    from portal.registry.selectors import retained_versions
    from portal.registry.tasks import storage_collect

    with transaction.atomic():
        # The model's lock also serialises with uploads of the same model.
        Model.objects.select_for_update().get(pk=version.model_id)
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if locked.is_deleted:
            return locked
        if not locked.is_final:
            raise Conflict(
                f"Version {locked.number} is still {locked.get_status_display().lower()}; "
                "delete it once its pipeline has finished.",
                code="version_in_progress",
            )
        reasons = retained_versions(model=version.model).get(locked.pk)
        if reasons:
            raise Conflict(
                f"Version {locked.number} cannot be deleted: {'; '.join(reasons)}. Deploy "
                "another version or delete the deployment first.",
                code="version_retained",
            )
        locked.mark_deleted(user=user)
        event_record(
            team=version.model.team,
            actor=user,
            version=locked,
            step="delete",
            level=EventLevel.WARNING,
            message=f"Version {locked.number} deleted; its files and image are removed by "
            "the next storage collection",
        )
        transaction.on_commit(storage_collect.delay)
    return locked


def _remove_folders(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- upload


def version_upload(
    *,
    model: Model,
    file: UploadedFile,
    user: User,
    source_format: str = "",
    sample: UploadedFile | None = None,
    options: dict[str, Any] | None = None,
) -> ModelVersion:
    """Store an upload as the model's next version and queue its pipeline.

    ``source_format`` may be left empty: the pipeline detects it from the content.
    ``options`` are conversion options (opset, atol, rtol, quantize, optimize,
    dynamic_batch, override_reason).
    """
    from portal.registry.tasks import version_process as version_process_task

    if source_format and source_format not in SourceFormat.values:
        raise ValidationError(
            {"format": f"Unknown format {source_format!r}."}, code="unsupported_format"
        )
    try:
        stored_options = conversion.options_from_upload(options or {})
    except InvalidOptions as exc:
        raise ValidationError({"options": exc.message}, code=exc.code) from None
    file_name = safe_file_name(file.name or "", default="model.onnx")
    sample_name = safe_file_name(sample.name or "", default="sample.json") if sample else ""
    sha256 = upload_sha256(file)
    with transaction.atomic():
        locked = Model.objects.select_for_update().get(pk=model.pk)
        number = (locked.versions.aggregate(top=Max("number"))["top"] or 0) + 1
        version = ModelVersion.objects.create(
            model=locked,
            number=number,
            source_format=source_format,
            file_name=file_name,
            size_bytes=file.size or 0,
            sha256=sha256,
            sample_file_name=sample_name,
            options=stored_options,
            created_by=user,
            progress=5,
        )
        try:
            _store(file, version.upload_path)
            if sample is not None and version.sample_path is not None:
                _store(sample, version.sample_path)
            event_record(
                team=model.team,
                actor=user,
                version=version,
                step="upload",
                message=f"Uploaded {file_name} ({_size(version.size_bytes)}, "
                f"sha256 {sha256[:12]}…)",
                data={"sha256": sha256, "size_bytes": version.size_bytes},
            )
        except BaseException:
            shutil.rmtree(version.storage_dir, ignore_errors=True)
            raise
        transaction.on_commit(partial(version_process_task.delay, version.pk))
    return version


def _store(uploaded: UploadedFile, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(uploaded, TemporaryUploadedFile):
        uploaded.flush()
        os.replace(uploaded.temporary_file_path(), target)
        return
    with target.open("wb") as out:
        for chunk in uploaded.chunks():
            out.write(chunk)


def file_sha256(path: Path) -> str:
    """The sha256 of a stored file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _size(num_bytes: int) -> str:
    from deployer.units import format_bytes  # the one size convention of pages and logs

    return format_bytes(num_bytes)


# ---------------------------------------------------------------- pipeline


def version_claim(*, version_id: int) -> ModelVersion | None:
    """Take a version for processing, counting the attempt; None if nothing is to do."""
    # A version in the building step belongs to the build task on the deploy queue.
    claimable = [VersionStatus.UPLOADED, *(WORKING_VERSION_STATUSES - {VersionStatus.BUILDING})]
    claimed = ModelVersion.objects.filter(
        pk=version_id,
        status__in=claimable,
        attempts__lt=settings.MODELPORT_TASK_MAX_ATTEMPTS,
    ).update(
        attempts=F("attempts") + 1,
        started_at=Coalesce(F("started_at"), Now()),
        updated_at=Now(),
    )
    if claimed:
        return ModelVersion.objects.select_related("model__team").get(pk=version_id)
    leftover = ModelVersion.objects.filter(pk=version_id).exclude(
        status__in=[*FINAL_VERSION_STATUSES, VersionStatus.BUILDING]
    )
    for version in leftover.select_related("model__team"):
        version_give_up(version=version, reason="it kept failing")
    return None


def version_process(*, version_id: int, engine_access: bool = False) -> None:
    """Run the pipeline of one version, doing only the steps not done yet.

    ``engine_access`` says whether this process may talk to Docker (only the deploy
    worker may); a conversion that needs a container is handed over to it.
    Raises ``TrackingError`` for MLflow outages (the task retries); every other
    failure ends the version as ``failed`` with a message that names the cause.
    """
    version = version_claim(version_id=version_id)
    if version is None:
        return
    try:
        if not version.signature or not version.served_file:
            try:
                conversion.version_prepare(version, engine_access=engine_access)
            except conversion.NeedsEngineWorker:
                _hand_to_engine_worker(version)
                return
        if not version.mlflow_version:
            _register(version)
        if engine.builds_images() and not version.image_ref:
            _queue_build(version)
            return
    except TrackingError:
        raise
    except DeployerError as exc:
        _fail(version, code=exc.code, message=exc.message)
        return
    except Exception as exc:
        log.exception("version %s failed unexpectedly", version.pk)
        _fail(
            version,
            code="internal_error",
            message=f"An unexpected error stopped the pipeline: {exc}. Upload again; if it "
            "happens again, report it with this message.",
        )
        return
    _mark_ready(version)


def _tensor_text(tensor: dict[str, Any]) -> str:
    dims = ",".join("?" if d < 0 else str(d) for d in tensor["shape"])
    return f"{tensor['name']} {tensor['datatype']}[{dims}]"


def _register(version: ModelVersion) -> None:
    version.advance(status=VersionStatus.REGISTERING, step="register", progress=70)
    timer = StepTimer()
    model = version.model
    validation = version.report.get("validation", {})
    served = version.served_model_path
    assert served is not None
    conversion_params, conversion_metrics, originals = conversion.mlflow_extras(version)
    result = track_version(
        TrackingRequest(
            target=engine.tracking_target(),
            registered_model=model.mlflow_name,
            version_uid=str(version.uid),
            run_name=f"{model.name} v{version.number}",
            model_path=served,
            description=f"ModelPort {model.team.slug}/{model.name} version {version.number}",
            params={
                "source_format": version.source_format,
                "file_name": version.file_name,
                "sha256": version.sha256,
                "onnx_ir_version": str(validation.get("ir_version", "")),
                "opsets": ",".join(f"{k}={v}" for k, v in validation.get("opsets", {}).items()),
                "onnxruntime_version": str(validation.get("onnxruntime_version", "")),
                "sample_source": str(validation.get("sample_source", "")),
                **conversion_params,
            },
            metrics={
                "size_bytes": float(version.size_bytes),
                "parameter_count": float(validation.get("parameter_count", 0)),
                **{f"validation_{k}": float(v) for k, v in validation.get("timings", {}).items()},
                **conversion_metrics,
            },
            tags={
                "modelport_team": model.team.slug,
                "modelport_model": model.name,
                "modelport_version": str(version.number),
                "modelport_sha256": version.sha256,
            },
            documents={"report.json": version.report, "signature.json": version.signature},
            artifacts=(version.known_answer_path, *originals),
        )
    )
    version.mlflow_run_id = result.run_id
    version.mlflow_version = result.registry_version
    version.report = {**version.report, "mlflow": {"experiment_id": result.experiment_id}}
    version.progress = 95
    version.save(
        update_fields=["mlflow_run_id", "mlflow_version", "report", "progress", "updated_at"]
    )
    event_record(
        team=model.team,
        version=version,
        step="register",
        message=f"Recorded in MLflow as {model.mlflow_name} version {result.registry_version}",
        duration_ms=timer.ms,
        data={"run_id": result.run_id},
    )


# ---------------------------------------------------------------- image build (containers)


def _hand_to_engine_worker(version: ModelVersion) -> None:
    """Continue the pipeline on a convert worker, which may start sandbox containers."""
    from portal.registry.tasks import version_convert as version_convert_task

    # The hand-off is not a failed attempt.
    ModelVersion.objects.filter(pk=version.pk).update(attempts=F("attempts") - 1)
    event_record(
        team=version.model.team,
        version=version,
        step="convert",
        message="Converting in a sandbox container on a convert worker (one that talks to "
        "the Docker engine)",
    )
    transaction.on_commit(partial(version_convert_task.delay, version.pk))


def _queue_build(version: ModelVersion) -> None:
    """Hand the version to a convert worker (one that talks to Docker) for its image."""
    from portal.registry.tasks import version_build as version_build_task

    version.advance(status=VersionStatus.BUILDING, step="build", progress=80)
    # The build counts its own attempts: a pipeline retry is not a failed build.
    ModelVersion.objects.filter(pk=version.pk).update(attempts=0)
    transaction.on_commit(partial(version_build_task.delay, version.pk))


def version_build(*, version_id: int) -> None:
    """The building step: make the version's model image, record its size and build time.

    Runs on a convert worker. Idempotent: the image is tagged by content, so a
    retry after a crash finds or finishes the same image and never makes a second.
    Raises ``EngineUnavailable`` when Docker does not answer (the task retries).
    """
    claimed = ModelVersion.objects.filter(
        pk=version_id,
        status=VersionStatus.BUILDING,
        attempts__lt=settings.MODELPORT_TASK_MAX_ATTEMPTS,
    ).update(attempts=F("attempts") + 1, updated_at=Now())
    version = ModelVersion.objects.select_related("model__team").filter(pk=version_id).first()
    if version is None or not claimed:
        if version is not None and version.status == VersionStatus.BUILDING:
            version_give_up(version=version, reason="the image build kept failing")
        return
    if engine.runtime_name() != "docker":
        _mark_ready(version, "(no Docker engine here: it will run as a local process)")
        return
    timer = StepTimer()
    try:
        built = version_image_ensure(version=version, device="cpu", on_line=_BuildLog(version))
    except EngineUnavailable:
        raise
    except DeployerError as exc:
        _fail(version, code=exc.code, message=exc.message)
        return
    figures = {
        "image_build_seconds": round(timer.ms / 1000, 3),
        "image_size_bytes": built.size_bytes,
        "image_model_layer_bytes": built.own_layer_bytes,
    }
    version.refresh_from_db(fields=["report"])
    version.image_ref = built.ref
    version.report = {
        **version.report,
        "image": {"ref": built.ref, "id": built.image_id, **figures},
    }
    version.save(update_fields=["image_ref", "report", "updated_at"])
    verb = "Found the identical image" if built.cached else "Built image"
    event_record(
        team=version.model.team,
        version=version,
        step="build",
        message=f"{verb} {built.ref}: model layer {_size(built.own_layer_bytes)}, image "
        f"{_size(built.size_bytes)}",
        duration_ms=timer.ms,
        data=figures,
    )
    if version.mlflow_run_id:
        try:
            record_build(
                engine.tracking_target(),
                version.mlflow_run_id,
                metrics={key: float(value) for key, value in figures.items()},
                tags={"modelport_image": built.ref},
            )
        except TrackingError as exc:
            event_record(
                team=version.model.team,
                version=version,
                step="build",
                level=EventLevel.WARNING,
                message=f"The build figures were not recorded in MLflow: {exc.message}",
            )
    _mark_ready(version)


def version_image_ensure(
    *, version: ModelVersion, device: str, on_line: Callable[[str], None]
) -> BuiltImage:
    """The version's model image for ``device``, built unless identical content exists."""
    served = version.served_model_path
    if served is None or not served.is_file():
        raise DeployerError(f"Version {version.number} has no served model file to package.")
    model = version.model
    built = engine.model_image(
        model_path=served,
        sha256=file_sha256(served),
        device=device,
        labels={
            "modelport.installation": settings.MODELPORT_INSTALLATION_ID,
            "modelport.team": model.team.slug,
            "modelport.model": model.name,
            "modelport.version": str(version.number),
            "modelport.version-uid": str(version.uid),
        },
        log=on_line,
        warmup_sample=version.warmup_sample_path,
    )
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        images = {**locked.report.get("images", {}), device: built.ref}
        locked.report = {**locked.report, "images": images}
        locked.save(update_fields=["report", "updated_at"])
    version.report = locked.report
    return built


class _BuildLog:
    """Receives build lines: all go to the version's build.log, the milestones to the timeline."""

    MILESTONES = ("Building", "Built", "Downloading wheels", "Wheelhouse", "Pulling", "Using")

    def __init__(self, version: ModelVersion) -> None:
        self.version = version
        self.path = version.storage_dir / "build.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.touched = 0.0

    def __call__(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")
        step = re.match(r"^Step (\d+)/(\d+) : (\w+)", line)
        if (step and step.group(3) != "LABEL") or line.startswith(self.MILESTONES):
            event_record(
                team=self.version.model.team,
                version=self.version,
                step="build",
                message=line[:500],
            )
        now = time.monotonic()
        if now - self.touched > 5:
            # A long build is still alive: reconcile must not hand it to another worker.
            self.touched = now
            ModelVersion.objects.filter(pk=self.version.pk).update(updated_at=Now())


def _fail(version: ModelVersion, *, code: str, message: str) -> None:
    step = version.step or "pipeline"
    version.mark_failed(code=code, message=message)
    event_record(
        team=version.model.team,
        version=version,
        step=step,
        level=EventLevel.ERROR,
        message=message,
        data={"code": code},
    )


def version_give_up(*, version: ModelVersion, reason: str) -> None:
    """End a version that cannot finish, with a message that says what happened."""
    if version.status in FINAL_VERSION_STATUSES:
        return
    if version.status == VersionStatus.BUILDING:
        message = (
            f"The model image could not be built after {version.attempts} attempts ({reason}). "
            "Check the Docker engine on the convert worker's host, then upload the file again."
        )
        code = "build_failed"
    elif version.status == VersionStatus.REGISTERING:
        message = (
            f"MLflow could not record this version after {version.attempts} attempts ({reason}). "
            "Check the MLflow server and upload the file again."
        )
        code = "tracking_failed"
    else:
        message = (
            f"Processing stopped after {version.attempts} attempts ({reason}). Upload the file "
            "again; if it fails the same way, the model is probably too large for the limits."
        )
        code = "gave_up"
    _fail(version, code=code, message=message)


def versions_reconcile() -> dict[str, int]:
    """Hand lost or stuck versions back to a worker, or end them when out of attempts."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.MODELPORT_STALE_AFTER_S)
    lost = now - timedelta(seconds=60)
    stuck = ModelVersion.objects.filter(
        Q(status=VersionStatus.UPLOADED, updated_at__lt=lost)
        | Q(status__in=WORKING_VERSION_STATUSES, updated_at__lt=stale)
    ).select_related("model__team")
    counts = {"requeued": 0, "failed": 0}
    for version in stuck:
        if version.attempts >= settings.MODELPORT_TASK_MAX_ATTEMPTS:
            version_give_up(version=version, reason="no worker finished it")
            counts["failed"] += 1
        else:
            ModelVersion.objects.filter(pk=version.pk).update(updated_at=now)
            _requeue(version)
            counts["requeued"] += 1
    return counts


def _requeue(version: ModelVersion) -> None:
    from portal.registry.tasks import version_build as version_build_task
    from portal.registry.tasks import version_process as version_process_task

    if version.status == VersionStatus.BUILDING:
        version_build_task.delay(version.pk)
    else:
        version_process_task.delay(version.pk)


def _mark_ready(version: ModelVersion, note: str = "") -> None:
    version.mark_ready()
    event_record(
        team=version.model.team,
        version=version,
        step="ready",
        level=EventLevel.SUCCESS,
        message=f"Version {version.number} is ready to deploy {note}".rstrip(),
    )
