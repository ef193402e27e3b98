"""How sizes are written for people: one convention for the engine's logs and the portal."""

from __future__ import annotations

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_bytes(num_bytes: int | float | None) -> str:
    """A size with binary prefixes and one decimal ("320.7 MiB"); whole bytes below 1 KiB.

    The portal's pages, its timeline and the engine's build log all write sizes with this,
    so the same image never reads "336 MB" in one place and "320.7 MB" in another.
    """
    if num_bytes is None:
        return "—"
    value = float(num_bytes)
    if value < 0:
        raise ValueError(f"A size cannot be negative: {num_bytes}")
    if value < 1024:
        whole = int(value)
        return "1 byte" if whole == 1 else f"{whole} bytes"
    for unit in _BINARY_UNITS:
        value /= 1024
        if round(value, 1) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # the loop returns at its last unit
