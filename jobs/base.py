"""The one interface every analysis implements, and the registry that finds it by name.

An analysis is a pydantic ``Params`` model (its manifest entry) plus the pure tensor work
for one stage of the plan:

* ``map``: per image. The runner decodes a batch, runs the model once with hooks on every
  layer any fused analysis asked for, and hands each analysis a :class:`MapBatch`.
  The analysis returns its table rows as arrays aligned with the batch.

Kernels here never touch Ray or files; ``pipeline`` feeds them and writes what they return.

Example::

    @register
    class Features(MapAnalysis):
        name = "features"
        Params = FeaturesParams

        def map_batch(self, batch):
            return {f"layer={l}": {"vector": pool(batch.activations[l])} for l in self.params.layers}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

Stage = Literal["map", "reduce", "model"]

# Rows an analysis returns: {partition: {column: array with one entry per image}}.
# The partition is "" or a Hive-style "key=value" folder such as "layer=layer3".
Rows = dict[str, dict[str, np.ndarray]]


class AnalysisParams(BaseModel):
    """Fields shared by every manifest entry of ``analyses``."""

    model_config = ConfigDict(extra="forbid")

    type: str
    name: str | None = None

    @property
    def entry_name(self) -> str:
        """The output folder and the key in run.json: ``name``, or ``type`` when unnamed."""
        return self.name or self.type


@dataclass
class MapBatch:
    """What a per-image analysis sees: one decoded, preprocessed batch and the model's pass.

    ``images`` are normalised model inputs (N, C, H, W) on the model's device;
    ``activations`` holds the output of every hooked layer (detached, float32);
    ``labels`` is -1 where the dataset has no label.
    """

    image_ids: list[str]
    labels: torch.Tensor
    images: torch.Tensor
    logits: torch.Tensor
    activations: dict[str, torch.Tensor]
    model: torch.nn.Module


class Analysis:
    """Base class: validated params plus the work of one stage."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    Params: ClassVar[type[AnalysisParams]]

    def __init__(self, params: AnalysisParams):
        self.params = params

    def layers(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Layers this entry reads, each with its field path inside the entry.

        The default reads a ``layer`` (str) or ``layers`` (list of str) parameter;
        the manifest checks every one against ``model.named_modules()``.
        """
        found: list[tuple[tuple[str | int, ...], str]] = []
        layer = getattr(self.params, "layer", None)
        if isinstance(layer, str):
            found.append((("layer",), layer))
        for i, name in enumerate(getattr(self.params, "layers", None) or []):
            found.append((("layers", i), name))
        return found


class MapAnalysis(Analysis):
    """An analysis computed per image from one shared forward pass."""

    stage: ClassVar[Stage] = "map"

    def map_batch(self, batch: MapBatch) -> Rows:
        raise NotImplementedError


REGISTRY: dict[str, type[Analysis]] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: make an analysis available to manifests under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"analysis {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls
