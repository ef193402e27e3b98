"""Playwright driving Debian's Chromium against the live portal, with a real worker."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO, require

CHROMIUM = os.environ.get("MODELPORT_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = REPO / "artifacts" / "screenshots"
WIDTHS = {"wide": 1280, "phone": 375}


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    require("Chromium", Path(CHROMIUM).exists(), f"install Debian's chromium ({CHROMIUM})")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM calls the live
    # server makes happen in other threads, but Django's guard looks at this one.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync",
            ],
        )  # fmt: skip
        yield browser
        browser.close()


class PageWatch:
    """Collects console errors, page errors and requests to hosts other than the portal."""

    def __init__(self, page: Any, origin: str) -> None:
        self.errors: list[str] = []
        self.foreign: list[str] = []
        host = urlsplit(origin).netloc
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on(
            "request",
            lambda r: (
                None
                if urlsplit(r.url).netloc in ("", host) or r.url.startswith("data:")
                else self.foreign.append(r.url)
            ),
        )

    def check(self) -> None:
        assert self.errors == [], f"JavaScript console errors: {self.errors}"
        assert self.foreign == [], f"requests to other hosts: {self.foreign}"


def shoot(page: Any, name: str) -> None:
    """Save a full-page screenshot under artifacts/screenshots/."""
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def clean_screenshots() -> None:
    if SCREENSHOTS.exists() and not os.environ.get("MODELPORT_KEEP_SCREENSHOTS"):
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
