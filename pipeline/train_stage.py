"""The train stage: analyses that train the model on the dataset, on Ray Train.

Per entry, on the driver::

    labelled images ─► analysis.split ─► decode them (Ray tasks, the dataset's own decode path)
                    ─► one TrainData in the object store
                    ─► TorchTrainer: ``workers`` Ray Train workers (gloo on CPUs, NCCL on GPUs),
                        each loads the model and runs analysis.fit on the same data;
                        worker 0 reports its rows and stats with a checkpoint (the weights)
                        (one worker: the same fit in one Ray task, which returns them)
                    ─► the table, _split.parquet and _model.pt ─► ledger ─► commit

The images go to the workers as one object in Ray's object store (uint8 pixels, read in place
by every worker on a node), not as a Ray Data stream: fine-tuning visits the same images every
epoch in a seeded order, so the decoded set is made once and its size is known before training
starts (checked against ``execution.driver_memory``). That suits datasets of up to some
hundred thousand small images; a larger one should be sampled (``dataset.sample``).

The checkpoint passes through Ray Train's storage, which is the entry's staging folder, so it
is as shared as the output must be on a cluster. An entry of one worker skips Ray Train: its
controller and worker group cost seconds of start-up that a short fine-tune does not, and one
worker has nothing to synchronise. An entry is one unit: a run that stops during
training trains again from the start on the rerun; one that stops after recording its results
commits them without training.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs import REGISTRY, TrainAnalysis, TrainData
from pipeline.datasets import DatasetIndex
from pipeline.manifest import Manifest
from pipeline.reduce import ImageSource, RunContext, driver_memory, gib
from pipeline.store import Store
from pipeline.writers import BlockRecord, FileRecord, Result, StagedEntry, as_table, write_result

Log = Callable[[str], None]

# Beside the entry's table. The leading underscore keeps dataset readers given the entry folder
# (pandas, pyarrow) to the table's own parts, as with _SUCCESS and _shards: they read every other
# file of the folder as a part of the table.
MODEL_FILE = "_model.pt"
SPLIT_FILE = "_split.parquet"
CHECKPOINT_FILE = "model.pt"  # in Ray Train's checkpoint
TRAIN_DIR = "_train"  # Ray Train's storage for the run, inside the entry's staging folder
DECODE_CHUNK = 1024  # images per decode task
# How often Ray Train's controller polls its workers (Ray's default: 2 s). A fine-tune of a few
# epochs is short, and each poll it waits for at the end is time the run waits too; a value set
# in the environment is kept.
POLL_ENV, POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
# An entry of one worker trains in a plain Ray task unless this is set (tests compare the two).
TRAIN_ONE_WORKER_ON_RAY_TRAIN = False


def _decode(source: ImageSource, ids: list[str]) -> dict[str, np.ndarray]:
    return source(ids)


class TorchWorkers:
    """:class:`jobs.core.base.Workers` over the process group Ray Train set up (gloo or NCCL)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self.world > 1:
            torch.distributed.broadcast(tensor, src)


