"""The upload page lists every format, how this server handles it, and what it needs."""

from __future__ import annotations

from typing import Any

from django.test import Client

from deployer.convert.formats import LABELS, NEEDS, Format
from portal.registry.choices import SourceFormat
from portal.registry.models import Model
from tests.conftest import Personas


def test_every_format_is_listed_with_what_it_needs(personas: Personas, settings: Any) -> None:
    # A server without containers: the container-only formats are refused, and say so.
    settings.MODELPORT_CONVERSION_SANDBOX = "local"
    settings.MODELPORT_CONVERSION_TRUSTED_LOCAL = True
    Model.objects.create(team=personas.acme, name="demo")
    client = Client()
    client.force_login(personas.bob.user)
    page = client.get("/models/demo/upload/").content.decode()
    assert set(SourceFormat.values) == {f.value for f in Format}
    assert set(NEEDS) == set(Format) == set(LABELS)
    for fmt in Format:
        assert f'value="{fmt.value}"' in page, fmt
    # Django escapes quotes in the text; compare the escaped form.
    from django.utils.html import escape

    for needs in NEEDS.values():
        assert escape(needs) in page, needs
    for fmt in ("xgboost", "keras", "torch_state_dict"):
        option = page.split(f'value="{fmt}"', 1)[1].split("</option>", 1)[0]
        assert "disabled" in option.split(">", 1)[0]
        assert "(refused on this server)" in option
    pickle_option = page.split('value="pickle"', 1)[1].split("</option>", 1)[0]
    assert "disabled" not in pickle_option.split(">", 1)[0]
