"""The path of a version from upload to ready: progress only grows, each step is told once.

Every write of a version's progress is caught by a PostgreSQL trigger, so the test sees
each value the pipeline stored (also from a worker process), not samples of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from portal.core.models import Event
from portal.registry import services
from portal.registry.choices import VersionStatus
from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas, Worker, wait_for
from tests.deployer.convert import conversion_models as cm

_TRIGGER = """
CREATE TABLE IF NOT EXISTS test_progress_log (
    id serial PRIMARY KEY, version_id bigint NOT NULL, progress int NOT NULL, step text
);
CREATE OR REPLACE FUNCTION test_progress_log_write() RETURNS trigger AS $$
BEGIN
    INSERT INTO test_progress_log (version_id, progress, step)
    VALUES (NEW.id, NEW.progress, NEW.step);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS test_progress_log_trigger ON registry_modelversion;
CREATE TRIGGER test_progress_log_trigger
    AFTER INSERT OR UPDATE OF progress ON registry_modelversion
    FOR EACH ROW EXECUTE FUNCTION test_progress_log_write();
"""


@pytest.fixture
def progress_log(transactional_db: None) -> Iterator[None]:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (set DATABASE_URL)")
    with connection.cursor() as cursor:
        cursor.execute(_TRIGGER)
    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER IF EXISTS test_progress_log_trigger ON registry_modelversion")
        cursor.execute("DROP TABLE IF EXISTS test_progress_log")


def _progress(version_id: int) -> list[tuple[int, str]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT progress, step FROM test_progress_log WHERE version_id = %s ORDER BY id",
            [version_id],
        )
        return [(int(p), str(s)) for p, s in cursor.fetchall()]


def _assert_monotonic(version_id: int) -> list[int]:
    seen = _progress(version_id)
    values = [p for p, _ in seen]
    assert values, "no progress was written"
    assert values == sorted(values), f"progress went down: {seen}"
    assert values[-1] == 100
    return values


def _signed_in_bob() -> Any:
    from django.test import Client

    client = Client()
    assert client.login(username="bob", password="bob-password")
    return client


def _upload(personas: Personas, path: Path, **extra: Any) -> ModelVersion:
    model, _ = Model.objects.get_or_create(team=personas.acme, name="demo")
    return services.version_upload(
        model=model,
        file=SimpleUploadedFile(path.name, path.read_bytes()),
        user=personas.bob.user,
        **extra,
    )


@pytest.mark.django_db(transaction=True)
def test_onnx_upload_with_optimize_never_moves_progress_back(
    progress_log: None, personas: Personas, tmp_path: Path, settings: Any
) -> None:
    """Before: validate stored 55 %, then optimize 45 %."""
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    cm.onnx_with_external_data(tmp_path / "src")
    folder = cm.onnx_with_external_data(tmp_path / "src")[0].parent
    cm.onnx_zip(tmp_path / "model.zip", folder)
    version = _upload(personas, tmp_path / "model.zip")
    services.version_process(version_id=version.pk, engine_access=True)
    version.refresh_from_db()
    assert version.status == VersionStatus.READY, version.error
    values = _assert_monotonic(version.pk)
    steps = [s for _, s in _progress(version.pk)]
    assert steps.index("validate") < steps.index("optimize")
    assert len(set(values)) >= 5


@pytest.mark.django_db(transaction=True)
def test_a_failed_check_leaves_the_version_at_check_without_going_back(
    progress_log: None, personas: Personas, tmp_path: Path, settings: Any
) -> None:
    """Before: the check failure set the step back to check (35 %) after optimize (45 %)."""
    from tests.conftest import require_module

    require_module("torch")
    import numpy as np

    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    settings.MODELPORT_CONVERSION_TRUSTED_LOCAL = True
    cm.noisy_torchscript_file(tmp_path / "noisy.pt")
    np.save(tmp_path / "x.npy", np.zeros((4, 3), dtype=np.float32))
    version = _upload(
        personas,
        tmp_path / "noisy.pt",
        sample=SimpleUploadedFile("x.npy", (tmp_path / "x.npy").read_bytes()),
    )
    services.version_process(version_id=version.pk, engine_access=True)
    version.refresh_from_db()
    assert version.status == VersionStatus.FAILED
    assert version.step == "check"
    values = [p for p, _ in _progress(version.pk)]
    assert values == sorted(values), _progress(version.pk)


@pytest.fixture
def no_docker_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's Docker client points at a port where nothing listens (a host without
    an engine), with the default sandbox setting: pipeline and deploy workers hand over."""
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")
    monkeypatch.setenv("MODELPORT_CONVERSION_SANDBOX", "auto")
    monkeypatch.setenv("MODELPORT_RUNTIME", "local")


def _final(client: Any, number: int) -> dict[str, Any] | None:
    body = client.get(f"/api/v1/models/prog/versions/{number}/").json()
    return body if body["status"] in ("ready", "failed") else None


