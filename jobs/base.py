"""The one interface every analysis implements, and the registry that finds it by name.

An analysis is a pydantic ``Params`` model (its manifest entry) plus the pure tensor work
for one stage of the plan:

* ``map``: per image. The runner decodes a batch, runs the model once with hooks on every
  layer any fused analysis asked for, and hands each analysis a :class:`MapBatch`.
  The analysis returns its table rows as arrays aligned with the batch.
* ``reduce``: over the whole dataset. ``map_batch`` runs in the same fused pass but returns
  *partials* of any length (per-batch top-k candidates, per-image feature vectors, moment
  sums); the runner commits them as Parquet, then calls ``reduce`` once with those tables
  (:class:`ReduceInputs`) and a :class:`ReduceContext` (the model, the input pixels, a
  parallel map). ``reduce`` returns tables and rendered images (:class:`ReduceOutput`).

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

import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Protocol

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Stage = Literal["map", "reduce", "model"]

# Rows an analysis returns: {partition: {column: array with one entry per image}}.
# The partition is "" or a Hive-style "key=value" folder such as "layer=layer3".
Rows = dict[str, dict[str, np.ndarray]]


def _distinct_layers(layers: list[str]) -> list[str]:
    twice = sorted({name for name in layers if layers.count(name) > 1})
    if twice:
        raise ValueError(f"layers must be unique; listed more than once: {', '.join(twice)}")
    return layers


# ``layers`` of an analysis that keys its results by layer: at least one, none twice.
DistinctLayers = Annotated[list[str], Field(min_length=1), AfterValidator(_distinct_layers)]


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
    ``labels`` is -1 where the dataset has no label. ``pixels`` are the same images before
    normalisation (uint8 (N, H, W, 3), on the CPU: the frame of every box and overlay), and
    ``boxes`` the object box of each image in that frame ((N, 4) ``[x0, y0, x1, y1]``,
    half-open; a row of -1 where the image has none), when the dataset has boxes.
    """

    image_ids: list[str]
    labels: torch.Tensor
    images: torch.Tensor
    logits: torch.Tensor
    activations: dict[str, torch.Tensor]
    model: torch.nn.Module
    pixels: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, keep: np.ndarray) -> MapBatch:
        """The images where the boolean mask ``keep`` is true, every field alike."""
        idx = torch.from_numpy(np.flatnonzero(keep))

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[idx.to(t.device)]

        return MapBatch(
            image_ids=[i for i, k in zip(self.image_ids, keep) if k],
            labels=take(self.labels),
            images=take(self.images),
            logits=take(self.logits),
            activations={k: take(v) for k, v in self.activations.items()},
            model=self.model,
            pixels=None if self.pixels is None else self.pixels[keep],
            boxes=None if self.boxes is None else self.boxes[keep],
        )


