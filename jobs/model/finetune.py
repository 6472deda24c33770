"""``finetune``: transfer learning, a fixed feature extractor against fine-tuning.

How much does a pretrained network's representation give a new task, and how much does
training its upper layers add? The classic recipe (Donahue et al. 2014, "DeCAF"; Razavian et
al. 2014; Yosinski et al. 2014) trains only a new linear classifier on the frozen features
(``train_layers: head``), or trains the upper layers too at a lower learning rate. Branson et
al. (2014, "Bird Species Categorization Using Pose Normalized Deep Convolutional Nets") train
the head alone first and then the chosen layers (``schedule: two_step``), so that a random or
mismatched head does not send large gradients into pretrained layers. The entry also fits a
logistic regression on the frozen penultimate features of the same train split (the linear
probe, as ``probes`` does) so the two held-out accuracies can be compared directly.

Example manifest entry::

    - type: finetune
      train_layers: head      # head | {top: 2} | all
      schedule: two_step      # two_step: head alone for head_epochs, then train_layers | one_step
      head_epochs: 2
      epochs: 5
      lr_head: 0.01           # the last linear layer
      lr_body: 0.001          # every other trained parameter (pretrained: lower)
      momentum: 0.9
      weight_decay: 0.0005
      batch_size: 64
      seed: 0
      split: {held_out: 0.5, seed: 0}
      reset_head: false       # true: a new, seeded head (same shape) instead of the pretrained one
      probe: true             # the logistic-regression probe on the frozen penultimate features
      workers: 1              # Ray Train workers (one GPU each when the run has GPUs); one: a Ray task

Which parameters train:

* the *head* is the model's last ``nn.Linear`` in ``named_modules()`` order (``linear`` of the
  CIFAR ResNets, ``fc`` of torchvision's ResNets, ``classifier.6`` of VGG);
* the *blocks* are the model's top-level children (``named_children()``) that have parameters,
  in order, leaving out a child whose only parameters are the head's (ResNet-20: ``conv1``,
  ``bn1``, ``layer1``, ``layer2``, ``layer3``); ``{top: n}`` trains the last n blocks and the
  head (ResNet-20, ``top: 1``: ``layer3`` and ``linear``);
* ``all``: every parameter.

Modules with no trained parameter stay in eval mode while training: their BatchNorm statistics
are not updated and dropout is off, so with ``train_layers: head`` every other parameter and
buffer is bit-identical to the pretrained model's (a fixed feature extractor). Trained
modules are in train mode. The head keeps its shape, so the fine-tuned ``_model.pt`` loads
into the manifest's model as ``model.weights``; labels must be classes of the model.

Training is plain SGD with momentum and weight decay (on trained parameters only), constant
learning rates per group, cross-entropy, no augmentation; a new optimiser per phase. While the
head alone trains on a body that has not changed, the penultimate features are computed once
(they are the probe's too) and the head trains on them: the same computation, with epochs that
cost a linear layer's, provided the model's output is its head's on those features (checked;
otherwise the whole model runs every step). Each epoch
visits the train split in a seeded order (``seed`` and the epoch); ``batch_size`` is the
batch of all workers together, each worker computing an equal share and the gradients summed
over workers, so the update is that of one process over the whole batch (BatchNorm statistics
of trained layers are per worker). With one CPU worker two runs with the same seed give
bit-identical weights.

The split: the labelled images sorted by image id, split by scikit-learn's
``train_test_split`` stratified by label with ``random_state=split.seed`` (exactly the split of
a ``probes`` entry with ``test_size`` = ``held_out`` and the same seed); unlabelled images
are left out.

Table ``finetune/part-*.parquet``: one row per epoch, plus epoch 0 (``phase: start``, the
model before training): ``epoch``, ``phase`` (start | head | fine_tune), ``phase_epoch``,
``steps`` (optimiser steps so far), ``train_loss``, ``train_accuracy`` (running, over the
epoch), ``held_out_loss``, ``held_out_accuracy``, ``lr_head``, ``lr_body`` (null when the
phase trains the head only), ``trained`` (the trained modules), ``trainable_parameters``,
``seconds``. Beside it: ``_split.parquet`` (``image_id``, ``label``, ``split``: train |
held_out) and ``_model.pt`` (the fine-tuned state dict; both start with ``_`` so that dataset
readers given the entry folder read the table alone). run.json: the final and the starting
held-out accuracy, the probe's held-out and train accuracy, the split sizes and the seconds of
training, of the one pass for the penultimate features, and of the probe's fit.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.core.base import AnalysisParams, TrainAnalysis, TrainData, TrainOutput, Workers, register
from jobs.core.hooks import eval_mode
from jobs.core.kernels import logged_warnings
from jobs.dataset.probes import make_classifier
from jobs.dataset.probes import split as stratified_split


class TopBlocks(BaseModel):
    """``train_layers: {top: n}``: the last n parameterised top-level blocks and the head."""

    model_config = ConfigDict(extra="forbid")
    top: int = Field(ge=1)


TrainLayers = Literal["head", "all"] | TopBlocks


class HeldOut(BaseModel):
    """The held-out split: a fraction of the labelled images, stratified by label, seeded."""

    model_config = ConfigDict(extra="forbid")
    held_out: float = Field(default=0.5, gt=0, lt=1, description="fraction of the labelled images held out")
    seed: int = 0


DEFAULT_HEAD_EPOCHS = 2


class FinetuneParams(AnalysisParams):
    """What ``finetune`` trains, how (schedule, learning rates per group) and on which split."""

    train_layers: TrainLayers = Field(default="head", description="head | {top: n} | all")
    schedule: Literal["two_step", "one_step"] = Field(
        default="two_step", description="two_step: the head alone for head_epochs, then train_layers for "
                                        "epochs (Branson et al. 2014) | one_step: train_layers for epochs")
    head_epochs: int | None = Field(default=None, ge=1, description="two_step: epochs of the head alone first "
                                                                    "(default 2); none with one_step")
    epochs: int = Field(default=5, ge=1)
    lr_head: float = Field(default=0.01, gt=0, description="learning rate of the last linear layer")
    lr_body: float = Field(default=0.001, gt=0, description="learning rate of every other trained parameter")
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    batch_size: int = Field(default=64, ge=1, description="images per step, all workers together")
    seed: int = 0
    split: HeldOut = Field(default_factory=HeldOut)
    reset_head: bool = Field(default=False, description="start from a new seeded head of the same shape")
    probe: bool = Field(default=True, description="fit the linear probe on the frozen penultimate features")
    workers: int = Field(default=1, ge=1, description="Ray Train workers (one GPU each on a GPU run); one trains in "
                                                      "a plain Ray task, without Ray Train's start-up")

    @field_validator("train_layers", mode="before")
    @classmethod
    def _train_layers(cls, value: Any) -> Any:
        """One message for every wrong value, with what is allowed (not one per branch of the union)."""
        allowed = "head, all or {top: n}"
        if isinstance(value, str) and value not in ("head", "all"):
            close = difflib.get_close_matches(value, ["head", "all", "top"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close and close[0] != "top" else (
                "; write {top: n}" if close else "")
            raise ValueError(f"expected {allowed} (got {value!r}{hint})")
        if isinstance(value, dict):
            if set(value) != {"top"}:
                raise ValueError(f"expected {allowed}: a mapping with the one key 'top' (got keys "
                                 f"{', '.join(map(repr, value)) or 'none'})")
            top = value["top"]
            if isinstance(top, bool) or not isinstance(top, int) or top < 1:
                raise ValueError(f"top: expected a whole number of blocks >= 1 (got {top!r})")
        elif not isinstance(value, (str, TopBlocks)):
            raise ValueError(f"expected {allowed} (got {value!r})")
        return value

    @model_validator(mode="after")
    def _schedule_fields(self) -> FinetuneParams:
        if self.schedule == "one_step" and self.head_epochs is not None:
            raise ValueError("head_epochs: only schedule 'two_step' trains the head alone first; "
                             "leave it out with schedule 'one_step'")
        if self.schedule == "two_step" and self.head_epochs is None:
            self.head_epochs = DEFAULT_HEAD_EPOCHS  # filled in, so the resolved manifest says it
        return self


# ----------------------------------------------------------------------------- which parameters


def head_name(model: torch.nn.Module) -> str:
    """The model's last ``nn.Linear`` in ``named_modules()`` order: the head."""
    found = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not found:
        raise ValueError("the model has no nn.Linear layer to serve as the head")
    return found[-1]


