"""Record model versions in MLflow: a run, a logged ONNX model, a registered version.

Every write is looked up first by the portal's version id (a tag), so a retried
job never creates a second run or a second registered version.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from deployer.errors import TrackingError

VERSION_TAG = "modelport_version_uid"
# On versions deleted in ModelPort (and on registered models of deleted models).
DELETED_TAG = "modelport_deleted"
LOGGED_MODEL_TAG = "modelport_logged_model_uri"
_lock = threading.Lock()


@dataclass(frozen=True)
class TrackingTarget:
    """Where to record: the MLflow server or store, and the experiment."""

    tracking_uri: str
    experiment: str
    artifact_root: str | None = None


@dataclass(frozen=True)
class TrackingRequest:
    """One portal version to record."""

    target: TrackingTarget
    registered_model: str
    version_uid: str
    run_name: str
    model_path: Path
    description: str = ""
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: tuple[Path, ...] = ()


@dataclass(frozen=True)
class TrackingResult:
    """Where the version was recorded."""

    experiment_id: str
    run_id: str
    registry_version: str


def _client(target: TrackingTarget) -> Any:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(target.tracking_uri)
    mlflow.set_registry_uri(target.tracking_uri)
    return MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)


def _experiment_id(client: Any, target: TrackingTarget) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(target.experiment)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if target.artifact_root and not target.tracking_uri.startswith(("http://", "https://")):
        location = Path(target.artifact_root).resolve().as_uri()
    try:
        return str(client.create_experiment(target.experiment, artifact_location=location))
    except MlflowException:
        # Another worker created it between our lookup and our create.
        found = client.get_experiment_by_name(target.experiment)
        if found is None:
            raise
        return str(found.experiment_id)


@contextmanager
def _mlflow_errors(action: str) -> Iterator[None]:
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:  # MLflow raises MlflowException, requests and OS errors alike
        raise TrackingError(
            f"MLflow could not {action}: {str(exc).splitlines()[0][:400]}. Check that the "
            "MLflow server (MLFLOW_TRACKING_URI) is up; the step is retried automatically.",
        ) from exc


def track_version(request: TrackingRequest) -> TrackingResult:
    """Record the version in MLflow, or return what an earlier attempt recorded."""
    with _lock, _mlflow_errors("record the version"):
        client = _client(request.target)
        experiment_id = _experiment_id(client, request.target)
        existing = _registered_version(client, request)
        if existing is not None:
            return TrackingResult(
                experiment_id=experiment_id,
                run_id=str(existing.run_id),
                registry_version=str(existing.version),
            )
        run_id, model_uri = _finished_run(client, experiment_id, request.version_uid)
        if run_id is None or model_uri is None:
            run_id, model_uri = _log_run(client, experiment_id, request)
        _ensure_registered_model(client, request)
        import mlflow

        # register_model resolves a logged model's models:/ URI, which a bare
        # create_model_version call against a tracking server does not.
        created = mlflow.register_model(
            model_uri,
            request.registered_model,
            tags={VERSION_TAG: request.version_uid, **request.tags},
        )
        if request.description:
            client.update_model_version(
                request.registered_model, created.version, description=request.description
            )
        return TrackingResult(
            experiment_id=experiment_id, run_id=run_id, registry_version=str(created.version)
        )


def _registered_version(client: Any, request: TrackingRequest) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(
            f"name = '{request.registered_model}' and tags.{VERSION_TAG} = '{request.version_uid}'"
        )
    except MlflowException:
        return None
    return versions[0] if versions else None


def _finished_run(
    client: Any, experiment_id: str, version_uid: str
) -> tuple[str | None, str | None]:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{VERSION_TAG} = '{version_uid}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if not runs:
        return None, None
    run = runs[0]
    return str(run.info.run_id), run.data.tags.get(LOGGED_MODEL_TAG)


def _log_run(client: Any, experiment_id: str, request: TrackingRequest) -> tuple[str, str]:
    import mlflow
    import mlflow.onnx
    import onnx

    tags = {VERSION_TAG: request.version_uid, **request.tags}
    with mlflow.start_run(experiment_id=experiment_id, run_name=request.run_name, tags=tags) as run:
        run_id = str(run.info.run_id)
        if request.params:
            mlflow.log_params(request.params)
        if request.metrics:
            mlflow.log_metrics(request.metrics)
        with tempfile.TemporaryDirectory() as tmp:
            for name, document in request.documents.items():
                path = Path(tmp) / name
                path.write_text(json.dumps(document, indent=2, sort_keys=True, default=str))
                mlflow.log_artifact(str(path))
        for artifact in request.artifacts:
            mlflow.log_artifact(str(artifact))
        info = mlflow.onnx.log_model(
            onnx.load(str(request.model_path)),
            name="model",
            pip_requirements=["onnxruntime", "onnx", "numpy"],
        )
        model_uri = str(info.model_uri)
        mlflow.set_tag(LOGGED_MODEL_TAG, model_uri)
    return run_id, model_uri


def _ensure_registered_model(client: Any, request: TrackingRequest) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(request.registered_model)
    except MlflowException:
        try:
            client.create_registered_model(
                request.registered_model, description="Managed by ModelPort."
            )
        except MlflowException:
            client.get_registered_model(request.registered_model)


def set_alias(target: TrackingTarget, registered_model: str, alias: str, version: str) -> None:
    """Point ``alias`` (for example ``production``) at a registered version."""
    with _lock, _mlflow_errors(f"move the alias {alias!r}"):
        _client(target).set_registered_model_alias(registered_model, alias, version)


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI."""
    return f"{ui_url}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(ui_url: str, registered_model: str, version: str) -> str:
    """The registered version's page in the MLflow UI."""
    return f"{ui_url}/#/models/{quote(registered_model)}/versions/{version}"


