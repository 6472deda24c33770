"""The one interface every analysis implements, and the registry that finds it by name.

An analysis is a pydantic ``Params`` model (its manifest entry) plus the pure tensor work
for one stage of the plan:

* ``map``: per image. The runner decodes a batch and hands each analysis a :class:`MapBatch`;
  the model runs once on it, with hooks on every layer any fused analysis asked for, when an
  analysis first reads its logits or activations.
  The analysis returns its table rows as arrays aligned with the batch.
* ``reduce``: over the whole dataset. ``map_batch`` runs in the same fused pass but returns
  *partials* of any length (per-batch top-k candidates, per-image feature vectors, moment
  sums); the runner commits them as Parquet, then calls ``reduce`` once with those tables
  (:class:`ReduceInputs`) and a :class:`ReduceContext` (the model, the input pixels, a
  parallel map). ``reduce`` returns tables and rendered images (:class:`ReduceOutput`).
* ``train``: the model is trained (fine-tuned) on the dataset's labelled images. The entry
  splits them (:meth:`TrainAnalysis.split`); the runner decodes them once and runs
  :meth:`TrainAnalysis.fit` on every training worker with a :class:`Workers` to sum
  gradients over; ``fit`` returns a row per epoch and the trained model stays in place.
* ``model``: no pass over the dataset. The entry lists independent *units* of work (a class,
  a channel, a layer, a chosen image) from a :class:`ModelContext`; the runner spreads groups
  of units over the workers as tasks, and ``run`` computes one group (one batch on the
  device), returning a :class:`ReduceOutput` whose tables the runner concatenates.

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

import hashlib
import importlib
import json
import pkgutil
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Protocol, cast

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from jobs.core.pixels import normalize, pixels_to_inputs
from jobs.core.views import Block

Stage = Literal["map", "reduce", "model", "train"]

# Rows an analysis returns: {partition: {column: array with one entry per image}}.
# The partition is "" or a Hive-style "key=value" folder such as "layer=layer3".
Rows = dict[str, dict[str, np.ndarray]]


def listed_twice(items: Sequence[Any]) -> list[Any]:
    """The items a list holds more than once, sorted (for "listed once" checks of parameters)."""
    return sorted({item for item in items if items.count(item) > 1})


def _distinct_layers(layers: list[str]) -> list[str]:
    twice = listed_twice(layers)
    if twice:
        raise ValueError(f"layers must be unique; listed more than once: {', '.join(twice)}")
    return layers


# Columns most tables share (see DESIGN.md's output contract).
IMAGE_ID = pa.field("image_id", pa.string())
LABEL = pa.field("label", pa.int64())
FLOATS = pa.list_(pa.float32())  # a vector or a flattened map, float32


def by_layer(layers: Sequence[str], schema: pa.Schema) -> dict[str, pa.Schema]:
    """One partition ``layer=<layer>`` per layer, each with ``schema``."""
    return {f"layer={layer}": schema for layer in layers}


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


class MapBatch:
    """What a per-image analysis sees: one decoded, preprocessed batch and the model's pass.

    ``images`` are normalised model inputs (N, C, H, W) on the model's device;
    ``logits`` and ``activations`` (the output of every hooked layer, detached, float32) come
    from one shared inference forward of the batch; ``labels`` is -1 where the dataset has no
    label. ``pixels`` are the same images before normalisation (uint8 (N, H, W, 3), on the CPU:
    the frame of every box and overlay), and ``boxes`` the object box of each image in that
    frame ((N, 4) ``[x0, y0, x1, y1]``, half-open; a row of -1 where the image has none), when
    the dataset has boxes. ``mean``/``std``: the normalisation,
    ``images = (pixels / 255 - mean) / std`` per channel.

    Given ``forward`` (a callable returning ``(logits, activations)``) instead of ``logits`` and
    ``activations``, the shared forward runs the first time either is read, and never when no
    analysis of the batch reads them (attribution methods that run their own forward). A
    forward that fails raises :class:`SharedForwardError` for every analysis that reads it.
    ``baselines``: the same images through a baseline model, by name (``random_init``: the
    architecture with seeded random weights), for an analysis that asks for one
    (:meth:`Analysis.baselines`); empty otherwise.
    """

    def __init__(self, image_ids: list[str], labels: torch.Tensor, images: torch.Tensor, *,
                 model: torch.nn.Module, logits: torch.Tensor | None = None,
                 activations: dict[str, torch.Tensor] | None = None,
                 forward: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None,
                 pixels: np.ndarray | None = None, boxes: np.ndarray | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 baselines: dict[str, MapBatch] | None = None):
        self.image_ids = image_ids
        self.labels = labels
        self.images = images
        self.model = model
        self.pixels = pixels
        self.boxes = boxes
        self.mean = mean
        self.std = std
        self.baselines: dict[str, MapBatch] = baselines or {}
        self._forward = forward
        self._logits = logits
        self._activations = activations if activations is not None or forward is not None else {}
        self._error: SharedForwardError | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def _run_forward(self) -> None:
        if self._error is not None:
            raise self._error
        if self._forward is not None:
            forward, self._forward = self._forward, None
            # A failure is kept: every analysis that reads the batch gets it, without a retry.
            try:
                self._logits, self._activations = forward()
            except SharedForwardError as e:  # a subset's forward reads its batch's
                self._error = e
                raise
            except Exception as e:
                self._error = SharedForwardError(f"{type(e).__name__}: {e}")
                raise self._error from e

    @property
    def forward_done(self) -> bool:
        """Whether the shared forward has run (or its results were given)."""
        return self._forward is None and self._error is None

    @property
    def logits(self) -> torch.Tensor:
        self._run_forward()
        return cast(torch.Tensor, self._logits)

    @property
    def activations(self) -> dict[str, torch.Tensor]:
        self._run_forward()
        return cast(dict[str, torch.Tensor], self._activations)

    def subset(self, keep: np.ndarray) -> MapBatch:
        """The images where the boolean mask ``keep`` is true, every field alike; the subset's
        logits and activations are the batch's, so both share one forward."""
        idx = torch.from_numpy(np.flatnonzero(keep))

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[idx.to(t.device)]

        def forward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return take(self.logits), {k: take(v) for k, v in self.activations.items()}

        return MapBatch(
            image_ids=[i for i, k in zip(self.image_ids, keep) if k],
            labels=take(self.labels),
            images=take(self.images),
            model=self.model,
            forward=forward,
            pixels=None if self.pixels is None else self.pixels[keep],
            boxes=None if self.boxes is None else self.boxes[keep],
            mean=self.mean,
            std=self.std,
            baselines={name: b.subset(keep) for name, b in self.baselines.items()},
        )


