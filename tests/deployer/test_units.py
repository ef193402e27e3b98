"""Sizes are written one way everywhere: binary prefixes, one decimal, bytes below 1 KiB."""

from __future__ import annotations

import pytest

from deployer.units import format_bytes


@pytest.mark.parametrize(
    ("num_bytes", "shown"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (868, "868 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (336_266_000, "320.7 MiB"),  # the image `docker images` calls "336MB"
        (1024 * 1024 - 1, "1.0 MiB"),  # never "1024.0 KiB"
        (5 * 1024**3, "5.0 GiB"),
        (None, "—"),
    ],
)
def test_sizes_read_the_same_everywhere(num_bytes: int | None, shown: str) -> None:
    assert format_bytes(num_bytes) == shown


def test_a_negative_size_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="cannot be negative: -1"):
        format_bytes(-1)
