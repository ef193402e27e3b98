"""Template filters for the portal's pages."""

from __future__ import annotations

from django import template

from deployer.units import format_bytes

register = template.Library()


@register.filter
def shape(dims: list[int] | None) -> str:
    """A tensor shape for people: [-1, 4] reads "batch × 4" (a free dimension is "any")."""
    if not dims:
        return "scalar"
    return " × ".join(
        ("batch" if i == 0 else "any") if d < 0 else str(d) for i, d in enumerate(dims)
    )


@register.filter
def sig(value: object, digits: int = 3) -> str:
    """A number with a few significant digits (1.19e-07, 0.00385), or "—"."""
    if value is None or value == "":
        return "—"
    try:
        return f"{float(str(value)):.{int(digits)}g}"
    except ValueError:
        return str(value)


@register.filter
def size(num_bytes: int | float | None) -> str:
    """A size in binary units ("320.7 MiB", "868 bytes"), as the timeline writes them."""
    return format_bytes(num_bytes)


@register.filter
def first_line(text: str | None) -> str:
    """The first line of a message: a failure's one-line cause."""
    return (text or "").partition("\n")[0]


@register.filter
def after_first_line(text: str | None) -> str:
    """Everything after the first line of a message: a failure's detail (log lines)."""
    return (text or "").partition("\n")[2].strip()
