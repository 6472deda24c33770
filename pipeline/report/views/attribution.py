"""The attribution family's one page: every method's maps side by side per image, and the
faithfulness scores of ``attribution_summary``."""

from __future__ import annotations

import pandas as pd
from markupsafe import Markup

from jobs import REGISTRY
from pipeline.report.html import esc, figure, num, render, table_html
from pipeline.report.run import Run
from pipeline.report.views.base import family_view

COLUMNS = ["image_id", "label", "method", "target", "score", "deletion_auc", "insertion_auc", "pointing", "key"]


@family_view("attribution", "attribution.html")
def attribution(run: Run, entries: list[str]) -> Markup:
    kinds = {name: run.analyses[name].get("type") for name in entries}
    summaries = [name for name in entries if REGISTRY[str(kinds[name])].stage == "reduce"]
    overall = per_class = None
    if summaries:
        s = run.table(summaries[0])
        overall = table_html(s[s.label.isna()].drop(columns=["label", "label_name"]))
        rows = s[s.label.notna()]
        per_class = table_html(rows) if len(rows) else None
    frames = []
    for entry in entries:
        files = run.parts(entry)
        if entry in summaries or not files:
            continue
        df = run.table(entry, [c for c in COLUMNS if c in run.schema(files[0]).names])
        df["entry"] = entry
        frames.append(df)
    items = []
    if frames:
        df = pd.concat(frames, ignore_index=True)
        for image_id, group in df.groupby("image_id", sort=True):
            figs = []
            for r in group.itertuples():
                caption = (f"<b>{esc(r.entry)}</b> · class {esc(run.label(r.target))}<br>p {num(r.score, 2)}"
                           f" · del {num(getattr(r, 'deletion_auc', None), 2)} · ins "
                           f"{num(getattr(r, 'insertion_auc', None), 2)}")
                figs.append(figure(run.image(r.entry, getattr(r, "key", None)), caption, paged=True,
                                   pixelated=False))
            items.append(render("image_row.html", title=image_id, subtitle=run.label(group.label.iloc[0]),
                                cls="grid wide", figures=figs))
    return render("attribution.html", overall=overall, per_class=per_class, items=items)
