"""The geometry of the page's bar charts, for an inline SVG the template draws: one slot per
day of the range, a bar for each day with a value, a y axis of round steps. Pure and
integer-valued, so money charts are exact too (labels come from the caller's formatter)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

WIDTH = 880
HEIGHT = 260
LEFT = 84
"""Room for the y axis labels."""
BOTTOM = 28
"""Room for the x axis labels."""
TOP = 12
X_LABELS_MAX = 10
TICKS = 4


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str
    """What a pointer over it shows: the day and the exact value."""
    day: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    y_ticks: list[tuple[float, str]]
    """(y, label) of each horizontal grid line."""
    x_labels: list[tuple[float, str]]
    """(x, label) of the days named under the axis."""
    baseline: float
    left: float
    """Where the plot starts: the y axis."""


def nice_step(top: int, ticks: int = TICKS) -> int:
    """The least of 1, 2 or 5 times 10^k at or above `top` / `ticks`: grid lines at round values."""
    rough = max(1, -(-top // ticks))
    magnitude = 1
    while magnitude * 10 <= rough:
        magnitude *= 10
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)


def bar_chart(points: Sequence[tuple[str, int]], label: Callable[[int], str]) -> Chart:
    """A chart of `points` (day, value) in order; a day with 0 gets no bar."""
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - TOP - BOTTOM
    step = nice_step(max((v for _, v in points), default=0))
    top = step * TICKS
    slot = plot_w / max(1, len(points))
    gap = min(slot * 0.2, 4.0)
    bars = [
        Bar(
            x=LEFT + i * slot + gap / 2,
            y=TOP + plot_h - plot_h * value / top,
            width=max(slot - gap, 1.0),
            height=plot_h * value / top,
            title=f"{day}: {label(value)}",
            day=day,
        )
        for i, (day, value) in enumerate(points)
        if value > 0
    ]
    ticks = [(TOP + plot_h - plot_h * k / TICKS, label(step * k)) for k in range(TICKS + 1)]
    every = max(1, -(-len(points) // X_LABELS_MAX))
    x_labels = [
        (LEFT + (i + 0.5) * slot, day[5:]) for i, (day, _) in enumerate(points) if i % every == 0
    ]
    return Chart(WIDTH, HEIGHT, bars, ticks, x_labels, TOP + plot_h, LEFT)
