"""``saliency_segmentation``: object masks from attribution maps, without any supervision.

Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks" (ICLR-W 2014), Sec. 6:
the pixels of an image's map above its ``foreground`` quantile (default 0.95) seed the
foreground colour model of GrabCut (Rother et al., SIGGRAPH 2004; OpenCV's ``grabCut``), those
below its ``background`` quantile (default 0.30) the background's, and GrabCut labels the rest
(pixels above the map's median start as probable foreground, the others as probable
background). A map too flat to give ``min_seeds`` seeds of each kind keeps its foreground
seeds as the mask (``grabcut`` false). OpenCV's random state is seeded before every image, and
a value within ``1e-5`` of the map's largest magnitude of a threshold counts as on it (equal
values in exact arithmetic, such as an upsampled map's, differ by float rounding from one
batch size to another), so a mask does not depend on the batch.

The maps are the checked attribution entries' own (``methods``, default every attribution
entry that explains classes; each with its ``target``), computed again on this entry's
``sample`` (the maps are not stored at input resolution), at the image's size.

Rows: per map ``method``, ``image_id``, ``label``, ``target``, ``iou`` (against the dataset's
object box; NaN without one), ``foreground`` (the mask's share of the image), ``grabcut``,
``mask`` (bit-packed rows of the (height, width) mask, ``np.unpackbits(mask)[:h * w]``),
``height``, ``width``; then the aggregate rows (``image_id`` null): per method, over all
images (``label`` null) and per class, the mean ``iou`` with its bootstrap interval ``lo``,
``hi`` and ``n``.

Example manifest entry::

    - type: saliency_segmentation
      methods: [saliency, grad_cam]
      sample: {n: 100, seed: 0}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from jobs.attribution.base import (
    AttributionAnalysis,
    Bootstrap,
    bound_methods,
    choose_targets,
    class_method_entries,
)
from jobs.core.base import (
    IMAGE_ID,
    LABEL,
    AnalysisParams,
    MapBatch,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rows,
    SampleSpec,
    register,
    sample_ids,
)


class SaliencySegmentationParams(AnalysisParams):
    methods: list[str] | None = Field(default=None, description="attribution entries; default: all of them")
    sample: SampleSpec = Field(default_factory=lambda: SampleSpec(n=100, seed=0))
    foreground: float = Field(default=0.95, gt=0, lt=1, description="quantile above which pixels seed the object")
    background: float = Field(default=0.30, gt=0, lt=1, description="quantile below which pixels seed the rest")
    iterations: int = Field(default=5, ge=1, description="GrabCut iterations")
    min_seeds: int = Field(default=10, ge=1, description="fewest seeds of each kind GrabCut is run with")
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    # Filled from the manifest when it is read (see ``bind``): the checked entries' params.
    method_entries: list[dict[str, Any]] = Field(default_factory=list, json_schema_extra={"hidden": True})


TIE_TOLERANCE = 1e-5  # of a map's largest magnitude: far above float32 rounding, far below a seed's meaning


def grabcut_mask(image: np.ndarray, heat: np.ndarray, foreground: float = 0.95, background: float = 0.30,
                 iterations: int = 5, min_seeds: int = 10) -> tuple[np.ndarray, bool]:
    """A bool (H, W) object mask of ``image`` (uint8 (H, W, 3), RGB) seeded by ``heat`` (H, W):
    GrabCut from its top and bottom quantiles, or the top seeds alone when there are fewer than
    ``min_seeds`` of either kind. Returns (mask, whether GrabCut ran)."""
    import cv2

    heat = np.nan_to_num(np.asarray(heat, np.float64), nan=-np.inf)
    finite = np.abs(heat[np.isfinite(heat)])
    # Float rounding must not move a pixel across a threshold: within tol of one is on it.
    tol = TIE_TOLERANCE * (float(finite.max()) if finite.size else 0.0)
    hi, lo = np.quantile(heat, foreground), np.quantile(heat, background)
    seeds_fg, seeds_bg = heat > hi + tol, heat < lo - tol
    if hi <= lo + tol or seeds_fg.sum() < min_seeds or seeds_bg.sum() < min_seeds:
        return heat >= hi - tol if hi > lo + tol else np.zeros(heat.shape, bool), False
    mask = np.where(heat >= np.median(heat) - tol, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    mask[seeds_fg] = cv2.GC_FGD
    mask[seeds_bg] = cv2.GC_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's global generator
    bgr = np.ascontiguousarray(np.asarray(image, np.uint8)[..., ::-1])
    cv2.grabCut(bgr, mask, (0, 0, 0, 0), bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD), True


def box_iou(mask: np.ndarray, box: Sequence[int]) -> float:
    """Intersection over union of a bool mask (H, W) and a box ``[x0, y0, x1, y1]`` (half-open);
    NaN without a box (a row of -1)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if min(x0, y0, x1, y1) < 0:
        return float("nan")
    inside = np.zeros(mask.shape, bool)
    inside[y0:y1, x0:x1] = True
    union = (mask | inside).sum()
    return float((mask & inside).sum() / union) if union else float("nan")