@dataclass
class MapOutput:
    """A per-image analysis' result when its rows are not one per image, or it renders.

    ``rows``: {partition: {column: array}} of any row count; each row names its image
    (``image_id``, ``label`` columns), e.g. one row per (image, target class).
    ``images``: (key, image) pairs to store in the entry's image shards; a ``key`` column
    (or ``<prefix>_key``) in the rows finds them, and the runner adds the ``shard`` column.
    Rendering happens where the batch is computed, so it scales with the workers.
    """

    rows: Rows
    images: list[tuple[str, Image.Image]] = field(default_factory=list)


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

    def check_dataset(self, image_ids: Collection[str]) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems with this entry against the listed dataset, each with its field path.

        Called before any work starts (e.g. query ids that are not in the dataset).
        """
        return []

    def select(self, image_ids: Sequence[str]) -> list[str] | None:
        """The images of the dataset this entry works on (a sample), or None for all.

        Resolved once on the driver from the listed dataset; the runner then hands
        ``map_batch`` only those images of each batch (an analysis that selects must return
        a :class:`MapOutput` or partials, whose rows name their images).
        """
        return None

    def sources(self, entries: Sequence[AnalysisParams]) -> list[str]:
        """Names of the other manifest ``entries`` whose committed tables this entry reduces.

        Such a reduce entry needs no pass over the dataset: it runs once they are committed,
        and its inputs are their tables (one partition per entry). Raise ValueError for
        entries that cannot be used; the manifest reports it against this entry.
        """
        return []


class MapAnalysis(Analysis):
    """An analysis computed per image from one shared forward pass."""

    stage: ClassVar[Stage] = "map"

    def map_batch(self, batch: MapBatch) -> Rows | MapOutput:
        """Rows aligned with the batch (one per image, ``image_id``/``label`` added by the
        runner), or a :class:`MapOutput` of rows that name their images, plus rendered images."""
        raise NotImplementedError


class ReduceInputs(Protocol):
    """The partials an entry's ``map_batch`` returned over the whole dataset, per partition."""

    def partitions(self) -> list[str]: ...

    def read(self, partition: str = "", columns: Sequence[str] | None = None) -> pa.Table: ...

    def batches(self, partition: str = "", columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The same rows in bounded record batches, for reductions that stream."""
        ...


class ReduceContext(Protocol):
    """What a reduction may use besides its inputs; the runner provides it.

    ``model`` is the run's model in eval mode on ``device``; ``input_size`` is the (H, W) of
    every model input; ``images(ids)`` returns those images as the model saw them before
    normalisation (uint8, (H, W, 3)), the frame every box and crop is in;
    ``parallel_map(fn, items, shared)`` returns ``[fn(shared, item) for item in items]``,
    possibly computed on several workers (``fn`` must be a module-level function).
    """

    model: torch.nn.Module
    device: torch.device
    input_size: tuple[int, int]
    label_names: list[str] | None
    workers: int

    def images(self, image_ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def parallel_map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None) -> list: ...

    def log(self, message: str) -> None: ...


@dataclass
class ReduceOutput:
    """A reduction's result.

    ``tables``: {partition: table}, a ``pa.Table`` or {column: array}. A column named
    ``key`` (or ``<prefix>_key``) names a rendered image; the runner adds the matching
    ``shard`` (``<prefix>_shard``) column: the tar file, relative to the entry folder, that
    holds ``<key>.png``. ``images``: (key, image) pairs, consumed lazily, so a reduction can
    render thousands without holding them all. ``stats``: extra numbers for run.json.
    """

    tables: dict[str, pa.Table | dict[str, Any]]
    images: Iterable[tuple[str, Image.Image]] = ()
    stats: dict[str, Any] = field(default_factory=dict)


class ReduceAnalysis(Analysis):
    """An analysis of the whole dataset: per-batch partials, then one reduction."""

    stage: ClassVar[Stage] = "reduce"

    def map_batch(self, batch: MapBatch) -> Rows:
        """Partials for one batch: {partition: {column: array}}, rows of any count."""
        raise NotImplementedError

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        raise NotImplementedError


class TableInputs:
    """:class:`ReduceInputs` over in-memory tables (tests, notebooks)."""

    def __init__(self, tables: dict[str, pa.Table], batch_rows: int = 65536):
        self.tables, self.batch_rows = tables, batch_rows

    def partitions(self) -> list[str]:
        return sorted(self.tables)

    def read(self, partition: str = "", columns: Sequence[str] | None = None) -> pa.Table:
        t = self.tables[partition]
        return t.select(list(columns)) if columns else t

    def batches(self, partition: str = "", columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        yield from self.read(partition, columns).to_batches(max_chunksize=self.batch_rows)


@dataclass
class LocalContext:
    """:class:`ReduceContext` in one process, from images held in memory (tests, notebooks)."""

    model: torch.nn.Module
    pixels: dict[str, np.ndarray]
    input_size: tuple[int, int]
    label_names: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 1

    def images(self, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self.pixels[i] for i in image_ids}

    def parallel_map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None) -> list:
        return [fn(shared, item) for item in items]

    def log(self, message: str) -> None:
        pass


def safe_key(text: str) -> str:
    """A WebDataset-safe sample key: no dots (they start the extension), no slashes.

    >>> safe_key("layer3.2.conv2")
    'layer3_2_conv2'
    """
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


REGISTRY: dict[str, type[Analysis]] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: make an analysis available to manifests under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"analysis {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls
