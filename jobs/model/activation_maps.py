"""``activation_maps``: the feature maps of chosen layers for chosen images, one tile per channel.

What a layer keeps of an image, channel by channel (Yosinski et al. 2015, "Understanding
Neural Networks Through Deep Visualization", the toolbox's activation grid). Every tile of an
(image, layer) grid shares one colour scale (``scale: layer``, so channels compare by
strength; the layer's max is white/yellow) or each channel has its own (``scale: channel``).
Maps with negative values (before a ReLU) use a blue-white-red scale centred on zero.

Rows: one per (image, layer, channel): ``image_id``, ``label``, ``layer``, ``channel``,
``max``, ``mean``, the raw ``map`` (float32, flattened, ``height`` x ``width``), and the grid
picture of its (image, layer) as ``key`` (+ ``shard``); channels run row-major in the grid.

Example::

    - type: activation_maps
      layers: [layer1, layer3]
      images: [cat/0001.png]        # or sample: {n: 4, seed: 0}
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from jobs.core.base import DistinctLayers, ModelContext, ReduceOutput, image_key, register
from jobs.core.hooks import layer_outputs
from jobs.core.render import colormap, enlarge, grid
from jobs.core.views import Gallery
from jobs.model.base import ChosenImagesAnalysis, ChosenImagesParams


class ActivationMapsParams(ChosenImagesParams):
    layers: DistinctLayers
    scale: Literal["layer", "channel"] = "layer"
    cell: int = Field(default=32, ge=4, description="min side in px of each channel's tile")


def channel_tiles(maps: torch.Tensor, scale: str, cell: int) -> list[np.ndarray]:
    """(C, h, w) maps of one image -> one uint8 RGB tile per channel, on a shared or own scale."""
    m = maps.float().cpu()
    signed = bool((m < 0).any())
    dims = (1, 2) if scale == "channel" else (0, 1, 2)
    if signed:
        top = m.abs().amax(dim=dims, keepdim=True) if scale == "channel" else m.abs().max()
        unit = (m / torch.as_tensor(top).clamp_min(1e-12) + 1) / 2
    else:
        top = m.amax(dim=dims, keepdim=True) if scale == "channel" else m.max()
        unit = m / torch.as_tensor(top).clamp_min(1e-12)
    return [enlarge(colormap(u.numpy(), signed=signed), cell) for u in unit]


@register
class ActivationMaps(ChosenImagesAnalysis):
    """Feature maps of chosen images: one unit of work per image."""

    Params = ActivationMapsParams
    params: ActivationMapsParams
    view = (Gallery("{{ r.image_id }}<br>{{ r.layer }}", unique=("key",), per_page=12),)

    def check_model(self, model, input_size):
        layers = self.params.layers
        _, outputs = layer_outputs(model, torch.zeros(1, 3, *input_size), layers)
        return [(("layers", i), f"layer {layer!r} outputs shape {tuple(outputs[layer].shape[1:])} per image, "
                                "not (C, H, W) feature maps")
                for i, layer in enumerate(layers) if outputs[layer].dim() != 4]

    def run(self, units: list[Any], ctx: ModelContext) -> ReduceOutput:
        p = self.params
        x = ctx.normalize(ctx.images(units))
        _, outputs = layer_outputs(ctx.model, x, p.layers)
        cols: dict[str, list] = {c: [] for c in ("image_id", "label", "layer", "channel", "max", "mean", "map",
                                                  "height", "width", "key")}
        images = []
        for layer in p.layers:
            acts = outputs[layer]
            if acts.dim() != 4:
                raise ValueError(f"layer {layer!r} outputs shape {tuple(acts.shape)}, not (N, C, H, W) feature maps")
            for n, image_id in enumerate(units):
                maps = acts[n]
                key = image_key(image_id, layer)
                tiles = channel_tiles(maps, p.scale, p.cell)
                images.append((key, grid(tiles, cols=int(np.ceil(np.sqrt(len(tiles)))), pad=1)))
                flat = maps.reshape(maps.shape[0], -1).cpu()
                for c in range(maps.shape[0]):
                    cols["image_id"].append(image_id)
                    cols["label"].append(ctx.label(image_id))
                    cols["layer"].append(layer)
                    cols["channel"].append(c)
                    cols["max"].append(float(flat[c].max()))
                    cols["mean"].append(float(flat[c].mean()))
                    cols["map"].append(flat[c].numpy())
                    cols["height"].append(maps.shape[1])
                    cols["width"].append(maps.shape[2])
                    cols["key"].append(key)
        table = pa.table({
            "image_id": pa.array(cols["image_id"], pa.string()),
            "label": pa.array(cols["label"], pa.int64()),
            "layer": pa.array(cols["layer"], pa.string()),
            "channel": pa.array(cols["channel"], pa.int32()),
            "max": pa.array(cols["max"], pa.float32()),
            "mean": pa.array(cols["mean"], pa.float32()),
            "map": pa.array(cols["map"], pa.list_(pa.float32())),
            "height": pa.array(cols["height"], pa.int32()),
            "width": pa.array(cols["width"], pa.int32()),
            "key": pa.array(cols["key"], pa.string()),
        })
        return ReduceOutput(tables={"": table}, images=images)
