"""What every per-image attribution analysis shares: targets, samples, faithfulness, overlays.

An attribution analysis answers "which pixels matter for this class?" for every image of the
dataset (or a seeded sample of it). Each method implements one function,
:meth:`AttributionAnalysis.attribute`, from model inputs and target classes to raw maps; this
module turns them into rows, scores how faithful each map is, and renders overlays. Gradient
methods also implement :meth:`AttributionAnalysis.attribute_own`: the logits of their own
forward choose the targets, so the batch needs no separate inference forward.

Rows (one per image and target class): ``image_id``, ``label``, ``method`` (the entry's
name), ``target``, ``rank`` (where the model ranks the target: 1 = its prediction),
``score`` (the target's softmax probability on the clean image), the method's raw map
columns (float32, flattened, with ``channels``/``height``/``width``), the faithfulness
columns ``deletion_auc``, ``insertion_auc`` (Petsiuk et al. 2018), ``pointing`` and
``box_energy`` (NaN without an object box), and with ``render`` the overlay's ``key``
(+ ``shard``) and its colour range ``vmin``/``vmax``.

Example manifest entry (the fields every attribution analysis takes)::

    - type: grad_cam
      layer: layer3
      target: predicted     # predicted | label | a class index | {top: 3}
      sample: {n: 500, seed: 0}
      metrics: true         # deletion / insertion AUC, pointing game
      steps: 16             # points of each deletion / insertion curve, minus one
      chunk: 256            # most model inputs in one forward: bounds memory
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from jobs.core.base import (
    FLOATS,
    IMAGE_ID,
    LABEL,
    REGISTRY,
    AnalysisParams,
    MapAnalysis,
    MapBatch,
    MapOutput,
    SampleSpec,
    image_key,
    sample_ids,
)

if TYPE_CHECKING:
    from jobs.attribution.backprop import ClassForward

# Registered names of the attribution analyses (``attribution_summary`` reads their tables).
ATTRIBUTION: set[str] = set()


def attribution_entries(methods: list[str] | None, entries: Sequence[AnalysisParams]) -> list[str]:
    """The attribution entries a summary or check reads: ``methods`` (entry names, each checked
    to be an attribution entry of the manifest), or all of them when None. Raises ValueError
    naming what is wrong and listing the attribution entries."""
    by_name = {e.entry_name: e for e in entries}
    listed = ", ".join(e.entry_name for e in entries if e.type in ATTRIBUTION) or "none"
    if methods is None:
        chosen = [e.entry_name for e in entries if e.type in ATTRIBUTION]
        if not chosen:
            raise ValueError(f"needs at least one attribution entry in the manifest ({', '.join(sorted(ATTRIBUTION))})")
        return chosen
    problems = []
    for name in methods:
        if name not in by_name:
            problems.append(f"methods: {name!r} is not an entry of this manifest (attribution entries: {listed})")
        elif by_name[name].type not in ATTRIBUTION:
            problems.append(f"methods: {name!r} is a {by_name[name].type} entry, not an attribution method "
                            f"({', '.join(sorted(ATTRIBUTION))})")
    if problems:
        raise ValueError("; ".join(problems))
    return list(dict.fromkeys(methods))


def class_method_entries(methods: list[str] | None, entries: Sequence[AnalysisParams]) -> list[dict[str, Any]]:
    """The params (JSON) of the attribution entries an entry recomputes maps of: ``methods`` (or every
    attribution entry), without those that explain a neuron rather than a class (named ones are
    refused), and without what does not change a map (``render``, ``metrics``, ``sample`` and the
    method's ``map_only`` fields), so that those do not change the entry's key. Raises ValueError
    naming what is wrong."""
    chosen = attribution_entries(methods, entries)
    by_name = {e.entry_name: e for e in entries}
    units = [name for name in chosen if neuron_target(by_name[name]) is not None]
    if units and methods is not None:
        raise ValueError(f"methods: {', '.join(map(repr, units))} explain(s) a neuron, not a class")
    chosen = [name for name in chosen if name not in units]
    if not chosen:
        raise ValueError("needs at least one attribution entry that explains classes (not a neuron target)")
    return [by_name[name].model_copy(update={"render": False, "metrics": False, "sample": None,
                                             **getattr(type(by_name[name]), "map_only", {})})
            .model_dump(mode="json") for name in chosen]


def bound_methods(method_entries: Sequence[dict[str, Any]]) -> list[AttributionAnalysis]:
    """The analyses of :func:`class_method_entries`' params (a fresh instance each call: nothing
    cached across models)."""
    out = []
    for entry in method_entries:
        cls = REGISTRY[entry["type"]]
        analysis = cls(cls.Params.model_validate(entry))
        if not isinstance(analysis, AttributionAnalysis):
            raise ValueError(f"methods: {entry.get('name') or entry['type']!r} is not an attribution method")
        out.append(analysis)
    return out


class Bootstrap(BaseModel):
    """A percentile bootstrap interval of each mean (:func:`jobs.core.kernels.bootstrap_interval`)."""

    model_config = ConfigDict(extra="forbid")
    resamples: int = Field(default=1000, ge=1)
    level: float = Field(default=0.95, gt=0, lt=1)
    seed: int = 0


class TopTargets(BaseModel):
    """``target: {top: k}``: one map for each of the model's k most probable classes."""

    model_config = ConfigDict(extra="forbid")
    top: int = Field(ge=1)


