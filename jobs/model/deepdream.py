"""``deepdream``: amplify what a layer sees in an image.

Mordvintsev, Olah & Tyka, "Inceptionism: Going Deeper into Neural Networks", 2015: gradient
ascent on the image to maximise ``mean(f(x)^2)`` of a layer's activations, with normalised
steps, random jitter and octaves (see :func:`jobs.model.reconstruct.dream`). ``size`` first
enlarges small images (CIFAR's 32 px) so the octaves have room.

Rows (one per image and layer): ``image_id``, ``label``, ``layer``, ``start_value`` and
``final_value`` of the objective, ``steps`` (per octave), ``octaves``, the dream raw
(``image``, float32, 3 x ``height`` x ``width``) and ``key`` (+ ``shard``): the original and
the dream side by side.

Example::

    - type: deepdream
      layers: [layer2]
      images: [cat/0001.png]
      octaves: 3
      size: 96
"""

from __future__ import annotations

import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field

from jobs.core.base import register
from jobs.core.hooks import forward_to
from jobs.core.views import Gallery
from jobs.model.base import LayerImagesAnalysis, LayerImagesParams
from jobs.model.reconstruct import dream


class DeepDreamParams(LayerImagesParams):
    octaves: int = Field(default=3, ge=1)
    octave_scale: float = Field(default=1.4, gt=1)
    steps: int = Field(default=10, ge=1, description="steps per octave")
    lr: float = Field(default=0.01, gt=0)
    jitter: int = Field(default=2, ge=0)
    size: int | None = Field(default=None, ge=8,
                             description="dream at this side (bilinear resize); default: input size")
    cell: int = Field(default=128, ge=8, description="min side in px of each rendered image")


@register
class DeepDream(LayerImagesAnalysis):
    """DeepDream: one unit per (layer, image), a batch per layer within a task."""

    Params = DeepDreamParams
    params: DeepDreamParams
    view = (Gallery("{{ r.image_id }} · {{ r.layer }}<br>{{ r.start_value|num(2) }} → {{ r.final_value|num(2) }}",
                    per_page=12),)

    def run_layer(self, layer, originals, ids, ctx):
        p = self.params
        if p.size:
            originals = F.interpolate(originals, size=(p.size, p.size), mode="bilinear", align_corners=False,
                                      antialias=True).clamp(0, 1)

        def features(x: torch.Tensor) -> torch.Tensor:
            return forward_to(ctx.model, layer, x)

        result = dream(features, originals, ctx.normalize, octaves=p.octaves, octave_scale=p.octave_scale,
                       steps=p.steps, lr=p.lr, jitter=p.jitter, seed=p.seed)
        n = len(ids)
        return originals, result.images, {
            "start_value": pa.array(result.start.numpy(), pa.float32()),
            "final_value": pa.array(result.final.numpy(), pa.float32()),
            "steps": pa.array([p.steps] * n, pa.int32()),
            "octaves": pa.array([p.octaves] * n, pa.int32()),
        }