class SharedForwardError(RuntimeError):
    """The batch's shared model forward failed (the message names the original error)."""


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


class SampleSpec(BaseModel):
    """A seeded random sample of ``n`` images of the dataset, the same for every entry with
    the same ``n`` and ``seed`` (drawn from the sorted image ids, so dataset order is moot)."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=1)
    seed: int = 0


def sample_ids(image_ids: list[str], n: int, seed: int) -> list[str]:
    """``n`` ids drawn without replacement from the sorted ids (all when there are fewer)."""
    ids = sorted(image_ids)
    if n >= len(ids):
        return ids
    picked = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return [ids[i] for i in np.sort(picked)]


class Analysis:
    """Base class: validated params plus the work of one stage."""

    name: ClassVar[str]
    family: ClassVar[str]  # the subpackage of jobs/ it lives in: attribution, dataset, model
    stage: ClassVar[Stage]
    Params: ClassVar[type[AnalysisParams]]
    params: AnalysisParams
    # Its page in the report, as blocks over its table (see jobs.core.views); () for a plain
    # table, unless the report registers a page for it.
    view: ClassVar[tuple[Block, ...]] = ()

    def __init__(self, params: AnalysisParams):
        self.params = params

    @classmethod
    def registered(cls) -> None:
        """Called once :func:`register` has named the class (a family keeps its list of members)."""

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

    def baselines(self) -> dict[str, int]:
        """Baseline models this entry's ``map_batch`` also needs the batch through, by name, each
        with the seed of its weights: ``{"random_init": seed}`` asks for the architecture
        initialised as its constructor does, after ``torch.manual_seed(seed)``. Given to
        ``map_batch`` as ``batch.baselines[name]``. None by default."""
        return {}

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

    def check_model(self, model: torch.nn.Module, input_size: tuple[int, int]
                    ) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems with this entry against the model (a layer of the wrong kind, a channel or
        class it does not have), each with its field path; called when the manifest is checked."""
        return []

    def check_labels(self, model: torch.nn.Module, labels: np.ndarray) -> str | None:
        """A problem with the dataset's labels (int64, -1: none) for this entry and ``model`` (a label
        the model has no output for), or None; called once the dataset is listed, before any work."""
        return None

    def schema(self) -> dict[str, pa.Schema] | None:
        """The tables this entry's pass over the dataset yields, by partition: for a ``map``
        analysis its output table (``image_id`` and ``label`` first, before the runner adds the
        ``shard`` columns of its ``key`` columns), for a ``reduce`` analysis its partials.

        Every block any worker writes is cast to it, so all parts of a table share one schema
        whatever each block held. None: no dataset pass (``model`` analyses, entries that
        reduce other entries' tables).
        """
        return None

    def bind(self, entries: Sequence[AnalysisParams]) -> AnalysisParams:
        """These params with whatever this entry takes from the manifest's other ``entries``
        filled in (e.g. the params of the attribution entries it checks), when the manifest is
        read; so its key, and every worker, sees them. Raise ValueError for entries it cannot
        use; the manifest reports it against this entry. The default takes nothing."""
        return self.params

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

    def rows(self, partition: str = "") -> int:
        """How many rows the partition holds, without reading them."""
        ...

    def width(self, partition: str, column: str) -> int:
        """The length of the list column's first vector (0 when the partition has no rows)."""
        ...

    def split(self, partition: str, parts: int) -> list[ReduceInputs]:
        """At most ``parts`` disjoint inputs that together hold the partition's rows, in order:
        pieces a reduction can hand to ``parallel_map`` tasks (each reads only its own)."""
        ...


