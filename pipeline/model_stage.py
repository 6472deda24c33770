"""The model stage: analyses of the model itself, as Ray tasks over groups of units.

No pass over the dataset. Per entry, on the driver::

    select images ─► decode them ─► analysis.units(context) ─► groups of units

then every group of every entry is one Ray task (the model loaded once per worker process),
at most ``execution.workers`` at a time, which writes what it computes itself::

    task(group) ─► analysis.run(group, context) ─► Result ─► <output>/.staging/<entry>
                └► block record ─► driver: ledger ─► commit (rename, _SUCCESS)

An entry is committed as soon as all its groups are recorded, so a later failure loses
nothing already committed, and a rerun computes only the groups its ledger does not have;
a failed group fails its entry only.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs import REGISTRY, ModelAnalysis, ModelContext
from pipeline.checkpoints import entry_folder
from pipeline.datasets import DatasetIndex
from pipeline.manifest import Manifest
from pipeline.progress import Progress
from pipeline.reduce import EntryInputs, RunContext
from pipeline.store import Store
from pipeline.worker import default_threads, resolve_device
from pipeline.writers import BlockRecord, Result, StagedEntry, as_table, encode_png, write_result

Log = Callable[[str], None]

# Models loaded by this worker process, by spec: a process runs many tasks of a stage.
_MODELS: dict[str, torch.nn.Module] = {}


def _load(model_spec: dict, device: torch.device) -> torch.nn.Module:
    from pipeline.models import load_model, spec_from_json

    key = json.dumps(model_spec, sort_keys=True) + str(device)
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time per process
        spec = spec_from_json(model_spec)
        model = load_model(spec).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)  # inputs get gradients, weights never do
        _MODELS[key] = model
    return _MODELS[key]


def run_units(analysis: ModelAnalysis, units: list, ctx: ModelContext) -> Result:
    """One group: the analysis' tables (as Arrow) and its rendered images (PNG), as a :class:`Result`."""
    output = analysis.run(units, ctx)
    return Result(tables={partition: as_table(table) for partition, table in output.tables.items()},
                  images=[(key, encode_png(image)) for key, image in output.images], stats=dict(output.stats))


def model_task(model_spec: dict, entry: dict, device: str, threads: int | None, units: list,
               shared: dict[str, Any], store: Store, group: int, rows_per_part: int) -> dict:
    """A Ray task: ``run`` one group of units of one entry (``shared``: the context's data),
    write its tables and images into the entry's staging folder ``store``; return the
    block record (as JSON)."""
    start = time.time()
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    params = REGISTRY[entry["type"]].Params.model_validate(entry)
    analysis = REGISTRY[params.type](params)
    if not isinstance(analysis, ModelAnalysis):
        raise TypeError(f"{params.entry_name}: {params.type!r} is a {analysis.stage} analysis, not a model analysis")
    ctx = ModelContext(model=_load(model_spec, dev), device=dev, **shared)
    record = write_result(store, group, run_units(analysis, units, ctx), rows_per_part=rows_per_part,
                          where=params.entry_name)
    record.seconds = round(time.time() - start, 3)
    return record.to_json()


def groups(units: Sequence[Any], size: int, workers: int) -> list[list[Any]]:
    """Consecutive groups of at most ``size`` units, and at least ``workers`` groups when
    there are that many units (so every worker has work)."""
    if not units:
        return []
    size = max(1, min(size, math.ceil(len(units) / workers)))
    return [list(units[i:i + size]) for i in range(0, len(units), size)]


def group_size(analysis: ModelAnalysis) -> int:
    """Units per task: the entry's ``units_per_task`` when it has one, else the analysis' own."""
    return int(getattr(analysis.params, "units_per_task", None) or analysis.units_per_task)


class _Entry:
    """One entry's work: its context data, its groups, and their records (this run's and an
    earlier run's, from the ledger)."""

    def __init__(self, analysis: ModelAnalysis, shared: dict[str, Any], parts: list[list[Any]],
                 staged: StagedEntry):
        self.analysis, self.shared, self.parts, self.staged = analysis, shared, parts, staged
        self.name = staged.entry  # its folder: the entry, or with checkpoints <entry>/checkpoint=<name>
        self.records = staged.open()
        self.resumed = len(self.records)
        self.error: str | None = None
        self.trace: str | None = None
        self.shared_ref: Any = None
        self.running = 0

    @property
    def finished(self) -> bool:
        return self.error is not None or len(self.records) == len(self.parts)


def _commit(manifest: Manifest, store: Store, entry: _Entry) -> dict:
    """Commit an entry whose groups are all recorded; return its run.json stats."""
    start = time.time()
    records = list(entry.records.values())
    final = entry.staged.commit(records)
    # The summary reads the committed table back, its scalar columns only (no image arrays).
    tables = {}
    parts = [f.final for r in records for f in r.files if f.final.endswith(".parquet")]
    if parts:
        with store.open_input(f"{final}/{parts[0]}") as handle:
            schema = pq.read_schema(handle)
        scalars = [f.name for f in schema if not pa.types.is_list(f.type)]
        tables[""] = EntryInputs(store, [final]).read(final, columns=scalars)
    summary = entry.analysis.summary(tables)
    # Compute time of the entry's own tasks (the stage's entries share the workers).
    seconds = sum(r.seconds for r in records) + time.time() - start
    return {"status": "complete", "rows": sum(r.rows for r in records), "images": sum(r.images for r in records),
            "shards": sum(f.final.endswith(".tar") for r in records for f in r.files),
            "tasks": len(entry.parts), "tasks_resumed": entry.resumed, "seconds": round(seconds, 3), **summary}


