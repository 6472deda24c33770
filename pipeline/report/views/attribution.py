"""The attribution family's one page: every method's maps side by side per image, the
faithfulness scores of ``attribution_summary`` with their intervals, and the ``sanity_checks``."""

from __future__ import annotations

from typing import Any

import pandas as pd
from markupsafe import Markup

from jobs import REGISTRY
from pipeline.report.charts import line_chart
from pipeline.report.html import esc, figure, num, render, table_html
from pipeline.report.run import Run
from pipeline.report.views.base import family_view

COLUMNS = ["image_id", "label", "method", "target", "score", "deletion_auc", "insertion_auc", "pointing", "key",
           "neuron_layer", "neuron_channel", "neuron_y", "neuron_x", "neuron_value", "feature_channel",
           "projection_key"]


@family_view("attribution", "attribution.html")
def attribution(run: Run, entries: list[str]) -> Markup:
    kinds = {name: run.analyses[name].get("type") for name in entries}
    reduced = {name for name in entries if REGISTRY[str(kinds[name])].stage == "reduce"}
    summaries = [name for name in entries if kinds[name] == "attribution_summary" and run.parts(name)]
    overall, per_class = summary_tables(run.table(summaries[0])) if summaries else (None, None)
    checks = [(name, sanity_section(run.table(name))) for name in entries
              if kinds[name] == "sanity_checks" and run.parts(name)]
    segmentations = [(name, segmentation_table(run.table(name, ["method", "image_id", "label", "iou", "foreground",
                                                                    "n", "lo", "hi"]), run))
                     for name in entries if kinds[name] == "saliency_segmentation" and run.parts(name)]
    frames = []
    for entry in entries:
        files = run.parts(entry)
        if entry in reduced or not files:
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
                caption = caption_of(r, run)
                figs.append(figure(run.image(r.entry, getattr(r, "key", None)), caption, paged=True,
                                   pixelated=False))
                projection = getattr(r, "projection_key", None)
                if isinstance(projection, str):  # occlusion's strongest feature map, projected (Z&F Fig. 7 c)
                    figs.append(figure(run.image(r.entry, projection),
                                       f"<b>{esc(r.entry)}</b> · strongest feature map {int(r.feature_channel)},"
                                       " projected", paged=True, pixelated=True))
            items.append(render("image_row.html", title=image_id, subtitle=run.label(group.label.iloc[0]),
                                cls="grid wide", figures=figs))
    return render("attribution.html", overall=overall, per_class=per_class, checks=checks,
                  segmentations=segmentations, items=items)


def segmentation_table(df: pd.DataFrame, run: Run) -> Markup:
    """``saliency_segmentation``'s aggregate rows: per method (and class), IoU as ``mean [lo, hi]``."""
    agg = df[df.image_id.isna()].copy()
    agg["class"] = [run.label(v) if pd.notna(v) else "all" for v in agg.label]
    agg["iou"] = [interval(v, lo, hi) for v, lo, hi in zip(agg.iou, agg.lo, agg.hi)]
    return table_html(agg[["method", "class", "iou", "n", "foreground"]].rename(
        columns={"foreground": "mask share of image"}))


def caption_of(r: Any, run: Run) -> str:
    """A map's caption: its class, probability and scores, or the unit it explains."""
    layer = getattr(r, "neuron_layer", None)
    if isinstance(layer, str):
        return (f"<b>{esc(r.entry)}</b> · unit {esc(layer)}[{int(r.neuron_channel)}] at ({int(r.neuron_y)}, "
                f"{int(r.neuron_x)})<br>value {num(r.neuron_value, 3)}")
    return (f"<b>{esc(r.entry)}</b> · class {esc(run.label(r.target))}<br>p {num(r.score, 2)} · del "
            f"{num(getattr(r, 'deletion_auc', None), 2)} · ins {num(getattr(r, 'insertion_auc', None), 2)}")


def summary_tables(df: pd.DataFrame) -> tuple[Markup, Markup | None]:
    """An ``attribution_summary`` table as its overall table (one row per method) and its per-class
    table (None without classes), each score as ``mean [lo, hi]`` where the run has intervals."""
    s = with_intervals(df)
    overall = table_html(s[s.label.isna()].drop(columns=["label", "label_name"], errors="ignore"))
    rows = s[s.label.notna()]
    return overall, (table_html(rows) if len(rows) else None)


def interval(value: float, lo: float, hi: float) -> str:
    """``mean [lo, hi]`` as the report prints numbers; the mean alone without an interval."""
    if pd.isna(lo) or pd.isna(hi):
        return num(value)
    return f"{num(value)} [{num(lo)}, {num(hi)}]"


