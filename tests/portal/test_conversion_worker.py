"""Conversion on a real Celery worker: bad uploads fail with their cause, the worker lives on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import Personas, Worker, require_module, wait_for
from tests.deployer.convert import conversion_models as cm


def _final(client: Any, number: int) -> dict[str, Any] | None:
    body = client.get(f"/api/v1/models/conv/versions/{number}/").json()
    return body if body["status"] in ("ready", "failed") else None


def test_worker_converts_survives_bad_uploads_and_serves_the_result(
    personas: Personas, celery_worker: Worker, tmp_path: Path
) -> None:
    require_module("torch")
    cm.pickle_file(tmp_path / "reg.pkl", cm.regressor())
    data = (tmp_path / "reg.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 3])
    cm.greedy_pickle(tmp_path / "greedy.pkl", gigabytes=64)
    cm.torchscript_file(tmp_path / "model.pt")
    np.savez(tmp_path / "sample.npz", **cm.torch_sample())

    client = personas.bob.client()
    assert client.post("/api/v1/models/", {"name": "conv"}, format="json").status_code == 201
    uploads = [
        ({"file": (tmp_path / "cut.pkl")}, "failed"),
        ({"file": (tmp_path / "greedy.pkl")}, "failed"),
        ({"file": (tmp_path / "model.pt"), "sample_input": (tmp_path / "sample.npz")}, "ready"),
    ]
    for number, (files, _want) in enumerate(uploads, start=1):
        handles = {k: v.open("rb") for k, v in files.items()}
        try:
            response = client.post("/api/v1/models/conv/versions/", handles, format="multipart")
        finally:
            for handle in handles.values():
                handle.close()
        assert response.status_code == 202
        assert response.json()["number"] == number
    for number, (_files, want) in enumerate(uploads, start=1):
        version = wait_for(
            lambda number=number: _final(client, number), timeout_s=300, what=f"v{number}"
        )
        assert version["status"] == want, (version["error"], celery_worker.log_text()[-2000:])
        if want == "failed":
            assert version["error_code"] in {"load_failed", "out_of_memory"}
            assert "MODELPORT_CONVERSION_MEMORY_MB" in version["error"] or (
                "upload it again" in version["error"]
            )
        else:
            assert version["report"]["conversion"]["check"]["passed"] is True
            assert version["source_format"] == "torchscript"
    assert celery_worker.process.poll() is None