class ReduceContext(Protocol):
    """What a reduction may use besides its inputs; the runner provides it.

    ``model`` is the run's model in eval mode on ``device``; ``input_size`` is the (H, W) of
    every model input; ``images(ids)`` returns those images as the model saw them before
    normalisation (uint8, (H, W, 3)), the frame every box and crop is in;
    ``parallel_map(fn, items, shared)`` returns ``[fn(shared, item) for item in items]``,
    possibly computed on several workers (``fn`` must be a module-level function); with
    ``gpu``, each task holds a GPU when the run has them (leave it off for I/O and merges).
    ``put(value)`` stores a value once where every task can read it (the object store) and
    returns a handle; ``shared`` may be a handle, or a tuple/list/dict that holds handles or
    lists of handles, and each task gets the values; ``get(handle)`` returns the value here.
    Putting a large array in pieces, each piece as it is read, keeps one copy of it in all.
    ``mean``/``std`` are the model's normalisation (``input = (pixels / 255 - mean) / std``), and
    ``image_reader`` a picklable callable like ``images`` that tasks may take in ``shared``
    to decode their own images.
    """

    model: torch.nn.Module
    device: torch.device
    input_size: tuple[int, int]
    label_names: list[str] | None
    workers: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_reader(self) -> Images: ...

    def images(self, image_ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def parallel_map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None,
                     gpu: bool = False) -> list: ...

    def put(self, value: Any) -> Any: ...

    def get(self, handle: Any) -> Any: ...

    def log(self, message: str) -> None: ...


