"""``filters``: the weights of conv layers as pictures.

The first layer's kernels see RGB directly, so each is drawn as a small colour image
(Krizhevsky et al. 2012, Fig. 3; Zeiler & Fergus 2014). A deeper kernel has one k x k slice
per input channel; it is drawn as a grid of those slices in a blue-white-red colour map
(white = 0). Two scalings are rendered, one row each in the table (``norm``):

* ``filter``: every filter on its own scale: an RGB kernel min-max stretched to [0, 1], a
  deeper kernel's slices coloured by ``w / max|w|`` over that filter -- the most contrast;
* ``global``: one scale for the whole layer, ``0.5 + w / (2 max|w_layer|)`` for RGB kernels
  and ``w / max|w_layer|`` for slices -- so filters can be compared by strength.

Rows: one per (``layer``, ``channel``, ``norm``): the raw ``weight`` (float32, flattened,
shape ``in_channels``/``height``/``width``), its L2 norm ``l2``, the filter's picture ``key``
and the whole layer's grid ``grid_key`` (with their ``shard`` columns).

Example::

    - type: filters
      layers: [conv1, layer1.0.conv1]   # default: the first conv layer
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from jobs.core.base import AnalysisParams, DistinctLayers, ModelAnalysis, ModelContext, ReduceOutput, register, safe_key
from jobs.core.render import colormap, enlarge, grid
from jobs.core.views import Gallery

Norm = Literal["filter", "global"]


def _all_norms() -> list[Norm]:
    return ["filter", "global"]


class FiltersParams(AnalysisParams):
    layers: DistinctLayers | None = Field(default=None, description="conv layers; default: the first one")
    norms: list[Norm] = Field(default_factory=_all_norms, min_length=1)
    cell: int = Field(default=48, ge=4, description="min side in px of each filter's picture")


def first_conv(model: torch.nn.Module) -> str:
    """Name of the model's first ``nn.Conv2d`` in ``named_modules()`` order."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            return name
    raise ValueError("the model has no nn.Conv2d layer")


def rgb_filters(weight: torch.Tensor, norm: Norm) -> np.ndarray:
    """First-layer kernels (K, 3, k, k) -> uint8 pictures (K, k, k, 3).

    ``filter``: each kernel min-max stretched to [0, 255]; ``global``: ``0.5 + w / (2 max|w|)``
    with one max over the layer (grey = 0).
    """
    w = weight.detach().float().cpu()
    if norm == "filter":
        lo = w.amin(dim=(1, 2, 3), keepdim=True)
        hi = w.amax(dim=(1, 2, 3), keepdim=True)
        unit = (w - lo) / (hi - lo).clamp_min(1e-12)
    else:
        unit = 0.5 + w / (2 * w.abs().max().clamp_min(1e-12))
    return (unit.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def slice_scale(weight: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Kernels (K, C, k, k) scaled to [-1, 1]: per filter (``filter``) or per layer (``global``)."""
    w = weight.detach().float().cpu()
    top = w.abs().amax(dim=(1, 2, 3), keepdim=True) if norm == "filter" else w.abs().max()
    return w / torch.as_tensor(top).clamp_min(1e-12)


def _tile_columns(n: int) -> int:
    return max(1, int(np.ceil(np.sqrt(n))))


def filter_pictures(weight: torch.Tensor, norm: Norm, cell: int) -> list[np.ndarray]:
    """One uint8 picture per output channel: an RGB kernel, or a grid of its input slices."""
    if weight.shape[1] == 3:
        return [enlarge(p, cell) for p in rgb_filters(weight, norm)]
    scaled = slice_scale(weight, norm).numpy()
    k = max(weight.shape[-2:])
    per_slice = max(2, cell // max(1, _tile_columns(weight.shape[1])))
    pictures = []
    for kernel in scaled:
        tiles = [enlarge(colormap((s + 1) / 2, signed=True), max(per_slice, k)) for s in kernel]
        pictures.append(np.asarray(grid(tiles, cols=_tile_columns(len(tiles)), pad=1)))
    return pictures


@register
class Filters(ModelAnalysis):
    """Conv weights as pictures: one unit of work per layer."""

    Params = FiltersParams
    params: FiltersParams
    view = (Gallery("{{ r.layer }} · {{ r.norm }} scale", key="grid_key", unique=("layer", "norm")),)
    units_per_task: ClassVar[int] = 1

    def check_model(self, model, input_size):
        modules = dict(model.named_modules())
        problems = []
        for i, layer in enumerate(self.params.layers or []):
            module = modules.get(layer)
            if module is not None and not isinstance(module, torch.nn.Conv2d):
                problems.append((("layers", i), f"layer {layer!r} is a {type(module).__name__}, not a Conv2d: "
                                                "filters draws conv weights"))
        if self.params.layers is None:
            try:
                first_conv(model)
            except ValueError as e:
                problems.append((("layers",), str(e)))
        return problems

    def units(self, ctx: ModelContext) -> list[Any]:
        return list(self.params.layers or [first_conv(ctx.model)])

    def run(self, units: list[Any], ctx: ModelContext) -> ReduceOutput:
        from PIL import Image

        p = self.params
        modules = dict(ctx.model.named_modules())
        columns: dict[str, list] = {c: [] for c in ("layer", "channel", "norm", "in_channels", "height", "width",
                                                    "weight", "l2", "key", "grid_key")}
        images: list[tuple[str, Image.Image | np.ndarray]] = []
        for layer in units:
            weight = modules[layer].weight.detach().float().cpu()
            k_out, k_in, kh, kw = weight.shape
            flat = weight.reshape(k_out, -1)
            for norm in p.norms:
                pictures = filter_pictures(weight, norm, p.cell)
                grid_key = safe_key(f"{layer}-{norm}-grid")
                images.append((grid_key, grid(pictures, cols=_tile_columns(k_out), pad=2)))
                for c, picture in enumerate(pictures):
                    key = safe_key(f"{layer}-{norm}-c{c}")
                    images.append((key, picture))
                    columns["layer"].append(layer)
                    columns["channel"].append(c)
                    columns["norm"].append(norm)
                    columns["in_channels"].append(k_in)
                    columns["height"].append(kh)
                    columns["width"].append(kw)
                    columns["weight"].append(flat[c].numpy())
                    columns["l2"].append(float(flat[c].norm()))
                    columns["key"].append(key)
                    columns["grid_key"].append(grid_key)
        pngs = [(k, v if isinstance(v, Image.Image) else Image.fromarray(v)) for k, v in images]
        return ReduceOutput(tables={"": _table(columns)}, images=pngs)


def _table(columns: dict[str, list]):
    import pyarrow as pa

    return pa.table({
        "layer": pa.array(columns["layer"], pa.string()),
        "channel": pa.array(columns["channel"], pa.int32()),
        "norm": pa.array(columns["norm"], pa.string()),
        "in_channels": pa.array(columns["in_channels"], pa.int32()),
        "height": pa.array(columns["height"], pa.int32()),
        "width": pa.array(columns["width"], pa.int32()),
        "weight": pa.array([w.astype(np.float32) for w in columns["weight"]], pa.list_(pa.float32())),
        "l2": pa.array(columns["l2"], pa.float32()),
        "key": pa.array(columns["key"], pa.string()),
        "grid_key": pa.array(columns["grid_key"], pa.string()),
    })