def blocks(model: torch.nn.Module) -> list[str]:
    """The top-level children with parameters, in order, less one whose only parameters are the head's."""
    head = {id(p) for p in model.get_submodule(head_name(model)).parameters()}
    out = []
    for name, child in model.named_children():
        params = {id(p) for p in child.parameters()}
        if params and not params <= head:
            out.append(name)
    return out


def trained_modules(model: torch.nn.Module, train_layers: TrainLayers, head_only: bool = False) -> list[str]:
    """Names of the modules whose parameters train: the head, and the blocks ``train_layers`` picks
    (``""``, the whole model, for ``all``); just the head with ``head_only``."""
    head = head_name(model)
    if head_only or train_layers == "head":
        return [head]
    if train_layers == "all":
        return [""]
    assert isinstance(train_layers, TopBlocks)
    chosen = blocks(model)
    if train_layers.top > len(chosen):
        raise ValueError(f"top {train_layers.top}: the model has {len(chosen)} blocks with parameters "
                         f"({', '.join(chosen)})")
    picked = chosen[len(chosen) - train_layers.top:]
    return picked + ([head] if not any(head == b or head.startswith(b + ".") for b in picked) else [])


def param_groups(model: torch.nn.Module, modules: Sequence[str], lr_head: float, lr_body: float
                 ) -> list[dict[str, Any]]:
    """SGD parameter groups of the ``modules`` that train: ``head`` at ``lr_head``, then ``body``
    (every other trained parameter, if any) at ``lr_body``; each group names its parameters."""
    head = head_name(model)
    head_params = {id(p) for p in model.get_submodule(head).parameters()}
    names: dict[int, str] = {}
    for module in modules:
        prefix = f"{module}." if module else ""
        for name, p in model.get_submodule(module).named_parameters():
            names.setdefault(id(p), prefix + name)
    by_id = {id(p): p for p in model.parameters()}
    head_ids = [i for i in names if i in head_params]
    body_ids = [i for i in names if i not in head_params]
    groups = [{"name": "head", "params": [by_id[i] for i in head_ids], "lr": lr_head,
               "names": [names[i] for i in head_ids]}]
    if body_ids:
        groups.append({"name": "body", "params": [by_id[i] for i in body_ids], "lr": lr_body,
                       "names": [names[i] for i in body_ids]})
    return groups


