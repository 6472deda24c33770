"""The model stage: analyses of the model itself, as Ray tasks over groups of units.

No pass over the dataset. Per entry, on the driver::

    select images ─► decode them ─► analysis.units(context) ─► groups of units

then every group of every entry is one Ray task (the model loaded once per worker process,
tables and PNG-encoded images computed there), at most ``execution.workers`` at a time::

    task(group) ─► analysis.run(group, context) ─► tables + PNGs ─► driver
                ─► <output>/.staging/<entry> ─► rename ─► _SUCCESS

An entry is committed as soon as all its groups are back, so a later failure loses nothing
already committed; a failed group fails its entry only.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import torch

from jobs import REGISTRY, ModelAnalysis, ModelContext
from pipeline.datasets import DatasetIndex
from pipeline.manifest import MODEL_SOURCES, Manifest
from pipeline.reduce import RunContext, as_table
from pipeline.worker import default_threads, pack_images, resolve_device, unpack_partial
from pipeline.writers import EntryWriter

Log = Callable[[str], None]

# Models loaded by this worker process, by spec: a process runs many tasks of a stage.
_MODELS: dict[str, torch.nn.Module] = {}


def _load(model_spec: dict, device: torch.device) -> torch.nn.Module:
    from pipeline.models import load_model

    key = json.dumps(model_spec, sort_keys=True) + str(device)
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time per process
        spec = MODEL_SOURCES[model_spec["source"]].model_validate(model_spec)
        model = load_model(spec).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)  # inputs get gradients, weights never do
        _MODELS[key] = model
    return _MODELS[key]


def run_units(analysis: ModelAnalysis, units: list, ctx: ModelContext) -> tuple[dict[str, pa.Table], bytes]:
    """One group: the analysis' tables (as Arrow) and its images packed as PNGs."""
    result = analysis.run(units, ctx)
    tables = {partition: as_table(table) for partition, table in result.tables.items()}
    return tables, pack_images(result.images)


def model_task(model_spec: dict, entry: dict, device: str, threads: int | None, units: list,
               shared: dict[str, Any]) -> tuple[dict[str, pa.Table], bytes, float]:
    """A Ray task: ``run`` one group of units of one entry (``shared``: the context's data);
    returns its tables, packed images and compute seconds."""
    start = time.time()
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    params = REGISTRY[entry["type"]].Params.model_validate(entry)
    analysis = REGISTRY[params.type](params)
    ctx = ModelContext(model=_load(model_spec, dev), device=dev, **shared)
    return (*run_units(analysis, units, ctx), time.time() - start)


def groups(units: Sequence[Any], size: int, workers: int) -> list[list[Any]]:
    """Consecutive groups of at most ``size`` units, and at least ``workers`` groups when
    there are that many units (so every worker has work)."""
    if not units:
        return []
    size = max(1, min(size, math.ceil(len(units) / workers)))
    return [list(units[i:i + size]) for i in range(0, len(units), size)]


def _group_size(analysis: ModelAnalysis) -> int:
    return int(getattr(analysis.params, "units_per_task", None) or analysis.units_per_task)


class _Entry:
    """One entry's work: its context data, its groups, the results that came back."""

    def __init__(self, analysis: ModelAnalysis, shared: dict[str, Any], parts: list[list[Any]]):
        self.analysis, self.shared, self.parts = analysis, shared, parts
        self.results: dict[int, tuple[dict[str, pa.Table], bytes, float]] = {}
        self.error: str | None = None
        self.trace: str | None = None
        self.shared_ref: Any = None

    @property
    def name(self) -> str:
        return self.analysis.params.entry_name

    @property
    def finished(self) -> bool:
        return self.error is not None or len(self.results) == len(self.parts)


def _commit(manifest: Manifest, entry: _Entry, key: dict) -> dict:
    """Write an entry's groups in unit order and commit it; return its run.json stats."""
    start = time.time()
    writer = EntryWriter(manifest.output, entry.name, manifest.execution.rows_per_part)
    tables: dict[str, list[pa.Table]] = {}
    try:
        for i in range(len(entry.parts)):
            part_tables, images, _ = entry.results[i]
            packed = unpack_partial(images)
            for image_key, png in zip(packed.column("key").to_pylist(), packed.column("png").to_pylist()):
                writer.add_image(image_key, png)
            for partition, table in part_tables.items():
                if table.num_rows:
                    writer.add(partition, table)
                    tables.setdefault(partition, []).append(table)
        summary = entry.analysis.summary({p: pa.concat_tables(ts) for p, ts in tables.items()})
    except BaseException:
        writer.abort()
        raise
    writer.commit(key)
    # Compute time of the entry's own tasks (the stage's entries share the workers).
    seconds = sum(r[2] for r in entry.results.values()) + time.time() - start
    return {"status": "complete", "rows": writer.rows, "images": writer.images, "shards": writer.shard_count,
            "tasks": len(entry.parts), "seconds": round(seconds, 3), **summary}


