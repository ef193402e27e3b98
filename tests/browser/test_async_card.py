"""The deployment page's async card in Chromium: queue depth and the oldest request's age,
refreshed by htmx as requests arrive; photographed under artifacts/screenshots/."""

from __future__ import annotations

from typing import Any

import pytest

from deployer.serving.async_spool import Spool
from portal.deployments.async_inference import deployment_spool_prepare
from portal.registry.models import Model
from tests.browser.conftest import PageWatch, shoot
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment

pytestmark = [pytest.mark.browser]


def _submit(spool: Spool) -> None:
    spool.submit(
        body=b"{}", model_name="demo", key_id="k_1", headers={}, callback_url="", max_depth=100
    )


@pytest.mark.django_db(transaction=True)
def test_the_async_card_follows_the_queue(
    browser: Any, personas: Personas, live_server: Any, onnx_file: Any
) -> None:
    deployment = running_deployment(
        ready_version(Model.objects.create(team=personas.acme, name="demo"), 1, onnx_file)
    )
    spool = Spool(deployment_spool_prepare(deployment=deployment))
    _submit(spool)
    base = live_server.url
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = PageWatch(page, base)
    page.goto(f"{base}/accounts/login/")
    page.get_by_label("User name").fill("vera")
    page.get_by_label("Password").fill("vera-password")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/")
    page.goto(f"{base}/deployments/{deployment.pk}/")
    assert page.locator("#async-depth").inner_text() == "1"
    assert page.locator("#async-oldest").inner_text().endswith(" s")
    for _ in range(2):
        _submit(spool)
    # htmx refreshes the card every 5 s.
    page.locator("#async-depth", has_text="3").wait_for(timeout=20_000)
    page.locator("#deployment-async").scroll_into_view_if_needed()
    shoot(page, "deployment-async-queue")
    watch.check()
    page.close()