def test_on_a_real_worker_progress_only_grows_and_detect_is_told_once(
    no_docker_engine: None,
    progress_log: None,
    personas: Personas,
    celery_worker: Worker,
    tmp_path: Path,
) -> None:
    """An ONNX upload (validate, then optimize) and a skops upload (handed from the
    pipeline worker to the deploy worker) through the API on a real Celery worker."""
    cm.skops_file(tmp_path / "pipe.skops", cm.string_label_pipeline())
    folder = cm.onnx_with_external_data(tmp_path / "src")[0].parent
    cm.onnx_zip(tmp_path / "model.zip", folder)
    client = personas.bob.client()
    assert client.post("/api/v1/models/", {"name": "prog"}, format="json").status_code == 201
    for name in ("model.zip", "pipe.skops"):
        with (tmp_path / name).open("rb") as handle:
            response = client.post(
                "/api/v1/models/prog/versions/", {"file": handle}, format="multipart"
            )
        assert response.status_code == 202, response.content
    for number in (1, 2):
        body = wait_for(lambda n=number: _final(client, n), timeout_s=240, what=f"v{number}")
        assert body["status"] == "ready", (body["error"], celery_worker.log_text()[-2000:])
        version = ModelVersion.objects.get(model__name="prog", number=number)
        _assert_monotonic(version.pk)
        detects = Event.objects.filter(version=version, step="detect")
        assert detects.count() == 1, list(detects.values_list("message", flat=True))
    skops = ModelVersion.objects.get(model__name="prog", number=2)
    messages = list(Event.objects.filter(version=skops).values_list("message", flat=True))
    assert any("convert worker" in m for m in messages), messages


# ---------------------------------------------------------------- what the pages and messages say


def test_without_docker_a_pytorch_refusal_suggests_onnx_not_skops(
    personas: Personas, tmp_path: Path, settings: Any, db: None
) -> None:
    from tests.conftest import require_module

    require_module("torch")
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    settings.MODELPORT_CONVERSION_TRUSTED_LOCAL = False
    cm.torchscript_file(tmp_path / "model.pt")
    version = _upload(personas, tmp_path / "model.pt")
    services.version_process(version_id=version.pk, engine_access=True)
    version.refresh_from_db()
    assert version.error_code == "conversion_refused"
    assert "torch.onnx.export" in version.error
    assert "skops" not in version.error


def test_a_version_that_failed_detection_does_not_say_detecting(
    personas: Personas, tmp_path: Path, settings: Any, db: None
) -> None:
    import numpy as np

    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    np.savez(tmp_path / "arrays.npz", x=np.ones(3))
    version = _upload(personas, tmp_path / "arrays.npz")
    services.version_process(version_id=version.pk, engine_access=True)
    version.refresh_from_db()
    assert version.status == VersionStatus.FAILED
    page = _signed_in_bob().get("/models/demo/versions/1/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "detecting…" not in text
    assert 'data-testid="format-unknown"' in text


def test_a_passing_check_says_why_it_passes(
    personas: Personas, tmp_path: Path, settings: Any, db: None
) -> None:
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    cm.skops_file(tmp_path / "pipe.skops", cm.string_label_pipeline())
    version = _upload(personas, tmp_path / "pipe.skops")
    services.version_process(version_id=version.pk, engine_access=True)
    version.refresh_from_db()
    assert version.status == VersionStatus.READY, version.error
    check = Event.objects.get(version=version, step="check")
    assert "probabilities: max abs" in check.message
    assert "pass, every difference is within" in check.message
    page = _signed_in_bob().get("/models/demo/versions/1/").content.decode()
    assert 'data-testid="check-why"' in page
    assert "within atol" in page or "within rtol" in page


def test_a_near_zero_output_passes_on_atol_and_says_so() -> None:
    """max rel 0.05 with rtol 0.001 passes because every abs diff is within atol."""
    from deployer.convert.report import OutputCheck

    check = OutputCheck(
        name="y", datatype="FP32", kind="float", elements=4, passed=True,
        max_abs_diff=5e-6, max_rel_diff=0.05, atol=1e-5, rtol=1e-3,
    )  # fmt: skip
    assert check.summary().endswith("pass, every difference is within atol")
    failed = OutputCheck(
        name="y", datatype="FP32", kind="float", elements=4, passed=False, mismatched=3,
        max_abs_diff=0.5, max_rel_diff=0.5, atol=1e-5, rtol=1e-3,
    )  # fmt: skip
    assert "fail, 3 of 4 element(s) differ by more than atol + rtol" in failed.summary()


def test_folded_docker_build_counts_the_steps_docker_counts() -> None:
    """Before: "Docker build, 18 steps" next to "Step 24/24" (LABEL steps are not kept)."""
    from portal.registry.views import _fold_build_steps

    kept = [n for n in range(1, 25) if n not in (3, 7, 9, 12, 15, 20)]
    events = [Event(step="build", message=f"Step {n}/24 : RUN x") for n in kept]
    (folded,) = _fold_build_steps(events)
    assert folded.message == "Docker build, 24 steps (18 listed, labels left out)"
    (whole,) = _fold_build_steps(
        [Event(step="build", message=f"Step {n}/3 : RUN x") for n in (1, 2, 3)]
    )
    assert whole.message == "Docker build, 3 steps"
