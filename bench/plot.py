"""A small SVG line plot on log-log axes, with no dependencies: for the figures in docs/.

Benchmarks run on machines where matplotlib is not installed, and it must not become a
dependency for one figure. What a benchmark figure needs is little: a few series of points
joined by lines, logarithmic axes whose ticks are decades with readable labels, faint minor
grid lines (2..9 within each decade) so the eye can read values between decades, a marker per
series that survives printing in grey, and a legend. `loglog_svg` writes exactly that as a
standalone SVG string (no scripts, no external fonts or styles), so the file renders the same
in a browser, on GitHub and in an editor's preview.

Design choices, and why:

* **Decades only as labelled ticks.** The axes span whole decades (the data's range rounded
  out), so every labelled tick is a power of ten and slopes read at a glance: a line rising
  one decade per decade is linear in the number of files, a flat line is O(1).
* **Colour and marker both** tell series apart (Okabe-Ito colours, which stay distinct for
  colour-blind readers; circle, square, triangle, diamond, cross, ... as markers).
* **The legend sits right of the plot**, never over the data, and each point may carry its
  value as a label (`label_points`, on a white halo so a line under it does not hide it) for
  readers who want the figure without the table.
* Label formatting is the caller's (`x_format`, `y_format`): the plot knows numbers, the
  benchmark knows they are files and seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

#: Okabe-Ito: distinct for the common forms of colour blindness.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
MARKERS = ("circle", "square", "triangle", "diamond", "cross", "down")

FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """One series: its legend label and its (x, y) points (both > 0; drawn in x order)."""

    label: str
    points: Sequence[tuple[float, float]]
    dashed: bool = False


#: Room (in decades) between the outermost points and the plot's edges.
PAD = 0.25


def _span(values: Sequence[float]) -> tuple[float, float]:
    """The axis range in log10 units: the data's, padded, at least one decade wide."""
    lo, hi = math.log10(min(values)) - PAD, math.log10(max(values)) + PAD
    if hi - lo < 1:
        mid = (lo + hi) / 2
        lo, hi = mid - 0.5, mid + 0.5
    return lo, hi


def _ticks(lo: float, hi: float) -> list[tuple[float, bool]]:
    """(value, is a decade) of every grid line within [10**lo, 10**hi]."""
    found = []
    for d in range(math.floor(lo), math.ceil(hi) + 1):
        for m in range(1, 10):
            v = m * 10.0**d
            if lo - 1e-9 <= math.log10(v) <= hi + 1e-9:
                found.append((v, m == 1))
    return found


def _marker(kind: str, x: float, y: float, colour: str) -> str:
    r = 5.0
    if kind == "circle":
        return f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{r:.1f}' fill='{colour}'/>"
    if kind == "square":
        return (
            f"<rect x='{x - r:.1f}' y='{y - r:.1f}' width='{2 * r:.1f}' height='{2 * r:.1f}' "
            f"fill='{colour}'/>"
        )
    if kind in ("triangle", "down"):
        s = 1 if kind == "triangle" else -1
        pts = [(x, y - s * 1.2 * r), (x - 1.1 * r, y + s * 0.8 * r), (x + 1.1 * r, y + s * 0.8 * r)]
        return _polygon(pts, colour)
    if kind == "diamond":
        pts = [(x, y - 1.3 * r), (x + r, y), (x, y + 1.3 * r), (x - r, y)]
        return _polygon(pts, colour)
    d = 0.9 * r  # cross
    return (
        f"<path d='M{x - d:.1f},{y - d:.1f} L{x + d:.1f},{y + d:.1f} M{x - d:.1f},{y + d:.1f} "
        f"L{x + d:.1f},{y - d:.1f}' stroke='{colour}' stroke-width='2.5'/>"
    )


def _polygon(pts: Sequence[tuple[float, float]], colour: str) -> str:
    coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
    return f"<polygon points='{coords}' fill='{colour}'/>"


