"""The evolution page of a checkpoint series: how the model changes through training.

Accuracy per checkpoint (from the first ``predictions`` entry) as a line chart; for a few channels
of the first ``top_patches`` entry, the strongest patch of each checkpoint side by side (Zeiler &
Fergus 2014, Fig. 4); and the first ``filters`` entry's filter grid per checkpoint.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from markupsafe import Markup

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


def _top_patches(run: Run, entry: str) -> Markup:
    tables = {name: run.at(name).table(entry, ["layer", "channel", "rank", "image_id", "activation", "key"])
              for name in run.checkpoints}
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
        rows.append(_row(f"{layer} channel {channel}", "the strongest patch at each checkpoint", figures))
    return Markup("").join(rows)


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
    top = _first(run, "top_patches")
    if top:
        sections.append((f"Top patches ({top})", _top_patches(run, top)))
    filters = _first(run, "filters")
    if filters:
        sections.append((f"Filters ({filters})", _filters(run, filters)))
    return render("cards.html", sections=sections)
