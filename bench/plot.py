"""Line plots of benchmark results, rendered to PNG with matplotlib: one figure per family.

Every benchmark family (materialise, cold pulls, the embedded default, start-up, the node
plugin) draws its shape the same way: time (or time per object, or throughput) against size,
datapin and each peer as a line, so a reader sees at a glance who is flat, who is linear, and
where the lines cross. `save_png` is that one figure; the benchmark decides what the axes are.

Design choices, and why:

* **matplotlib, in the `bench` extra only.** The figures are for docs/, made by a person running
  a benchmark, never by the product or the tests, so matplotlib is imported inside `save_png`
  (a bench run that draws nothing does not need it) and the headless `Agg` backend is chosen
  explicitly: benchmark machines have no display.
* **Log axes by default.** Sizes in benchmarks span decades (1k to 200k objects, 10k to 1M
  files); on log-log axes a line rising one decade per decade is linear in the size and a flat
  line is O(1), so slopes read directly. A family whose x is categorical or narrow asks for
  linear axes.
* **Colour and marker both** tell series apart (Okabe-Ito colours stay distinct for
  colour-blind readers; markers survive printing in grey). datapin's lines are solid, a line
  marked `dashed` is a variant of another (datapin over gRPC beside in-process, for one).
* **Values on the points** (`label_points`) for readers who want the figure without the table;
  label formatting is the caller's (`x_format`, `y_format`): the plot knows numbers, the
  benchmark knows they are files and seconds.
* **Reproducible bytes where matplotlib allows:** a fixed size and DPI, and no date in the
  PNG's metadata, so re-rendering the same figures does not churn docs/.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Okabe-Ito: distinct for the common forms of colour blindness.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
MARKERS = ("o", "s", "^", "D", "X", "v", "P")


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """One series: its legend label and its (x, y) points (drawn in x order)."""

    label: str
    points: Sequence[tuple[float, float]]
    dashed: bool = False


def save_png(
    path: Path,
    *,
    title: str,
    x_label: str,
    y_label: str,
    lines: Sequence[Line],
    x_format: Callable[[float], str] = lambda v: f"{v:g}",
    y_format: Callable[[float], str] = lambda v: f"{v:g}",
    log_x: bool = True,
    log_y: bool = True,
    label_points: bool = True,
    note: str = "",
    x_ticks: Sequence[float] = (),
) -> Path:
    """Draw `lines` (see the module doc) and write the PNG to `path`; returns `path`.
    `x_ticks`, if given, are the only labelled x values (sizes that are powers of two read
    better at the sizes measured than at powers of ten)."""
    drawn = [line for line in lines if line.points]
    if not drawn:
        raise ValueError(f"nothing to plot for {title!r}: every line is empty")
    points = [p for line in drawn for p in line.points]
    if (log_x and min(x for x, _ in points) <= 0) or (log_y and min(y for _, y in points) <= 0):
        raise ValueError(f"{title!r}: a log axis needs positive values")

    import matplotlib  # noqa: PLC0415 - only a run that draws needs it (see the module doc)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8.0, 5.0), dpi=110)
    try:
        for n, line in enumerate(drawn):
            xs, ys = zip(*sorted(line.points), strict=True)
            ax.plot(
                xs,
                ys,
                label=line.label,
                color=COLOURS[n % len(COLOURS)],
                marker=MARKERS[n % len(MARKERS)],
                linestyle="--" if line.dashed else "-",
                linewidth=1.8,
                markersize=6,
            )
            if label_points:
                for x, y in zip(xs, ys, strict=True):
                    ax.annotate(
                        y_format(y),
                        (x, y),
                        textcoords="offset points",
                        xytext=(5, 5),
                        fontsize=7,
                        color=COLOURS[n % len(COLOURS)],
                    )
        if log_x:
            ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        for axis, fmt, log in ((ax.xaxis, x_format, log_x), (ax.yaxis, y_format, log_y)):
            axis.set_major_formatter(FuncFormatter(lambda v, _, fmt=fmt: fmt(v)))
            if log:  # a range inside one decade has no major tick: label 2x, 3x and 5x too
                axis.set_minor_formatter(
                    FuncFormatter(lambda v, _, fmt=fmt: fmt(v) if _mantissa(v) in (2, 3, 5) else "")
                )
        if x_ticks:
            ax.xaxis.set_major_locator(FixedLocator(list(x_ticks)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(visible=True, which="major", alpha=0.45)
        ax.grid(visible=True, which="minor", alpha=0.15)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
        if note:
            fig.text(0.01, 0.01, note, fontsize=7, color="#555555")
        fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def _mantissa(v: float) -> int:
    """The leading digit of a positive number (3 for 0.003 and for 300)."""
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


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


def bytes_label(n: float) -> str:
    """A size in binary units: "64 KiB", "1 GiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"