@dataclass(frozen=True)
class MemoryPlan:
    """What a reduction will hold on the driver at its peak, said before it starts.

    The runner compares ``bytes`` with ``execution.driver_memory`` and, when it is over,
    fails the entry with ``what`` and ``fix`` (what to change) instead of running out.
    """

    bytes: int
    what: str
    fix: str


# Decodes dataset images as the model saw them: ids -> {id: uint8 (H, W, 3)} (ReduceContext.images).
Images = Callable[[Sequence[str]], dict[str, np.ndarray]]


@dataclass
class Rendered:
    """Pictures a reduction draws, as independent items the runner spreads over tasks.

    ``draw(shared, item, images)`` yields the (key, image) pairs of one item, decoding the
    dataset images it shows with ``images(ids)``. ``draw`` must be a module-level function
    and ``items``/``shared`` small and picklable (ids, coordinates, boxes; never pixels): the
    runner hands groups of items to Ray tasks, each decoding its own images and writing its
    own shards, so no picture passes through the driver. Iterating draws every item here, in
    order, with ``images`` (what tests and notebooks do).

    Example::

        def draw(size, ids, images):
            for image_id, px in images(ids).items():
                yield image_key(image_id), Image.fromarray(px).resize((size, size))

        Rendered(draw, items=[ids[s:s + 512] for s in range(0, len(ids), 512)], shared=64, images=ctx.images)
    """

    draw: Callable[[Any, Any, Images], Iterable[tuple[str, Image.Image]]]
    items: Sequence[Any]
    shared: Any
    images: Images

    def __iter__(self) -> Iterator[tuple[str, Image.Image]]:
        for item in self.items:
            yield from self.draw(self.shared, item, self.images)


