"""Small server-rendered SVG line charts (no JavaScript, no chart library)."""

from __future__ import annotations

from dataclasses import dataclass

from portal.monitoring.selectors import Point

WIDTH, HEIGHT, PAD = 300, 80, 4


@dataclass(frozen=True)
class Chart:
    """One metric's line over the window, scaled into the SVG's box."""

    title: str
    unit: str
    lines: list[tuple[str, str]]  # (css class, "x,y x,y ...")
    latest: str
    peak: str
    empty: bool
    width: int = WIDTH
    height: int = HEIGHT


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if value >= 100 or value == int(value):
        return f"{value:,.0f} {unit}"
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"


def chart(points: list[Point], title: str, unit: str, *attributes: str) -> Chart:
    """Scale ``attributes`` of ``points`` into polylines sharing one y axis."""
    series = [[getattr(p, a) for p in points] for a in attributes]
    values = [v for s in series for v in s if v is not None]
    if len(points) < 2 or not values:
        return Chart(title, unit, [], "–", "–", empty=True)
    top = max(values) or 1.0
    start = points[0].at.timestamp()
    span = (points[-1].at.timestamp() - start) or 1.0
    lines = []
    for attribute, values_of in zip(attributes, series, strict=True):
        coords = []
        for point, value in zip(points, values_of, strict=True):
            if value is None:
                continue
            x = PAD + (point.at.timestamp() - start) / span * (WIDTH - 2 * PAD)
            y = HEIGHT - PAD - value / top * (HEIGHT - 2 * PAD)
            coords.append(f"{x:.1f},{y:.1f}")
        lines.append((attribute.replace("_", "-"), " ".join(coords)))
    latest = " / ".join(_fmt(s[-1], unit) for s in series)
    return Chart(title, unit, lines, latest, _fmt(max(values), unit), empty=False)
