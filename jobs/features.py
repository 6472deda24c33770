"""``features``: the activations of one or more layers for every image, pooled to a vector.

Example manifest entry::

    - type: features
      layers: [layer1, layer2, layer3]
      pool: avg        # avg | max | none (flattened) | grid
      grid: 2          # with pool: grid, average over a 2x2 grid of cells

Table ``features/layer=<layer>/part-*.parquet``: ``image_id``, ``label``, ``vector``.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field

from jobs.base import FLOATS, IMAGE_ID, LABEL, AnalysisParams, MapAnalysis, MapBatch, Rows, by_layer, register


class FeaturesParams(AnalysisParams):
    type: Literal["features"] = "features"
    layers: list[str] = Field(min_length=1)
    pool: Literal["avg", "max", "none", "grid"] = "avg"
    grid: int = Field(default=2, ge=1, description="cells per side when pool is 'grid'")


def pool(activation: torch.Tensor, how: str, grid: int = 2) -> torch.Tensor:
    """Pool a batch of activations (N, C, H, W) -- or any (N, ...) -- to vectors (N, D).

    ``avg``/``max`` reduce every spatial position of a channel (D = C); ``grid`` averages
    over a ``grid`` x ``grid`` partition of the map (D = C * grid^2, channel-major); ``none``
    flattens. Outputs without spatial dimensions (a linear layer's (N, C)) are flattened
    whatever ``how`` is.

    >>> pool(torch.arange(8.).reshape(1, 2, 2, 2), "avg")
    tensor([[1.5000, 5.5000]])
    """
    if activation.dim() <= 2 or how == "none":
        return activation.flatten(1)
    spatial = activation.flatten(2)  # (N, C, positions)
    if how == "avg":
        return spatial.mean(dim=2)
    if how == "max":
        return spatial.amax(dim=2)
    if how == "grid":
        if activation.dim() != 4:
            raise ValueError(f"pool 'grid' needs (N, C, H, W) activations, got shape {tuple(activation.shape)}")
        return F.adaptive_avg_pool2d(activation, grid).flatten(1)
    raise ValueError(f"unknown pool {how!r}; expected one of avg, max, none, grid")


@register
class Features(MapAnalysis):
    """Pooled activations of the chosen layers, one vector per image and layer."""

    name = "features"
    Params = FeaturesParams

    def schema(self) -> dict[str, pa.Schema]:
        return by_layer(self.params.layers, pa.schema([IMAGE_ID, LABEL, ("vector", FLOATS)]))

    def map_batch(self, batch: MapBatch) -> Rows:
        p = self.params
        return {
            f"layer={layer}": {"vector": pool(batch.activations[layer], p.pool, p.grid).float().cpu().numpy()}
            for layer in p.layers
        }
