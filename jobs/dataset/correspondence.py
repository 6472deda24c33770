"""``correspondence``: does covering the same part of different images change a layer the same way?

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014), Sec. 5
and Table 1: occlude the same part in each image ``i`` and take, per layer ``l``, the change
``eps_i = phi_l(x_i) - phi_l(x~_i)``. The network "implicitly establishes correspondence" if
those changes agree across images:
``Delta_l = sum_{i != j} H(sign(eps_i), sign(eps_j))``, ``H`` the Hamming distance. Here the
part is each image's object box (``part: object``, the default; the demo's shapes have one;
images without one are left out) or one fixed box ``[x0, y0, x1, y1]`` in input pixels for
every image (aligned images, as the paper's faces), filled with 0 in model-input
space (the normalisation mean colour), and the control is a square of the same size at a
random place in the same image (seeded by ``seed`` and the image id). Reported normalised:
``H / D`` (``D`` the layer's size), averaged over the ordered pairs of a group -- ``delta``, in
[0, 1], lower is more consistent -- with ``delta_std`` the standard deviation over the group's
images of each image's mean distance to the others. Groups: all the images (``label`` null)
and, with ``by_class``, the images of each class (Zeiler & Fergus compare dogs with dogs).
A change smaller than ``1e-5`` of the image's largest activation in the layer counts as none,
so float rounding does not decide a sign.

Rows: ``layer``, ``occluder`` (``part`` | ``random``), ``label`` (null: every image),
``label_name``, ``images``, ``pairs``, ``dims``, ``delta``, ``delta_std``. Stats: per layer
the overall part and random ``delta``.

Example manifest entry::

    - type: correspondence
      layers: [relu1, relu2, relu3, relu4]
      sample: {n: 100, seed: 0}
      part: object        # or [x0, y0, x1, y1], the same box in every (aligned) image
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import Field

from jobs.core.base import (
    IMAGE_ID,
    LABEL,
    AnalysisParams,
    DistinctLayers,
    MapBatch,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rows,
    SampleSpec,
    by_layer,
    register,
    sample_ids,
    unit_seed,
)
from jobs.core.views import Summary, Table

OCCLUDERS = ("part", "random")
# A change below this share of the image's largest |activation| in the layer counts as none.
RELATIVE_ZERO = 1e-5

PARTIAL = pa.schema([IMAGE_ID, LABEL, ("occluder", pa.string()), ("dims", pa.int64()),
                     ("positive", pa.binary()), ("negative", pa.binary())])


class CorrespondenceParams(AnalysisParams):
    layers: DistinctLayers
    sample: SampleSpec | None = Field(default_factory=lambda: SampleSpec(n=100, seed=0))
    part: Literal["object"] | tuple[int, int, int, int] = Field(
        default="object", description="object: each image's box | [x0, y0, x1, y1]: one box for every image")
    by_class: bool = True
    seed: int = Field(default=0, description="seeds the random occluders' places")
    chunk: int = Field(default=64, ge=1, description="images per forward (three copies each)")


def random_box(box: np.ndarray, size: tuple[int, int], seed: int) -> np.ndarray:
    """A box of ``box``'s size (``[x0, y0, x1, y1]``, half-open) at a seeded uniform place in an
    image of ``size`` (H, W)."""
    h, w = int(box[3] - box[1]), int(box[2] - box[0])
    rng = np.random.default_rng(seed)
    y0 = int(rng.integers(0, size[0] - h + 1))
    x0 = int(rng.integers(0, size[1] - w + 1))
    return np.array([x0, y0, x0 + w, y0 + h], np.int64)


def occlude(x: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """Copies of ``x`` (N, C, H, W) with each image's box ``[x0, y0, x1, y1]`` set to 0."""
    out = x.clone()
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.int64).tolist()):
        out[i, :, y0:y1, x0:x1] = 0
    return out


def change_signs(clean: torch.Tensor, occluded: torch.Tensor) -> torch.Tensor:
    """``sign(clean - occluded)`` per image, flattened (N, D) int8, with changes below
    ``RELATIVE_ZERO`` of the image's largest |clean| value counted as 0."""
    c, o = clean.flatten(1).float(), occluded.flatten(1).float()
    eps = c - o
    tol = RELATIVE_ZERO * c.abs().amax(dim=1, keepdim=True)
    return torch.where(eps.abs() <= tol, torch.zeros_like(eps), torch.sign(eps)).to(torch.int8)


def pack(signs: np.ndarray) -> tuple[list[bytes], list[bytes]]:
    """Sign rows (N, D) in {-1, 0, 1} as bit-packed positive and negative masks."""
    return ([np.packbits(r > 0).tobytes() for r in signs], [np.packbits(r < 0).tobytes() for r in signs])


def unpack(positive: list[bytes], negative: list[bytes], dims: int) -> np.ndarray:
    """The inverse of :func:`pack`: (N, D) int8."""
    pos = np.stack([np.unpackbits(np.frombuffer(b, np.uint8))[:dims] for b in positive]).astype(np.int8)
    neg = np.stack([np.unpackbits(np.frombuffer(b, np.uint8))[:dims] for b in negative]).astype(np.int8)
    return pos - neg


def pairwise_hamming(signs: np.ndarray) -> np.ndarray:
    """(N, N) Hamming distances between sign rows in {-1, 0, 1}: the positions where they differ,
    counted as ``D - agreements`` with agreements from one-hot products."""
    n, d = signs.shape
    agree = np.zeros((n, n), np.float64)
    for value in (-1, 0, 1):
        hot = (signs == value).astype(np.float32)
        agree += hot @ hot.T
    return d - np.rint(agree)