def set_trainable(model: torch.nn.Module, modules: Sequence[str]) -> int:
    """Only the ``modules``' parameters require gradients, only they are in train mode (the rest
    in eval mode: frozen BatchNorm statistics, no dropout); returns how many parameters train."""
    model.eval()
    model.requires_grad_(False)
    for name in modules:
        module = model.get_submodule(name)
        module.train()
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Phase:
    """Part of the schedule: ``epochs`` epochs training ``modules``."""

    name: str
    epochs: int
    modules: list[str]
    head_only: bool


def phases(model: torch.nn.Module, params: FinetuneParams) -> list[Phase]:
    """The schedule: two_step's head phase first, then the fine-tuning phase of ``train_layers``."""
    out = []
    if params.schedule == "two_step":
        out.append(Phase("head", params.head_epochs or DEFAULT_HEAD_EPOCHS, trained_modules(model, "head"), True))
    chosen = trained_modules(model, params.train_layers)
    out.append(Phase("fine_tune", params.epochs, chosen, chosen == [head_name(model)]))
    return out


# ----------------------------------------------------------------------------- the split


def held_out_split(image_ids: Sequence[str], labels: np.ndarray, held_out: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into ``image_ids``) of the train and held-out images: the labelled images sorted
    by id, stratified by label, seeded (the ``probes`` split); unlabelled (< 0) ones in neither."""
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.asarray(image_ids, dtype=object)
    labelled = np.flatnonzero(labels >= 0)
    labelled = labelled[np.argsort(ids[labelled].astype(str), kind="stable")]
    y = labels[labelled]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"finetune needs labelled images of at least 2 classes; got {len(y)} labelled "
                         f"image(s) of {len(classes)} class(es)")
    if (counts < 2).any():
        raise ValueError(f"split: a stratified split needs at least 2 labelled images per class; "
                         f"{int((counts < 2).sum())} of {len(classes)} classes have 1")
    n_held = math.ceil(held_out * len(y))
    if min(n_held, len(y) - n_held) < len(classes):
        raise ValueError(f"split.held_out: {held_out} splits {len(y)} labelled images into {len(y) - n_held} "
                         f"train and {n_held} held out, fewer than one per class on a side ({len(classes)} "
                         "classes)")
    train, held = stratified_split(y, held_out, seed)
    return np.sort(labelled[train]), np.sort(labelled[held])


# ----------------------------------------------------------------------------- kernels


# Logits of the images at some rows of the data: the whole model, or the head on cached features.
Forward = Callable[[np.ndarray], torch.Tensor]


def whole_model(model: torch.nn.Module, data: TrainData, device: torch.device) -> Forward:
    """The forward of training through the whole model: images at ``rows`` -> logits."""
    return lambda rows: model(data.inputs(rows, device))


def penultimate_features(model: torch.nn.Module, data: TrainData, rows: np.ndarray, device: torch.device,
                         batch_size: int) -> tuple[torch.Tensor, bool]:
    """The head's inputs (float32 (len(rows), D), on ``device``) for the images at ``rows``, the model
    in eval mode; and whether the model's output is the head's output on them (then training the
    head alone can run on these features instead of the whole model)."""
    head = model.get_submodule(head_name(model))
    caught: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        caught.append(args[0].detach().float())

    handle = head.register_forward_pre_hook(hook)
    outputs: list[torch.Tensor] = []
    try:
        with eval_mode(model), torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                outputs.append(model(data.inputs(rows[start:start + batch_size], device)))
            handle.remove()
            last = len(outputs) == len(caught) and all(
                out.shape == (len(x), getattr(head, "out_features", -1))
                and bool(torch.allclose(out.float(), head(x.to(out.dtype)).float(), rtol=1e-4, atol=1e-5))
                for out, x in zip(outputs, caught))
    finally:
        handle.remove()
    if caught:
        return torch.cat(caught).clone(), last  # a normal tensor (out of inference mode)
    return torch.zeros((0, int(getattr(head, "in_features", 0))), device=device), last


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_held: np.ndarray, y_held: np.ndarray, seed: int,
                 log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Train and held-out accuracy of a logistic regression (``probes``' classifier, standardised,
    C = 1) fitted on the train split's penultimate features."""
    start = time.time()
    probe = make_classifier("logistic", C=1.0, max_iter=1000, seed=seed, standardize=True)
    with logged_warnings(log, "linear probe: "):
        probe.fit(x_train, y_train)
    return {"probe_train_accuracy": float(probe.score(x_train, y_train)),
            "probe_held_out_accuracy": float(probe.score(x_held, y_held)),
            "probe_seconds": round(time.time() - start, 3)}


