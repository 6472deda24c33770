"""The model side of a map stage: one actor per worker computes and writes every fused analysis.

A plain callable on ``dict[str, np.ndarray]`` blocks (those ``pipeline.decode.decode_batch``
makes), so it runs the same under Ray Data and in a test without Ray. What it returns is
metadata only: the tables and images are already in the run's staging area.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from jobs import REGISTRY, Analysis, AnalysisParams, MapBatch, MapOutput
from jobs.core.base import SharedForwardError
from jobs.core.pixels import pixels_to_inputs
from pipeline.compiled import CompiledForward
from pipeline.plan import Stage
from pipeline.store import Store
from pipeline.writers import BlockRecord, BlockWriter, labels_to_arrow, to_arrow


def autocast(device: torch.device, precision: str):
    """``execution.precision`` as a context: nothing for float32, else autocast to bf16/fp16."""
    if precision == "float32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(device: str) -> torch.device:
    """``execution.device`` on this process: ``auto`` is a GPU when this process sees one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def contiguous_runs(rows: np.ndarray) -> list[slice]:
    """Slices of ``rows`` over which the values count up by one (a map block is one run)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class ModelWorker:
    """Loads the model once, then computes and writes every fused per-image analysis of a block.

    Called with one block of decoded images (a Ray Data batch; its ``row`` column holds the
    dataset rows), it runs the model on batches of ``execution.batch_size``, writes each
    entry's tables and images into the entry's staging folder (:class:`pipeline.writers.BlockWriter`)
    and returns only their metadata: one JSON :class:`pipeline.writers.BlockRecord` per entry.
    Entries already recorded for a block (``done``, by block index) are not computed again.
    """

    def __init__(self, model_spec: dict, entries: list[dict], execution: dict, store: Store,
                 staging: dict[str, str], block_rows: int, done: dict[str, list[int]] | None = None,
                 threads: int | None = None, selections: dict[str, int] | None = None,
                 samples: list[list[str]] | None = None, checkpoints: dict[str, dict] | None = None,
                 slots: dict[str, list] | None = None):
        from pipeline.models import load_model, preprocess_of, random_init_model, spec_from_json

        if threads:
            torch.set_num_threads(threads)
        spec = spec_from_json(model_spec)
        self.preprocess = preprocess_of(spec)
        self.device = resolve_device(execution["device"])
        self.precision = execution["precision"]
        self.batch_size = int(execution["batch_size"])
        self.rows_per_part = int(execution["rows_per_part"])
        # A checkpoint series: every checkpoint's model, each run on the same decoded batches.
        specs = {name: spec_from_json(s) for name, s in checkpoints.items()} if checkpoints else {None: spec}
        # NHWC suits cuDNN's tensor cores and oneDNN's CPU convolutions alike (ResNet-20 on
        # two CPU cores: 1.3x); outputs differ from NCHW only by float rounding.
        self.channels_last = bool(execution.get("channels_last"))
        self.models: dict[str | None, torch.nn.Module] = {}
        for name, one in specs.items():
            model = load_model(one).to(self.device)
            self.models[name] = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.model = next(iter(self.models.values()))
        params = [REGISTRY[e["type"]].Params.model_validate(e) for e in entries]
        self.analyses = [REGISTRY[p.type](p) for p in params]
        self.layers = Stage("map", self.analyses).layers()
        # Warnings for the run's log, sent with the next block's record (once each).
        self.notices: list[str] = []
        # Baseline models (an untrained network of the same architecture), one per (name, seed)
        # an entry asks for, each run on a batch only for the entries that ask.
        self.baseline_models: dict[tuple[str, int], torch.nn.Module] = {}
        for analysis in self.analyses:
            for name, seed in analysis.baselines().items():
                if name != "random_init":
                    raise ValueError(f"{analysis.params.entry_name}: unknown baseline {name!r}; expected random_init")
                if (name, seed) not in self.baseline_models:
                    model = random_init_model(spec, seed).to(self.device)
                    self.baseline_models[(name, seed)] = (
                        model.to(memory_format=torch.channels_last) if self.channels_last else model)
        # execution.compile: each model's shared forward compiled once, its stage's layers tapped
        # (see pipeline.compiled); every other use of a model stays eager.
        self.compiled: dict[int, CompiledForward] = {}
        if execution.get("compile"):
            backend = str(execution.get("compile_backend") or "inductor")
            wanted = {id(m): (m, self.layers) for m in self.models.values()}
            for (name, seed), model in self.baseline_models.items():
                wanted[id(model)] = (model, baseline_layers(self.analyses, name, seed))
            for ident, (model, layers) in wanted.items():
                try:
                    self.compiled[ident] = CompiledForward(model, layers, self.notices.append, backend)
                except Exception as e:  # noqa: BLE001 -- a TorchScript model takes no hooks: it runs eagerly
                    self.notices.append(f"execution.compile: the model cannot be compiled ({type(e).__name__}: "
                                        f"{str(e)[:300]}); it runs eagerly")
                    break
        by_name = {a.params.entry_name: a for a in self.analyses}
        # What is written where: {folder: (analysis, checkpoint)}; without checkpoints each entry's
        # folder is the entry itself.
        self.slots: dict[str, tuple[Analysis, str | None]] = (
            {folder: (by_name[entry], checkpoint) for folder, (entry, checkpoint) in slots.items()} if slots
            else {name: (a, None) for name, a in by_name.items()})
        self.schemas = {folder: a.schema() for folder, (a, _) in self.slots.items()}
        # Entries that work on a sample of the dataset see only its images of each batch.
        sets = [frozenset(ids) for ids in samples or []]
        self.selections = {entry: sets[i] for entry, i in (selections or {}).items()}
        self.store, self.staging, self.block_rows = store, staging, block_rows
        self.done = {entry: frozenset(blocks) for entry, blocks in (done or {}).items()}
        # PNG encoding and Parquet writing release the GIL: they use the actor's other CPUs.
        self.pool = ThreadPoolExecutor(max(1, int(execution.get("cpus_per_worker") or 1)))

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _compute(self, analyses: list, pixels: np.ndarray, image_ids: np.ndarray, labels: np.ndarray,
                 boxes: np.ndarray | None = None, model: torch.nn.Module | None = None,
                 on_device: torch.Tensor | None = None) -> dict[str, tuple[dict[str, pa.Table], list] | str]:
        """Every analysis' tables and images for one batch, by entry, with ``model`` (the worker's
        model by default); an analysis that raises gives its error message instead (the others keep
        their rows; the runner fails that entry). ``on_device``: the same pixels already on the
        device (decoded there), so they are not copied over again."""
        model = self.model if model is None else model

        try:
            # Ray hands batches over read-only and zero-copy: copy before use on the device.
            pixels = np.array(pixels, copy=True)
            if on_device is not None:
                x = on_device
            else:
                x = torch.from_numpy(pixels)
                if self.device.type == "cuda":
                    # uint8 crosses the bus (a quarter of float32), from page-locked memory so the
                    # copy is a DMA; normalising happens on the device.
                    x = x.pin_memory()
                x = x.to(self.device, non_blocking=True)
            x = pixels_to_inputs(x, self.preprocess.mean, self.preprocess.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batch = shared_batch(model, x, self.layers, [str(i) for i in image_ids], labels, amp=self._autocast,
                                 pixels=pixels, boxes=boxes, mean=tuple(self.preprocess.mean),
                                 std=tuple(self.preprocess.std), run=self.compiled.get(id(model)))
        except Exception as e:  # noqa: BLE001 -- the inputs failed: every analysis of the batch did
            message = _describe(e, "model forward")
            return {a.params.entry_name: message for a in analyses}
        baseline_batches: dict[tuple[str, int], MapBatch] = {}

        def with_baselines(analysis: Analysis) -> MapBatch:
            """The batch, with the baseline models' passes the analysis asks for (each model's
            forward runs once per batch, when first read, hooked at its users' layers)."""
            wanted = analysis.baselines()
            for name, seed in wanted.items():
                if (name, seed) not in baseline_batches:
                    layers = baseline_layers(analyses, name, seed)
                    base = self.baseline_models[(name, seed)]
                    tapped = self.compiled.get(id(base))
                    baseline_batches[(name, seed)] = shared_batch(
                        base, x, layers, batch.image_ids, labels, amp=self._autocast,
                        pixels=pixels, boxes=boxes, mean=batch.mean, std=batch.std,
                        # the compiled forward taps every user's layers: the active users' are among them
                        run=tapped if tapped is not None and set(layers) <= set(tapped.layers) else None)
            # Set on the one shared batch (not a copy), so its forward still runs once.
            batch.baselines = {n: baseline_batches[(n, s)] for n, s in wanted.items()}
            return batch

        out: dict[str, tuple[dict[str, pa.Table], list] | str] = {}
        ids = pa.array([str(i) for i in image_ids], pa.string())
        label_column = labels_to_arrow(np.asarray(labels))
        for analysis in analyses:
            entry = analysis.params.entry_name
            try:
                chosen = with_baselines(analysis)
                selection = self.selections.get(entry)
                if selection is not None:
                    keep = np.array([i in selection for i in batch.image_ids], dtype=bool)
                    if not keep.any():
                        continue  # no image of this batch is in the entry's sample
                    chosen = chosen.subset(keep) if not keep.all() else chosen
                result = analysis.map_batch(chosen)
                if isinstance(result, MapOutput):
                    rows, images = result.rows, result.images
                elif analysis.stage == "map" and selection is not None:
                    raise TypeError(f"{analysis.name} works on a sample, so map_batch must return a "
                                    "MapOutput whose rows name their images")
                else:
                    rows, images = result, []
                if analysis.stage == "map" and not isinstance(result, MapOutput):
                    # Rows aligned with the batch: the image and its label come first.
                    tables = {p: pa.table({"image_id": ids, "label": label_column,
                                           **{c: to_arrow(np.asarray(v)) for c, v in columns.items()}})
                              for p, columns in rows.items()}
                else:
                    tables = {p: pa.table({c: to_arrow(np.asarray(v)) for c, v in columns.items()})
                              for p, columns in rows.items()}
                out[entry] = (tables, list(images))
            except SharedForwardError as e:  # the model failed, not the analysis
                out[entry] = f"model forward: {e}"[:2000]
            except Exception as e:  # noqa: BLE001 -- recorded against this entry only
                out[entry] = _describe(e, analysis.name)
        return out

    def _write_block(self, batch: dict[str, np.ndarray]) -> dict:
        """Compute one block (rows in dataset order) in batches of ``batch_size`` and write
        each entry's part of it; entries done for this block are left out. With checkpoints,
        every checkpoint's model runs on each batch of the block, decoded once."""
        began = time.time()
        start, size = int(batch["row"][0]), len(batch["row"])
        on_device = None
        if "encoded" in batch:
            batch, on_device = self._decode_on_device(batch)
        ok = np.asarray(batch["error"]) == ""
        errors = [{"image_id": str(i), "stage": str(st), "error": str(e)}
                  for i, st, e in zip(batch["image_id"], batch["error_stage"], batch["error"]) if e != ""]
        todo = [f for f in self.slots if start // self.block_rows not in self.done.get(f, ())]
        writers = {f: BlockWriter(self.store.child(self.staging[f]), start, self.schemas[f], self.rows_per_part,
                                  self.pool, where=f) for f in todo}
        failed: dict[str, str] = {}
        for s in range(0, size, self.batch_size):
            # Batches of the block's rows, bad images left out afterwards: the same batches
            # whatever the block size.
            keep = np.flatnonzero(ok[s:s + self.batch_size]) + s
            if not len(keep):
                continue
            boxes = batch["box"][keep] if "box" in batch else None
            for checkpoint, model in self.models.items():
                active = {self.slots[f][0].params.entry_name: f for f in todo
                          if self.slots[f][1] == checkpoint and f not in failed}
                if not active:
                    continue
                computed = self._compute([self.slots[f][0] for f in active.values()], batch["pixels"][keep],
                                         batch["image_id"][keep], batch["label"][keep], boxes, model,
                                         None if on_device is None else on_device[torch.from_numpy(keep)])
                for entry, value in computed.items():
                    folder = active[entry]
                    if not isinstance(value, str):
                        try:
                            writers[folder].add_tables(value[0])
                            writers[folder].add_images(value[1])
                            continue
                        except Exception as e:  # noqa: BLE001 -- out of disk, say: this entry fails, the others go on
                            value = _describe(e, f"writing {folder}")
                    failed[folder] = value
                    writers[folder].abort()
        entries = {}
        for folder, writer in writers.items():
            if folder in failed:
                record = BlockRecord(block=start, error=failed[folder])
            else:
                try:
                    record = writer.close()
                except Exception as e:  # noqa: BLE001
                    writer.abort()
                    record = BlockRecord(block=start, error=_describe(e, f"writing {folder}"))
            record.size, record.errors = size, errors
            record.seconds = round(time.time() - began, 3)
            entries[folder] = record.to_json()
        notices, self.notices[:] = list(self.notices), []
        return {"start": start, "size": size, "errors": errors, "entries": entries, "notices": notices}

    def _decode_on_device(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], torch.Tensor]:
        """``execution.decode: gpu``: the block's JPEGs (its ``encoded`` bytes) decoded and
        preprocessed on the device. Returns the block with their pixels (the CPU copy analyses
        render from) and errors filled in, and every image's pixels on the device."""
        from pipeline.device_decode import decode_on_device

        encoded = batch["encoded"]
        todo = [i for i, data in enumerate(encoded) if len(data)]
        batch = {**batch, "pixels": np.array(batch["pixels"], copy=True),
                 "error": np.array(batch["error"], copy=True), "error_stage": np.array(batch["error_stage"], copy=True)}
        # Images decoded by the decode tasks (other formats) go over as they would anyway.
        on_device = torch.from_numpy(batch["pixels"]).to(self.device)
        decoded = decode_on_device([bytes(encoded[i]) for i in todo], self.preprocess.resize, self.preprocess.crop,
                                   self.device)
        good = []
        for i, result in zip(todo, decoded):
            if isinstance(result, Exception):  # an error row, as the decode tasks would make it
                batch["error"][i], batch["error_stage"][i] = f"{type(result).__name__}: {result}", "decode"
            else:
                on_device[i] = result
                good.append(i)
        if good:
            batch["pixels"][good] = on_device[good].cpu().numpy()
        return batch, on_device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["row"], dtype=np.int64)
        records = [self._write_block({k: v[run] for k, v in batch.items()}) for run in contiguous_runs(rows)]
        return {"record": np.asarray([json.dumps(r) for r in records], dtype=object)}


