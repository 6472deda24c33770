"""Static charts for the report, drawn with matplotlib (Agg) and inlined as SVG.

Text stays text (``svg.fonttype: none``), escaped by matplotlib's SVG writer, so labels from
the data cannot inject markup.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import matplotlib
import numpy as np
from markupsafe import Markup
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jobs.core.render import PALETTE, plain_text

_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.S)  # the XML declaration and DOCTYPE before <svg
# Inline SVG in HTML needs no namespaces or RDF metadata (and the report names no URL).
_NAMESPACES = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)


def _svg(fig: Figure, title: str) -> Markup:
    FigureCanvasAgg(fig)
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "convscope"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    svg = _METADATA.sub("", _NAMESPACES.sub("", _PROLOGUE.sub("", buf.getvalue(), count=1)))
    label = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    svg = svg.replace("<svg ", f'<svg class="chart" role="img" aria-label="{label}" '
                                'style="max-width: 100%; height: auto" ', 1)
    return Markup(svg)


def bar_chart(values: Sequence[tuple[str, float]], title: str, top: float = 1.0,
              series: Sequence[tuple[str, Sequence[float]]] | None = None) -> Markup:
    """Horizontal bars, one row per ``(name, value)`` from 0 to at least ``top``; ``series``
    draws several bars per row (with a legend), each a list aligned with ``values``."""
    series = list(series or [("", [v for _, v in values])])
    names = [name for name, _ in values]
    n, k = len(names), len(series)
    fig = Figure(figsize=(6.4, 0.6 + 0.22 * max(n, 1) * k))
    ax = fig.add_subplot()
    height = 0.8 / k
    y = np.arange(n)
    peak = top
    for s, (label, vals) in enumerate(series):
        v = np.array([np.nan if x is None else float(x) for x in vals], dtype=float)
        shown = np.nan_to_num(v, nan=0.0)
        peak = max(peak, float(shown.max()) if len(shown) else 0.0)
        pos = y - 0.4 + height * (s + 0.5)
        ax.barh(pos, shown, height=height * 0.9, color=np.array(PALETTE[s % len(PALETTE)]) / 255,
                label=plain_text(label) if label else None)
        for yy, value in zip(pos, v):
            ax.text(0 if np.isnan(value) else value, yy, " —" if np.isnan(value) else f" {value:.3f}",
                    va="center", fontsize=7)
    ax.set_yticks(y, [plain_text(name) for name in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, peak * 1.12 if peak > 0 else 1)
    ax.set_title(plain_text(title), fontsize=9, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(axis="x", labelsize=7)
    if any(label for label, _ in series):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _svg(fig, title)


def line_chart(x_labels: Sequence[str], series: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[float]]],
               title: str, y_label: str = "", x_label: str = "", error_bars: bool = False) -> Markup:
    """One line per ``(name, values, lo, hi)`` over the points ``x_labels`` (NaN: no point), with
    a shaded band from ``lo`` to ``hi``, or with ``error_bars`` a bar from ``lo`` to ``hi`` at each
    point (NaN: none)."""
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot()
    x = np.arange(len(x_labels))
    for s, (name, values, lo, hi) in enumerate(series):
        colour = np.array(PALETTE[s % len(PALETTE)]) / 255
        v, low, high = (np.array([np.nan if a is None else float(a) for a in arr], dtype=float)
                        for arr in (values, lo, hi))
        if error_bars:
            below, above = np.nan_to_num(v - low, nan=0.0), np.nan_to_num(high - v, nan=0.0)
            ax.errorbar(x, v, yerr=np.vstack([np.maximum(below, 0), np.maximum(above, 0)]), marker="o",
                        markersize=3, color=colour, capsize=3, linewidth=1.2, label=plain_text(name))
        else:
            ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)
            ax.plot(x, v, marker="o", markersize=3, color=colour, label=plain_text(name))
    ax.set_xticks(x, [plain_text(label) for label in x_labels], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(plain_text(y_label), fontsize=8)
    if x_label:
        ax.set_xlabel(plain_text(x_label), fontsize=8)
    ax.set_title(plain_text(title), fontsize=9, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _svg(fig, title)
