"""``guided_grad_cam``: guided backpropagation weighted by Grad-CAM, pixel by pixel.

Selvaraju et al., "Grad-CAM" (ICCV 2017), Sec. 3.1: ``Guided Grad-CAM = R_guided *
upsample(Grad-CAM)``, the guided-backprop picture (Springenberg et al. 2015) kept only where
the class-discriminative Grad-CAM map is high.

Example manifest entry::

    - type: guided_grad_cam
      layer: layer3
      signed: false      # true keeps the (3, H, W) signed picture

Table columns: see :mod:`jobs.attribution.base`; ``map`` is (1, H, W), ``max_c |R_c|``.
"""

from __future__ import annotations

import torch

from jobs.attribution.base import Attribution, AttributionAnalysis, AttributionParams
from jobs.attribution.grad_cam import grad_cam_maps
from jobs.attribution.guided_backprop import rule_gradients
from jobs.core.base import MapBatch, register


class GuidedGradCamParams(AttributionParams):
    layer: str
    signed: bool = False


@register
class GuidedGradCam(AttributionAnalysis):
    """Guided Grad-CAM maps, one per image and target."""

    Params = GuidedGradCamParams
    params: GuidedGradCamParams

    def attribute(self, batch: MapBatch, x: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> Attribution:
        from jobs.attribution.backprop import reduce_channels
        from jobs.core.kernels import upsample

        p = self.params
        cams = upsample(grad_cam_maps(batch.model, x, targets, p.layer, self.chunk(x)), (x.shape[-2], x.shape[-1]))
        guided = rule_gradients(batch.model, x, targets, "guided", signed=True, chunk=self.chunk(x))
        maps = reduce_channels(guided * cams.unsqueeze(1).to(guided.device), p.signed)
        return Attribution.pixels(maps, p.signed)
