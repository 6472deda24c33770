"""Running a manifest on Ray: list, plan, stream blocks through the workers, commit.

A map stage is one Ray Data pipeline over blocks of the dataset::

    index rows ─► decode (CPU tasks) ─► ModelWorker actors ─► Parquet parts + image shards
                                                           └► block metadata ─► driver

The model actors write what they compute into the run's staging area themselves; the driver
receives one small record per block, keeps each entry's ledger of finished blocks, collects
the images that could not be used (``errors.parquet``) and commits each entry when all its
blocks are in (:mod:`pipeline.writers`). A rerun skips committed entries and, inside an
entry, blocks its ledger already has. Embedded local Ray by default; ``execution.address``
(or ``--address``) joins a cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from torch import nn

from jobs import REGISTRY, ModelAnalysis, ReduceAnalysis, TrainAnalysis
from pipeline.checkpoints import (
    checkpoint_names,
    combined_key,
    entry_folder,
    merge_stats,
    model_specs,
    prune,
    remove_empty,
    seal,
    with_model,
)
from pipeline.datasets import DatasetIndex, list_dataset
from pipeline.decode import decode_batch
from pipeline.errors import UserError
from pipeline.manifest import BuiltinModel, Manifest, ParquetDataset
from pipeline.model_stage import run_model_stage
from pipeline.models import check_labels, check_layers, load_each_model, model_hash, preprocess_of
from pipeline.plan import Stage, entry_key, plan
from pipeline.progress import RAY_FALSE_ALARMS, RAY_WORKER_NOISE, Progress, RunLog, StderrFilter
from pipeline.reduce import run_reduce_stage
from pipeline.store import Store
from pipeline.testset import ERROR_STAGE as TESTSET_ERROR
from pipeline.testset import FIELD as TESTSET
from pipeline.testset import list_testsets, run_testset_passes, testset_folder
from pipeline.train_stage import run_train_stage
from pipeline.worker import ModelWorker, default_threads, entries_json
from pipeline.writers import (
    INPUTS,
    STAGING,
    SUCCESS,
    BlockRecord,
    StagedEntry,
    invalidate,
    labels_to_arrow,
    read_success,
)

RUN_LOG = "run.log"
# torch.compile's backend for execution.compile; tests set "eager" (traced by dynamo, no code
# generated), which takes seconds where generating C++ for a model on a CPU takes a minute.
COMPILE_BACKEND = "inductor"
# execution.decode: gpu on a CPU-only run decodes on the CPU; tests set this to run the device
# path (decode_jpeg works on the CPU too) through the whole pipeline instead.
DEVICE_DECODE_ON_CPU = False
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class RunResult:
    output: Path | str
    status: str
    analyses: dict[str, dict] = field(default_factory=dict)
    errors: int = 0
    error: str | None = None  # why the run as a whole failed (e.g. too many bad images)

    @property
    def ok(self) -> bool:
        return self.status == "complete"


def versions() -> dict[str, str]:
    """The versions of what produced a run, for run.json. torchvision's comes from its package
    metadata: a run that never needs torchvision does not import it (about 2 s) just to name it."""
    from importlib.metadata import PackageNotFoundError, version

    import pandas
    import PIL
    import pydantic
    import ray
    import torch

    from pipeline import __version__

    try:
        vision = version("torchvision")
    except PackageNotFoundError:
        vision = "not installed"
    return {
        "convscope": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": vision, "ray": ray.__version__, "pyarrow": pa.__version__,
        "pandas": pandas.__version__, "pillow": PIL.__version__, "pydantic": pydantic.__version__,
    }


# ----------------------------------------------------------------------------- Ray


def init_ray(address: str | None, log: Log) -> None:
    """Join the cluster at ``address``, or start an embedded local Ray (reused if running)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        log(f"joining the Ray cluster at {address}")
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        log("starting an embedded local Ray")
        # A local Ray turns on token authentication by default and says so at warning level:
        # right for a machine of one user, and nothing to act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)


def _configure_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Blocks finish in any order (no head-of-line blocking); tables are in dataset order
    # anyway, from the block numbers in their part names.
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data's bars are off because the run draws its own progress; it need not warn of that.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _decode_remote_args() -> dict:
    return {}