def fit_entry(config: dict[str, Any], rank: int, world: int, local_world: int, device: torch.device,
              report: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any], bytes | None]:
    """Load the model and run the entry's ``fit`` on this worker: its output (rows, stats, log)
    and, on worker 0, the trained weights as ``torch.save`` bytes."""
    import ray

    from pipeline.models import load_model, spec_from_json

    if not config["use_gpu"]:
        # A fixed thread count (Ray starts workers with one): results depend on it, by rounding.
        torch.set_num_threads(config["threads"] or max(1, (os.cpu_count() or 1) // local_world))
    entry = config["entry"]
    params = REGISTRY[entry["type"]].Params.model_validate(entry)
    analysis = REGISTRY[params.type](params)
    if not isinstance(analysis, TrainAnalysis):
        raise TypeError(f"{params.entry_name}: {params.type!r} is a {analysis.stage} analysis, not a train analysis")
    model = load_model(spec_from_json(config["model"])).to(device)
    data: TrainData = ray.get(config["data"])
    messages: list[str] = []
    output = analysis.fit(model, data, device, TorchWorkers(rank, world), report=report, log=messages.append)
    weights = None
    if rank == 0:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
        weights = buf.getvalue()
    return {"rows": output.rows, "stats": output.stats, "log": messages}, weights


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's loop on each worker: :func:`fit_entry`, and (worker 0) report the rows,
    stats and trained weights as the run's checkpoint."""
    import ray.train
    import ray.train.torch

    # Ray Train says every report it receives at info level; the run's log says what counts.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")

    def report(row: dict[str, Any]) -> None:
        ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float, str))})

    output, weights = fit_entry(config, context.get_world_rank(), context.get_world_size(),
                                context.get_local_world_size(), device, report)
    with tempfile.TemporaryDirectory(prefix="convscope-train-") as folder:
        checkpoint = None
        if weights is not None:
            with open(os.path.join(folder, CHECKPOINT_FILE), "wb") as f:
                f.write(weights)
            with open(os.path.join(folder, "output.json"), "w") as g:
                json.dump(output, g)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"done": 1}, checkpoint=checkpoint)


