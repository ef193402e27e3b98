"""The Batch jobs page in Chromium: start a job, watch it finish live (htmx), its mapping
and download; a refused file names the column and input. Photographed under
artifacts/screenshots/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deployer.batch import InputFormat
from portal.registry.models import Model
from tests.browser.conftest import PageWatch, shoot
from tests.conftest import Personas, Worker
from tests.deployer.test_batch import CSV_MAPPING, features, write_input
from tests.portal.factories import ready_version

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def test_start_a_batch_job_and_watch_it_finish_in_the_browser(
    browser: Any,
    celery_worker: Worker,
    personas: Personas,
    live_server: Any,
    onnx_file: Path,
    tmp_path: Path,
) -> None:
    ready_version(Model.objects.create(team=personas.acme, name="iris"), 1, onnx_file)
    source = write_input(InputFormat.CSV, tmp_path, features(5000))
    base = live_server.url
    page = browser.new_page()
    watch = PageWatch(page, base)
    page.goto(f"{base}/accounts/login/")
    page.get_by_label("User name").fill("bob")
    page.get_by_label("Password").fill("bob-password")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Batch jobs").click()
    page.get_by_label("Dataset").set_input_files(str(source))
    page.get_by_role("button", name="Start batch job").click()
    page.get_by_role("alert").get_by_text("No column feeds input 'input'").wait_for()
    shoot(page, "batch-refused")
    page.get_by_label("Dataset").set_input_files(str(source))
    page.get_by_label("Column mapping").fill(json.dumps(CSV_MAPPING))
    page.get_by_role("button", name="Start batch job").click()
    page.get_by_test_id("batch-mapping").wait_for()
    page.get_by_test_id("batch-download").wait_for(timeout=120_000)
    assert page.get_by_test_id("batch-status").inner_text().lower() == "succeeded"
    assert "5000 of 5000 rows" in page.get_by_test_id("batch-rows").inner_text()
    assert "f0, f1, f2, f3" in page.get_by_test_id("batch-mapping").inner_text()
    shoot(page, "batch-job-done")
    with page.expect_download() as download:
        page.get_by_test_id("batch-download").click()
    saved = tmp_path / "downloaded.csv"
    download.value.save_as(saved)
    assert len(saved.read_text().splitlines()) == 5001
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Batch jobs").click()
    page.get_by_text("in.csv").wait_for()
    shoot(page, "batch-list")
    watch.check()
    page.close()