def baseline_layers(analyses: list[Analysis], name: str, seed: int) -> list[str]:
    """The layers a baseline model's forward is hooked at: those the analyses asking for it read."""
    return Stage("map", [a for a in analyses if a.baselines().get(name) == seed]).layers()


def shared_batch(model: torch.nn.Module, x: torch.Tensor, layers: list[str], image_ids: list[str],
                 labels: np.ndarray, amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 pixels: np.ndarray | None = None, boxes: np.ndarray | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 run: Callable[[torch.Tensor], tuple] | None = None) -> MapBatch:
    """The :class:`MapBatch` of inputs ``x`` that every fused analysis sees. Its one inference
    forward (hooks on ``layers``, under ``amp``) runs when an analysis first reads the logits or
    activations: a batch of attribution methods that run their own forward pays for none.
    ``run``: that forward instead, returning ``(logits, activations)`` of at least ``layers``
    (a :class:`pipeline.compiled.CompiledForward`); ``model`` stays the batch's eager model."""

    def forward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from pipeline.models import capture

        if run is not None:
            with torch.inference_mode(), amp():
                logits, acts = run(x)
            acts = {k: v for k, v in acts.items() if k in layers}
        else:
            with torch.inference_mode(), amp(), capture(model, layers) as acts:
                logits = model(x)
        return (logits.float() if isinstance(logits, torch.Tensor) else logits,
                {k: v.float() for k, v in acts.items()})

    return MapBatch(image_ids=image_ids, labels=torch.tensor(np.asarray(labels, dtype=np.int64)), images=x,
                    model=model, forward=forward, pixels=pixels,
                    boxes=None if boxes is None else np.asarray(boxes, dtype=np.int64), mean=mean, std=std)


def _describe(e: Exception, where: str) -> str:
    return f"{where}: {type(e).__name__}: {e}"[:2000]


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def entries_json(params: list[AnalysisParams]) -> list[dict]:
    return [p.model_dump(mode="json") for p in params]
