"""``cam``: class activation maps, for models ending in global average pooling and one linear layer.

Zhou, Khosla, Lapedriza, Oliva & Torralba, "Learning Deep Features for Discriminative
Localization" (CVPR 2016): with ``logits_c = sum_k w_ck mean_ij A_kij + b_c``,
``CAM_c = sum_k w_ck A_k`` at ``layer`` (the feature map that is pooled). No gradients: the
activations come from the shared forward pass. The head is checked on every worker's first
batch: if the logits are not that linear function of the pooled ``layer``, the entry fails
with a message naming what was found (use ``grad_cam`` for such models).

Example manifest entry::

    - type: cam
      layer: relu4          # the feature map that the global average pool reads

Table columns: see :mod:`jobs.attribution.base`; ``map`` is the raw (1, h, w) CAM at the layer's
resolution (signed; overlays resize it to the image).
"""

from __future__ import annotations

import torch

from jobs.attribution.base import Attribution, AttributionAnalysis, AttributionParams
from jobs.core.base import MapBatch, register


class CamParams(AttributionParams):
    layer: str


@register
class Cam(AttributionAnalysis):
    """Class activation maps from the shared forward pass, one per image and target."""

    Params = CamParams
    params: CamParams

    def __init__(self, params: CamParams):
        super().__init__(params)
        self._weights: torch.Tensor | None = None

    def attribute(self, batch: MapBatch, x: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> Attribution:
        from jobs.attribution.backprop import cam, find_cam_head

        if self._weights is None:
            self._weights = find_cam_head(batch.model, self.params.layer, x).detach().float()
        acts = batch.activations[self.params.layer]
        if acts.dim() != 4:
            raise ValueError(f"cam needs a (N, K, h, w) feature map at layer {self.params.layer!r}, "
                             f"got shape {tuple(acts.shape)}")
        a = acts[rows.to(acts.device)].float()
        w = self._weights.to(a.device)[targets.to(a.device)]
        maps = cam(a, w)
        return Attribution(columns={"map": maps}, heat=maps, signed=True)