Target = Literal["predicted", "label"] | Annotated[int, Field(ge=0)] | TopTargets


class Neuron(BaseModel):
    """One unit of a layer: ``channel`` at the position ``at`` of each image's map."""

    model_config = ConfigDict(extra="forbid")
    layer: str
    channel: int = Field(ge=0)
    at: Literal["max", "center"] | tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] = Field(
        default="max", description="max: where the channel peaks in each image | center | [y, x]")


class NeuronTarget(BaseModel):
    """``target: {neuron: {layer, channel, at}}``: the map of one activation, not of a class score
    (:func:`jobs.attribution.backprop.neuron_gradients`)."""

    model_config = ConfigDict(extra="forbid")
    neuron: Neuron


class AttributionParams(AnalysisParams):
    target: Target = "predicted"
    sample: SampleSpec | None = None
    metrics: bool = True
    steps: int = Field(default=16, ge=1, description="deletion / insertion curve steps")
    render: bool = True
    cell: int = Field(default=128, ge=8, description="min side in px of each overlay panel")
    chunk: int | None = Field(default=None, ge=1, description="most model inputs per forward or backward; "
                                                             "default 256 on a GPU, 64 on a CPU (fewer for "
                                                             "large images)")
    # Fields that add to the rows but do not change the map, and their values that leave them
    # out: entries that recompute maps (sanity checks, segmentation) pay only for the map.
    map_only: ClassVar[dict[str, Any]] = {}


class NeuronTargetParams(AttributionParams):
    """Params of a method that also explains single units: ``target`` may name a neuron."""

    target: Target | NeuronTarget = "predicted"  # type: ignore[assignment]


NEURON_COLUMNS = [("neuron_layer", pa.string()), ("neuron_channel", pa.int32()), ("neuron_y", pa.int32()),
                  ("neuron_x", pa.int32()), ("neuron_value", pa.float32())]


def neuron_target(params: AnalysisParams) -> Neuron | None:
    """The unit an entry explains, or None when it explains classes."""
    target = getattr(params, "target", None)
    return target.neuron if isinstance(target, NeuronTarget) else None


@dataclass
class Attribution:
    """What a method returns for M (image, target) pairs.

    ``columns``: raw map columns, each (M, ...) -- stored flattened as float32 lists with the
    shape in ``channels``/``height``/``width`` (taken from ``columns[shape_of]``).
    ``heat``: (M, h, w), the map that is scored and drawn (higher = more important for the
    target); it is resized to the input frame for both. ``signed``: heat may be negative.
    """

    columns: dict[str, torch.Tensor]
    heat: torch.Tensor
    signed: bool = False
    shape_of: str = "map"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def pixels(cls, maps: torch.Tensor, signed: bool) -> Attribution:
        """A pixel-gradient map: (M, H, W) magnitudes, or (M, C, H, W) signed (scored and
        drawn as the sum over channels)."""
        return cls(columns={"map": maps}, heat=maps.sum(dim=1) if signed else maps, signed=signed)


