"""``attribution_summary``: how faithful and how well localised each attribution method is, on
this model and dataset, overall and per class.

Reads the committed tables of the manifest's attribution entries (``methods``; default: all
of them) -- no pass over the images -- and averages their per-map scores:

* ``deletion_auc`` (lower is better) and ``insertion_auc`` (higher is better): Petsiuk, Das
  & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models" (BMVC 2018);
* ``pointing_game``: the fraction of maps whose maximum falls inside the object box (Zhang et
  al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016), over images with boxes;
* ``box_energy``: the mean share of positive attribution inside the box (Wang et al.,
  "Score-CAM", CVPR-W 2020).

Example manifest entry::

    - type: attribution_summary
      methods: [saliency, grad_cam]   # entry names; default: every attribution entry
      bootstrap: {resamples: 1000, level: 0.95, seed: 0}   # null: no intervals

Table ``attribution_summary/part-*.parquet``, one row per method and class plus one per method
over all images (``label`` null): ``method``, ``label``, ``label_name``, ``maps``,
``images``, ``deletion_auc``, ``insertion_auc``, ``boxed`` (maps with a box),
``pointing_game``, ``box_energy``; after each score its percentile bootstrap interval
``<score>_lo``, ``<score>_hi`` over the group's maps (:func:`jobs.core.kernels.bootstrap_interval`,
the same seed for every group). Stats (run.json): the best method by each score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from jobs.attribution.base import Bootstrap, attribution_entries, neuron_target
from jobs.core.base import AnalysisParams, ReduceAnalysis, ReduceContext, ReduceInputs, ReduceOutput, register
from jobs.core.kernels import bootstrap_interval

SCORES = {"deletion_auc": "min", "insertion_auc": "max", "pointing_game": "max", "box_energy": "max"}
COLUMNS = ["image_id", "label", "method", "deletion_auc", "insertion_auc", "pointing", "box_energy"]


class AttributionSummaryParams(AnalysisParams):
    methods: list[str] | None = None
    bootstrap: Bootstrap | None = Field(default_factory=Bootstrap)


# Each score and the per-map column it averages.
OF = {"deletion_auc": "deletion_auc", "insertion_auc": "insertion_auc", "pointing_game": "pointing",
      "box_energy": "box_energy"}


def summarise(df: pd.DataFrame, bootstrap: Bootstrap | None = None) -> pd.Series:
    """Mean scores of one method's rows, with their bootstrap intervals; NaN-aware (images
    without boxes do not count)."""
    out: dict[str, float | int] = {"maps": len(df), "images": df["image_id"].nunique(),
                                   "boxed": int(df["pointing"].notna().sum()) if "pointing" in df else 0}
    for score, column in OF.items():
        values = df[column].to_numpy(dtype=np.float64) if column in df else np.zeros(0)
        values = values[~np.isnan(values)]
        out[score] = float(values.mean()) if len(values) else float("nan")
        if bootstrap is not None:
            out[f"{score}_lo"], out[f"{score}_hi"] = bootstrap_interval(values, bootstrap.resamples, bootstrap.level,
                                                                        bootstrap.seed)
    return pd.Series(out)


def scores(out: pd.DataFrame, names: Sequence[str]) -> dict[str, pa.Array]:
    """The float64 columns of ``names``, each followed by its interval when it was computed."""
    columns = {}
    for name in names:
        for column in (name, f"{name}_lo", f"{name}_hi"):
            if column in out:
                columns[column] = pa.array(out[column].astype(np.float64))
    return columns


@register
class AttributionSummary(ReduceAnalysis):
    """Per-method, per-class means of the attribution entries' faithfulness scores."""

    Params = AttributionSummaryParams
    params: AttributionSummaryParams

    def sources(self, entries: Sequence[AnalysisParams]) -> list[str]:
        chosen = attribution_entries(self.params.methods, entries)
        if self.params.methods is None:  # by default the class explanations: a unit's map has no class score
            by_name = {e.entry_name: e for e in entries}
            chosen = [name for name in chosen if neuron_target(by_name[name]) is None] or chosen
        return chosen

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        frames = []
        for entry in inputs.partitions():
            table = inputs.read(entry)
            present = [c for c in COLUMNS if c in table.column_names]
            df = table.select(present).to_pandas()
            df["method"] = entry
            frames.append(df)
        df = pd.concat(frames, ignore_index=True)
        rows = []
        for method, group in df.groupby("method", sort=False):
            rows.append({"method": method, "label": None, **summarise(group, self.params.bootstrap)})
            for label, by_class in group.dropna(subset=["label"]).groupby("label"):
                rows.append({"method": method, "label": int(label), **summarise(by_class, self.params.bootstrap)})
        out = pd.DataFrame(rows)
        names = ctx.label_names or []
        out["label_name"] = [names[int(v)] if v is not None and not pd.isna(v) and int(v) < len(names) else None
                             for v in out["label"]]
        overall = out[out["label"].isna()].set_index("method")
        best = {}
        for score, how in SCORES.items():
            values = overall[score].dropna()
            if len(values):
                best[score] = str(values.idxmin() if how == "min" else values.idxmax())
        ctx.log("attribution summary: " + ", ".join(f"best {k}: {v}" for k, v in best.items()))
        table = pa.table({
            "method": pa.array(out["method"].tolist(), pa.string()),
            "label": pa.array([None if pd.isna(v) else int(v) for v in out["label"]], pa.int64()),
            "label_name": pa.array(out["label_name"].tolist(), pa.string(), from_pandas=True),
            "maps": pa.array(out["maps"].astype(np.int64)),
            "images": pa.array(out["images"].astype(np.int64)),
            **scores(out, ("deletion_auc", "insertion_auc")),
            "boxed": pa.array(out["boxed"].astype(np.int64)),
            **scores(out, ("pointing_game", "box_energy")),
        })
        stats = {"best": best, "methods": {m: {k: (None if pd.isna(v) else round(float(v), 4))
                                               for k, v in overall.loc[m, list(SCORES)].items()}
                                           for m in overall.index}}
        return ReduceOutput(tables={"": table}, stats=stats)