def _decode_stage(ds, manifest: Manifest, block: int, column: str | None, device_jpeg: bool = False):
    """Read + decode + resize/crop as CPU tasks (``pipeline.decode``, no torch); with
    ``device_jpeg``, JPEGs are only read, for the model actors to decode on their device."""
    pre = preprocess_of(manifest.model)
    return ds.map_batches(
        decode_batch,
        batch_size=block,
        batch_format="numpy",
        fn_kwargs={"resize": pre.resize, "crop": pre.crop, "parquet_column": column, "device_jpeg": device_jpeg},
        num_cpus=1,
        # A remote-args function keeps Ray Data from fusing decoding into the model actor:
        # decode tasks then run beside the actors and overlap the model instead of delaying it.
        ray_remote_args_fn=_decode_remote_args,
    )


# Decoded pixels per decode task with decode_batch_size: auto.
DECODE_BLOCK_BYTES = 32 * 2**20


def decode_block(setting: int | str, size: tuple[int, int] | None) -> int:
    """Images per decode task: ``setting``, or for ``auto`` about ``DECODE_BLOCK_BYTES`` of
    uint8 RGB pixels, 64 to 1024 images (256 when the image size is not fixed).

    Every block is a Ray task and an object on its way to the model actors; on CIFAR-size
    images 1024 per block rather than 256 takes a features pass on two CPU cores from
    11.3 s to 9.5 s (less work for the decode workers and the driver alike).
    """
    if setting != "auto":
        return int(setting)
    if size is None:
        return 256
    return int(min(1024, max(64, DECODE_BLOCK_BYTES // (size[0] * size[1] * 3))))


# With decode_batch_size: auto, at least this many blocks per worker (small datasets).
BLOCKS_PER_WORKER = 8


def block_rows(manifest: Manifest, images: int) -> int:
    """Dataset rows per block of a map stage of ``images`` images: the decode block, rounded
    up to whole batches.

    A block is decoded by one task, computed by one model actor (in batches of
    ``batch_size``, so batches never straddle blocks and are the same whatever the block
    size), written by that actor and recorded in the ledger: the unit of resume and of
    progress. With ``auto``, a small dataset still gets ``BLOCKS_PER_WORKER`` blocks per
    worker, so every worker has work and progress shows before the end.
    """
    ex = manifest.execution
    block = decode_block(ex.decode_batch_size, preprocess_of(manifest.model).output_size())
    if ex.decode_batch_size == "auto":
        block = max(1, min(block, -(-images // (BLOCKS_PER_WORKER * ex.worker_count))))
    return -(-block // ex.batch_size) * ex.batch_size


def auto_workers(resources: dict[str, float], device: str) -> int:
    """What ``execution.workers: auto`` means on a cluster of these Ray ``resources``.

    One model actor per GPU (a device other than ``cpu``). On CPUs, one per four CPUs and at
    least two: much of an analysis' time is Python and small kernels that one thread runs, so
    two actors of one thread each keep two cores busy where one actor of two threads does not.

    >>> auto_workers({"CPU": 16, "GPU": 4}, "auto"), auto_workers({"CPU": 2}, "auto"), auto_workers({"CPU": 64}, "cpu")
    (4, 2, 16)
    """
    gpus = int(resources.get("GPU", 0))
    if device != "cpu" and gpus >= 1:
        return gpus
    cpus = max(1, int(resources.get("CPU", 1)))
    return min(cpus, max(2, cpus // 4))


def with_worker_count(manifest: Manifest, log: Log) -> Manifest:
    """``manifest`` with ``execution.workers: auto`` replaced by its number on the running Ray
    cluster (and ``min_workers`` no larger); any other manifest as it is."""
    import ray

    ex = manifest.execution
    if ex.workers != "auto":
        return manifest
    n = auto_workers(ray.cluster_resources(), ex.device)
    log(f"execution.workers: auto -> {n}")
    low = None if ex.min_workers is None else min(ex.min_workers, n)
    return manifest.model_copy(update={"execution": ex.model_copy(update={"workers": n, "min_workers": low})})


@dataclass
class Resources:
    """What each model actor of a map stage gets."""

    use_gpu: bool
    actor_cpus: float
    threads: int | None


def _resources(manifest: Manifest) -> Resources:
    import ray

    ex = manifest.execution
    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 1))
    use_gpu = ex.device == "cuda" or (ex.device == "auto" and resources.get("GPU", 0) >= 1)
    if ex.device == "cuda" and resources.get("GPU", 0) < 1:
        raise UserError("execution.device: 'cuda' was asked for, but the Ray cluster has no GPU")
    if ex.cpus_per_worker != "auto":
        actor_cpus = float(ex.cpus_per_worker)
    elif use_gpu:
        # Rendering and writing run beside the GPU work; the other half of the CPUs decode.
        actor_cpus = float(max(1, min(4, int(total_cpus // ex.worker_count // 2))))
    else:
        # Leave one CPU for decoding, so model actors can never starve the tasks that feed them.
        actor_cpus = max(0.1, min(1.0, (total_cpus - 1) / ex.worker_count))
    threads = ex.threads_per_worker or (None if use_gpu else default_threads(ex.worker_count))
    return Resources(use_gpu, actor_cpus, threads)


def _map_dataset(manifest: Manifest, index: DatasetIndex, stage: Stage, store: Store,
                 staged: dict[str, StagedEntry], blocks: list[int], done: dict[str, set[int]],
                 slots: dict[str, tuple[str, str | None]] | None = None, log: Log = _stderr):
    """The Ray Data pipeline of a map stage over ``blocks`` (lazy; nothing runs until it is
    iterated). Its output is one small metadata row per block written. ``slots``: with
    checkpoints, {folder: (entry, checkpoint)} of every folder the stage writes."""
    import ray
    import ray.data

    ex = manifest.execution
    res = _resources(manifest)
    _await_cpus(min(float(ray.cluster_resources().get("CPU", 1)), res.actor_cpus * ex.worker_count + 1))
    execution = ex.model_dump(mode="json")
    execution["device"] = "cuda" if res.use_gpu else "cpu"
    execution["cpus_per_worker"] = res.actor_cpus
    execution["compile_backend"] = COMPILE_BACKEND
    device_jpeg = ex.decode == "gpu" and (res.use_gpu or DEVICE_DECODE_ON_CPU)
    if ex.decode == "gpu" and not device_jpeg:
        log("warning: execution.decode: 'gpu', but the model actors run on the CPU (device auto, no GPU in the "
            "Ray cluster); decoding on the CPU")
    execution["decode"] = "gpu" if device_jpeg else "cpu"
    rows = block_rows(manifest, len(index))
    table = with_boxes(index)
    table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    parts = [table.slice(b * rows, rows) for b in blocks]
    column = manifest.dataset.image_column if isinstance(manifest.dataset, ParquetDataset) else "image"
    chosen, samples = selections(stage, index)
    ds = ray.data.from_arrow(parts)
    with warnings.catch_warnings():
        # ray_remote_args_fn is deprecated for removal in Ray 2.64; pyproject pins below it.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        ds = _decode_stage(ds, manifest, rows, column, device_jpeg)
    ds = ds.map_batches(
        ModelWorker,
        batch_size=None,  # one decoded block is one call: the actor batches it for the model
        batch_format="numpy",
        fn_constructor_kwargs={
            "model_spec": manifest.model.model_dump(mode="json"),
            "entries": entries_json([a.params for a in stage.analyses]),
            "execution": execution,
            "store": store,
            "staging": {name: s.staging for name, s in staged.items()},
            "block_rows": rows,
            "done": {name: sorted(d) for name, d in done.items()},
            "threads": res.threads,
            "selections": chosen,
            "samples": samples,
            # Only the checkpoints some folder still needs: a resumed pass loads no model for nothing.
            **({"checkpoints": {name: spec.model_dump(mode="json")
                                for name, spec in model_specs(manifest.model).items()
                                if any(c == name for _, c in slots.values())},
                "slots": {folder: list(slot) for folder, slot in slots.items()}} if slots else {}),
        },
        # Ray Data restarts dead actors and retries their blocks by default; a retried block
        # writes under a new attempt id, and the ledger names the files that count.
        compute=ray.data.ActorPoolStrategy(min_size=ex.min_workers or ex.worker_count, max_size=ex.worker_count),
        num_cpus=res.actor_cpus,
        num_gpus=1 if res.use_gpu else 0,
        **store.remote_args(),
    )
    return ds


def with_boxes(index: DatasetIndex) -> pa.Table:
    """The index table, plus the dataset's object boxes (``box``) where it has them."""
    table = index.table
    if index.extra is None or "box" not in index.extra.column_names:
        return table
    boxes = dict(zip(index.extra.column("image_id").to_pylist(), index.extra.column("box").to_pylist()))
    column = [boxes.get(i) for i in table.column("image_id").to_pylist()]
    return table.append_column("box", pa.array(column, pa.list_(pa.int64())))


def selections(stage: Stage, index: DatasetIndex) -> tuple[dict[str, int], list[list[str]]]:
    """The images each entry of the stage that works on a sample is given: {entry: sample
    number} and the distinct samples (entries sharing a sample share one list, which keeps
    the actors' constructor arguments small)."""
    ids = index.table.column("image_id").to_pylist()
    chosen: dict[str, int] = {}
    samples: dict[tuple[str, ...], int] = {}
    for analysis in stage.analyses:
        picked = analysis.select(ids)
        if picked is not None:
            chosen[analysis.params.entry_name] = samples.setdefault(tuple(picked), len(samples))
    return chosen, [list(s) for s in samples]


# ----------------------------------------------------------------------------- stages


def covered_blocks(records: dict[int, BlockRecord], rows: int, total: int) -> tuple[set[int], list[int]]:
    """Blocks (of ``rows`` dataset rows; ``total`` rows in all) the ledger ``records`` cover
    exactly, and the recorded blocks that cover a block only in part (to compute again)."""
    by_block: dict[int, list[BlockRecord]] = {}
    for record in records.values():
        by_block.setdefault(record.block // rows, []).append(record)
    whole, partial = set(), []
    for b, pieces in by_block.items():
        at, stop = b * rows, min((b + 1) * rows, total)
        for piece in sorted(pieces, key=lambda r: r.block):
            if piece.block != at:
                break
            at += piece.size
        if at == stop:
            whole.add(b)
        else:
            partial += [p.block for p in pieces]
    return whole, partial


def _await_cpus(needed: float, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``needed`` CPUs are free before a stage starts.

    Ray Data releases a finished stage's actors by dropping references, so they exit only
    once garbage collection gets to them (after a failure, once the exception and its
    frames are gone). An actor still holding its CPU when the next stage starts could
    starve that stage's decode tasks; collect now and give the CPUs a moment to return.
    """
    import gc

    import ray

    gc.collect()
    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < needed and time.time() < deadline:
        time.sleep(0.05)


def run_map_stage(manifest: Manifest, store: Store, index: DatasetIndex, stage: Stage, keys: dict[str, dict],
                  log: RunLog, slots: dict[str, tuple[str, str | None]] | None = None
                  ) -> tuple[dict[str, dict], list[dict]]:
    """Run one fused map stage, resuming inside it from the entries' ledgers; commit every
    entry; return per-entry stats and the rows of images that could not be used.

    ``slots``: with checkpoints, {folder: (entry, checkpoint)} of the folders to write (every
    checkpoint's model runs on each decoded batch); ``keys`` and the stats are by folder.
    """
    rows, total = block_rows(manifest, len(index)), len(index)
    nblocks = -(-total // rows)
    owner = {folder: entry for folder, (entry, _) in slots.items()} if slots else {n: n for n in stage.entries}
    # A reduce entry's partials are committed apart, under .inputs/, for its reduction.
    reduces = {a.params.entry_name for a in stage.analyses if a.stage == "reduce"}
    partial = {folder for folder, entry in owner.items() if entry in reduces}
    layout = {"block_rows": rows, "images": total}
    staged = {name: StagedEntry(store, name, keys[name], layout, base=INPUTS if name in partial else "")
              for name in owner}
    recorded = {name: s.open() for name, s in staged.items()}
    done: dict[str, set[int]] = {}
    for name, records in recorded.items():
        done[name], again = covered_blocks(records, rows, total)
        staged[name].forget(again)
        for block in again:
            del records[block]
    written: set[int] = set.intersection(*done.values())  # blocks every entry has
    todo = sorted(set(range(nblocks)) - written)
    resumed = nblocks - len(todo)
    if resumed:
        log(f"  resuming: {resumed:,} of {nblocks:,} blocks already written by an earlier run")
    failures: dict[str, str] = {}
    notices: set[str] = set()
    start = time.time()
    skipped_rows = total - sum(min(rows, total - b * rows) for b in todo)
    what = stage.entries[0] if len(stage.entries) == 1 else f"map stage ({len(stage.entries)} analyses)"
    progress = Progress(total, what, log.file if log.bar else log, done=skipped_rows, bar=log.bar)
    try:
        # Ray Data's actor start-up logs a false alarm at error level (see RAY_FALSE_ALARMS).
        with StderrFilter(RAY_FALSE_ALARMS) if todo else contextlib.nullcontext():
            ds = _map_dataset(manifest, index, stage, store, staged, todo, done, slots, log) if todo else None
            batches = [] if ds is None else ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
            for batch in batches:
                for text in batch["record"]:
                    block = json.loads(text)
                    for name, data in block["entries"].items():
                        record = BlockRecord.from_json(data)
                        if record.error is not None:
                            if name not in failures:
                                failures[name] = record.error
                                log(f"{name} failed: {record.error}")
                        elif name not in failures:
                            staged[name].record(record)
                            recorded[name][record.block] = record
                    for notice in block.get("notices", []):
                        if notice not in notices:  # every actor says it once: the log says it once
                            notices.add(notice)
                            log(f"warning: {notice}")
                    progress.add(int(block["size"]))
    finally:
        progress.close()
    seconds = time.time() - start
    errors = list({(e["image_id"], e["stage"], e["error"]): e
                   for records in recorded.values() for r in records.values() for e in r.errors}.values())
    stats = {}
    for name, entry in staged.items():
        common = {"seconds": round(seconds, 3), "stage": "map",
                  "fused_with": [e for e in stage.entries if e != owner[name]],
                  "blocks": nblocks, "blocks_resumed": len(done[name])}
        records = recorded[name]
        if name not in failures and len(covered_blocks(records, rows, total)[0]) != nblocks:
            failures[name] = "blocks are missing from the ledger although the pass finished"
        if name in failures:
            entry.abort()
            stats[name] = {"status": "failed", "error": failures[name], **common}
            continue
        try:
            entry.commit(records.values())
        except Exception as e:  # noqa: BLE001 -- out of disk, say: this entry fails, the others still commit
            entry.abort()
            message = f"committing {name} failed: {type(e).__name__}: {e}"[:2000]
            log(message)
            stats[name] = {"status": "failed", "error": message, **common}
            continue
        stats[name] = {"status": "complete", "rows": sum(r.rows for r in records.values()), "errors": len(errors),
                       **common}
        images = sum(r.images for r in records.values())
        if images:
            shards = sum(f.final.endswith(".tar") for r in records.values() for f in r.files)
            stats[name].update(images=images, shards=shards)
        if name in partial:
            stats[name].update(status="partials", stage="reduce", partial_rows=stats[name].pop("rows"),
                               map_seconds=stats[name].pop("seconds"))
    return stats, errors


# ----------------------------------------------------------------------------- the run


def _prepare_output(store: Store) -> None:
    """Create the output folder and prove it is writable before any work starts."""
    probe = f".write-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        store.mkdir()
        store.write_bytes(probe, b"ok")
        store.delete(probe)
    except OSError as e:
        raise UserError(f"output: cannot write to {store.display()}: {e.strerror or e}") from None


def _images_table(index: DatasetIndex) -> pa.Table:
    """``images.parquet``: every selected image with its label name and any metadata (boxes)."""
    import pandas as pd

    t = index.table
    labels = t.column("label").to_numpy()
    df = pd.DataFrame({"image_id": t.column("image_id").to_pylist(), "label": labels})
    if index.label_names:
        names = np.array(index.label_names + [None], dtype=object)
        df["label_name"] = names[labels]  # label -1 picks the trailing None
    if index.extra is not None:
        df = df.merge(index.extra.to_pandas(), on="image_id", how="left")  # keeps the index order
    table = pa.Table.from_pandas(df, preserve_index=False)
    return table.set_column(1, "label", labels_to_arrow(labels))


def check_dataset(manifest: Manifest, index: DatasetIndex) -> None:
    """Entries that refer to images (query lists) must name images of the dataset."""
    from pipeline.errors import ManifestError
    from pipeline.manifest import format_loc

    ids = set(index.table.column("image_id").to_pylist())
    problems = [f"{format_loc(('analyses', i) + sub)}: {message}"
                for i, params in enumerate(manifest.analyses)
                for sub, message in REGISTRY[params.type](params).check_dataset(ids)]
    if problems:
        raise ManifestError(str(manifest.source or manifest.name), problems)


def _run_log(store: Store, log: Log) -> tuple[RunLog, Path | None]:
    """The run's log: ``<output>/run.log`` (appended to by every run into the output), and
    the messages on ``log``; for an output that is not a local folder, the file is written
    locally during the run and uploaded when it ends (the returned path)."""
    bar = log is _stderr and sys.stderr.isatty()
    if store.local:
        return RunLog(log, Path(store.path(RUN_LOG)), bar=bar), None
    import tempfile

    local = Path(tempfile.mkdtemp(prefix="convscope-log-")) / RUN_LOG
    try:
        local.write_bytes(store.read_bytes(RUN_LOG))
    except (FileNotFoundError, OSError):
        pass
    return RunLog(log, local, bar=bar), local


def run_manifest(manifest: Manifest, log: Log = _stderr) -> RunResult:
    """Run every analysis of a validated manifest; skip entries already committed, and
    blocks of an entry its ledger already has."""
    started = time.time()
    store = Store.open(manifest.output)
    # Everything `convscope validate` checks comes first: an invalid manifest leaves no output behind.
    specs = model_specs(manifest.model)
    if isinstance(manifest.model, BuiltinModel) and manifest.model.name == "demo_cnn" and manifest.model.checkpoints:
        from pipeline.demo import ensure_demo_checkpoints

        ensure_demo_checkpoints([c.weights for c in manifest.model.checkpoints], log=log)
    hashes: dict[str | None, str] = {}
    first: nn.Module | None = None  # kept for the label checks, once the dataset is listed
    # Trains the demo CNN here, once, if it is missing; a checkpoint that does not fit fails here.
    for name, model in load_each_model(manifest.model):
        if not hashes:
            check_layers(manifest, model)
            first = model
        hashes[name] = model_hash(specs[name], model)
        del model
    index = list_dataset(manifest.dataset)
    check_dataset(manifest, index)
    if first is not None:
        labels = index.table.column("label").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        check_labels(manifest, first, labels, str(getattr(manifest.dataset, "root", manifest.dataset.kind)))
    del first
    tests = list_testsets(manifest, index)
    _prepare_output(store)
    run_log, upload = _run_log(store, log)
    try:
        return _run(manifest, store, index, hashes, run_log, started, tests)
    finally:
        run_log.close()
        if upload is not None:
            try:
                store.write_bytes(RUN_LOG, upload.read_bytes())
            except OSError as e:
                log(f"could not upload {RUN_LOG}: {e}")


def _run(manifest: Manifest, store: Store, index: DatasetIndex, hashes: dict[str | None, str], log: RunLog,
         started: float, tests: dict[str, DatasetIndex] | None = None) -> RunResult:
    tests = tests or {}
    log(f"convscope run {manifest.name} -> {store.display()}")
    store.write_text("manifest.resolved.yaml", manifest.resolved_yaml())
    checkpoints = checkpoint_names(manifest.model)
    series = checkpoints != [None]  # a checkpoint series: every entry once per checkpoint
    names = [str(c) for c in checkpoints]
    mhash = hashes[None] if not series else combined_key([{"key": hashes[c]} for c in checkpoints], names)
    log(f"dataset: {len(index):,} images ({manifest.dataset.kind}), fingerprint {index.fingerprint[:19]}")
    if series:
        log(f"checkpoints: {', '.join(names)}")

    # Keys, ledgers and commits are by folder: the entry, or with checkpoints each of its checkpoint=<name>.
    folders = {p.entry_name: {c: entry_folder(p.entry_name, c) for c in checkpoints} for p in manifest.analyses}
    keys: dict[str, dict] = {}
    for c in checkpoints:
        for p in manifest.analyses:
            keys[folders[p.entry_name][c]] = entry_key(p, manifest, index.fingerprint, hashes[c])
        for p in manifest.analyses:
            sources = REGISTRY[p.type](p).sources(manifest.analyses)
            if sources:
                keys[folders[p.entry_name][c]] = entry_key(p, manifest, index.fingerprint, hashes[c],
                                                           {s: keys[folders[s][c]] for s in sources})
            test = tests.get(p.entry_name)
            if test is not None:  # what a probe is tested on is an input of the entry, and of its own pass
                keys[folders[p.entry_name][c]] = entry_key(p, manifest, index.fingerprint, hashes[c],
                                                           {TESTSET: {"key": test.fingerprint}})
                keys[testset_folder(p.entry_name, c)] = entry_key(p, manifest, test.fingerprint, hashes[c])
    sealed: set[str] = set()
    if series:
        for name, by_checkpoint in folders.items():
            committed = read_success(store, name)
            if committed and committed.get("key") == combined_key([keys[f] for f in by_checkpoint.values()], names):
                sealed.add(name)
                continue
            if committed:
                log(f"{name}: inputs changed since it was committed; recomputing")
            prune(store, name, names)
    done_folders, partials_folders = set(), set()
    for name, key in keys.items():
        committed = read_success(store, name)
        if committed and committed.get("key") == key["key"]:
            done_folders.add(name)
        elif committed:
            if not series:
                log(f"{name}: inputs changed since it was committed; recomputing")
            invalidate(store, name)
        partials = read_success(store, f"{INPUTS}/{name}")
        if name not in done_folders and partials and partials.get("key") == key["key"]:
            partials_folders.add(name)
        elif partials:
            invalidate(store.child(INPUTS), name)
    for name in sorted(sealed):
        if not all(f in done_folders for f in folders[name].values()):
            # A checkpoint's folder went missing or stale under a committed entry: the entry is
            # computed again, and until then it must not look complete.
            log(f"{name}: a checkpoint's table is missing or stale; recomputing it")
            sealed.discard(name)
            store.delete(f"{name}/{SUCCESS}")
    done = {name for name, fs in folders.items() if all(f in done_folders for f in fs.values())}
    partials_done = {name for name, fs in folders.items() if name not in done
                     and all(f in done_folders or f in partials_folders for f in fs.values())}
    by_folder: dict[str, dict] = {
        folder: {"status": "skipped", "reason": "already committed with the same inputs",
                 "rows": (read_success(store, folder) or {}).get("rows")} for folder in done_folders
    }
    if done:
        log(f"already complete, skipped: {', '.join(sorted(done))}")
    stages = plan(manifest, skip=done, partials_done=partials_done)
    if partials_done:
        log(f"partials already committed (no dataset pass needed): {', '.join(sorted(partials_done))}")
    all_errors: list[dict] = list(index.errors)
    if not any(stage.kind == "map" for stage in stages) and store.is_file("errors.parquet"):
        # No dataset pass this time: the images found bad by the pass that ran before still are.
        previous = store.read_table("errors.parquet").to_pylist()
        ids = set(index.table.column("image_id").to_pylist())
        all_errors += [e for e in previous if e["stage"] != "list" and e["image_id"] in ids]

    def todo(stage: Stage, checkpoint: str | None, skip: set[str]) -> list[str]:
        return [e for e in stage.entries if folders[e][checkpoint] not in skip]

    status = "complete"
    quiet = contextlib.ExitStack()
    if stages:
        init_ray(manifest.execution.address, log)
        _configure_data()
        manifest = with_worker_count(manifest, log)
        # What Ray's workers print that no user can act on (its log monitor hands their lines to
        # this process' stderr) stays out of the run's log.
        quiet.enter_context(StderrFilter(RAY_WORKER_NOISE))
    specs = model_specs(manifest.model)
    with quiet:
        for stage in stages:
            log(f"{stage.kind} stage: {', '.join(stage.entries)}")
            try:
                if stage.kind == "map":
                    # One pass for every checkpoint: each decoded batch goes through every checkpoint's model.
                    slots = {folders[e][c]: (e, c) for c in checkpoints
                             for e in todo(stage, c, done_folders | partials_folders)} if series else None
                    stats, errors = run_map_stage(manifest, store, index, stage, keys, log, slots)
                    all_errors.extend(errors)
                elif stage.kind == "reduce":
                    stats = {}
                    # Test datasets first: a map pass each, for the checkpoints whose entry still reduces.
                    ready = partials_folders | {testset_folder(e, c) for e in tests for c in checkpoints
                                                if folders[e][c] in done_folders}
                    test_stats, test_errors = run_testset_passes(manifest, store, tests,
                                                                 stage.analyses_of(ReduceAnalysis), keys, checkpoints,
                                                                 ready, run_map_stage, log)
                    all_errors.extend(test_errors)
                    for c in checkpoints:  # the reductions, and the model stage, run checkpoint after checkpoint
                        chosen = [a for a in stage.analyses_of(ReduceAnalysis)
                                  if folders[a.params.entry_name][c] not in done_folders]
                        stats.update(run_reduce_stage(with_model(manifest, specs[c]), store, index, chosen, keys, log,
                                                      checkpoint=c))
                    for entry, info in test_stats.items():
                        for c in checkpoints:
                            if folders[entry][c] in stats:
                                stats[folders[entry][c]][TESTSET] = info
                    for name, info in stats.items():
                        before = by_folder.get(name, {})
                        info["seconds"] = round(before.get("map_seconds", 0.0) + info.get("reduce_seconds", 0.0), 3)
                        carried = ("map_seconds", "partial_rows", "fused_with", "errors", "blocks", "blocks_resumed")
                        info.update({k: before[k] for k in carried if k in before})
                        info["stage"] = "reduce"
                elif stage.kind == "train":
                    stats, errors = run_train_stage(manifest, store, index, stage.analyses_of(TrainAnalysis), keys, log)
                    all_errors.extend(errors)
                    for info in stats.values():
                        info["stage"] = "train"
                else:
                    stats = {}
                    for c in checkpoints:
                        chosen_models = [a for a in stage.analyses_of(ModelAnalysis)
                                         if folders[a.params.entry_name][c] not in done_folders]
                        stats.update(run_model_stage(with_model(manifest, specs[c]), store, index, chosen_models, keys,
                                                     log, checkpoint=c))
                    for info in stats.values():
                        info["stage"] = "model"
                by_folder.update(stats)
                if any(info["status"] == "failed" for info in stats.values()):
                    status = "failed"
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 -- one failed stage must not lose the others
                status = "failed"
                message = f"{type(e).__name__}: {e}"
                log(f"{stage.kind} stage failed: {message}")
                for name in stage.entries:
                    for folder in folders[name].values():
                        if folder not in done_folders:
                            by_folder[folder] = {"status": "failed", "error": message[:2000],
                                                 "traceback": traceback.format_exc()[-4000:]}
    if series:
        # An entry is committed once every checkpoint's folder is: its own _SUCCESS comes last.
        for name, by_checkpoint in folders.items():
            if name not in sealed:
                seal(store, name, names, [keys[f] for f in by_checkpoint.values()])
        remove_empty(store, list(folders))
    analyses: dict[str, dict] = {}
    for name, by_checkpoint in folders.items():
        if not series:
            if name in by_folder:
                analyses[name] = by_folder[name]
        elif name in sealed:
            analyses[name] = {"status": "skipped", "reason": "already committed with the same inputs",
                              "rows": (read_success(store, name) or {}).get("rows")}
        else:
            analyses[name] = merge_stats({c: by_folder.get(f, {"status": "not run"}) for c, f in by_checkpoint.items()})

    all_errors = list({(e["image_id"], e["stage"], e["error"]): e for e in all_errors}.values())
    if stages or not store.is_file("errors.parquet"):
        store.write_table("errors.parquet", pa.Table.from_pylist(
            all_errors, schema=pa.schema([("image_id", pa.string()), ("stage", pa.string()), ("error", pa.string())])))
        store.write_table("images.parquet", _images_table(index))
    # Images that could not be used (listing errors about whole shards are counted apart).
    bad = ({e["image_id"] for e in all_errors if not e["stage"].startswith(TESTSET_ERROR)}
           & set(index.table.column("image_id").to_pylist()))
    run_error = None
    limit = manifest.execution.max_error_fraction
    if len(index) and len(bad) / len(index) > limit:
        status = "failed"
        run_error = (f"{len(bad):,} of {len(index):,} images ({len(bad) / len(index):.1%}) could not be used, "
                     f"over execution.max_error_fraction={limit:g}; see errors.parquet "
                     "(the analyses' tables are committed)")
        log(run_error)
    run_analyses: dict[str, dict] = {
        p.entry_name: {"type": p.type, **analyses.get(p.entry_name, {"status": "not run"})} for p in manifest.analyses}
    summary = {
        "name": manifest.name,
        "status": status,
        **({"error": run_error} if run_error else {}),
        "seconds": round(time.time() - started, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "manifest": str(manifest.source) if manifest.source else None,
        "output": store.display(),
        "dataset": {
            "kind": manifest.dataset.kind, "fingerprint": index.fingerprint, "images": len(index),
            "ok": len(index) - len(bad), "errors": len(bad), "error_rows": len(all_errors),
            "label_names": index.label_names,
        },
        "model": {"source": manifest.model.source, "name": getattr(manifest.model, "name", None),
                  "hash": mhash,
                  **({"checkpoints": [{"name": c.name, "weights": str(c.weights), "hash": hashes[c.name]}
                                      for c in getattr(manifest.model, "checkpoints", None) or []]}
                     if series else {})},
        "execution": {**manifest.execution.model_dump(mode="json"),
                      "address": manifest.execution.address or "embedded"},
        "versions": versions(),
        "analyses": run_analyses,
    }
    store.write_json("run.json", summary)
    for staging in (STAGING, f"{INPUTS}/{STAGING}", INPUTS):
        if store.is_dir(staging) and not store.list(staging):
            store.delete(staging)
    log(f"{manifest.name}: {status} in {time.time() - started:.1f} s")
    return RunResult(output=manifest.output, status=status, analyses=run_analyses, errors=len(all_errors),
                     error=run_error)