def evaluate(model: torch.nn.Module, forward: Forward, data: TrainData, device: torch.device, workers: Workers,
             batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the held-out images, the model in eval mode; each
    worker takes every ``world``-th batch and the sums are reduced."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    rows = data.held_out
    with eval_mode(model), torch.inference_mode():
        starts = list(range(0, len(rows), batch_size))
        for start in starts[workers.rank::workers.world]:
            chunk = rows[start:start + batch_size]
            logits = forward(chunk)
            y = data.targets(chunk, device)
            totals[0] += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += len(chunk)
    workers.all_reduce(totals)
    n = max(1.0, float(totals[2]))
    return float(totals[0]) / n, float(totals[1]) / n


def train_epoch(forward: Forward, optimizer: torch.optim.Optimizer, data: TrainData, device: torch.device,
                workers: Workers, batch_size: int, seed: int, epoch: int) -> tuple[float, float, int]:
    """One pass over the train split in a seeded order: (mean loss, accuracy, optimiser steps).

    Each batch of ``batch_size`` is shared out between the workers; every worker's loss is its
    share's summed cross-entropy over the whole batch's size, and the gradients are summed over
    workers before the step, so the update is that of the whole batch in one process.
    """
    order = data.train[np.random.default_rng([seed, epoch]).permutation(len(data.train))]
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    steps = 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        mine = batch[workers.rank::workers.world]
        optimizer.zero_grad(set_to_none=False)
        if len(mine):
            logits = forward(mine)
            y = data.targets(mine, device)
            loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
            (loss / len(batch)).backward()
            totals[0] += loss.detach().double()
            totals[1] += (logits.detach().argmax(1) == y).sum()
            totals[2] += len(mine)
        if workers.world > 1:
            for p in trained:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                workers.all_reduce(p.grad)
        optimizer.step()
        steps += 1
    workers.all_reduce(totals)
    n = max(1.0, float(totals[2]))
    return float(totals[0]) / n, float(totals[1]) / n, steps


def reset_linear(layer: torch.nn.Linear, seed: int) -> None:
    """Re-initialise a linear layer as PyTorch does (Kaiming-uniform), from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.copy_(torch.empty_like(layer.weight, device="cpu").uniform_(-bound, bound, generator=generator))
        if layer.bias is not None:
            layer.bias.copy_(torch.empty_like(layer.bias, device="cpu").uniform_(-bound, bound, generator=generator))


TABLE = pa.schema([
    ("epoch", pa.int64()), ("phase", pa.string()), ("phase_epoch", pa.int64()), ("steps", pa.int64()),
    ("train_loss", pa.float64()), ("train_accuracy", pa.float64()),
    ("held_out_loss", pa.float64()), ("held_out_accuracy", pa.float64()),
    ("lr_head", pa.float64()), ("lr_body", pa.float64()), ("trained", pa.list_(pa.string())),
    ("trainable_parameters", pa.int64()), ("seconds", pa.float64()),
])


@register
class Finetune(TrainAnalysis):
    """Train the head (and chosen blocks) on a seeded split; a linear probe on the same split."""

    Params = FinetuneParams
    params: FinetuneParams

    def workers(self) -> int:
        return self.params.workers

    def schema(self) -> dict[str, pa.Schema]:
        return {"": TABLE}

    def check_model(self, model: torch.nn.Module, input_size: tuple[int, int]
                    ) -> list[tuple[tuple[str | int, ...], str]]:
        try:
            head_name(model)
        except ValueError as e:
            return [(("train_layers",), str(e))]
        try:
            phases(model, self.params)
        except ValueError as e:
            return [(("train_layers", "top"), str(e))]
        return []

    def check_labels(self, model: torch.nn.Module, labels: np.ndarray) -> str | None:
        head = model.get_submodule(head_name(model))
        classes = head.out_features if isinstance(head, torch.nn.Linear) else None
        if classes is not None and len(labels) and int(labels.max()) >= classes:
            return (f"label {int(labels.max())} is not a class of the model's head ({classes} outputs); "
                    "fine-tuning keeps the head's shape")
        return None

    def split(self, image_ids: Sequence[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return held_out_split(image_ids, labels, self.params.split.held_out, self.params.split.seed)

    def fit(self, model: torch.nn.Module, data: TrainData, device: torch.device, workers: Workers,
            report: Callable[[dict[str, Any]], None] | None = None,
            log: Callable[[str], None] | None = None) -> TrainOutput:
        p = self.params
        torch.manual_seed(p.seed)
        head = model.get_submodule(head_name(model))
        assert isinstance(head, torch.nn.Linear)
        classes = head.out_features
        if len(data.labels) and int(data.labels.max()) >= classes:
            raise ValueError(f"label {int(data.labels.max())} is not a class of the model's head "
                             f"({classes} outputs); fine-tuning keeps the head's shape")
        if p.reset_head:
            reset_linear(head, p.seed)
        stats: dict[str, Any] = {"n_train": len(data.train), "n_held_out": len(data.held_out)}
        schedule = phases(model, p)
        whole = whole_model(model, data, device)
        on_features: Forward | None = None
        if any(phase.head_only for phase in schedule) or (p.probe and workers.rank == 0):
            t0 = time.time()
            features, last = penultimate_features(model, data, np.arange(len(data.labels)), device, p.batch_size)
            stats["features_seconds"] = round(time.time() - t0, 3)
            if last:  # the model's output is its head's: the head alone trains on these features
                on_features = lambda rows: head(features[torch.tensor(rows, device=features.device)])  # noqa: E731
            if p.probe and workers.rank == 0:
                x = features.cpu().numpy()
                stats.update(linear_probe(x[data.train], data.labels[data.train], x[data.held_out],
                                          data.labels[data.held_out], p.seed, log))
        started = time.time()
        rows: list[dict[str, Any]] = []

        def add(row: dict[str, Any]) -> None:
            rows.append(row)
            if report is not None:
                report(row)

        t0 = time.time()
        loss, acc = evaluate(model, on_features or whole, data, device, workers, p.batch_size)
        add({"epoch": 0, "phase": "start", "phase_epoch": 0, "steps": 0, "train_loss": None,
             "train_accuracy": None, "held_out_loss": loss, "held_out_accuracy": acc, "lr_head": None,
             "lr_body": None, "trained": [], "trainable_parameters": 0, "seconds": round(time.time() - t0, 3)})
        epoch = steps = 0
        for phase in schedule:
            trainable = set_trainable(model, phase.modules)
            groups = param_groups(model, phase.modules, p.lr_head, p.lr_body)
            optimizer = torch.optim.SGD([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                        lr=p.lr_head, momentum=p.momentum, weight_decay=p.weight_decay)
            lrs = {g["name"]: g["lr"] for g in groups}
            # The body frozen (eval mode) and not yet trained: its features are the cached ones.
            forward = on_features if phase.head_only and on_features is not None else whole
            for e in range(1, phase.epochs + 1):
                t0 = time.time()
                epoch += 1
                train_loss, train_acc, n = train_epoch(forward, optimizer, data, device, workers, p.batch_size,
                                                       p.seed, epoch)
                steps += n
                self._same_buffers(model, workers)
                loss, acc = evaluate(model, forward, data, device, workers, p.batch_size)
                add({"epoch": epoch, "phase": phase.name, "phase_epoch": e, "steps": steps,
                     "train_loss": train_loss, "train_accuracy": train_acc, "held_out_loss": loss,
                     "held_out_accuracy": acc, "lr_head": lrs["head"], "lr_body": lrs.get("body"),
                     "trained": list(phase.modules), "trainable_parameters": trainable,
                     "seconds": round(time.time() - t0, 3)})
            if not phase.head_only:
                on_features = None  # the body has changed
        model.eval()
        model.requires_grad_(False)
        stats.update({"held_out_accuracy": rows[-1]["held_out_accuracy"],
                      "start_held_out_accuracy": rows[0]["held_out_accuracy"],
                      "epochs": epoch, "steps": steps, "train_seconds": round(time.time() - started, 3)})
        return TrainOutput(rows=rows, stats=stats)

    @staticmethod
    def _same_buffers(model: torch.nn.Module, workers: Workers) -> None:
        """Worker 0's buffers (BatchNorm statistics of trained layers) on every worker."""
        if workers.world > 1:
            for buffer in model.buffers():
                workers.broadcast(buffer, 0)