PARTIAL = pa.schema([("method", pa.string()), IMAGE_ID, LABEL, ("target", pa.int64()), ("iou", pa.float64()),
                     ("foreground", pa.float64()), ("grabcut", pa.bool_()), ("mask", pa.binary()),
                     ("height", pa.int32()), ("width", pa.int32())])
SCHEMA = pa.schema([*PARTIAL, ("n", pa.int64()), ("lo", pa.float64()), ("hi", pa.float64())])


@register
class SaliencySegmentation(ReduceAnalysis):
    """GrabCut object masks seeded by each attribution method's maps, scored against the boxes."""

    Params = SaliencySegmentationParams
    params: SaliencySegmentationParams

    def bind(self, entries: Sequence[AnalysisParams]) -> AnalysisParams:
        return self.params.model_copy(update={"method_entries": class_method_entries(self.params.methods, entries)})

    def methods(self) -> list[AttributionAnalysis]:
        return bound_methods(self.params.method_entries)

    def select(self, image_ids):
        s = self.params.sample
        return sample_ids(list(image_ids), s.n, s.seed)

    def schema(self) -> dict[str, pa.Schema]:
        return {"": PARTIAL}

    def map_batch(self, batch: MapBatch) -> Rows:
        from jobs.attribution.sanity_checks import explain

        p = self.params
        if batch.pixels is None:
            raise ValueError("saliency_segmentation needs the decoded images")
        logits = batch.logits.float()
        device = batch.images.device
        cols: dict[str, list[Any]] = {f.name: [] for f in PARTIAL}
        for method in self.methods():
            rows, targets, _ = choose_targets(logits, batch.labels, method.params.target)
            ids = [batch.image_ids[i] for i in rows.tolist()]
            heat = explain(method, batch.model, batch.images[rows.to(device)], targets.to(device), ids,
                           method.chunk(batch.images))
            for j, r in enumerate(rows.tolist()):
                mask, ran = grabcut_mask(batch.pixels[r], heat[j].numpy(), p.foreground, p.background,
                                         p.iterations, p.min_seeds)
                box = batch.boxes[r] if batch.boxes is not None else (-1, -1, -1, -1)
                label = int(batch.labels[r])
                cols["method"].append(method.params.entry_name)
                cols["image_id"].append(ids[j])
                cols["label"].append(label if label >= 0 else None)
                cols["target"].append(int(targets[j]))
                cols["iou"].append(box_iou(mask, box))
                cols["foreground"].append(float(mask.mean()))
                cols["grabcut"].append(ran)
                cols["mask"].append(np.packbits(mask.reshape(-1)).tobytes())
                cols["height"].append(mask.shape[0])
                cols["width"].append(mask.shape[1])
        types = {"target": np.int64, "iou": np.float64, "foreground": np.float64, "grabcut": np.bool_,
                 "height": np.int32, "width": np.int32}
        return {"": {name: np.asarray(v, dtype=types.get(name, object)) for name, v in cols.items()}}

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        from jobs.core.kernels import bootstrap_interval

        b = self.params.bootstrap
        table = inputs.read("") if "" in inputs.partitions() else PARTIAL.empty_table()
        df = table.to_pandas()
        out: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
        stats: dict[str, float] = {}
        for method, group in df.groupby("method", sort=False):
            parts: list[tuple[Any, pd.DataFrame]] = [(None, group)]
            parts += [(int(c), g) for c, g in group.dropna(subset=["label"]).groupby("label", sort=True)]
            for label, g in parts:
                values = g["iou"].to_numpy(np.float64)
                values = values[~np.isnan(values)]
                lo, hi = bootstrap_interval(values, b.resamples, b.level, b.seed)
                mean = float(values.mean()) if len(values) else float("nan")
                for name in SCHEMA.names:
                    out[name].append(None)
                out["method"][-1], out["label"][-1], out["iou"][-1] = method, label, mean
                out["n"][-1], out["lo"][-1], out["hi"][-1] = len(values), lo, hi
                out["foreground"][-1] = float(g["foreground"].mean())
                if label is None:
                    stats[str(method)] = round(mean, 4)
        aggregate = pa.table({f.name: pa.array(out[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)
        rows = table.cast(PARTIAL)
        for name in ("n", "lo", "hi"):
            rows = rows.append_column(SCHEMA.field(name), pa.nulls(len(rows), SCHEMA.field(name).type))
        return ReduceOutput(tables={"": pa.concat_tables([rows, aggregate])}, stats={"iou": stats})