def consistency(signs: np.ndarray) -> tuple[float, float, int]:
    """(mean normalised Hamming distance over ordered pairs, std over images of each image's mean
    distance to the others, pairs) of one group's sign rows; NaN below two images."""
    n, d = signs.shape
    if n < 2 or d == 0:
        return float("nan"), float("nan"), 0
    h = pairwise_hamming(signs) / d
    per_image = h.sum(axis=1) / (n - 1)  # the diagonal is 0
    return float(h.sum() / (n * (n - 1))), float(per_image.std()), n * (n - 1)


@register
class Correspondence(ReduceAnalysis):
    """Consistency across images of the feature change when the same part is occluded, per layer."""

    Params = CorrespondenceParams
    params: CorrespondenceParams
    view = (
        Summary("Mean normalised Hamming distance between the sign patterns of the feature change when "
                "the object is covered (<b>part</b>) or a square of its size elsewhere (<b>random</b>): "
                "lower is more consistent (Zeiler & Fergus 2014, Table 1)."),
        Table(limit=2000),
    )

    def select(self, image_ids):
        s = self.params.sample
        return None if s is None else sample_ids(list(image_ids), s.n, s.seed)

    def schema(self) -> dict[str, pa.Schema]:
        return by_layer(self.params.layers, PARTIAL)

    def map_batch(self, batch: MapBatch) -> Rows:
        from jobs.core.hooks import layer_outputs

        p = self.params
        size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        if p.part != "object":
            x0, y0, x1, y1 = p.part
            if not (0 <= x0 < x1 <= size[1] and 0 <= y0 < y1 <= size[0]):
                raise ValueError(f"part {list(p.part)} is not a box [x0, y0, x1, y1] inside the {size[0]}x{size[1]} "
                                 "model input")
            boxes = np.tile(np.asarray(p.part, np.int64), (len(batch), 1))
        elif batch.boxes is None:
            raise ValueError("correspondence with part: object needs object boxes in the dataset (the part each "
                             "image has covered); give a fixed part: [x0, y0, x1, y1] otherwise")
        else:
            boxes = np.asarray(batch.boxes, np.int64)
        keep = np.flatnonzero((boxes >= 0).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        rows: dict[str, dict[str, list[Any]]] = {
            f"layer={layer}": {c: [] for c in PARTIAL.names} for layer in p.layers}
        for s in range(0, len(keep), p.chunk):
            part = keep[s:s + p.chunk]
            x = batch.images[torch.as_tensor(part, device=batch.images.device)].float()
            ids = [batch.image_ids[i] for i in part]
            own = boxes[part]
            elsewhere = np.stack([random_box(b, size, unit_seed(p.seed, i)) for b, i in zip(own, ids)])
            # The clean images and both occluded copies in one forward: one batch shape for all.
            inputs = torch.cat([x, occlude(x, own), occlude(x, elsewhere)]).to(batch.images.dtype)
            _, acts = layer_outputs(batch.model, inputs, p.layers)
            n = len(part)
            for layer in p.layers:
                a = acts[layer]
                out = rows[f"layer={layer}"]
                for k, occluder in enumerate(OCCLUDERS, start=1):
                    signs = change_signs(a[:n], a[k * n:(k + 1) * n]).cpu().numpy()
                    positive, negative = pack(signs)
                    out["image_id"] += ids
                    out["label"] += [v if v >= 0 else None for v in batch.labels.cpu()[torch.as_tensor(part)].tolist()]
                    out["occluder"] += [occluder] * n
                    out["dims"] += [signs.shape[1]] * n
                    out["positive"] += positive
                    out["negative"] += negative
        return {name: {c: np.asarray(v, dtype=np.int64 if c == "dims" else object) for c, v in cols.items()}
                for name, cols in rows.items()}

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        p = self.params
        names = ctx.label_names
        out: list[dict[str, Any]] = []
        stats: dict[str, dict[str, float]] = {}
        for layer in p.layers:
            partition = f"layer={layer}"
            if partition not in inputs.partitions():
                continue
            df = inputs.read(partition).to_pandas().sort_values(["occluder", "image_id"], kind="stable")
            for occluder in OCCLUDERS:
                mine = df[df["occluder"] == occluder]
                if mine.empty:
                    continue
                dims = int(mine["dims"].iloc[0])
                signs = unpack(mine["positive"].tolist(), mine["negative"].tolist(), dims)
                labels = mine["label"].to_numpy()
                groups: list[tuple[Any, np.ndarray]] = [(None, np.ones(len(mine), bool))]
                if p.by_class:
                    known = labels[pd.notna(labels)].astype(np.int64)
                    groups += [(int(c), labels == c) for c in sorted(set(known[known >= 0].tolist()))]
                for label, where in groups:
                    delta, std, pairs = consistency(signs[where])
                    out.append({"layer": layer, "occluder": occluder, "label": label,
                                "label_name": names[label] if label is not None and names and label < len(names)
                                else None, "images": int(where.sum()), "pairs": pairs, "dims": dims,
                                "delta": delta, "delta_std": std})
                    if label is None:
                        stats.setdefault(layer, {})[occluder] = delta
        table = pa.table({
            "layer": pa.array([r["layer"] for r in out], pa.string()),
            "occluder": pa.array([r["occluder"] for r in out], pa.string()),
            "label": pa.array([r["label"] for r in out], pa.int64()),
            "label_name": pa.array([r["label_name"] for r in out], pa.string()),
            "images": pa.array([r["images"] for r in out], pa.int64()),
            "pairs": pa.array([r["pairs"] for r in out], pa.int64()),
            "dims": pa.array([r["dims"] for r in out], pa.int64()),
            "delta": pa.array([r["delta"] for r in out], pa.float64()),
            "delta_std": pa.array([r["delta_std"] for r in out], pa.float64()),
        })
        return ReduceOutput(tables={"": table}, stats={"delta": stats})
