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

from jobs.attribution.base import Attribution, AttributionAnalysis, AttributionParams, Choice, Target
from jobs.attribution.grad_cam import grad_cam_maps, own_grad_cam
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

    def attribute_own(self, batch: MapBatch, target: Target) -> tuple[Choice, Attribution] | None:
        # The Grad-CAM forward chooses the targets; the guided backward needs a forward of its own.
        choice, cams = own_grad_cam(self.name, batch, target, self.params.layer, self.chunk(batch.images))
        if not len(choice.rows):
            return choice, Attribution.pixels(cams, self.params.signed)
        x = batch.images[choice.rows.to(batch.images.device)]
        return choice, self.weighted(batch, x, choice.targets.to(x.device), cams)

    def attribute(self, batch: MapBatch, x: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> Attribution:
        cams = grad_cam_maps(batch.model, x, targets, self.params.layer, self.chunk(x))
        return self.weighted(batch, x, targets, cams)

    def weighted(self, batch: MapBatch, x: torch.Tensor, targets: torch.Tensor, cams: torch.Tensor) -> Attribution:
        """Guided backprop of inputs ``x`` for ``targets``, weighted by their Grad-CAM ``cams``."""
        from jobs.attribution.backprop import reduce_channels
        from jobs.core.kernels import upsample

        p = self.params
        cams = upsample(cams, (x.shape[-2], x.shape[-1]))
        guided = rule_gradients(batch.model, x, targets, "guided", signed=True, chunk=self.chunk(x))
        maps = reduce_channels(guided * cams.unsqueeze(1).to(guided.device), p.signed)
        return Attribution.pixels(maps, p.signed)