def _prepare(manifest: Manifest, index: DatasetIndex, analysis: ModelAnalysis, run_ctx: RunContext,
             labels: dict[str, int | None], log: Log) -> _Entry:
    """On the driver: the entry's images, its units and their groups."""
    pre = manifest.model.preprocess
    chosen = analysis.select(list(labels)) or []
    pixels = run_ctx.images(chosen) if chosen else {}
    missing = [i for i in chosen if i not in pixels]
    if missing:
        log(f"{analysis.params.entry_name}: {len(missing)} chosen image(s) could not be decoded and are left out "
            f"(first: {missing[0]})")
    shared = {
        "input_size": tuple(pre.output_size()), "mean": list(pre.mean), "std": list(pre.std),
        "pixels": pixels, "labels": {i: int(labels[i]) if labels[i] is not None else -1 for i in pixels},
        "label_names": index.label_names,
    }
    ctx = ModelContext(model=run_ctx.model, device=run_ctx.device, **shared)
    units = analysis.units(ctx)
    return _Entry(analysis, shared, groups(units, _group_size(analysis), manifest.execution.workers))


def run_model_stage(manifest: Manifest, index: DatasetIndex, analyses: list[ModelAnalysis],
                    keys: dict[str, dict], log: Log) -> dict[str, dict]:
    """Run every model-level entry; one failure does not stop the others."""
    import ray

    ex = manifest.execution
    run_ctx = RunContext(manifest, index, log)
    labels = dict(zip(index.table.column("image_id").to_pylist(), index.table.column("label").to_pylist()))
    stats: dict[str, dict] = {}
    entries: list[_Entry] = []
    for analysis in analyses:
        name = analysis.params.entry_name
        try:
            entries.append(_prepare(manifest, index, analysis, run_ctx, labels, log))
        except Exception as e:  # noqa: BLE001 -- recorded against the entry
            stats[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                           "traceback": traceback.format_exc()[-4000:]}
            log(f"{name} failed: {stats[name]['error']}")

    use_gpu = run_ctx.device.type == "cuda"
    threads = ex.threads_per_worker or (None if use_gpu else default_threads(ex.workers))
    task = ray.remote(model_task).options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    spec = manifest.model.model_dump(mode="json")
    device = "cuda" if use_gpu else "cpu"
    for entry in entries:
        entry.shared_ref = ray.put(entry.shared)
        log(f"{entry.name}: {sum(map(len, entry.parts))} units in {len(entry.parts)} task(s)")
    # At most ``workers`` tasks in flight: each task uses ``threads`` threads (or one GPU).
    pending = [(entry, i) for entry in entries for i in range(len(entry.parts))]
    running: dict[Any, tuple[_Entry, int]] = {}
    while pending or running:
        while pending and len(running) < ex.workers:
            entry, i = pending.pop(0)
            if entry.error is None:
                ref = task.remote(spec, entry.analysis.params.model_dump(mode="json"), device, threads,
                                  entry.parts[i], entry.shared_ref)
                running[ref] = (entry, i)
        if not running:
            continue
        done, _ = ray.wait(list(running), num_returns=1)
        entry, i = running.pop(done[0])
        try:
            entry.results[i] = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 -- the entry fails; the others go on
            cause = getattr(e, "cause", None) or e
            if entry.error is None:
                entry.error, entry.trace = f"{type(cause).__name__}: {cause}"[:2000], str(e)[-4000:]
        if entry.finished and not any(r[0] is entry for r in running.values()):
            stats[entry.name] = _finish(manifest, entry, keys[entry.name], log)
    for entry in entries:  # entries with no units
        if entry.name not in stats:
            stats[entry.name] = _finish(manifest, entry, keys[entry.name], log)
    return stats


def _finish(manifest: Manifest, entry: _Entry, key: dict, log: Log) -> dict:
    if entry.error is not None:
        log(f"{entry.name} failed: {entry.error}")
        return {"status": "failed", "error": entry.error, "traceback": entry.trace}
    try:
        info = _commit(manifest, entry, key)
    except Exception as e:  # noqa: BLE001
        log(f"{entry.name} failed: {type(e).__name__}: {e}")
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": traceback.format_exc()[-4000:]}
    log(f"  {entry.name}: {info['rows']:,} rows, {info['images']:,} images in {info['seconds']:.1f} s")
    return info