def with_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """Each score with ``<score>_lo``/``_hi`` columns shown as one ``mean [lo, hi]`` column."""
    out = df.copy()
    for column in list(df.columns):
        if f"{column}_lo" in df and f"{column}_hi" in df:
            out[column] = [interval(v, lo, hi) for v, lo, hi in zip(df[column], df[f"{column}_lo"], df[f"{column}_hi"])]
            out = out.drop(columns=[f"{column}_lo", f"{column}_hi"])
    return out


MPRT = {"mprt_cascading": "cascading", "mprt_independent": "independent"}
TABLES = {"random_logit": "Random logit: the map of another class (high similarity: the method does not tell "
                          "classes apart)",
          "sensitivity": "Sensitivity: relative change of the map under small input noise (lower is steadier)",
          "road": "ROAD: the target's probability with pixels removed and imputed; MoRF AUC lower, LeRF AUC "
                  "higher is more faithful"}


def cells(rows: pd.DataFrame) -> list[str]:
    """Each aggregate row's ``value`` with its interval, as :func:`interval` prints it."""
    return [interval(v, lo, hi) for v, lo, hi in zip(rows.value, rows.lo, rows.hi)]


def step_label(step: float, name: str | None) -> str:
    """An MPRT step as its number and the block randomised at it (step 0: "none")."""
    return f"{int(step)} {name or 'none'}"


def sanity_section(df: pd.DataFrame) -> Markup:
    """A ``sanity_checks`` table's aggregate rows (``image_id`` null): a randomisation chart per
    MPRT order present (mean ``spearman_abs`` per method and step, shaded between ``lo`` and
    ``hi``) with the table of every MPRT metric, and the random-logit, sensitivity and ROAD
    tables (method x metric, ``mean [lo, hi]``; ROAD's curves per percentage folded)."""
    if not len(df):
        return Markup("<p>No sanity-check rows.</p>")
    agg = df[df.image_id.isna()] if "image_id" in df else df
    parts: list[Markup] = []
    for test, order in MPRT.items():
        rows = agg[agg.test == test].sort_values("step", kind="stable")
        if not len(rows):
            continue
        steps = rows.drop_duplicates("step")
        labels = [step_label(r.step, r.step_name) for r in steps.itertuples()]
        series = []
        metric = "spearman_abs" if (rows.metric == "spearman_abs").any() else str(rows.metric.iloc[0])
        for method, group in rows[rows.metric == metric].groupby("method", sort=False):
            by_step = group.drop_duplicates("step").set_index("step").reindex(steps.step)
            series.append((str(method), list(by_step.value), list(by_step.lo), list(by_step.hi)))
        parts.append(line_chart(labels, series, f"{test}: {metric} to the original map, {order} randomisation",
                                y_label=metric))
        wide = rows.assign(cell=cells(rows), blocks=[step_label(s, b) for s, b in zip(rows.step, rows.step_name)])
        table = wide.pivot_table(index=["method", "metric"], columns="blocks", values="cell", aggfunc="first",
                                 sort=False)
        parts.append(Markup("<details><summary>{}: every metric by blocks randomised</summary>").format(test)
                     + table_html(table.reset_index()) + Markup("</details>"))
    for test, caption in TABLES.items():
        rows = agg[(agg.test == test) & ((test != "road") | agg.step.isna())]
        if not len(rows):
            continue
        table = rows.assign(cell=cells(rows)).pivot_table(index="method", columns="metric", values="cell",
                                                           aggfunc="first", sort=False)
        parts.append(Markup("<h3>{}</h3>").format(caption) + table_html(table.reset_index()))
        curve = agg[(agg.test == "road") & agg.step.notna()].sort_values("step", kind="stable")
        if test == "road" and len(curve):
            wide = curve.assign(cell=cells(curve), removed=[f"{int(s)}%" for s in curve.step])
            table = wide.pivot_table(index=["method", "metric"], columns="removed", values="cell", aggfunc="first",
                                     sort=False)
            parts.append(Markup("<details><summary>ROAD: the target's probability by percentage removed (morf: "
                                "most relevant first, lerf: least)</summary>") + table_html(table.reset_index())
                         + Markup("</details>"))
    counts = pd.to_numeric(agg.n, errors="coerce").dropna() if "n" in agg else pd.Series(dtype=float)
    images = f"{int(counts.max()):,} images; " if len(counts) else ""
    return Markup("<p>{}mean [bootstrap interval of the mean].</p>").format(images) + Markup("").join(parts)
