"""Small helpers for pages that refresh parts of themselves with htmx."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


def render_page_or_fragment(
    request: HttpRequest, page: str, fragment: str, context: dict[str, Any]
) -> HttpResponse:
    """The whole page for a normal request, only the fragment for an htmx one."""
    template = fragment if getattr(request, "htmx", False) else page
    return render(request, template, context)