def _prepare(manifest: Manifest, store: Store, index: DatasetIndex, analysis: ModelAnalysis, run_ctx: RunContext,
             labels: dict[str, int | None], key: dict, log: Log, folder: str | None = None) -> _Entry:
    """On the driver: the entry's images, its units and their groups."""
    from pipeline.models import input_size_of, preprocess_of

    pre = preprocess_of(manifest.model)
    chosen = analysis.select(list(labels)) or []
    pixels = run_ctx.images(chosen) if chosen else {}
    missing = [i for i in chosen if i not in pixels]
    if missing:
        log(f"{analysis.params.entry_name}: {len(missing)} chosen image(s) could not be decoded and are left out "
            f"(first: {missing[0]})")
    # ModelContext's fields besides the model and device; the same dict goes to every task.
    shared: dict[str, Any] = {
        "input_size": input_size_of(manifest.model), "mean": list(pre.mean), "std": list(pre.std),
        "pixels": pixels, "labels": {i: int(label) if (label := labels[i]) is not None else -1 for i in pixels},
        "label_names": index.label_names,
    }
    ctx = ModelContext(model=run_ctx.model, device=run_ctx.device, **shared)
    units = analysis.units(ctx)
    parts = groups(units, group_size(analysis), manifest.execution.worker_count)
    # The ledger is only valid for the same groups of the same units.
    layout = {"groups": hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()}
    return _Entry(analysis, shared, parts, StagedEntry(store, folder or analysis.params.entry_name, key, layout))


def run_model_stage(manifest: Manifest, store: Store, index: DatasetIndex, analyses: list[ModelAnalysis],
                    keys: dict[str, dict], log: Log, checkpoint: str | None = None) -> dict[str, dict]:
    """Run every model-level entry (with the model of ``manifest``, one ``checkpoint`` of a series;
    ``keys`` and the stats are by folder), resuming from each entry's ledger; one failure does not
    stop the others."""
    import ray

    ex = manifest.execution
    run_ctx = RunContext(manifest, index, log, store.remote_args())
    labels = dict(zip(index.table.column("image_id").to_pylist(), index.table.column("label").to_pylist()))
    stats: dict[str, dict] = {}
    entries: list[_Entry] = []
    for analysis in analyses:
        name = entry_folder(analysis.params.entry_name, checkpoint)
        try:
            entries.append(_prepare(manifest, store, index, analysis, run_ctx, labels, keys[name], log, name))
        except Exception as e:  # noqa: BLE001 -- recorded against the entry
            stats[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                           "traceback": traceback.format_exc()[-4000:]}
            log(f"{name} failed: {stats[name]['error']}")

    use_gpu = run_ctx.device.type == "cuda"
    threads = ex.threads_per_worker or (None if use_gpu else default_threads(ex.worker_count))
    task = ray.remote(model_task).options(num_cpus=1, num_gpus=1 if use_gpu else 0, **store.remote_args())
    spec = manifest.model.model_dump(mode="json")
    device = "cuda" if use_gpu else "cpu"
    for entry in entries:
        entry.shared_ref = ray.put(entry.shared)
        resumed = f", {entry.resumed} already written by an earlier run" if entry.resumed else ""
        log(f"{entry.name}: {sum(map(len, entry.parts))} units in {len(entry.parts)} task(s){resumed}")
    # At most ``workers`` tasks in flight: each task uses ``threads`` threads (or one GPU).
    pending = [(entry, i) for entry in entries for i in range(len(entry.parts)) if i not in entry.records]
    total = sum(len(e.parts) for e in entries)
    progress = Progress(total, "model stage", log, unit="tasks", done=total - len(pending))
    running: dict[Any, tuple[_Entry, int]] = {}
    try:
        while pending or running:
            while pending and len(running) < ex.worker_count:
                entry, i = pending.pop(0)
                if entry.error is None:
                    ref = task.remote(spec, entry.analysis.params.model_dump(mode="json"), device, threads,
                                      entry.parts[i], entry.shared_ref, entry.staged.folder, i, ex.rows_per_part)
                    running[ref] = (entry, i)
            if not running:
                continue
            done, _ = ray.wait(list(running), num_returns=1)
            entry, i = running.pop(done[0])
            progress.add(1)
            try:
                record = BlockRecord.from_json(ray.get(done[0]))
                entry.staged.record(record)
                entry.records[i] = record
            except Exception as e:  # noqa: BLE001 -- the entry fails; the others go on
                cause = getattr(e, "cause", None) or e
                if entry.error is None:
                    entry.error, entry.trace = f"{type(cause).__name__}: {cause}"[:2000], str(e)[-4000:]
            if entry.finished and not any(r[0] is entry for r in running.values()):
                stats[entry.name] = _finish(manifest, store, entry, log)
    finally:
        progress.close()
    for entry in entries:  # entries with no units, or all of them written by an earlier run
        if entry.name not in stats:
            stats[entry.name] = _finish(manifest, store, entry, log)
    return stats


def _finish(manifest: Manifest, store: Store, entry: _Entry, log: Log) -> dict:
    if entry.error is not None:
        entry.staged.abort()
        log(f"{entry.name} failed: {entry.error}")
        return {"status": "failed", "error": entry.error, "traceback": entry.trace}
    try:
        info = _commit(manifest, store, entry)
    except Exception as e:  # noqa: BLE001
        entry.staged.abort()
        log(f"{entry.name} failed: {type(e).__name__}: {e}")
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": traceback.format_exc()[-4000:]}
    log(f"  {entry.name}: {info['rows']:,} rows, {info['images']:,} images in {info['seconds']:.1f} s")
    return info
