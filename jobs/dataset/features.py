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
from pydantic import Field

from jobs.core.base import FLOATS, IMAGE_ID, LABEL, AnalysisParams, MapAnalysis, MapBatch, Rows, by_layer, register
from jobs.core.kernels import pool


class FeaturesParams(AnalysisParams):
    layers: list[str] = Field(min_length=1)
    pool: Literal["avg", "max", "none", "grid"] = "avg"
    grid: int = Field(default=2, ge=1, description="cells per side when pool is 'grid'")




@register
class Features(MapAnalysis):
    """Pooled activations of the chosen layers, one vector per image and layer."""

    Params = FeaturesParams
    params: FeaturesParams

    def schema(self) -> dict[str, pa.Schema]:
        return by_layer(self.params.layers, pa.schema([IMAGE_ID, LABEL, ("vector", FLOATS)]))

    def map_batch(self, batch: MapBatch) -> Rows:
        p = self.params
        return {
            f"layer={layer}": {"vector": pool(batch.activations[layer], p.pool, p.grid).float().cpu().numpy()}
            for layer in p.layers
        }
