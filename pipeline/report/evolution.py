"""The evolution page of a checkpoint series: how the model changes through training.

Line charts per checkpoint: accuracy (the first ``predictions`` entry), dead units per layer (the
first ``activation_stats`` entry) and linear-probe test accuracy per layer (the first ``probes``
entry's full-data fits); for the channels of the first ``top_patches`` entry (the first few of
those it was given), the strongest patch of each checkpoint side by side, each with its
projections to the pixels when the entry has them (Zeiler & Fergus 2014, Fig. 4); and the first
``filters`` entry's filter grid per checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from markupsafe import Markup

from jobs.core.render import enlarge, signed_pixels
from pipeline.report.charts import line_chart
from pipeline.report.html import esc, figure, render, table_html
from pipeline.report.run import Run

CHANNELS = 6  # channels of the top_patches entry shown


def _first(run: Run, kind: str) -> str | None:
    return next((name for name, a in run.analyses.items()
                 if a.get("type") == kind and a.get("status") in ("complete", "skipped") and run.committed(name)), None)


def accuracy(run: Run, entry: str) -> pd.DataFrame:
    """Accuracy of every checkpoint on the labelled images: checkpoint, images, accuracy."""
    rows = []
    for name in run.checkpoints:
        df = run.at(name).table(entry, ["label", "pred"])
        labelled = df.dropna(subset=["label"]) if len(df) else df
        rows.append({"checkpoint": name, "images": len(labelled),
                     "accuracy": float((labelled["pred"] == labelled["label"]).mean()) if len(labelled) else np.nan})
    return pd.DataFrame(rows)


def _row(title: str, subtitle: str, figures: list[Markup]) -> Markup:
    return render("image_row.html", title=title, subtitle=subtitle, figures=figures, cls="grid")


def _projections(run: Run, entry: str) -> list[str]:
    """The methods the top_patches entry projected its patches with (``projection_<method>`` columns)."""
    for name in run.checkpoints:
        parts = run.at(name).parts(entry)
        if parts:
            return [c[len("projection_"):] for c in run.schema(parts[0]).names if c.startswith("projection_")]
    return []


def _top_patches(run: Run, entry: str) -> Markup:
    methods = _projections(run, entry)
    columns = ["layer", "channel", "rank", "image_id", "activation", "key", "box",
               *[f"projection_{m}" for m in methods]]
    tables = {name: run.at(name).table(entry, columns) for name in run.checkpoints}
    first = next((df for df in tables.values() if len(df)), None)
    if first is None:
        return Markup("<p>No patches.</p>")
    layer = str(first["layer"].iloc[0])
    channels = list(dict.fromkeys(first.loc[first["layer"] == layer, "channel"].tolist()))[:CHANNELS]
    rows = []
    for channel in channels:
        figures = []
        for name, df in tables.items():
            mine = df[(df["layer"] == layer) & (df["channel"] == channel)]
            top = mine.sort_values("rank").head(1)
            if not len(top):
                figures.append(figure(None, esc(name)))
                continue
            r = top.iloc[0]
            caption = Markup(f"{esc(name)}<br><small>{esc(r['image_id'])}, {float(r['activation']):.3g}</small>")
            figures.append(figure(run.at(name).image(entry, r["key"]), caption, lazy=False))
            x0, y0, x1, y1 = (int(v) for v in r["box"])
            for method in methods:
                values = np.asarray(r[f"projection_{method}"], np.float32)
                if values.size != 3 * (y1 - y0) * (x1 - x0):
                    continue
                src = run.picture(f"evolution-{entry}-{name}-{layer}-{channel}-{method}",
                                  enlarge(signed_pixels(values.reshape(3, y1 - y0, x1 - x0)), 48))
                figures.append(figure(src, Markup(f"{esc(name)}<br><small>{esc(method)}</small>"), lazy=False))
        what = "the strongest patch at each checkpoint" + (f", and its projection ({', '.join(methods)})"
                                                            if methods else "")
        rows.append(_row(f"{layer} channel {channel}", what, figures))
    return Markup("").join(rows)


def per_layer(run: Run, entry: str, columns: list[str], value: Callable[[pd.DataFrame], pd.Series]) -> pd.DataFrame:
    """One row per checkpoint, one column per layer: ``value`` of the entry's table of that checkpoint,
    grouped by layer (layers in table order; NaN where a checkpoint lacks one)."""
    rows = {}
    for name in run.checkpoints:
        at = run.at(name)
        parts = at.parts(entry)
        present = set(at.schema(parts[0]).names) | {"layer"} if parts else set()
        df = at.table(entry, [c for c in columns if c in present]) if parts else pd.DataFrame()
        rows[name] = value(df) if len(df) else pd.Series(dtype=float)
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("checkpoint")


def _lines(table: pd.DataFrame, title: str, y_label: str) -> Markup:
    series = [(str(layer), table[layer].tolist(), table[layer].tolist(), table[layer].tolist())
              for layer in table.columns]
    return line_chart(list(table.index), series, title, y_label=y_label, x_label="checkpoint")


def dead_units(run: Run, entry: str) -> pd.DataFrame:
    """Dead channels (never positive on the dataset) per layer and checkpoint."""
    return per_layer(run, entry, ["layer", "dead"],
                     lambda df: df.groupby("layer", sort=False)["dead"].sum().astype(float))


def probe_accuracy(run: Run, entry: str) -> pd.DataFrame:
    """The full-data linear probes' test accuracy per layer and checkpoint (not a baseline's)."""
    def full(df: pd.DataFrame) -> pd.Series:
        keep = df["shots"].isna() if "shots" in df.columns else pd.Series(True, index=df.index)
        if "baseline" in df.columns:
            keep &= df["baseline"].isna()
        return df[keep].groupby("layer", sort=False)["test_accuracy"].first()

    return per_layer(run, entry, ["layer", "test_accuracy", "shots", "baseline"], full)


def _filters(run: Run, entry: str) -> Markup:
    figures = []
    layer = None
    for name in run.checkpoints:
        df = run.at(name).table(entry, ["layer", "grid_key"])
        if not len(df):
            continue
        layer = layer or str(df["layer"].iloc[0])
        key = df.loc[df["layer"] == layer, "grid_key"].iloc[0]
        figures.append(figure(run.at(name).image(entry, key), esc(name), lazy=False))
    return _row(f"{layer}", "filters at each checkpoint", figures) if figures else Markup("<p>No filters.</p>")


def evolution_body(run: Run) -> Markup:
    """The page: accuracy, patches and filters per checkpoint, from the entries the run has."""
    sections: list[tuple[str, Markup]] = [("", Markup(
        f"<p>{len(run.checkpoints)} checkpoints: {esc(', '.join(run.checkpoints))}. Every analysis ran per "
        "checkpoint; the other pages show the last one.</p>"))]
    predictions = _first(run, "predictions")
    if predictions:
        acc = accuracy(run, predictions)
        values = acc["accuracy"].tolist()
        chart = line_chart(acc["checkpoint"].tolist(), [("accuracy", values, values, values)],
                           f"{predictions}: accuracy per checkpoint", y_label="accuracy", x_label="checkpoint")
        sections.append(("Accuracy", chart + table_html(acc)))
    stats = _first(run, "activation_stats")
    if stats:
        dead = dead_units(run, stats)
        sections.append(("Dead units", _lines(dead, f"{stats}: dead channels per layer", "dead channels")
                         + table_html(dead.reset_index())))
    probes = _first(run, "probes")
    if probes:
        acc = probe_accuracy(run, probes)
        sections.append(("Linear probes", _lines(acc, f"{probes}: probe test accuracy per layer", "test accuracy")
                         + table_html(acc.reset_index())))
    top = _first(run, "top_patches")
    if top:
        sections.append((f"Top patches ({top})", _top_patches(run, top)))
    filters = _first(run, "filters")
    if filters:
        sections.append((f"Filters ({filters})", _filters(run, filters)))
    return render("cards.html", sections=sections)
