"""``invariance``: how a layer's features and the prediction change as an image is moved.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, Fig. 5:
for chosen images, translate, scale and rotate each over a range; at every amount record, per
layer, the Euclidean distance between the features of the transformed and the untransformed
image, ``||phi(T x) - phi(x)||_2``, and the probability of the true class. Early layers move
a lot under small shifts; deep layers and the prediction should move less.

Transforms act on the normalised image about its centre (torchvision's ``affine``); pixels
that come in from outside are the dataset's mean colour (0 after normalisation).
``translate`` is a shift in pixels along each of ``axis`` (``x``: horizontal, positive right;
``y``: vertical, positive down -- the paper's Fig. 5 row 1), ``scale`` a zoom factor,
``rotate`` an angle in degrees (counter-clockwise). One unit of work per transform (and
translation axis), so each plot (one panel per layer, plus the true-class probability; a line
per image and the mean) sees every chosen image.

Rows (long form): ``image_id``, ``label``, ``transform``, ``axis`` (``x``/``y`` for
``translate``, null otherwise), ``amount``, ``layer``,
``distance``, ``relative_distance`` (distance / ||phi(x)||), ``true_class_prob`` (NaN when
unlabelled), ``predicted``, and the transform's plot ``key`` (+ ``shard``).

Example::

    - type: invariance
      layers: [layer1, layer3]
      sample: {n: 5, seed: 0}
      rotate: [0, 45, 90, 135, 180, 225, 270, 315, 360]
      axis: [x, y]          # translate horizontally and vertically (default: x)
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from jobs.core.base import DistinctLayers, ModelContext, ReduceOutput, register
from jobs.core.hooks import layer_outputs
from jobs.core.render import line_panels
from jobs.core.views import Gallery, Table
from jobs.model.base import ChosenImagesAnalysis, ChosenImagesParams

Transform = Literal["translate", "scale", "rotate"]
TRANSFORMS: tuple[Transform, ...] = ("translate", "scale", "rotate")
Axis = Literal["x", "y"]


class InvarianceParams(ChosenImagesParams):
    layers: DistinctLayers
    translate: list[float] | None = Field(default=None, description="pixels; default: -1/4..1/4 of the side, 9 steps")
    axis: Axis | list[Axis] = Field(default="x", description="translate along x (horizontal), y (vertical) or both")
    scale: list[float] = Field(default_factory=lambda: [round(0.6 + 0.1 * i, 2) for i in range(9)])
    rotate: list[float] = Field(default_factory=lambda: [30.0 * i for i in range(13)])
    chunk: int = Field(default=256, ge=1, description="most model inputs per forward")


def transform_images(x: torch.Tensor, kind: Transform, amount: float, axis: Axis = "x") -> torch.Tensor:
    """Translate (px along ``axis``: x right, y down), scale (factor) or rotate (degrees) a batch
    about its centre; uncovered pixels are 0. A translation by whole pixels is an exact shift."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import affine

    if kind == "translate":
        if axis not in ("x", "y"):
            raise ValueError(f"unknown translation axis {axis!r}; allowed: x, y")
        shift = int(round(amount))
        return affine(x, angle=0.0, translate=[shift, 0] if axis == "x" else [0, shift], scale=1.0,
                      shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST, fill=0.0)
    if kind == "scale":
        if amount <= 0:
            raise ValueError(f"scale must be positive, got {amount}")
        return affine(x, angle=0.0, translate=[0, 0], scale=float(amount), shear=[0.0, 0.0],
                      interpolation=InterpolationMode.BILINEAR, fill=0.0)
    if kind == "rotate":
        return affine(x, angle=float(amount), translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                      interpolation=InterpolationMode.BILINEAR, fill=0.0)
    raise ValueError(f"unknown transform {kind!r}; allowed: {', '.join(TRANSFORMS)}")


def invariance_curves(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, layers: list[str],
                      kind: Transform, amounts: list[float], chunk: int = 256, axis: Axis = "x"
                      ) -> dict[str, torch.Tensor]:
    """Feature distances and true-class probabilities of ``x`` (N, normalised) under a transform.

    Returns ``distance`` and ``relative_distance`` as (layers, amounts, N), and ``prob`` (true
    class; NaN where the label is < 0) and ``predicted`` as (amounts, N).
    """
    n = len(x)
    pairs = [(a, i) for a in range(len(amounts)) for i in range(n)]
    dist = torch.zeros(len(layers), len(amounts), n)
    norms = torch.ones(len(layers), len(amounts), n)
    prob = torch.full((len(amounts), n), float("nan"))
    pred = torch.zeros(len(amounts), n, dtype=torch.long)
    labels = labels.cpu().long()
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        batch = torch.cat([transform_images(x[i:i + 1], kind, amounts[a], axis) for a, i in part]).contiguous()
        logits, acts = layer_outputs(model, batch, layers)
        # The untransformed images in a batch of the same shape and memory layout: CPU
        # convolutions round differently for other batch sizes (and NHWC inputs), and the
        # identity must give a distance of exactly 0.
        _, reference = layer_outputs(model, torch.cat([x[i:i + 1] for _, i in part]).contiguous(), layers)
        a_idx = torch.tensor([a for a, _ in part])
        i_idx = torch.tensor([i for _, i in part])
        for li, layer in enumerate(layers):
            ref = reference[layer].flatten(1)
            dist[li, a_idx, i_idx] = (acts[layer].flatten(1) - ref).norm(dim=1).cpu()
            norms[li, a_idx, i_idx] = ref.norm(dim=1).cpu()
        p = torch.softmax(logits, dim=1).cpu()
        lab = labels[i_idx]
        known = (lab >= 0) & (lab < p.shape[1])
        values = torch.full((len(part),), float("nan"))
        values[known] = p[known.nonzero()[:, 0], lab[known]]
        prob[a_idx, i_idx] = values
        pred[a_idx, i_idx] = p.argmax(dim=1)
    return {"distance": dist, "relative_distance": dist / norms.clamp_min(1e-12), "prob": prob, "predicted": pred}


