"""The attribution family's one page: every method's maps side by side per image, the
faithfulness scores of ``attribution_summary`` with their intervals, and the ``sanity_checks``."""

from __future__ import annotations

import pandas as pd
from markupsafe import Markup

from jobs import REGISTRY
from pipeline.report.charts import line_chart
from pipeline.report.html import esc, figure, num, render, table_html
from pipeline.report.run import Run
from pipeline.report.views.base import family_view

COLUMNS = ["image_id", "label", "method", "target", "score", "deletion_auc", "insertion_auc", "pointing", "key"]


@family_view("attribution", "attribution.html")
def attribution(run: Run, entries: list[str]) -> Markup:
    kinds = {name: run.analyses[name].get("type") for name in entries}
    reduced = {name for name in entries if REGISTRY[str(kinds[name])].stage == "reduce"}
    summaries = [name for name in entries if kinds[name] == "attribution_summary" and run.parts(name)]
    overall = per_class = None
    if summaries:
        s = with_intervals(run.table(summaries[0]))
        overall = table_html(s[s.label.isna()].drop(columns=["label", "label_name"]))
        rows = s[s.label.notna()]
        per_class = table_html(rows) if len(rows) else None
    checks = [(name, sanity_section(run.table(name))) for name in entries
              if kinds[name] == "sanity_checks" and run.parts(name)]
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
                caption = (f"<b>{esc(r.entry)}</b> · class {esc(run.label(r.target))}<br>p {num(r.score, 2)}"
                           f" · del {num(getattr(r, 'deletion_auc', None), 2)} · ins "
                           f"{num(getattr(r, 'insertion_auc', None), 2)}")
                figs.append(figure(run.image(r.entry, getattr(r, "key", None)), caption, paged=True,
                                   pixelated=False))
            items.append(render("image_row.html", title=image_id, subtitle=run.label(group.label.iloc[0]),
                                cls="grid wide", figures=figs))
    return render("attribution.html", overall=overall, per_class=per_class, checks=checks, items=items)


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


def sanity_section(df: pd.DataFrame) -> Markup:
    """A ``sanity_checks`` table's aggregates: a randomisation chart per MPRT order (mean
    ``spearman_abs`` with its interval per method and blocks randomised) and the tables."""
    agg = df[df.image_id.isna()]
    parts: list[Markup] = []
    for test, order in MPRT.items():
        rows = agg[agg.test == test]
        if not len(rows):
            continue
        steps = rows.drop_duplicates("step").sort_values("step")
        labels = [f"{int(r.step)} {r.step_name or 'none'}" for r in steps.itertuples()]
        series = []
        metric = "spearman_abs" if (rows.metric == "spearman_abs").any() else str(rows.metric.iloc[0])
        for method, group in rows[rows.metric == metric].groupby("method", sort=False):
            by_step = group.set_index("step").reindex(steps.step)
            series.append((str(method), list(by_step.value), list(by_step.lo), list(by_step.hi)))
        parts.append(line_chart(labels, series, f"{test}: {metric} to the original map, {order} randomisation",
                                y_label=metric))
        wide = rows.assign(cell=[interval(v, lo, hi) for v, lo, hi in zip(rows.value, rows.lo, rows.hi)],
                           blocks=[f"{int(s)} {b or 'none'}" for s, b in zip(rows.step, rows.step_name)])
        table = wide.pivot_table(index=["method", "metric"], columns="blocks", values="cell", aggfunc="first",
                                 sort=False)
        parts.append(Markup("<details><summary>every similarity</summary>") + table_html(table.reset_index())
                     + Markup("</details>"))
    for test, caption in TABLES.items():
        rows = agg[(agg.test == test) & ((test != "road") | agg.step.isna())]
        if not len(rows):
            continue
        cells = rows.assign(cell=[interval(v, lo, hi) for v, lo, hi in zip(rows.value, rows.lo, rows.hi)])
        table = cells.pivot_table(index="method", columns="metric", values="cell", aggfunc="first", sort=False)
        parts.append(Markup("<h3>{}</h3>").format(caption) + table_html(table.reset_index()))
    images = int(agg.n.max()) if len(agg) else 0
    return Markup(f"<p>{images:,} images; mean [95% bootstrap interval].</p>") + Markup("").join(parts)