def choose_targets(logits: torch.Tensor, labels: torch.Tensor, target: Target
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row of the batch, target class, rank of that class) for every map to compute.

    Ranks count from 1 (the predicted class) by descending logit, ties to the lower class.
    ``label`` skips unlabelled images; a fixed class must exist in the model's output.
    """
    n, classes = logits.shape
    order = torch.sort(-logits.float(), dim=1, stable=True).indices.cpu()
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(1, classes + 1).expand(n, classes).contiguous())
    rows = torch.arange(n)
    if target == "predicted":
        cls = order[:, 0]
    elif target == "label":
        labelled = labels.cpu() >= 0
        rows, cls = rows[labelled], labels.cpu()[labelled]
        if len(cls) and int(cls.max()) >= classes:
            raise ValueError(f"target 'label': label {int(cls.max())} is not a class of a model with "
                             f"{classes} outputs")
    elif isinstance(target, TopTargets):
        k = min(target.top, classes)
        rows = rows.repeat_interleave(k)
        cls = order[:, :k].reshape(-1)
    else:
        if target >= classes:
            raise ValueError(f"target {target}: the model has {classes} classes (0..{classes - 1})")
        cls = torch.full((n,), int(target), dtype=torch.long)
    return rows, cls.long(), rank_of[rows, cls]


@dataclass
class Choice:
    """Which maps a method computes for a batch: ``rows`` (places in the batch), ``targets`` and
    ``ranks`` as :func:`choose_targets` gives them, and ``scores``, each target's softmax
    probability on the clean image; all (M,) on the CPU."""

    rows: torch.Tensor
    targets: torch.Tensor
    ranks: torch.Tensor
    scores: torch.Tensor


# Maps of the chosen (rows, targets) of one chunk of a batch, from that chunk's forward.
ChunkMaps = Callable[["ClassForward", torch.Tensor, torch.Tensor], torch.Tensor]


def own_forward_maps(name: str, batch: MapBatch, target: Target, chunk: int, maps: ChunkMaps,
                     rule: str | None = None, layer: str | None = None) -> tuple[Choice, torch.Tensor]:
    """Targets chosen from the logits of a forward with a graph, ``chunk`` images at a time, and
    ``maps`` of them from that same graph (:class:`jobs.attribution.backprop.ClassForward`), so
    that the batch's shared inference forward is not needed. Returns the choice and the maps."""
    from jobs.attribution.backprop import ClassForward

    parts: list[tuple[torch.Tensor, ...]] = []
    for sl in in_chunks(len(batch), chunk):
        forward = ClassForward(batch.model, batch.images[sl], rule=rule, layer=layer)
        logits = forward.logits.float()
        if logits.dim() != 2:
            raise ValueError(f"{name} needs the model to return (N, classes) logits, "
                             f"got shape {tuple(logits.shape)}")
        rows, targets, ranks = choose_targets(logits, batch.labels[sl], target)
        scores = torch.softmax(logits, dim=1)[rows.to(logits.device), targets.to(logits.device)].cpu()
        parts.append((rows + sl.start, targets, ranks, scores, maps(forward, rows, targets)))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return Choice(empty, empty, empty, torch.zeros(0)), torch.zeros(0)
    rows, targets, ranks, scores, out = (torch.cat(p) for p in zip(*parts))
    return Choice(rows, targets, ranks, scores), out


