"""The browser path a user takes, in Chromium, on a real worker and real serving processes.

sign in → create model → upload with progress → timeline reaches ready → deploy →
try-it returns the right numbers → second version → deploy it → roll back as admin →
the page shows the earlier version serving; a member never sees the rollback control.
Every page is photographed at wide and phone width under artifacts/screenshots/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.browser.conftest import WIDTHS, PageWatch, shoot
from tests.conftest import Personas, Worker
from tests.onnx_models import linear_model

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
TIMEOUT = 120_000


def _sign_in(page: Any, base: str, username: str) -> None:
    page.goto(f"{base}/accounts/login/")
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(f"{username}-password")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/")


def _upload(page: Any, base: str, model: str, path: Path, progress: list[float]) -> int:
    """Upload through the form; ``progress`` receives the bar's values as they change
    (reported through a function the test exposed, since the page navigates away)."""
    page.goto(f"{base}/models/{model}/upload/")
    progress.clear()
    page.evaluate(
        """() => {
        const box = document.querySelector('[data-progress]');
        const bar = box.querySelector('progress');
        const report = () => { if (!box.hidden) window.reportProgress(Number(bar.value)); };
        new MutationObserver(report).observe(bar, {attributes: true});
        new MutationObserver(report).observe(box, {attributes: true});
    }"""
    )
    page.get_by_label("Drop a model file here or choose one").set_input_files(str(path))
    page.get_by_role("button", name="Upload", exact=True).click()
    page.wait_for_url(re.compile(rf"{base}/models/{model}/versions/\d+/"), timeout=TIMEOUT)
    assert progress, "the progress bar was never shown"
    assert max(progress) == 100
    return int(page.url.rstrip("/").rsplit("/", 1)[1])


def test_upload_deploy_try_rollback_in_the_browser(
    browser: Any,
    personas: Personas,
    celery_worker: Worker,
    live_server: Any,
    tmp_path: Path,
    clean_screenshots: None,
) -> None:
    base = live_server.url
    v1_path, v2_path = tmp_path / "v1.onnx", tmp_path / "v2.onnx"
    # Big enough (about 4 MB) that the upload reports progress on the way.
    w1, b1 = linear_model(v1_path, in_features=4, out_features=3, seed=1)
    _w2, _b2 = linear_model(v2_path, in_features=4, out_features=3, seed=2)
    padding = np.zeros(1_000_000, dtype=np.float32).tobytes()
    _pad_model(v1_path, padding)

    context = browser.new_context(viewport={"width": WIDTHS["wide"], "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.on("dialog", lambda dialog: dialog.accept())
    progress: list[float] = []
    page.expose_function("reportProgress", lambda value: progress.append(value))
    watch = PageWatch(page, base)

    page.goto(f"{base}/")
    shoot(page, "login-wide")
    _sign_in(page, base, "alice")
    shoot(page, "models-empty-wide")

    page.get_by_label("Name").fill("browser-demo")
    page.get_by_label("Description").fill("A linear model driven through Chromium")
    page.get_by_role("button", name="Create model").click()
    page.wait_for_url(f"{base}/models/browser-demo/")
    shoot(page, "model-empty-wide")

    page.goto(f"{base}/models/browser-demo/upload/")
    shoot(page, "upload-wide")
    number = _upload(page, base, "browser-demo", v1_path, progress)
    assert number == 1
    shoot(page, "version-in-progress-wide")
    page.get_by_role("button", name="Deploy v1").wait_for()
    timeline = page.locator(".timeline").inner_text()
    for step in ("upload", "validate", "register", "ready"):
        assert step in timeline.lower()
    shoot(page, "version-ready-wide")

    page.get_by_role("button", name="Deploy v1").click()
    page.wait_for_url(re.compile(rf"{base}/deployments/\d+/"))
    deployment_url = page.url
    page.get_by_test_id("serving-version").filter(has_text="v1").wait_for()
    assert page.get_by_test_id("deployment-status").inner_text().lower() == "running"
    shoot(page, "deployment-wide")

    page.get_by_label(re.compile(r"^input")).fill("[[1, 2, 3, 4]]")
    page.get_by_role("button", name="Send request").click()
    shown = page.get_by_test_id("try-output-output")
    shown.wait_for()
    got = np.array(json.loads(shown.inner_text()))
    np.testing.assert_allclose(got, np.array([1, 2, 3, 4], dtype=np.float32) @ w1 + b1, rtol=1e-5)
    assert "ms" in page.get_by_test_id("try-latency").inner_text()
    shoot(page, "deployment-try-wide")

    assert _upload(page, base, "browser-demo", v2_path, progress) == 2
    page.get_by_role("button", name="Deploy v2").click()
    page.wait_for_url(deployment_url)
    page.get_by_test_id("serving-version").filter(has_text="v2").wait_for()

    page.get_by_test_id("rollback-v1").first.click()
    page.get_by_test_id("serving-version").filter(has_text="v1").wait_for()
    page.get_by_test_id("deployment-status").filter(has_text="Running").wait_for()
    shoot(page, "deployment-after-rollback-wide")
    revisions = page.get_by_test_id("revision-table").inner_text()
    assert "rollback" in revisions

    page.goto(f"{base}/accounts/tokens/")
    page.get_by_label("Name").fill("ci")
    page.get_by_role("button", name="Create token").click()
    assert page.locator("#new-token").inner_text().startswith("mp_")
    shoot(page, "tokens-wide")
    page.goto(f"{base}/deployments/")
    shoot(page, "deployments-wide")
    page.goto(f"{base}/")
    shoot(page, "models-wide")
    page.goto(f"{base}/api/docs/")
    page.locator(".swagger-ui .information-container").wait_for()
    shoot(page, "api-docs-wide")
    watch.check()
    context.close()

    # A member sees the deployment but no rollback control, on any page.
    member = browser.new_context(viewport={"width": WIDTHS["phone"], "height": 800})
    page = member.new_page()
    page.set_default_timeout(TIMEOUT)
    watch = PageWatch(page, base)
    _sign_in(page, base, "bob")
    shoot(page, "models-phone")
    page.goto(deployment_url)
    page.get_by_test_id("serving-version").wait_for()
    assert page.get_by_role("button", name=re.compile("Roll back")).count() == 0
    assert page.get_by_role("button", name=re.compile("Roll .* back")).count() == 0
    shoot(page, "deployment-phone")
    page.goto(f"{base}/models/browser-demo/versions/1/")
    assert page.get_by_role("button", name=re.compile("back to v1")).count() == 0
    shoot(page, "version-phone")
    for path, name in [
        ("/models/browser-demo/", "model-phone"),
        ("/models/browser-demo/upload/", "upload-phone"),
        ("/accounts/tokens/", "tokens-phone"),
        ("/deployments/", "deployments-phone"),
    ]:
        page.goto(f"{base}{path}")
        shoot(page, name)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= WIDTHS["phone"], f"{path} is {width}px wide at phone width"
    watch.check()
    member.close()


def _pad_model(path: Path, padding: bytes) -> None:
    """Make the file bigger without changing what it computes (ONNX doc_string)."""
    import onnx

    model = onnx.load(str(path))
    model.doc_string = "x" * len(padding)
    onnx.save(model, str(path))