@register
class Invariance(ChosenImagesAnalysis):
    """Feature distance and true-class probability under transforms: one unit per transform."""

    Params = InvarianceParams
    params: InvarianceParams
    view = (Gallery("{{ r.transform }} {{ r.axis or '' }}", unique=("key",), pixelated=False, per_page=12),
            Table(limit=2000, collapsed=True))
    units_per_task = 1

    def axes(self) -> list[Axis]:
        axis = self.params.axis
        return list(dict.fromkeys(axis)) if isinstance(axis, list) else [axis]

    def amounts(self, kind: Transform, input_size: tuple[int, int], axis: Axis = "x") -> list[float]:
        p = self.params
        if kind == "translate":
            if p.translate is not None:
                return list(p.translate)
            reach = input_size[1 if axis == "x" else 0] // 4
            return [float(v) for v in np.unique(np.round(np.linspace(-reach, reach, 9)))]
        return list(getattr(p, kind))

    def units(self, ctx: ModelContext) -> list[Any]:
        if not ctx.pixels:
            return []
        units: list[tuple[Transform, Axis | None]] = []
        for kind in TRANSFORMS:
            for axis in (self.axes() if kind == "translate" else [None]):
                if self.amounts(kind, ctx.input_size, axis or "x"):
                    units.append((kind, axis))
        return units

    def run(self, units: list[Any], ctx: ModelContext) -> ReduceOutput:
        p = self.params
        ids = list(ctx.pixels)
        x = ctx.normalize(ctx.images(ids))
        labels = torch.tensor([ctx.labels.get(i, -1) for i in ids])
        tables, images = [], []
        for kind, axis in units:
            amounts = self.amounts(kind, ctx.input_size, axis or "x")
            curves = invariance_curves(ctx.model, x, labels, p.layers, kind, amounts, p.chunk, axis or "x")
            # Horizontal translation keeps the name it always had.
            key = f"invariance-{kind}" + ("-y" if axis == "y" else "")
            shown = f"{kind} {axis}" if kind == "translate" and len(self.axes()) > 1 else kind
            panels = {f"{layer}: distance": curves["distance"][li].T.numpy() for li, layer in enumerate(p.layers)}
            panels["true-class probability"] = curves["prob"].T.numpy()
            unit = {"translate": "pixels", "scale": "scale factor", "rotate": "degrees"}[kind]
            images.append((key, line_panels(amounts, panels, [i[-24:] for i in ids], f"{shown} ({unit})",
                                            title=f"{shown}: {len(ids)} images",
                                            limits={"true-class probability": (0.0, 1.02)})))
            n_l, n_a, n = curves["distance"].shape
            grids = np.meshgrid(np.arange(n_l), np.arange(n_a), np.arange(n), indexing="ij")
            li, ai, ii = (g.ravel() for g in grids)
            tables.append(pa.table({
                "image_id": pa.array([ids[i] for i in ii], pa.string()),
                "label": pa.array([ctx.label(ids[i]) for i in ii], pa.int64()),
                "transform": pa.array([kind] * len(ii), pa.string()),
                "axis": pa.array([axis] * len(ii), pa.string()),
                "amount": pa.array(np.asarray(amounts, np.float64)[ai], pa.float64()),
                "layer": pa.array([p.layers[i] for i in li], pa.string()),
                "distance": pa.array(curves["distance"].numpy().ravel(), pa.float32()),
                "relative_distance": pa.array(curves["relative_distance"].numpy().ravel(), pa.float32()),
                "true_class_prob": pa.array(curves["prob"].numpy()[ai, ii], pa.float32()),
                "predicted": pa.array(curves["predicted"].numpy()[ai, ii], pa.int64()),
                "key": pa.array([key] * len(ii), pa.string()),
            }))
        return ReduceOutput(tables={"": pa.concat_tables(tables)}, images=images)