def loglog_svg(
    *,
    title: str,
    x_label: str,
    y_label: str,
    lines: Sequence[Line],
    x_format: Callable[[float], str] = lambda v: f"{v:g}",
    y_format: Callable[[float], str] = lambda v: f"{v:g}",
    label_points: bool = True,
    note: str = "",
    plot_width: int = 600,
    height: int = 520,
) -> str:
    """The plot as a standalone SVG document (see the module doc); the legend widens the
    document, never the plot."""
    drawn = [line for line in lines if line.points]
    if not drawn:
        raise ValueError("nothing to plot: every line is empty")
    xs = [x for line in drawn for x, _ in line.points]
    ys = [y for line in drawn for _, y in line.points]
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("a log-log plot needs positive values")
    x_lo, x_hi = _span(xs)
    y_lo, y_hi = _span(ys)
    # ~7.5 px per character of 13 px sans-serif, plus the swatch.
    legend_w = int(max(len(line.label) for line in drawn) * 7.5) + 60
    left, top, bottom = 92, 50, 70 if not note else 90
    pw, ph = plot_width, height - top - bottom
    width = left + pw + legend_w + 30

    def px(x: float) -> float:
        return left + (math.log10(x) - x_lo) / (x_hi - x_lo) * pw

    def py(y: float) -> float:
        return top + ph - (math.log10(y) - y_lo) / (y_hi - y_lo) * ph

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='{escape(title)}'>",
        f"<title>{escape(title)}</title>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
        f"<text x='{left + pw / 2:.1f}' y='28' text-anchor='middle' font-size='17' "
        f"font-weight='bold' {FONT}>{escape(title)}</text>",
    ]
    # Grid: minor lines at 2..9 of each decade, major ones (labelled) at each decade.
    for v, major in _ticks(x_lo, x_hi):
        x = px(v)
        colour, w = ("#bbbbbb", 1.0) if major else ("#e8e8e8", 0.8)
        out.append(
            f"<line x1='{x:.1f}' y1='{top}' x2='{x:.1f}' y2='{top + ph}' stroke='{colour}' "
            f"stroke-width='{w}'/>"
        )
        if major:
            out.append(
                f"<text x='{x:.1f}' y='{top + ph + 20}' text-anchor='middle' font-size='13' "
                f"{FONT}>{escape(x_format(v))}</text>"
            )
    for v, major in _ticks(y_lo, y_hi):
        y = py(v)
        colour, w = ("#bbbbbb", 1.0) if major else ("#e8e8e8", 0.8)
        out.append(
            f"<line x1='{left}' y1='{y:.1f}' x2='{left + pw}' y2='{y:.1f}' stroke='{colour}' "
            f"stroke-width='{w}'/>"
        )
        if major:
            out.append(
                f"<text x='{left - 8}' y='{y + 4:.1f}' text-anchor='end' font-size='13' "
                f"{FONT}>{escape(y_format(v))}</text>"
            )
    out.append(
        f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#444444'/>"
    )
    out.append(
        f"<text x='{left + pw / 2:.1f}' y='{top + ph + 45}' text-anchor='middle' font-size='14' "
        f"{FONT}>{escape(x_label)}</text>"
    )
    out.append(
        f"<text transform='translate(18 {top + ph / 2:.1f}) rotate(-90)' text-anchor='middle' "
        f"font-size='14' {FONT}>{escape(y_label)}</text>"
    )
    if note:
        out.append(
            f"<text x='{left}' y='{height - 14}' font-size='12' fill='#555555' {FONT}>"
            f"{escape(note)}</text>"
        )
    # Lines, then markers; value labels last, nudged apart where lines run close.
    labels: dict[float, list[tuple[float, str, str]]] = {}
    for i, line in enumerate(drawn):
        colour, marker = COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]
        pts = sorted(line.points)
        path = " ".join(
            f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y) in enumerate(pts)
        )
        dash = " stroke-dasharray='7 5'" if line.dashed else ""
        out.append(f"<path d='{path}' fill='none' stroke='{colour}' stroke-width='2.2'{dash}/>")
        for x, y in pts:
            out.append(_marker(marker, px(x), py(y), colour))
            labels.setdefault(x, []).append((py(y), y_format(y), colour))
    if label_points:
        last = max(labels)
        for x, at in labels.items():
            # Above its point; below it where the label above is too close (lines that run
            # together, as two tools with the same slope do).
            at.sort()
            placed: list[tuple[float, str, str]] = []
            for point_y, text, colour in at:
                ty = point_y - 9
                if placed and ty - placed[-1][0] < 13:
                    ty = max(point_y + 18, placed[-1][0] + 13)
                placed.append((ty, text, colour))
            at[:] = placed
            # The last column's labels go left of their points: right of them is the legend.
            anchor, dx = ("end", -9) if x == last else ("start", 9)
            for ty, text, colour in at:
                out.append(
                    f"<text x='{px(x) + dx:.1f}' y='{ty:.1f}' text-anchor='{anchor}' "
                    f"font-size='11' fill='{colour}' stroke='white' stroke-width='3' "
                    f"paint-order='stroke' {FONT}>{escape(text)}</text>"
                )
    # Legend, right of the plot.
    lx, ly = left + pw + 20, top + 10
    out.append(
        f"<rect x='{lx - 8}' y='{ly - 8}' width='{legend_w}' height='{24 * len(drawn) + 10}' "
        "fill='white' stroke='#bbbbbb'/>"
    )
    for i, line in enumerate(drawn):
        colour, marker = COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]
        y = ly + 10 + 24 * i
        dash = " stroke-dasharray='7 5'" if line.dashed else ""
        out.append(
            f"<line x1='{lx}' y1='{y}' x2='{lx + 34}' y2='{y}' stroke='{colour}' "
            f"stroke-width='2.2'{dash}/>"
        )
        out.append(_marker(marker, lx + 17, y, colour))
        out.append(
            f"<text x='{lx + 44}' y='{y + 4}' font-size='13' {FONT}>{escape(line.label)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def count_label(n: float) -> str:
    """10000 -> "10k", 1000000 -> "1M"."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def seconds_label(s: float) -> str:
    """A duration as people read it: "1 ms", "170 ms", "1.7 s", "26 s"."""
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"