@dataclass
class ReduceOutput:
    """A reduction's result.

    ``tables``: {partition: table}, a ``pa.Table`` or {column: array}. A column named
    ``key`` (or ``<prefix>_key``) names a rendered image; the runner adds the matching
    ``shard`` (``<prefix>_shard``) column: the tar file, relative to the entry folder, that
    holds ``<key>.png``. ``images``: a :class:`Rendered` (drawn in tasks, on the workers), or
    (key, image) pairs consumed lazily on the driver. ``stats``: extra numbers for run.json.
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

    def memory_plan(self, inputs: ReduceInputs) -> MemoryPlan | None:
        """The driver memory ``reduce`` will need for these inputs (None: small, not planned)."""
        return None


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

    def rows(self, partition: str = "") -> int:
        return self.tables[partition].num_rows

    def width(self, partition: str, column: str) -> int:
        t = self.tables[partition]
        return len(t.column(column)[0].as_py() or []) if t.num_rows else 0

    def split(self, partition: str, parts: int) -> list[ReduceInputs]:
        t, parts = self.tables[partition], max(1, parts)
        step = max(1, -(-t.num_rows // parts))
        return [TableInputs({partition: t.slice(s, step)}, self.batch_rows) for s in range(0, t.num_rows, step)] \
            or [TableInputs({partition: t}, self.batch_rows)]


@dataclass
class LocalContext:
    """:class:`ReduceContext` in one process, from images held in memory (tests, notebooks)."""

    model: torch.nn.Module
    pixels: dict[str, np.ndarray]
    input_size: tuple[int, int]
    label_names: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 1
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def images(self, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self.pixels[i] for i in image_ids}

    @property
    def image_reader(self) -> Images:
        return self.images

    def parallel_map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None,
                     gpu: bool = False) -> list:
        return [fn(shared, item) for item in items]

    def put(self, value: Any) -> Any:
        return value  # in one process the value is its own handle

    def get(self, handle: Any) -> Any:
        return handle

    def log(self, message: str) -> None:
        pass


def safe_key(text: str) -> str:
    """A WebDataset-safe sample key: no dots (they start the extension), no slashes.

    >>> safe_key("layer3.2.conv2")
    'layer3_2_conv2'
    """
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def image_key(image_id: str, *parts: object) -> str:
    """A shard key unique per image (and ``parts``): the id's readable tail plus a hash of it.

    >>> image_key("cat/001.png", "layer1")
    'cat_001_png-0ef71874-layer1'
    """
    digest = hashlib.sha1(image_id.encode()).hexdigest()[:8]
    return safe_key("-".join([image_id[-60:], digest, *map(str, parts)]))


def unit_seed(seed: int, unit: Any) -> int:
    """A seed for one unit of work (a class, a channel, an image id), from the entry's ``seed``:
    the same in every run and whichever group of units it is computed with."""
    digest = hashlib.sha256(json.dumps([seed, unit]).encode()).hexdigest()
    return int(digest[:8], 16)


REGISTRY: dict[str, type[Analysis]] = {}


def import_family(package: str, path: Iterable[str]) -> list[str]:
    """Import every module of a family package (``jobs.attribution``, ...), in name order, so
    that each analysis registers itself; returns their names."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path)))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: make an analysis available to manifests under its module's name.

    The module's name is the one place an analysis is named: it becomes ``cls.name``, the
    registry key and the manifest ``type``, which ``cls.Params`` then accepts as its only value
    (``type: Literal[name]``, the default) so that manifests discriminate entries by it.
    """
    name = cls.__module__.rsplit(".", 1)[-1]
    params = cls.Params
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"analysis {name!r} is registered twice")
    if any(other.Params is params for other in REGISTRY.values() if other is not cls):
        raise ValueError(f"{params.__name__} is the Params of two analyses; give {name!r} its own")
    cls.name = name
    parts = cls.__module__.split(".")
    cls.family = parts[1] if len(parts) == 3 and parts[0] == "jobs" else ""
    # pydantic annotates ``annotation`` as type[Any], but it takes any typing form such as this Literal.
    type_field = FieldInfo.from_annotated_attribute(Literal[name], name)  # type: ignore[arg-type]
    params.__pydantic_fields__["type"] = type_field
    params.model_rebuild(force=True)
    REGISTRY[name] = cls
    cls.registered()
    return cls


# ----------------------------------------------------------------------------- model stage


@dataclass
class ModelContext:
    """What a model-level analysis sees: the model, how inputs are normalised, chosen images.

    ``model`` is in eval mode on ``device``; ``mean``/``std`` are the preprocessing's
    per-channel normalisation (model input = (pixels in [0, 1] - mean) / std);
    ``pixels`` holds the images the entry selected (uint8 (H, W, 3), as the model sees them
    before normalisation) and ``labels`` their labels (-1 when unlabelled).
    """

    model: torch.nn.Module
    input_size: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    label_names: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N, 3, H, W) -> model inputs."""
        return normalize(x, self.mean, self.std)

    def label(self, image_id: str) -> int | None:
        """The image's label, None when it has none."""
        value = self.labels.get(image_id, -1)
        return None if value < 0 else int(value)

    def images(self, image_ids: Sequence[str]) -> torch.Tensor:
        """The chosen images ``image_ids`` as (N, 3, H, W) float32 in [0, 1] on ``device``."""
        stack = np.stack([self.pixels[i] for i in image_ids])
        return torch.from_numpy(stack).to(self.device).permute(0, 3, 1, 2).float().div(255.0)

    def num_classes(self) -> int:
        """The model's number of outputs, from one forward of a blank input."""
        with torch.no_grad():
            out = self.model(torch.zeros(1, 3, *self.input_size, device=self.device))
        if out.dim() != 2:
            raise ValueError(f"the model returns shape {tuple(out.shape)}, not (N, classes) logits")
        return int(out.shape[1])


