"""``inversion``: what a layer keeps of an image, by reconstructing the image from its features.

Mahendran & Vedaldi, "Understanding Deep Image Representations by Inverting Them", CVPR 2015:
from noise, minimise ``||phi(x) - phi0||^2 / ||phi0||^2 + lambda TV_beta(x)`` (see
:func:`jobs.model.reconstruct.invert`). Early layers keep nearly everything, deep layers keep what
the class needs; the pixel error between original and reconstruction says how much.

Rows (one per image and layer): ``image_id``, ``label``, ``layer``,
``relative_feature_error`` (``||phi(x) - phi0|| / ||phi0||`` at the result), ``pixel_error``
(RMSE to the original, pixels in [0, 1]), ``steps``, the reconstruction raw (``image``,
float32, 3 x ``height`` x ``width``), the error ``history``, and ``key`` (+ ``shard``): the
original and the reconstruction side by side.

Example::

    - type: inversion
      layers: [layer1, layer2, layer3]
      sample: {n: 4, seed: 0}
      steps: 300
"""

from __future__ import annotations

import pyarrow as pa
import torch
from pydantic import Field

from jobs.core.base import register, unit_seed
from jobs.core.hooks import forward_to
from jobs.core.views import Bars, Gallery
from jobs.model.base import LayerImagesAnalysis, LayerImagesParams
from jobs.model.reconstruct import invert


class InversionParams(LayerImagesParams):
    steps: int = Field(default=300, ge=1)
    lr: float = Field(default=0.05, gt=0)
    tv_weight: float = Field(default=0.5, ge=0, description="lambda of the TV_beta prior (per pixel)")
    tv_beta: float = Field(default=2.0, gt=0)
    jitter: int = Field(default=0, ge=0)


@register
class Inversion(LayerImagesAnalysis):
    """Feature inversion: one unit per (layer, image), a batch per layer within a task."""

    Params = InversionParams
    params: InversionParams
    view = (
        Bars("layer", "pixel_error", "pixel RMSE (lower: the layer keeps more)", top=0.3,
             columns=("pixel_error", "relative_feature_error")),
        Gallery("{{ r.image_id }} · {{ r.layer }}<br>pixel error {{ r.pixel_error|num }}", per_page=12,
                title="Original · reconstruction"),
    )

    def run_layer(self, layer, originals, ids, ctx):
        p = self.params

        def features(x: torch.Tensor) -> torch.Tensor:
            return forward_to(ctx.model, layer, x)

        with torch.no_grad():
            target = features(ctx.normalize(originals)).detach()
        result = invert(features, target, ctx.normalize, tuple(originals.shape[-2:]), steps=p.steps, lr=p.lr,
                        tv_weight=p.tv_weight, tv_beta=p.tv_beta, seeds=[unit_seed(p.seed, i) for i in ids],
                        reference=originals, jitter=p.jitter, seed=p.seed)
        n = len(ids)
        return originals, result.images, {
            "relative_feature_error": pa.array(result.feature_error.numpy(), pa.float32()),
            "pixel_error": pa.array(result.pixel_error.numpy(), pa.float32()),
            "steps": pa.array([p.steps] * n, pa.int32()),
            "history": pa.array(list(result.history.numpy()), pa.list_(pa.float32())),
        }

    def summary(self, tables):
        table = tables.get("")
        if table is None or not table.num_rows:
            return {}
        df = table.select(["layer", "pixel_error", "relative_feature_error"]).to_pandas()
        means = df.groupby("layer", sort=False).mean()
        return {"pixel_error": {k: round(float(v), 4) for k, v in means.pixel_error.items()},
                "relative_feature_error": {k: round(float(v), 4) for k, v in means.relative_feature_error.items()}}