class AttributionAnalysis(MapAnalysis):
    """Base of the per-image attribution methods: subclasses implement :meth:`attribute`, and
    :meth:`attribute_own` when their forward can choose the targets."""

    Params: ClassVar[type[AttributionParams]]
    params: AttributionParams

    @classmethod
    def registered(cls) -> None:
        ATTRIBUTION.add(cls.name)

    def select(self, image_ids):
        s = self.params.sample
        return None if s is None else sample_ids(list(image_ids), s.n, s.seed)

    def map_columns(self) -> list[tuple[str, pa.DataType]]:
        """The raw map columns :meth:`attribute` returns (flattened), with their types."""
        return [("map", FLOATS)]

    def panels(self) -> list[str]:
        """Pictures a row shows beside its overlay, each found by a ``<name>_key`` column; the
        method returns them in ``Attribution.extra["panels"][name]``, one per map."""
        return []

    def layers(self) -> list[tuple[tuple[str | int, ...], str]]:
        found = super().layers()
        neuron = neuron_target(self.params)
        return found + ([(("target", "neuron", "layer"), neuron.layer)] if neuron is not None else [])

    def check_model(self, model: torch.nn.Module, input_size: tuple[int, int]
                    ) -> list[tuple[tuple[str | int, ...], str]]:
        from jobs.attribution.backprop import neuron_positions
        from jobs.core.hooks import forward_to

        neuron = neuron_target(self.params)
        if neuron is None or neuron.layer not in dict(model.named_modules()):
            return []  # an unknown layer is reported by the manifest's layer check
        device = next(model.parameters(), torch.empty(0)).device
        with torch.no_grad():
            acts = forward_to(model, neuron.layer, torch.zeros(1, 3, *input_size, device=device))
        try:
            neuron_positions(acts, neuron.channel, "center" if neuron.at == "max" else neuron.at)
        except ValueError as e:
            field = ("channel",) if "channel" in str(e) else ("at",)
            return [(("target", "neuron", *field), str(e))]
        return []

    def schema(self) -> dict[str, pa.Schema]:
        p = self.params
        f32 = pa.float32()
        fields = [IMAGE_ID, LABEL, ("method", pa.string()), ("target", pa.int64()), ("rank", pa.int64()),
                  ("score", f32), *self.map_columns(),
                  ("channels", pa.int32()), ("height", pa.int32()), ("width", pa.int32())]
        if neuron_target(p) is not None:
            fields += NEURON_COLUMNS
        if p.metrics:
            fields += [("deletion_auc", f32), ("insertion_auc", f32)]
        fields += [("pointing", f32), ("box_energy", f32)]
        if p.render:
            fields += [("key", pa.string()), ("vmin", f32), ("vmax", f32)]
            fields += [(f"{name}_key", pa.string()) for name in self.panels()]
        return {"": pa.schema(fields)}

    def chunk(self, x: torch.Tensor) -> int:
        """Model inputs per forward for inputs like ``x`` (:func:`jobs.core.kernels.chunk_size`)."""
        from jobs.core.kernels import chunk_size

        return chunk_size(self.params.chunk, x)

    def attribute(self, batch: MapBatch, x: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> Attribution:
        """Maps for inputs ``x`` (M, C, H, W), classes ``targets`` (M,); ``rows`` are their
        places in ``batch`` (for per-image seeds and activations)."""
        raise NotImplementedError

    def attribute_own(self, batch: MapBatch, target: Target) -> tuple[Choice, Attribution] | None:
        """Maps of the classes ``target`` picks from the logits of this method's own forward of
        ``batch.images`` (with a graph), computed from that same graph; None when its forward
        cannot pick them (then the batch's shared inference forward does, and :meth:`attribute`
        computes the maps)."""
        return None

    def map_batch(self, batch: MapBatch) -> MapOutput:
        from jobs.attribution.faithfulness import box_energy, deletion_insertion, pointing_game
        from jobs.core.kernels import upsample

        p = self.params
        model = batch.model
        neuron = neuron_target(p)
        own = None if isinstance(p.target, NeuronTarget) else self.attribute_own(batch, p.target)
        if own is not None:
            choice, result = own
        elif neuron is not None:  # one map per image; the class columns stay empty
            n = len(batch)
            choice = Choice(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                            torch.zeros(n))
        else:
            logits = batch.logits.float()
            if logits.dim() != 2:
                raise ValueError(f"{self.name} needs the model to return (N, classes) logits, "
                                 f"got shape {tuple(logits.shape)}")
            rows, targets, ranks = choose_targets(logits, batch.labels, p.target)
            score = torch.softmax(logits, dim=1)[rows.to(logits.device), targets.to(logits.device)].cpu()
            choice = Choice(rows, targets, ranks, score)
        rows, targets, ranks, score = choice.rows, choice.targets, choice.ranks, choice.scores
        if not len(rows):
            return MapOutput(rows={"": {}})
        device = batch.images.device
        x = batch.images[rows.to(device)]
        t = targets.to(device)
        if own is None:
            result = self.attribute(batch, x, t, rows)
        size = (x.shape[-2], x.shape[-1])
        heat = upsample(result.heat.float(), size).cpu()
        m = len(rows)
        cols: dict[str, Any] = {
            "image_id": np.asarray([batch.image_ids[i] for i in rows.tolist()], dtype=object),
            "label": batch.labels.cpu()[rows].numpy().astype(np.int64),
            "method": np.full(m, p.entry_name, dtype=object),
            "target": targets.numpy().astype(np.int64),
            "rank": ranks.numpy().astype(np.int64),
            "score": score.numpy().astype(np.float32),
        }
        if neuron is not None:  # a unit's map explains no class
            cols.update(target=np.full(m, None, dtype=object), rank=np.full(m, None, dtype=object),
                        score=np.full(m, None, dtype=object))
        shape = tuple(result.columns[result.shape_of].shape[1:])
        shape = (1,) * (3 - len(shape)) + shape
        for name, values in result.columns.items():
            v = values.detach().cpu()
            v = v.float() if v.is_floating_point() else v
            cols[name] = v.numpy() if v.dim() == 1 else v.reshape(m, -1).numpy()  # 1-D: a scalar per row
        cols.update(channels=np.full(m, shape[0], np.int32), height=np.full(m, shape[1], np.int32),
                    width=np.full(m, shape[2], np.int32))
        if neuron is not None:
            pos, values = result.extra["neuron_positions"], result.extra["neuron_values"]
            cols.update(neuron_layer=np.full(m, neuron.layer, dtype=object),
                        neuron_channel=np.full(m, neuron.channel, np.int32),
                        neuron_y=pos[:, 0].numpy().astype(np.int32), neuron_x=pos[:, 1].numpy().astype(np.int32),
                        neuron_value=values.numpy().astype(np.float32))
        boxes = None if batch.boxes is None else torch.as_tensor(batch.boxes)[rows]
        if p.metrics and neuron is not None:  # the curves score a class; a unit has none
            cols["deletion_auc"] = np.full(m, np.nan, np.float32)
            cols["insertion_auc"] = np.full(m, np.nan, np.float32)
        elif p.metrics:
            curves = deletion_insertion(model, x, heat.to(device), t, steps=p.steps, chunk=self.chunk(x))
            cols["deletion_auc"] = curves["deletion_auc"].numpy()
            cols["insertion_auc"] = curves["insertion_auc"].numpy()
        if boxes is not None:
            cols["pointing"] = pointing_game(heat, boxes).numpy()
            cols["box_energy"] = box_energy(heat, boxes).numpy()
        else:
            cols["pointing"] = np.full(m, np.nan, np.float32)
            cols["box_energy"] = np.full(m, np.nan, np.float32)
        images = []
        if p.render:
            from jobs.core.render import overlay

            flat = heat.reshape(m, -1)
            if result.signed:
                top = flat.abs().amax(dim=1)
                vmin, vmax = -top, top
            else:
                vmin, vmax = torch.minimum(flat.amin(dim=1), torch.zeros(m)), flat.amax(dim=1)
            keys = []
            for j in range(m):
                unit = f"c{int(targets[j])}" if neuron is None else f"n{neuron.layer}-{neuron.channel}"
                key = image_key(cols["image_id"][j], p.entry_name, unit)
                pixels = batch.pixels[int(rows[j])] if batch.pixels is not None else np.zeros((*size, 3), np.uint8)
                images.append((key, overlay(pixels, heat[j].numpy(), float(vmin[j]), float(vmax[j]),
                                            signed=result.signed, min_side=p.cell)))
                keys.append(key)
            cols.update(key=np.asarray(keys, dtype=object), vmin=vmin.numpy().astype(np.float32),
                        vmax=vmax.numpy().astype(np.float32))
            for name in self.panels():
                pictures = result.extra["panels"][name]
                panel_keys = [f"{key}-{name}" for key in keys]
                images += list(zip(panel_keys, pictures))
                cols[f"{name}_key"] = np.asarray(panel_keys, dtype=object)
        return MapOutput(rows={"": cols}, images=images)


def in_chunks(n: int, size: int):
    """Slices of at most ``size`` covering range(n)."""
    for start in range(0, n, max(1, size)):
        yield slice(start, min(n, start + size))
