"""``grad_cam``: gradient-weighted class activation maps at any convolutional layer.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization" (ICCV 2017): ``alpha_k = mean_ij dS_t / dA_kij`` and
``Grad-CAM = ReLU(sum_k alpha_k A_k)``, with ``S_t`` the target's pre-softmax score.

Example manifest entry::

    - type: grad_cam
      layer: layer3

Table columns: see :mod:`jobs.attribution.base`; ``map`` is (1, h, w) at the layer's resolution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from jobs.attribution.base import (
    Attribution,
    AttributionAnalysis,
    AttributionParams,
    Choice,
    Target,
    in_chunks,
    own_forward_maps,
)
from jobs.core.base import MapBatch, register

if TYPE_CHECKING:
    from jobs.attribution.backprop import ClassForward


class GradCamParams(AttributionParams):
    layer: str


def grad_cam_chosen(forward: ClassForward, rows: torch.Tensor, targets: torch.Tensor, layer: str) -> torch.Tensor:
    """Grad-CAM (M, h, w) of the pairs (``rows``, ``targets``) from ``forward``, a forward that
    recorded ``layer``."""
    from jobs.attribution.backprop import grad_cam

    acts = forward.activations(rows)
    if acts.dim() != 4:
        raise ValueError(f"grad_cam needs a (N, K, h, w) feature map at layer {layer!r}, "
                         f"got shape {tuple(acts.shape)}")
    return grad_cam(acts.float(), forward.gradients(rows, targets))


def own_grad_cam(name: str, batch: MapBatch, target: Target, layer: str, chunk: int) -> tuple[Choice, torch.Tensor]:
    """Targets chosen from the Grad-CAM forward's own logits, and their Grad-CAM maps."""
    return own_forward_maps(name, batch, target, chunk,
                            lambda forward, rows, targets: grad_cam_chosen(forward, rows, targets, layer),
                            layer=layer)


def grad_cam_maps(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, layer: str,
                  chunk: int) -> torch.Tensor:
    """Grad-CAM (M, h, w) for inputs ``x``, ``chunk`` images per forward and backward."""
    from jobs.attribution.backprop import grad_cam, layer_gradients

    out = []
    for sl in in_chunks(len(x), chunk):
        acts, grads, _ = layer_gradients(model, x[sl], layer, targets[sl])
        if acts.dim() != 4:
            raise ValueError(f"grad_cam needs a (N, K, h, w) feature map at layer {layer!r}, "
                             f"got shape {tuple(acts.shape)}")
        out.append(grad_cam(acts, grads))
    return torch.cat(out)


@register
class GradCam(AttributionAnalysis):
    """Grad-CAM maps, one per image and target."""

    Params = GradCamParams
    params: GradCamParams

    def attribute_own(self, batch: MapBatch, target: Target) -> tuple[Choice, Attribution] | None:
        choice, maps = own_grad_cam(self.name, batch, target, self.params.layer, self.chunk(batch.images))
        return choice, Attribution(columns={"map": maps}, heat=maps)

    def attribute(self, batch: MapBatch, x: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> Attribution:
        maps = grad_cam_maps(batch.model, x, targets, self.params.layer, self.chunk(x))
        return Attribution(columns={"map": maps}, heat=maps)
