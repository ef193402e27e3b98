"""Long text stays on the card: a model's description in the list, a long Try-it answer.

Real Chromium at wide and phone width, the live portal, and a real serving process
answering the Try-it request. Screenshots go to artifacts/screenshots/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployer.checks import wait_until_ready
from deployer.runtimes.base import InstanceState, LaunchSpec
from deployer.runtimes.local import LocalProcessRuntime
from tests.browser.conftest import WIDTHS, PageWatch, shoot
from tests.conftest import Personas
from tests.onnx_models import linear_model
from tests.portal.factories import ready_version, running_deployment

pytestmark = [pytest.mark.browser]

DESCRIPTION = (
    "Scores card transactions for fraud in real time from the merchant category, amount, "
    "time since the previous purchase, distance from home and forty engineered features; "
    "retrained weekly on the last ninety days of labelled chargebacks by the risk team."
)
OUTPUTS = 90  # under the 100 values Try-it shows, so the whole answer is on the page


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """A real serving instance of a model with a long output row."""
    model = tmp_path / "wide.onnx"
    weight, bias = linear_model(model, in_features=4, out_features=OUTPUTS)
    runtime = LocalProcessRuntime(tmp_path / "state")
    spec = LaunchSpec(
        deployment_id=1, revision_id=1, model_name="fraud-scorer", model_version="1",
        model_path=model,
    )  # fmt: skip
    launch = runtime.start(spec)
    try:
        wait_until_ready(
            launch.url, "fraud-scorer", timeout_s=60,
            still_running=lambda: runtime.status(launch.handle).state == InstanceState.RUNNING,
            describe_failure=lambda: runtime.logs(launch.handle),
        )  # fmt: skip
        yield launch.url, weight, bias
    finally:
        runtime.stop(launch.handle, grace_s=2)


def _fits(page: Any, selector: str) -> dict[str, float]:
    """The element's scroll and client widths, and whether it is shown at all."""
    return page.eval_on_selector(
        selector,
        """el => ({scroll: el.scrollWidth, client: el.clientWidth,
                   shown: el.getClientRects().length > 0, height: el.clientHeight,
                   text: el.innerText})""",
    )


def test_long_description_and_try_it_output_wrap_at_every_width(
    browser: Any, personas: Personas, live_server: Any, serving: tuple[str, Any, Any]
) -> None:
    from portal.registry.models import Model

    url, weight, bias = serving
    model = Model.objects.create(team=personas.acme, name="fraud-scorer", description=DESCRIPTION)
    version = ready_version(model, 1)
    version.signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, OUTPUTS]}],
    }
    version.mlflow_version, version.mlflow_run_id = "4", "run-1"
    version.save()
    deployment = running_deployment(version)
    deployment.endpoint_url = f"{url}/v2/models/fraud-scorer"
    deployment.save()
    base = live_server.url
    for label, width in WIDTHS.items():
        context = browser.new_context(viewport={"width": width, "height": 900})
        page = context.new_page()
        watch = PageWatch(page, base)
        page.goto(f"{base}/accounts/login/")
        page.get_by_label("User name").fill("alice")
        page.get_by_label("Password").fill("alice-password")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{base}/")

        desc = _fits(page, "[data-testid=model-description]")
        shoot(page, f"models-long-description-{label}")
        assert desc["shown"], f"{label}: the description is hidden"
        assert desc["text"] == DESCRIPTION
        assert desc["scroll"] <= desc["client"] + 1, f"{label}: the description is clipped"
        assert desc["height"] > 30, f"{label}: the description does not wrap"

        page.goto(f"{base}/deployments/{deployment.pk}/")
        page.locator("#input-1").fill("[[1, 2, 3, 4]]")
        page.get_by_role("button", name="Send request").click()
        page.locator("#try-result > *").first.wait_for()
        shown = page.get_by_test_id("try-output-output")
        assert shown.count() == 1, page.locator("#try-result").inner_text()
        shown.scroll_into_view_if_needed()
        got = np.array(json.loads(shown.inner_text()))
        expected = np.array([[1, 2, 3, 4]], dtype=np.float32) @ weight + bias
        np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-5)
        out = _fits(page, "[data-testid=try-output-output]")
        shoot(page, f"deployment-try-long-output-{label}")
        assert out["scroll"] <= out["client"] + 1, f"{label}: the output runs off the card"
        page_width = page.evaluate("document.documentElement.scrollWidth")
        assert page_width <= width, f"{label}: the page scrolls sideways ({page_width}px)"
        page.goto(f"{base}/models/fraud-scorer/versions/1/")
        numbers = page.get_by_test_id("version-numbers")
        assert "v1 is ModelPort's number" in numbers.inner_text()
        assert "version 4 of acme.fraud-scorer" in numbers.inner_text()
        shoot(page, f"version-numbers-{label}")
        page.goto(f"{base}/models/fraud-scorer/")
        shoot(page, f"model-versions-{label}")
        watch.check()
        context.close()
