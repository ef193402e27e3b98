"""The bad-input suite: hostile and broken uploads sent over HTTP to a real web server and
handled by a real Celery worker (conversions in the Docker sandbox).

Each input must end in a final state with an error that names the problem (or, for a
hostile file name, be stored safely under a clean name); the web and worker processes
keep running; nothing lands outside storage; after one reconcile no version or
deployment is left in a non-final state. Figures go to artifacts/reports/bad_input.json.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from django.conf import settings

from portal.deployments import services as deployment_services
from portal.deployments.choices import FINAL_DEPLOYMENT_STATUSES
from portal.deployments.models import Deployment
from portal.registry import services as registry_services
from portal.registry.choices import FINAL_VERSION_STATUSES
from portal.registry.models import ModelVersion
from tests.conftest import REPO, Personas, Worker, wait_for
from tests.deployer.convert import conversion_models as cm
from tests.deployer.convert.conftest import converter_image, docker_engine  # noqa: F401
from tests.onnx_models import external_data_model, greedy_model, linear_model

pytestmark = pytest.mark.e2e


@dataclass
class Case:
    name: str
    file: tuple[str, bytes]
    codes: set[str]  # acceptable error codes ("" = the version may become ready)
    phrase: str  # what the error (or the outcome) must say
    sample: tuple[str, bytes] | None = None
    fields: dict[str, str] = field(default_factory=dict)
    escapes: list[Path] = field(default_factory=list)  # paths the input aims at


def _onnx_bytes(tmp: Path, **kwargs: Any) -> bytes:
    path = tmp / f"linear-{uuid.uuid4().hex}.onnx"
    linear_model(path, **kwargs)
    return path.read_bytes()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _cases(tmp: Path) -> list[Case]:
    good = _onnx_bytes(tmp)
    outside = tmp / f"escape-{uuid.uuid4().hex}"
    secret = tmp / "secret.bin"
    secret.write_bytes(np.ones((4, 3), dtype=np.float32).tobytes())
    external = tmp / "external.onnx"
    external_data_model(external, "../secret.bin")
    absolute = tmp / "absolute.onnx"
    external_data_model(absolute, str(secret))
    greedy = tmp / "greedy.onnx"
    greedy_model(greedy)
    cm.greedy_pickle(tmp / "greedy.pkl", gigabytes=64)
    marker = tmp / f"MARKER-{uuid.uuid4().hex}"
    cm.marker_pickle(tmp / "marker.pkl", marker)
    cm.pickle_file(tmp / "reg.pkl", cm.regressor())
    pickled = (tmp / "reg.pkl").read_bytes()
    return [
        Case("empty file", ("model.onnx", b""), {"empty_file"}, "empty"),
        Case("truncated ONNX", ("model.onnx", good[: len(good) // 2]),
             {"not_onnx", "onnx_check_failed"}, "ONNX"),
        Case("truncated pickle", ("model.pkl", pickled[: len(pickled) // 3]),
             {"load_failed"}, "upload it again"),
        Case("text file", ("notes.txt", b"these are my notes, not a model\n" * 50),
             {"unknown_format"}, "does not recognise"),
        Case("PNG image named .onnx", ("model.onnx", b"\x89PNG\r\n\x1a\n" + bytes(200)),
             {"unsupported_format", "not_onnx"}, "not"),
        Case("Keras HDF5 file", ("model.h5", b"\x89HDF\r\n\x1a\n" + bytes(500)),
             {"unsupported_format"}, "Keras 3 (model.save('model.keras'))"),
        Case("file name with path traversal", (f"../../../../{outside.name}.onnx", good),
             {""}, "stored as", escapes=[tmp.parent / f"{outside.name}.onnx"]),
        Case("absolute file name", (f"{outside}.onnx", good), {""}, "stored as",
             escapes=[Path(f"{outside}.onnx")]),
        Case("ONNX external data with ../", ("model.onnx", external.read_bytes()),
             {"external_data_outside"}, "outside"),
        Case("ONNX external data with an absolute path", ("model.onnx", absolute.read_bytes()),
             {"external_data_outside"}, "outside"),
        Case("zip with a ../ entry",
             ("model.zip", _zip({"model.onnx": good, "../../evil.txt": b"gotcha"})),
             {"unsafe_archive"}, "..", escapes=[tmp.parent / "evil.txt"]),
        Case("zip with an absolute entry",
             ("model.zip", _zip({"model.onnx": good, f"{outside}.txt": b"gotcha"})),
             {"unsafe_archive"}, "absolute", escapes=[Path(f"{outside}.txt")]),
        Case("decompression bomb", ("model.zip", _zip({"model.onnx": good,
                                                       "weights.bin": bytes(2**30)})),
             {"unsafe_archive"}, "decompression bomb"),
        Case("pickle that writes a marker if loaded on the host",
             ("model.pkl", (tmp / "marker.pkl").read_bytes()), {"load_failed"},
             "No such file or directory", escapes=[marker]),
        Case("ONNX model that allocates without bound", ("model.onnx", greedy.read_bytes()),
             {"out_of_memory"}, "memory"),
        Case("pickle that allocates without bound",
             ("model.pkl", (tmp / "greedy.pkl").read_bytes()), {"out_of_memory"},
             "MODELPORT_CONVERSION_MEMORY_MB"),
        Case("sample with the wrong shape", ("model.onnx", good), {"invalid_sample"}, "dimension",
             sample=("sample.npy", _npy(np.zeros((2, 7), dtype=np.float32)))),
        Case("sample with the wrong input name", ("model.onnx", good), {"invalid_sample"},
             "input", sample=("sample.json", json.dumps({"nope": [[1, 2, 3, 4]]}).encode())),
        Case("sample that is not an array", ("model.onnx", good), {"invalid_sample"}, "sample",
             sample=("sample.npy", b"\x93NUMPY garbage")),
        Case("sample with strings for a float input", ("model.onnx", good), {"invalid_sample"},
             "FP32", sample=("sample.json", json.dumps({"input": [list("abcd")]}).encode())),
        Case("ONNX file stated to be TorchScript", ("model.onnx", good),
             {"format_mismatch"},
             "torchscript", fields={"format": "torchscript"}),
    ]  # fmt: skip


def _storage_files() -> set[Path]:
    return {p for p in Path(settings.MODELPORT_STORAGE_DIR).rglob("*") if p.is_file()}


def _files_outside_storage_folders(before: set[Path]) -> list[Path]:
    """Files this test added to storage outside an existing version's own folder, and
    working files that outlived their step (storage is shared by the session's tests)."""
    storage = Path(settings.MODELPORT_STORAGE_DIR)
    owned = [v.storage_dir for v in ModelVersion.objects.all()]
    stray = []
    for path in sorted(_storage_files() - before):
        inside = any(path.is_relative_to(folder) for folder in owned)
        if not inside and not path.is_relative_to(storage / "images"):
            stray.append(path)
        if inside and "work" in path.relative_to(storage).parts:
            stray.append(path)
    return stray


def _converter_containers() -> int:
    import docker

    client = docker.from_env()
    return len(client.containers.list(all=True, filters={"label": "modelport.role=converter"}))


def test_bad_input_suite(
    converter_image: str,  # noqa: F811
    personas: Personas,
    celery_worker: Worker,
    live_server: Any,
    tmp_path: Path,
) -> None:
    cases = _cases(tmp_path)
    before = _storage_files()
    session = requests.Session()
    session.headers["Authorization"] = f"Token {personas.bob.token}"
    api = f"{live_server.url}/api/v1"
    assert session.post(f"{api}/models/", json={"name": "hostile"}).status_code == 201

    # Everything is accepted at the door (the checks need the worker), then judged there.
    sent: list[tuple[Case, int]] = []
    for case in cases:
        files: dict[str, Any] = {"file": case.file}
        if case.sample is not None:
            files["sample_input"] = case.sample
        response = session.post(f"{api}/models/hostile/versions/", files=files, data=case.fields)
        assert response.status_code == 202, (case.name, response.content)
        sent.append((case, response.json()["number"]))

    results = []
    for case, number in sent:

        def final(number: int = number) -> dict[str, Any] | None:
            body = session.get(f"{api}/models/hostile/versions/{number}/").json()
            return body if body["status"] in ("ready", "failed") else None

        version = wait_for(final, timeout_s=300, what=f"{case.name} to end")
        results.append(
            {
                "input": case.name,
                "status": version["status"],
                "error_code": version["error_code"],
                "error": version["error"],
                "file_name": version["file_name"],
            }
        )

    # Processes alive, answers still coming.
    assert celery_worker.process.poll() is None, celery_worker.log_text()[-3000:]
    assert session.get(f"{api}/models/").status_code == 200

    escaped = [str(p) for case in cases for p in case.escapes if p.exists()]
    stray = _files_outside_storage_folders(before)
    incoming = [p for p in Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir() if p.is_file()]
    incoming = [p for p in incoming if p not in before]
    containers = _converter_containers()

    registry_services.versions_reconcile()
    deployment_services.deployments_reconcile()
    stuck = ModelVersion.objects.exclude(status__in=FINAL_VERSION_STATUSES).count()
    stuck += Deployment.objects.exclude(status__in=FINAL_DEPLOYMENT_STATUSES).count()

    report = {
        "tried": len(cases),
        "crashes": 0 if celery_worker.process.poll() is None else 1,
        "files_outside_storage": len(escaped) + len(stray) + len(incoming),
        "converter_containers_left": containers,
        "rows_stuck_after_reconcile": stuck,
        "results": results,
    }
    out = REPO / "artifacts" / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bad_input.json").write_text(json.dumps(report, indent=2))

    mismatched = []
    for case, result in zip(cases, results, strict=True):
        code = result["error_code"] if result["status"] == "failed" else ""
        text = result.get("error") or f"stored as {result.get('file_name')}"
        if code not in case.codes or case.phrase.lower() not in text.lower():
            mismatched.append((case.name, result["status"], code, text))
    assert mismatched == [], json.dumps(mismatched, indent=2)
    assert escaped == []
    assert stray == []
    assert incoming == []
    assert containers == 0
    assert stuck == 0