def record_build(
    target: TrackingTarget, run_id: str, *, metrics: dict[str, float], tags: dict[str, str]
) -> None:
    """Add an image build's figures to a version's run (a retry overwrites the same keys)."""
    from mlflow.entities import Metric, RunTag

    with _lock, _mlflow_errors("record the image build"):
        now = int(time.time() * 1000)
        _client(target).log_batch(
            run_id,
            metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )


def _not_found(exc: Exception) -> bool:
    code = str(getattr(exc, "error_code", ""))
    return code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower()


def version_mark_deleted(
    target: TrackingTarget, registered_model: str, version: str, *, deleted_at: str
) -> list[str]:
    """Tag a registered version ``modelport_deleted=true`` and drop the aliases on it.

    The version itself stays in MLflow: its run, metrics and artifacts are the
    audit trail of what was served. Returns the aliases removed. Idempotent; a
    version MLflow no longer has counts as marked.
    """
    from mlflow.exceptions import MlflowException

    with _lock, _mlflow_errors(f"mark version {version} of {registered_model} deleted"):
        client = _client(target)
        try:
            found = client.get_model_version(registered_model, version)
        except MlflowException as exc:
            if _not_found(exc):
                return []
            raise
        client.set_model_version_tag(registered_model, version, DELETED_TAG, "true")
        client.set_model_version_tag(registered_model, version, f"{DELETED_TAG}_at", deleted_at)
        removed = []
        for alias in list(getattr(found, "aliases", []) or []):
            client.delete_registered_model_alias(registered_model, alias)
            removed.append(str(alias))
        return removed


def registered_model_mark_deleted(
    target: TrackingTarget, registered_model: str, *, deleted_at: str
) -> int:
    """Mark a deleted model: the registered model and each of its versions get the tag.

    Returns how many versions were marked; a registered model MLflow does not have
    counts as done.
    """
    from mlflow.exceptions import MlflowException

    with _lock, _mlflow_errors(f"mark {registered_model} deleted"):
        client = _client(target)
        try:
            client.get_registered_model(registered_model)
        except MlflowException as exc:
            if _not_found(exc):
                return 0
            raise
        client.set_registered_model_tag(registered_model, DELETED_TAG, "true")
        client.set_registered_model_tag(registered_model, f"{DELETED_TAG}_at", deleted_at)
        versions = client.search_model_versions(f"name = '{registered_model}'")
        for found in versions:
            client.set_model_version_tag(registered_model, found.version, DELETED_TAG, "true")
            for alias in list(getattr(found, "aliases", []) or []):
                client.delete_registered_model_alias(registered_model, alias)
        return len(versions)


BATCH_JOB_TAG = "modelport_batch_job_uid"


@dataclass(frozen=True)
class BatchRunRecord:
    """One finished batch job, recorded as a run nested under its version's run."""

    target: TrackingTarget
    registered_model: str
    job_uid: str
    run_name: str
    # The version's own run: the batch run is its child (MLflow shows it under it).
    parent_run_id: str = ""
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def record_batch_run(record: BatchRunRecord) -> str:
    """Record a batch job's run (found by its job tag when it exists); return the run id."""
    with _lock, _mlflow_errors("record the batch job"):
        client = _client(record.target)
        experiment_id = _experiment_id(client, record.target)
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.{BATCH_JOB_TAG} = '{record.job_uid}'",
            max_results=1,
        )
        if found:
            return str(found[0].info.run_id)
        tags = {
            BATCH_JOB_TAG: record.job_uid,
            "modelport_registered_model": record.registered_model,
            **record.tags,
        }
        if record.parent_run_id:
            tags["mlflow.parentRunId"] = record.parent_run_id
        run = client.create_run(experiment_id, run_name=record.run_name, tags=tags)
        run_id = str(run.info.run_id)
        for key, value in record.params.items():
            client.log_param(run_id, key, value)
        for key, number in record.metrics.items():
            client.log_metric(run_id, key, number)
        client.set_terminated(run_id)
        return run_id
