"""The Inference keys page in Chromium: create (shown once, htmx), revoke, and the
deployment page's access badge; photographed under artifacts/screenshots/."""

from __future__ import annotations

from typing import Any

import pytest

from deployer.keys import read_keys_file
from portal.accounts.models import InferenceKey
from portal.deployments.inference_keys import all_keys_write, keys_file_path
from portal.registry.models import Model
from tests.browser.conftest import PageWatch, shoot
from tests.conftest import Personas
from tests.portal.factories import ready_version, running_deployment

pytestmark = [pytest.mark.browser]


@pytest.mark.django_db(transaction=True)
def test_create_and_revoke_a_key_in_the_browser(
    browser: Any, personas: Personas, live_server: Any, onnx_file: Any
) -> None:
    deployment = running_deployment(
        ready_version(Model.objects.create(team=personas.acme, name="demo"), 1, onnx_file)
    )
    all_keys_write()
    base = live_server.url
    page = browser.new_page()
    watch = PageWatch(page, base)
    page.goto(f"{base}/accounts/login/")
    page.get_by_label("User name").fill("bob")
    page.get_by_label("Password").fill("bob-password")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/")
    page.goto(f"{base}/accounts/keys/")
    page.get_by_label("Name").fill("checkout")
    page.get_by_label("Rate limit").fill("5")
    page.get_by_role("button", name="Create key").click()
    page.locator("#new-key").wait_for()
    key = page.locator("#new-key").inner_text()
    assert key.startswith("mpk_")
    page.locator("#key-table").get_by_text("checkout").wait_for()
    shoot(page, "keys-created")
    row = InferenceKey.objects.get(name="checkout")
    assert row.key_id in {k.id for k in read_keys_file(keys_file_path(deployment.pk)).keys}
    page.reload()
    assert page.locator("#new-key").count() == 0  # shown once
    page.get_by_role("button", name="Revoke key checkout").click()
    page.locator(f"#key-{row.pk}").get_by_text("revoked").wait_for()
    assert row.key_id not in {k.id for k in read_keys_file(keys_file_path(deployment.pk)).keys}
    shoot(page, "keys-revoked")
    page.goto(f"{base}/deployments/{deployment.pk}/")
    assert "private" in page.get_by_test_id("deployment-access").inner_text()
    shoot(page, "deployment-private")
    watch.check()
    page.close()