class ModelAnalysis(Analysis):
    """An analysis of the model itself (per unit, class, layer or chosen image); no dataset pass.

    ``units`` lists the work on the driver; the runner hands ``run`` groups of at most
    ``units_per_task`` units (the ``units_per_task`` parameter when the entry has one), as Ray
    tasks spread over the workers, and concatenates the tables in unit order. ``run`` must
    give every unit the same result whichever group it lands in (seed per unit, normalise
    per image). Images the entry works on come from :meth:`Analysis.select`.
    """

    stage: ClassVar[Stage] = "model"
    units_per_task: ClassVar[int] = 16

    def units(self, ctx: ModelContext) -> list[Any]:
        """The independent pieces of work, in output order (small picklable values)."""
        raise NotImplementedError

    def run(self, units: list[Any], ctx: ModelContext) -> ReduceOutput:
        """Tables and rendered images for ``units``, computed together."""
        raise NotImplementedError

    def summary(self, tables: dict[str, pa.Table]) -> dict[str, Any]:
        """Numbers for run.json from the entry's whole table (per partition)."""
        return {}


# ----------------------------------------------------------------------------- train stage


class Workers(Protocol):
    """The training workers as one ``fit`` sees them: its ``rank`` among ``world`` processes,
    and the collectives the runner provides (torch.distributed under Ray Train; nothing to do
    in one process)."""

    rank: int
    world: int

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the workers, in place."""
        ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` with worker ``src``'s, in place."""
        ...


class OneWorker:
    """:class:`Workers` of a single process (tests, notebooks): the collectives are no-ops."""

    rank = 0
    world = 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        pass

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        pass


@dataclass
class TrainData:
    """What a training analysis trains and evaluates on: decoded images and their split.

    ``pixels``: uint8 (N, H, W, 3), as the model sees them before normalisation (possibly a
    read-only view of the object store); ``labels``: int64 (N,); ``train`` and ``held_out``:
    indices into both. ``mean``/``std``: the normalisation, as in :class:`MapBatch`.
    """

    image_ids: list[str]
    labels: np.ndarray
    pixels: np.ndarray
    train: np.ndarray
    held_out: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: list[str] | None = None

    def inputs(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """Model inputs (len(rows), 3, H, W) float32 of the images at ``rows``, on ``device``."""
        pixels = torch.from_numpy(np.ascontiguousarray(self.pixels[rows]))  # fancy indexing copies
        return pixels_to_inputs(pixels.to(device), self.mean, self.std)

    def targets(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """The labels of the images at ``rows``, (len(rows),) int64 on ``device``."""
        return torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64)).to(device)


@dataclass
class TrainOutput:
    """``rows``: the entry's table (one dict per row, e.g. per epoch); ``stats``: numbers for run.json."""

    rows: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


class TrainAnalysis(Analysis):
    """An analysis that trains the model on the dataset (on the runner's training workers).

    The runner lists the labelled images, asks :meth:`split` for the train and held-out
    images, decodes them once, and calls :meth:`fit` on every worker with the same data, a
    fresh copy of the model on the worker's device, and its :class:`Workers`. ``fit`` trains
    the model in place, the same on every worker (gradients summed with ``all_reduce``), and
    returns its table; the runner keeps worker 0's model and output.
    """

    stage: ClassVar[Stage] = "train"

    def workers(self) -> int:
        """How many training workers the entry asks for."""
        return int(getattr(self.params, "workers", 1) or 1)

    def split(self, image_ids: Sequence[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the train and the held-out images among ``image_ids`` (labels all >= 0)."""
        raise NotImplementedError

    def fit(self, model: torch.nn.Module, data: TrainData, device: torch.device, workers: Workers,
            report: Callable[[dict[str, Any]], None] | None = None,
            log: Callable[[str], None] | None = None) -> TrainOutput:
        """Train ``model`` (on ``device``) in place; ``report`` is called with each row as it is
        made, ``log`` with anything worth telling (not converged, ...)."""
        raise NotImplementedError
