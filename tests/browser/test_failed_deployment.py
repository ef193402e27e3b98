"""A failed deployment's page: a one-line cause, then the detail; logs stay in the log
panel, free of colour codes, wrapped.

The failure is real: a model with reflect padding over a dynamic length, whose recorded
sample has length 1, is rolled out on a local serving process. Its warm-up fails inside
onnxruntime, which writes a coloured error line to the instance's log before the
runtime logs its own JSON error and exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployer.logs import failure_cause, strip_ansi
from deployer.samples import save_known_answer
from portal.deployments import services
from portal.deployments.choices import DeploymentStatus
from portal.deployments.models import Deployment
from portal.registry.models import Model
from tests.browser.conftest import WIDTHS, PageWatch, shoot
from tests.conftest import Personas
from tests.portal.factories import ready_version

pytestmark = [pytest.mark.browser]


def _reflect_padded(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
        "reflect",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "padded"])],
        initializer=[numpy_helper.from_array(np.array([0, 0, 2, 0, 0, 2], np.int64), "pads")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_cause_and_detail_without_colour_codes(
    browser: Any, personas: Personas, live_server: Any, tmp_path: Path
) -> None:
    model = Model.objects.create(team=personas.acme, name="padder")
    onnx_file = _reflect_padded(tmp_path / "pad.onnx")
    version = ready_version(model, 1, onnx_file)
    version.signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4, -1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4, -1]}],
    }
    version.save()
    x = np.ones((1, 4, 1), dtype=np.float32)  # length 1: reflect padding by 2 cannot work
    save_known_answer(version.known_answer_path, {"x": x}, {"y": np.ones((1, 4, 5), np.float32)})

    revision = services.deployment_deploy(
        version=version, name="production", user=personas.bob.user
    )
    services.revision_rollout(revision_id=revision.pk)
    deployment = Deployment.objects.get(pk=revision.deployment_id)
    assert deployment.status == DeploymentStatus.FAILED
    cause, _, detail = deployment.error.partition("\n")
    assert cause.startswith("Version 1 did not go live: The serving instance exited before")
    assert "Warm-up inference failed" in cause
    assert "Pad" in cause
    assert "\x1b" not in deployment.error
    assert detail.startswith("Last log lines:")

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
        page.goto(f"{base}/deployments/{deployment.pk}/")

        shown = page.get_by_test_id("failure-cause")
        assert shown.inner_text() == cause
        hidden = page.get_by_test_id("failure-detail")
        assert not hidden.is_visible()  # behind "Detail" until asked for
        logs = page.locator("#deployment-logs pre.logs")
        assert "warmup_failed" in logs.inner_text()
        assert "\x1b" not in logs.inner_text()
        assert "[1;31m" not in page.content()
        shoot(page, f"deployment-failed-{label}")
        page.get_by_text("Detail", exact=True).click()
        assert hidden.is_visible()
        assert "warmup_failed" in hidden.inner_text()
        shoot(page, f"deployment-failed-detail-{label}")
        page_width = page.evaluate("document.documentElement.scrollWidth")
        assert page_width <= width, f"{label}: the page scrolls sideways ({page_width}px)"
        for selector in ("[data-testid=failure-detail]", "#deployment-logs pre.logs"):
            fits = page.eval_on_selector(selector, "el => el.scrollWidth <= el.clientWidth + 1")
            assert fits, f"{label}: {selector} runs off the card"
        watch.check()
        context.close()


def test_failure_cause_reads_the_last_logged_error() -> None:
    coloured = "\x1b[1;31m2026-12-02 [E:onnxruntime:, sequential_executor.cc:572] Pad failed\x1b[m"
    lines = "\n".join(
        [
            '{"level": "info", "msg": "model loaded"}',
            coloured,
            '{"level": "error", "msg": "warm-up inference failed:  Pad reflect\\nsecond line"}',
            '{"level": "info", "msg": "stopped"}',
        ]
    )
    assert strip_ansi(coloured).startswith("2026-12-02 [E:onnxruntime:")
    assert "\x1b" not in strip_ansi(lines)
    assert failure_cause(lines) == "warm-up inference failed: Pad reflect second line"
    assert failure_cause("no json here") == ""
