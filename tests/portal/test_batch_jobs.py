"""Batch jobs through the portal: the API, a real Celery worker on Redis, PostgreSQL,
serving instances of the local runtime, MLflow; a worker SIGKILLed in the middle."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.conf import settings as django_settings
from django.test import Client

from deployer.batch import InputFormat, OnnxScorer
from portal.deployments.batch import services
from portal.deployments.batch.models import BatchJob
from portal.deployments.choices import BatchJobStatus
from portal.registry.models import Model, ModelVersion
from tests.conftest import Personas, Worker, start_worker, wait_for
from tests.deployer.test_batch import CSV_MAPPING, features, predictions, write_input
from tests.portal.factories import ready_version

URL = "/api/v1/batch-jobs/"


@pytest.fixture
def version(personas: Personas, onnx_file: Path) -> ModelVersion:
    model = Model.objects.create(team=personas.acme, name="iris", created_by=personas.alice.user)
    return ready_version(model, 1, onnx_file)


def submit(persona: Any, path: Path, **fields: Any) -> Any:
    with path.open("rb") as handle:
        return persona.client().post(
            URL, {"model": "iris", "version": 1, "file": handle, **fields}, format="multipart"
        )


def finished(job_id: int) -> BatchJob | None:
    job = BatchJob.objects.get(pk=job_id)
    return job if job.is_final else None


def download(persona: Any, job_id: int, target: Path) -> Path:
    response = persona.client().get(f"{URL}{job_id}/output")
    assert response.status_code == 200, response
    target.write_bytes(b"".join(response.streaming_content))
    return target


@pytest.mark.e2e
def test_a_job_in_each_format_scores_every_row_and_is_recorded_in_mlflow(
    celery_worker: Worker,
    personas: Personas,
    version: ModelVersion,
    onnx_file: Path,
    mlflow_server: str,
    tmp_path: Path,
) -> None:
    x = features(1500)
    expected = OnnxScorer(onnx_file).infer({"input": x})["output"]
    ids = {}
    for fmt in InputFormat:
        source = write_input(fmt, tmp_path, x)
        extra = {"mapping": json.dumps(CSV_MAPPING)} if fmt is InputFormat.CSV else {}
        response = submit(personas.bob, source, chunk_rows=400, **extra)
        assert response.status_code == 202, response.json()
        assert response.json()["total_rows"] == 1500
        ids[fmt] = response.json()["id"]
    for fmt, job_id in ids.items():
        job = wait_for(lambda job_id=job_id: finished(job_id), timeout_s=180, what=f"{fmt} job")
        assert job.status == BatchJobStatus.SUCCEEDED, (
            fmt,
            job.error,
            celery_worker.log_text()[-3000:],
        )
        assert (job.rows_done, job.errors, job.runtime) == (1500, 0, "local")
        out = download(personas.bob, job_id, tmp_path / f"out-{fmt}-{job.output_name}")
        row_ids, predicted = predictions(fmt, out)
        np.testing.assert_array_equal(row_ids, np.arange(1500))
        np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)
        assert job.mlflow_run_id
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=mlflow_server).get_run(job.mlflow_run_id)
    assert run.data.metrics["rows"] == 1500
    assert run.data.params["output_sha256"] == job.output_sha256
    assert run.data.params["input_sha256"] == job.input_sha256
    assert run.data.tags["modelport_registered_model"] == "acme.iris"
    assert run.data.metrics["rows_per_s"] > 0


@pytest.mark.e2e
def test_a_job_given_no_chunk_size_runs_at_the_fastest_it_tried_and_says_so(
    celery_worker: Worker,
    personas: Personas,
    version: ModelVersion,
    onnx_file: Path,
    mlflow_server: str,
    tmp_path: Path,
) -> None:
    x = features(200_000)
    source = write_input(InputFormat.PARQUET, tmp_path, x)
    response = submit(personas.bob, source)
    assert response.status_code == 202, response.json()
    assert (response.json()["chunk_rows"], response.json()["chunk_probe"]) == (0, {})
    job_id = response.json()["id"]
    job = wait_for(lambda: finished(job_id), timeout_s=180, what="the job")
    assert job.status == BatchJobStatus.SUCCEEDED, (job.error, celery_worker.log_text()[-3000:])
    tried = {int(rows): rate for rows, rate in job.chunk_probe["rows_per_s"].items()}
    # the sizes whose probe (two chunks, at least 8,192 rows) is at most 5% of the file
    assert set(tried) == {1024, 4096}
    assert job.chunk_rows == job.chunk_probe["chosen"] == max(tried, key=lambda r: tried[r])
    assert job.chunks_done == -(-200_000 // job.chunk_rows)
    _, predicted = predictions(InputFormat.PARQUET, download(personas.bob, job_id, tmp_path / "o"))
    expected = OnnxScorer(onnx_file).infer({"input": x})["output"]
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=mlflow_server).get_run(job.mlflow_run_id)
    assert run.data.params["chunk_rows"] == str(job.chunk_rows)
    page = Client()
    page.force_login(personas.bob.user)
    html = page.get(f"/deployments/batch/{job_id}/").content.decode()
    assert f"{job.chunk_rows} rows" in html
    assert "the fastest tried: 1024 →" in html


@pytest.mark.e2e
def test_bad_rows_fill_the_error_column_until_the_threshold_fails_the_job(
    celery_worker: Worker, personas: Personas, version: ModelVersion, tmp_path: Path
) -> None:
    lines = ["a,b,c,d", *[f"{i},1,2,3" for i in range(300)]]
    for row in (10, 20):
        lines[row + 1] = f"{row},1,x,3"
    tolerated = tmp_path / "two-bad.csv"
    tolerated.write_text("\n".join(lines) + "\n")
    for row in (30, 40, 50):
        lines[row + 1] = f"{row},nan?,2,3"
    too_many = tmp_path / "five-bad.csv"
    too_many.write_text("\n".join(lines) + "\n")
    ok = submit(personas.bob, tolerated, max_errors=3, chunk_rows=64).json()["id"]
    failing = submit(personas.bob, too_many, max_errors=3, chunk_rows=64).json()["id"]

    job = wait_for(lambda: finished(ok), timeout_s=120, what="tolerated job")
    assert (job.status, job.rows_done, job.errors) == (BatchJobStatus.SUCCEEDED, 300, 2)
    out = download(personas.bob, ok, tmp_path / "out.csv")
    errors = [line.rsplit(",", 1)[-1] for line in out.read_text().splitlines()[1:]]
    assert [i for i, e in enumerate(errors) if e.strip('"')] == [10, 20]

    job = wait_for(lambda: finished(failing), timeout_s=120, what="failing job")
    assert job.status == BatchJobStatus.FAILED
    assert job.error_code == "too_many_errors"
    assert "more than the 3" in job.error
    # The job stops at the chunk that crossed the threshold, with all of its errors.
    assert [e["row"] for e in job.first_errors] == [10, 20, 30, 40, 50]
    assert job.error.startswith("5 rows failed")
    assert "'x' is not a FP32 value" in job.first_errors[0]["error"]
    assert personas.bob.client().get(f"{URL}{failing}/output").status_code == 404


@pytest.mark.e2e
def test_a_sigkilled_worker_resumes_from_its_last_chunk_with_exact_rows(
    worker_env: dict[str, str],
    personas: Personas,
    version: ModelVersion,
    onnx_file: Path,
    settings: Any,
    tmp_path: Path,
) -> None:
    worker = start_worker(worker_env, tmp_path / "worker-1.log", queues=("batch",), concurrency=1)
    rows = 24_000
    x = features(rows)
    source = write_input(InputFormat.JSONL, tmp_path, x)
    try:
        job_id = submit(personas.bob, source, chunk_rows=40).json()["id"]

        def running_past(fraction: float) -> BatchJob | None:
            job = BatchJob.objects.get(pk=job_id)
            done = job.worker_pid and job.rows_done >= rows * fraction
            return job if done and not job.is_final else None

        # 1. The pool process dies: the worker gives the message back at once.
        job = wait_for(lambda: running_past(0.1), timeout_s=120, what="10% done")
        os.kill(job.worker_pid, signal.SIGKILL)
        killed_pid = job.worker_pid
        wait_for(
            lambda: BatchJob.objects.filter(pk=job_id, attempts=2).exclude(worker_pid=killed_pid)
            .exclude(worker_pid=0).exists(),
            timeout_s=120,
            what="the job run again",
        )  # fmt: skip
        # 2. The whole worker dies: the resume sweep hands the job to a new worker.
        job = wait_for(lambda: running_past(0.4), timeout_s=180, what="40% done")
        worker.kill()
        at_kill = BatchJob.objects.get(pk=job_id).rows_done
        assert at_kill < rows, "the job must still be running when the worker dies"
        worker = start_worker(
            worker_env, tmp_path / "worker-2.log", queues=("batch",), concurrency=1
        )
        settings.MODELPORT_BATCH_STALE_S = 1
        wait_for(lambda: services.batch_jobs_resume() == 1, timeout_s=60, what="job handed back")
        job = wait_for(lambda: finished(job_id), timeout_s=300, what="the job to finish")
    finally:
        worker.stop()
    assert job.status == BatchJobStatus.SUCCEEDED, (job.error, worker.log_text()[-3000:])
    assert job.attempts == 3
    assert job.rows_done == rows
    out = download(personas.bob, job_id, tmp_path / "out.jsonl")
    row_ids, predicted = predictions(InputFormat.JSONL, out)
    assert len(row_ids) == rows
    np.testing.assert_array_equal(row_ids, np.arange(rows))  # none missing, none twice
    expected = OnnxScorer(onnx_file).infer({"input": x})["output"]
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)
    batch_dir = Path(django_settings.DATA_DIR) / "runtime" / "batch" / "local"
    assert not list(batch_dir.glob("proc-*.json")), "an instance of a killed run was left"


def test_a_mismatch_is_refused_before_any_job_exists(
    personas: Personas, version: ModelVersion, tmp_path: Path
) -> None:
    source = tmp_path / "three.csv"
    source.write_text("a,b,c\n1,2,3\n")
    response = submit(personas.bob, source)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "mapping_mismatch"
    assert "'input'" in body["detail"]
    assert "its columns: a, b, c" in body["detail"]
    response = submit(personas.bob, source, mapping=json.dumps({"input": ["a", "b", "c", "z"]}))
    assert response.status_code == 400
    assert "Column 'z' mapped to input 'input'" in response.json()["detail"]
    assert not BatchJob.objects.exists()


def test_outsiders_see_nothing_and_viewers_cannot_start_jobs(
    personas: Personas, version: ModelVersion, tmp_path: Path
) -> None:
    source = write_input(InputFormat.NPY, tmp_path, features(10))
    job_id = submit(personas.bob, source).json()["id"]
    assert submit(personas.vera, source).status_code == 403
    charlie = personas.charlie.client()
    assert charlie.get(URL).json() == []
    for path in (f"{URL}{job_id}/", f"{URL}{job_id}/output"):
        assert charlie.get(path).status_code == 404
    assert charlie.post(f"{URL}{job_id}/cancel").status_code == 404
    assert personas.vera.client().get(f"{URL}{job_id}/").json()["mapping"] == {"input": ["arr_0"]}


def test_a_queued_job_is_cancelled_at_once_and_can_be_rescored_from_its_stored_input(
    personas: Personas, version: ModelVersion, tmp_path: Path
) -> None:
    source = write_input(InputFormat.NPZ, tmp_path, features(10))
    job_id = submit(personas.bob, source).json()["id"]
    response = personas.bob.client().post(f"{URL}{job_id}/cancel")
    assert (response.status_code, response.json()["status"]) == (202, "cancelled")
    again = personas.bob.client().post(
        URL, {"model": "iris", "version": 1, "input_job": job_id}, format="multipart"
    )
    assert again.status_code == 202, again.json()
    assert again.json()["input_sha256"] == BatchJob.objects.get(pk=job_id).input_sha256
    assert again.json()["total_rows"] == 10


@pytest.mark.e2e
def test_the_cli_scores_a_file_waits_with_progress_and_downloads_the_output(
    celery_worker: Worker,
    personas: Personas,
    version: ModelVersion,
    onnx_file: Path,
    live_server: Any,
    capsys: Any,
    tmp_path: Path,
) -> None:
    from deployer.cli import EXIT_OK, EXIT_REFUSED, main

    x = features(3000)
    source = write_input(InputFormat.CSV, tmp_path, x)
    common = ["--url", live_server.url, "--token", personas.bob.token]
    target = tmp_path / "scored.csv"
    code = main(
        ["batch", str(source), "--model", "iris", "--version", "1", "--chunk-rows", "500",
         "--mapping", json.dumps(CSV_MAPPING), "--wait", "--output", str(target), *common]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert "succeeded: 3000 rows, 0 errors" in captured.out
    assert "rows/s" in captured.err
    row_ids, predicted = predictions(InputFormat.CSV, target)
    np.testing.assert_array_equal(row_ids, np.arange(3000))
    expected = OnnxScorer(onnx_file).infer({"input": x})["output"]
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)

    code = main(["batch", str(source), "--model", "iris", "--version", "1", *common])
    assert code == EXIT_REFUSED
    assert "No column feeds input 'input'" in capsys.readouterr().err


def test_the_pages_start_a_job_show_its_mapping_and_progress_and_cancel_it(
    personas: Personas, version: ModelVersion, tmp_path: Path
) -> None:
    from django.test import Client

    browser = Client()
    browser.force_login(personas.bob.user)
    page = browser.get("/deployments/batch/")
    assert page.status_code == 200
    assert b"iris v1" in page.content
    source = write_input(InputFormat.CSV, tmp_path, features(20))
    with source.open("rb") as handle:
        refused = browser.post(
            "/deployments/batch/", {"version": version.pk, "file": handle}, follow=True
        )
    assert "No column feeds input &#x27;input&#x27;" in refused.content.decode()
    assert not BatchJob.objects.exists()
    with source.open("rb") as handle:
        started = browser.post(
            "/deployments/batch/",
            {"version": version.pk, "file": handle, "mapping": json.dumps(CSV_MAPPING)},
        )
    job = BatchJob.objects.get()
    assert started["Location"] == f"/deployments/batch/{job.pk}/"
    detail = browser.get(started["Location"]).content.decode()
    assert 'data-testid="batch-mapping"' in detail
    assert "<code>f0</code>, <code>f1</code>, <code>f2</code>, <code>f3</code>" in detail
    assert "0</strong> of 20 rows" in detail
    fragment = browser.get(started["Location"], HTTP_HX_REQUEST="true").content.decode()
    assert fragment.startswith('<section class="card" id="batch-status" hx-get=')
    assert "<html" not in fragment
    browser.post(f"/deployments/batch/{job.pk}/cancel")
    job.refresh_from_db()
    assert job.status == BatchJobStatus.CANCELLED
    outsider = Client()
    outsider.force_login(personas.charlie.user)
    assert outsider.get(f"/deployments/batch/{job.pk}/").status_code == 404
    assert b"iris" not in outsider.get("/deployments/batch/").content


@pytest.mark.e2e
def test_with_docker_a_job_runs_in_a_container_of_the_versions_image(
    docker_mode: None,
    celery_worker: Worker,
    personas: Personas,
    version: ModelVersion,
    onnx_file: Path,
    tmp_path: Path,
) -> None:
    import docker

    x = features(2000)
    source = write_input(InputFormat.PARQUET, tmp_path, x)
    job_id = submit(personas.bob, source, chunk_rows=500).json()["id"]
    job = wait_for(lambda: finished(job_id), timeout_s=400, what="the job in a container")
    assert job.status == BatchJobStatus.SUCCEEDED, (job.error, celery_worker.log_text()[-3000:])
    assert job.runtime == "docker"
    version.refresh_from_db()
    assert version.report["images"]["cpu"], "the version's serving image was built for the job"
    row_ids, predicted = predictions(
        InputFormat.PARQUET, download(personas.bob, job_id, tmp_path / "o.parquet")
    )
    np.testing.assert_array_equal(row_ids, np.arange(2000))
    expected = OnnxScorer(onnx_file).infer({"input": x})["output"]
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)
    client = docker.from_env()
    left = client.containers.list(all=True, filters={"label": f"modelport.batch-job={job_id}"})
    assert left == [], "the job's container was not removed"
