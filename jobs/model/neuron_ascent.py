"""``neuron_ascent``: what a channel or a single neuron of a layer responds to most.

Yosinski, Clune, Nguyen, Fuchs & Lipson, "Understanding Neural Networks Through Deep
Visualization", ICML-W 2015 (one neuron, the centre of a channel's map, with their
regularisers), and Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017 (the
whole channel's mean, with a decorrelated Fourier image); see :mod:`jobs.model.ascent`. The
forward stops at the layer, so deep layers' later blocks cost nothing.

``neuron``: ``channel`` maximises the channel's mean activation, ``center`` the activation at
the centre of its map. On a layer with (N, C) outputs (a linear layer) the unit is the
output ``channel`` itself.

Rows (one per channel and restart): ``layer``, ``channel``, then the columns every ascent
analysis writes (:class:`jobs.model.ascent.AscentAnalysis`).

Example::

    - type: neuron_ascent
      layer: layer3
      channels: [0, 1, 2, 3]   # or all
      neuron: channel
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
import torch
from pydantic import Field

from jobs.core.base import ModelContext, register
from jobs.core.hooks import forward_to
from jobs.core.views import Gallery, Table
from jobs.model.ascent import AscentAnalysis, AscentParams


class NeuronAscentParams(AscentParams):
    layer: str
    channels: Literal["all"] | list[int] = Field(default="all", description="channel indices, or all of them")
    neuron: Literal["channel", "center"] = "channel"


def layer_shape(model: torch.nn.Module, layer: str, input_size: tuple[int, int], device=None) -> tuple[int, ...]:
    """The shape of one image's output of ``layer`` (e.g. (C, h, w)), from a blank input."""
    with torch.no_grad():
        return tuple(forward_to(model, layer, torch.zeros(1, 3, *input_size, device=device)).shape[1:])


@register
class NeuronAscent(AscentAnalysis):
    """Channel or neuron visualisation by gradient ascent: one unit per (channel, restart)."""

    Params = NeuronAscentParams
    params: NeuronAscentParams
    view = (
        Gallery("{{ r.layer }} channel {{ r.channel }}<br>{{ r.start_value|num(2) }} → {{ r.final_value|num(2) }}"),
        Table(drop=("image", "history", "map", "weight", "key", "shard")),
    )

    @property
    def objective_name(self) -> str:
        return self.params.neuron

    def _size(self, input_size):
        p = self.params
        return (p.size, p.size) if p.size else tuple(input_size)

    def check_model(self, model, input_size):
        shape = layer_shape(model, self.params.layer, self._size(input_size))
        if len(shape) not in (1, 3):
            return [(("layer",), f"layer {self.params.layer!r} outputs shape {shape} per image; neuron_ascent "
                                 "needs (C, h, w) feature maps or (C,) outputs")]
        if self.params.channels != "all":
            bad = [c for c in self.params.channels if not 0 <= c < shape[0]]
            if bad:
                return [(("channels",), f"channel(s) {', '.join(map(str, bad))} not in layer "
                                        f"{self.params.layer!r}, which has {shape[0]} (0..{shape[0] - 1})")]
        return []

    def units(self, ctx: ModelContext) -> list[Any]:
        p = self.params
        channels: Sequence[int]
        if p.channels == "all":
            channels = range(layer_shape(ctx.model, p.layer, self._size(ctx.input_size), ctx.device)[0])
        else:
            channels = p.channels
        return [(int(c), r) for c in channels for r in range(p.starts())]

    def objective(self, units, ctx):
        layer, centre = self.params.layer, self.params.neuron == "center"
        channels = torch.tensor([c for c, _ in units], device=ctx.device)
        rows = torch.arange(len(units), device=ctx.device)

        def activation(x: torch.Tensor) -> torch.Tensor:
            acts = forward_to(ctx.model, layer, x)[rows, channels]
            if acts.dim() == 1:
                return acts
            if centre:
                return acts[:, acts.shape[1] // 2, acts.shape[2] // 2]
            return acts.flatten(1).mean(dim=1)
        return activation

    def facet_layer(self, ctx):
        f = self.params.facets
        return f.layer if f is not None and f.layer is not None else self.params.layer

    def describe(self, units, images, ctx):
        return {"layer": pa.array([self.params.layer] * len(units), pa.string()),
                "channel": pa.array([c for c, _ in units], pa.int32())}