def train_task(config: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """One worker's training as a plain Ray task: :func:`fit_entry` alone, nothing to synchronise."""
    device = torch.device("cuda") if config["use_gpu"] else torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        return fit_entry(config, 0, 1, 1, device, lambda row: None)
    finally:
        torch.set_num_threads(threads)  # the worker process runs the run's other tasks too


def decode_images(ctx: RunContext, ids: Sequence[str], log: Log) -> dict[str, np.ndarray]:
    """The images ``ids`` decoded as the model sees them (Ray tasks of DECODE_CHUNK images)."""
    chunks = [list(ids[s:s + DECODE_CHUNK]) for s in range(0, len(ids), DECODE_CHUNK)]
    decoded: dict[str, np.ndarray] = {}
    for part in ctx.parallel_map(_decode, chunks, shared=ctx.image_reader):  # put in the object store once
        decoded.update(part)
    return decoded


def train_data(manifest: Manifest, index: DatasetIndex, analysis: TrainAnalysis, ctx: RunContext, log: Log
               ) -> tuple[TrainData, list[str]]:
    """The entry's split and its decoded images; the ids of the labelled images left out (not decodable)."""
    ids = index.table.column("image_id").to_pylist()
    labels = index.table.column("label").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == 0:
        raise ValueError("the dataset has no labelled images to train on")
    h, w = ctx.input_size
    need = 2 * len(labelled) * h * w * 3
    if need > driver_memory(manifest):
        raise MemoryError(f"{analysis.params.entry_name} would hold about {gib(need)} of decoded images on the "
                          f"driver ({len(labelled):,} labelled images of {h}x{w}), over execution.driver_memory "
                          f"({gib(driver_memory(manifest))}). Use a smaller dataset.sample, or raise "
                          "execution.driver_memory if this machine has the memory")
    wanted = [ids[i] for i in labelled]
    pixels = decode_images(ctx, wanted, log)
    bad = [i for i in wanted if i not in pixels]
    if bad:
        log(f"{analysis.params.entry_name}: {len(bad)} labelled image(s) could not be decoded and are left out "
            f"(first: {bad[0]})")
    keep = [i for i in labelled if ids[i] in pixels]
    kept_ids = [ids[i] for i in keep]
    kept_labels = labels[keep]
    train, held_out = analysis.split(kept_ids, kept_labels)
    rows = np.sort(np.concatenate([train, held_out]))
    position = {int(r): n for n, r in enumerate(rows)}
    data = TrainData(
        image_ids=[kept_ids[r] for r in rows], labels=kept_labels[rows],
        pixels=np.stack([pixels[kept_ids[r]] for r in rows]) if len(rows) else np.zeros((0, h, w, 3), np.uint8),
        train=np.array([position[int(r)] for r in train], dtype=np.int64),
        held_out=np.array([position[int(r)] for r in held_out], dtype=np.int64),
        mean=tuple(ctx.mean), std=tuple(ctx.std), label_names=index.label_names,
    )
    return data, bad


def split_table(data: TrainData) -> pa.Table:
    """``image_id``, ``label``, ``split`` (train | held_out), in image id order."""
    which = np.full(len(data.image_ids), "", dtype=object)
    which[data.train] = "train"
    which[data.held_out] = "held_out"
    order = np.argsort(np.asarray(data.image_ids, dtype=str), kind="stable")
    return pa.table({
        "image_id": pa.array([data.image_ids[i] for i in order], pa.string()),
        "label": pa.array(data.labels[order], pa.int64()),
        "split": pa.array(which[order].tolist(), pa.string()),
    })


def _storage(store: Store, rel: str) -> tuple[str, Any]:
    """Ray Train's ``storage_path`` (and filesystem) for the folder ``rel`` of the output."""
    return (store.path(rel), None) if store.local else (store.path(rel), store.fs)


def fit_on_ray(manifest: Manifest, analysis: TrainAnalysis, data: TrainData, staged: StagedEntry,
               use_gpu: bool) -> tuple[dict[str, Any], bytes]:
    """Run ``analysis.fit`` as a Ray Train TorchTrainer (one worker: a Ray task); return worker
    0's output and model.pt."""
    import ray
    from ray.train.torch import TorchConfig

    # What ray.train and ray.train.torch export under Ray Train v2 (the default), by their own names.
    from ray.train.v2.api.config import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    ex = manifest.execution
    workers = analysis.workers()
    threads = ex.threads_per_worker  # default: the node's CPUs shared by its workers
    config = {"entry": analysis.params.model_dump(mode="json"), "model": manifest.model.model_dump(mode="json"),
              "data": ray.put(data), "threads": threads, "use_gpu": use_gpu}
    if workers == 1 and not TRAIN_ONE_WORKER_ON_RAY_TRAIN:
        # One worker has nothing to synchronise: a task on one of the run's warm worker processes
        # does the same computation without Ray Train's controller and worker group (about 8 s
        # of start-up on two CPU cores, more than a short fine-tune's training).
        task = ray.remote(train_task).options(num_cpus=1, num_gpus=1 if use_gpu else 0,
                                              **staged.store.remote_args())
        output, weights = ray.get(task.remote(config))
        if weights is None:
            raise RuntimeError("training finished without the trained weights")
        return output, weights
    rel = f"{staged.staging}/{TRAIN_DIR}"
    staged.store.delete(rel)
    path, filesystem = _storage(staged.store, rel)
    # Ray Train hands this variable on to its controller when the trainer is made.
    polled = POLL_ENV not in os.environ
    if polled:
        os.environ[POLL_ENV] = POLL_SECONDS
    trainer = TorchTrainer(
        train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"{analysis.params.entry_name}-{uuid.uuid4().hex[:8]}", storage_path=path,
                             storage_filesystem=filesystem,
                             # Ray Train's own progress (resources, worker group, each report) is
                             # not the run's: the stage logs its epochs itself.
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint from worker 0")
        with result.checkpoint.as_directory() as folder:
            with open(os.path.join(folder, "output.json")) as f:
                output = json.load(f)
            with open(os.path.join(folder, CHECKPOINT_FILE), "rb") as g:
                weights = g.read()
    finally:
        if polled:
            os.environ.pop(POLL_ENV, None)
        staged.store.delete(rel)
    return output, weights


def _staged_file(staged: StagedEntry, name: str, data: bytes) -> FileRecord:
    """Write ``name`` into the staging folder under an attempt name; its record for the ledger."""
    attempt = f"{name}.{uuid.uuid4().hex[:12]}"
    size = staged.folder.write_bytes(attempt, data)
    return FileRecord(staged=attempt, final=name, rows=0, bytes=size)


def train_entry(manifest: Manifest, store: Store, index: DatasetIndex, analysis: TrainAnalysis, ctx: RunContext,
                key: dict, log: Log) -> dict:
    """Train one entry, write its table, split and model, and commit it; return its run.json stats."""
    name = analysis.params.entry_name
    start = time.time()
    staged = StagedEntry(store, name, key, {"train": 1})
    records = staged.open()
    try:
        if 0 not in records:
            records[0] = _train(manifest, index, analysis, ctx, staged, log)
        record = records[0]
        staged.commit([record])
    except Exception:
        staged.abort()
        raise
    return {"status": "complete", "rows": record.rows, "seconds": round(time.time() - start, 3), **record.stats}


def _train(manifest: Manifest, index: DatasetIndex, analysis: TrainAnalysis, ctx: RunContext, staged: StagedEntry,
           log: Log) -> BlockRecord:
    """Decode, train on Ray, write the table, split and model into staging; the recorded block."""
    name = analysis.params.entry_name
    data, undecodable = train_data(manifest, index, analysis, ctx, log)
    use_gpu = ctx.device.type == "cuda"
    workers = analysis.workers()
    on = "one Ray task" if workers == 1 and not TRAIN_ONE_WORKER_ON_RAY_TRAIN else f"{workers} Ray Train worker(s)"
    log(f"  {name}: training on {len(data.train):,} images, {len(data.held_out):,} held out, "
        f"{on} on {'a GPU' if use_gpu and workers == 1 else 'GPUs' if use_gpu else 'CPUs'}")
    output, weights = fit_on_ray(manifest, analysis, data, staged, use_gpu)
    for message in output.get("log", []):
        log(f"  {name}: {message}")
    for row in output["rows"]:
        log(f"  {name}: epoch {row['epoch']} ({row['phase']}): held-out accuracy {row['held_out_accuracy']:.4f}"
            + (f", train loss {row['train_loss']:.4f}" if row["train_loss"] is not None else ""))
    # The ids go to errors.parquet (run_train_stage takes them out of the stats).
    stats = {**output["stats"], "undecodable": len(undecodable), "undecodable_ids": undecodable}
    schemas = analysis.schema() or {}
    table = pa.Table.from_pylist(output["rows"], schema=schemas.get(""))
    record = write_result(staged.folder, 0, Result(tables={"": as_table(table)}, stats=stats),
                          schemas=schemas or None, rows_per_part=manifest.execution.rows_per_part, where=name)
    buf = io.BytesIO()
    pq.write_table(split_table(data), buf)
    record.files.append(_staged_file(staged, SPLIT_FILE, buf.getvalue()))
    # Written whole, fsynced, then renamed into place with the entry: never a partial model.pt.
    record.files.append(_staged_file(staged, MODEL_FILE, weights))
    staged.record(record)
    return record


def run_train_stage(manifest: Manifest, store: Store, index: DatasetIndex, analyses: list[TrainAnalysis],
                    keys: dict[str, dict], log: Log) -> tuple[dict[str, dict], list[dict]]:
    """Train every entry in turn; one failure does not stop the others. Returns the entries'
    stats and the error rows of images that could not be decoded."""
    ctx = RunContext(manifest, index, log, store.remote_args())
    stats: dict[str, dict] = {}
    errors: list[dict] = []
    for analysis in analyses:
        name = analysis.params.entry_name
        log(f"training {name}")
        start = time.time()
        try:
            stats[name] = train_entry(manifest, store, index, analysis, ctx, keys[name], log)
            errors += [{"image_id": i, "stage": "train", "error": "could not be decoded"}
                       for i in stats[name].pop("undecodable_ids", [])]
            log(f"  {name}: held-out accuracy {stats[name].get('held_out_accuracy', float('nan')):.4f}"
                + (f" (linear probe {stats[name]['probe_held_out_accuracy']:.4f})"
                   if "probe_held_out_accuracy" in stats[name] else "")
                + f" in {time.time() - start:.1f} s")
        except Exception as e:  # noqa: BLE001 -- recorded against the entry
            cause = getattr(e, "cause", None) or e
            message = f"{type(cause).__name__}: {cause}"
            log(f"{name} failed: {message}")
            stats[name] = {"status": "failed", "error": message[:2000], "traceback": traceback.format_exc()[-4000:],
                           "seconds": round(time.time() - start, 3)}
    return stats, errors
