"""What the model-level analyses of a few chosen images share: the images, and a per-layer
optimisation of them (inversion, DeepDream)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, ClassVar

import pyarrow as pa
import torch
from pydantic import Field

from jobs.core.base import (
    AnalysisParams,
    DistinctLayers,
    ModelAnalysis,
    ModelContext,
    ReduceOutput,
    SampleSpec,
    image_key,
    sample_ids,
)
from jobs.core.render import side_by_side


class ChosenImagesParams(AnalysisParams):
    """Entries that work on a few chosen images: listed ``images``, else a seeded ``sample``."""

    images: list[str] | None = Field(default=None, min_length=1, description="image ids of the dataset")
    sample: SampleSpec = Field(default_factory=lambda: SampleSpec(n=4))


class ChosenImagesAnalysis(ModelAnalysis):
    """A model-level analysis of chosen images; its units are the image ids that decoded."""

    Params: ClassVar[type[ChosenImagesParams]]
    params: ChosenImagesParams

    def select(self, image_ids: Sequence[str]) -> list[str]:
        p = self.params
        return list(p.images) if p.images else sample_ids(list(image_ids), p.sample.n, p.sample.seed)

    def check_dataset(self, image_ids: Collection[str]) -> list[tuple[tuple[str | int, ...], str]]:
        known = image_ids if isinstance(image_ids, (set, frozenset, dict)) else set(image_ids)
        missing = [i for i in self.params.images or [] if i not in known]
        if not missing:
            return []
        shown = ", ".join(repr(i) for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        return [(("images",), f"{len(missing)} image id(s) not in the dataset: {shown}{more}")]

    def units(self, ctx: ModelContext) -> list[Any]:
        return list(ctx.pixels)


class LayerImagesParams(ChosenImagesParams):
    """Fields of an optimisation per (layer, chosen image): the layers, a seed, the picture size."""

    layers: DistinctLayers
    seed: int = 0
    cell: int = Field(default=96, ge=8, description="min side in px of each rendered image")
    units_per_task: int = Field(default=16, ge=1, description="images optimised together in one batch")


class LayerImagesAnalysis(ChosenImagesAnalysis):
    """An optimisation per (layer, chosen image) that yields an image: inversion, DeepDream.

    Units are ``(layer, image_id)``; a task computes each layer's images in one batch
    (:meth:`run_layer`). Rows: ``image_id``, ``label``, ``layer``, the method's columns, the
    result raw (``image``: float32 in [0, 1], flattened 3 x ``height`` x ``width``) and
    ``key`` (+ ``shard``): the input and the result side by side.
    """

    Params: ClassVar[type[LayerImagesParams]]
    params: LayerImagesParams

    def units(self, ctx: ModelContext) -> list[Any]:
        return [(layer, image_id) for layer in self.params.layers for image_id in ctx.pixels]

    def run_layer(self, layer: str, originals: torch.Tensor, ids: list[str], ctx: ModelContext
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, pa.Array]]:
        """For ``originals`` (n, 3, H, W) in [0, 1]: (the inputs as shown, the results, the
        method's columns)."""
        raise NotImplementedError

    def run(self, units: list[Any], ctx: ModelContext) -> ReduceOutput:
        tables, images = [], []
        for layer in dict.fromkeys(layer for layer, _ in units):
            ids = [image_id for name, image_id in units if name == layer]
            shown, results, columns = self.run_layer(layer, ctx.images(ids), ids, ctx)
            keys = [image_key(i, layer) for i in ids]
            images += [(k, side_by_side([a, b], self.params.cell)) for k, a, b in zip(keys, shown.cpu(), results)]
            n = len(ids)
            tables.append(pa.table({
                "image_id": pa.array(ids, pa.string()),
                "label": pa.array([ctx.label(i) for i in ids], pa.int64()),
                "layer": pa.array([layer] * n, pa.string()),
                **columns,
                "image": pa.array(list(results.float().cpu().reshape(n, -1).numpy()), pa.list_(pa.float32())),
                "height": pa.array([results.shape[-2]] * n, pa.int32()),
                "width": pa.array([results.shape[-1]] * n, pa.int32()),
                "key": pa.array(keys, pa.string()),
            }))
        return ReduceOutput(tables={"": pa.concat_tables(tables)}, images=images)
