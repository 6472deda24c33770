"""Running a manifest on Ray: list, plan, stream batches through the workers, commit.

A map stage is one Ray Data pipeline::

    index rows ─► decode (CPU tasks) ─► ModelWorker actors (model once per actor) ─► driver

The driver streams the results (in dataset order) into per-entry Parquet writers, records
images that could not be used in ``errors.parquet``, and commits each entry atomically.
Embedded local Ray by default; ``execution.address`` (or ``--address``) joins a cluster.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from jobs import REGISTRY
from pipeline.datasets import DatasetIndex, list_dataset
from pipeline.errors import UserError
from pipeline.manifest import Manifest, ParquetDataset
from pipeline.models import check_layers, load_model, model_hash
from pipeline.plan import Stage, entry_key, plan
from pipeline.model_stage import run_model_stage
from pipeline.reduce import run_reduce_stage
from pipeline.decode import decode_batch
from pipeline.worker import IMAGES, PARTIAL, SEP, ModelWorker, default_threads, entries_json, error_key, unpack_partial
from pipeline.writers import (
    INPUTS,
    STAGING,
    EntryWriter,
    atomic_write_table,
    atomic_write_text,
    invalidate,
    labels_to_arrow,
    read_success,
    to_arrow,
    write_json,
)

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class RunResult:
    output: Path
    status: str
    analyses: dict[str, dict] = field(default_factory=dict)
    errors: int = 0
    error: str | None = None  # why the run as a whole failed (e.g. too many bad images)

    @property
    def ok(self) -> bool:
        return self.status == "complete"


def versions() -> dict[str, str]:
    import pandas
    import PIL
    import pydantic
    import ray
    import torch
    import torchvision

    from pipeline import __version__

    return {
        "convscope": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": torchvision.__version__, "ray": ray.__version__, "pyarrow": pa.__version__,
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
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)


def _configure_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic tables, whatever the workers
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _decode_remote_args() -> dict:
    return {}


def _decode_stage(ds, manifest: Manifest, block: int, column: str):
    """Read + decode + resize/crop as CPU tasks (``pipeline.decode``, no torch)."""
    return ds.map_batches(
        decode_batch,
        batch_size=block,
        batch_format="numpy",
        fn_kwargs={"resize": manifest.model.preprocess.resize, "crop": manifest.model.preprocess.crop,
                   "parquet_column": column},
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


def _map_dataset(manifest: Manifest, index: DatasetIndex, stage: Stage):
    """The Ray Data pipeline of a map stage (lazy; nothing runs until it is iterated)."""
    import ray
    import ray.data

    ex = manifest.execution
    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 1))
    use_gpu = ex.device == "cuda" or (ex.device == "auto" and resources.get("GPU", 0) >= 1)
    if ex.device == "cuda" and resources.get("GPU", 0) < 1:
        raise UserError("execution.device: 'cuda' was asked for, but the Ray cluster has no GPU")
    # Leave one CPU for decoding, so model actors can never starve the tasks that feed them.
    actor_cpus = max(0.1, min(1.0, (total_cpus - 1) / ex.workers)) if not use_gpu else 1.0
    threads = ex.threads_per_worker or (None if use_gpu else default_threads(ex.workers))

    _await_cpus(min(total_cpus, actor_cpus * ex.workers + 1))
    execution = ex.model_dump(mode="json")
    execution["device"] = "cuda" if use_gpu else "cpu"
    block = decode_block(ex.decode_batch_size, manifest.model.preprocess.output_size())
    table = _with_boxes(index)
    blocks = [table.slice(i, block) for i in range(0, table.num_rows, block)] or [table]
    column = manifest.dataset.image_column if isinstance(manifest.dataset, ParquetDataset) else "image"
    chosen, samples = selections(stage, index)
    ds = ray.data.from_arrow(blocks)
    with warnings.catch_warnings():
        # ray_remote_args_fn is deprecated for removal in Ray 2.64; pyproject pins below it.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        ds = _decode_stage(ds, manifest, block, column)
    ds = ds.map_batches(
        ModelWorker,
        batch_size=ex.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model_spec": manifest.model.model_dump(mode="json"),
            "entries": entries_json([a.params for a in stage.analyses]),
            "execution": execution,
            "threads": threads,
            "selections": chosen,
            "samples": samples,
        },
        # Ray Data restarts dead actors and retries their batches by default.
        compute=ray.data.ActorPoolStrategy(size=ex.workers),
        num_cpus=actor_cpus,
        num_gpus=1 if use_gpu else 0,
    )
    return ds


def _with_boxes(index: DatasetIndex) -> pa.Table:
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


class _Progress:
    def __init__(self, total: int, what: str, log: Log, every: float = 5.0):
        self.total, self.what, self.log, self.every = total, what, log, every
        self.done = 0
        self.start = self.last = time.time()

    def add(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done >= self.total:
            rate = self.done / max(now - self.start, 1e-9)
            self.log(f"  {self.what}: {self.done:,}/{self.total:,} images ({rate:,.0f} images/s)")
            self.last = now


def _consume(batch: dict[str, np.ndarray], writers: dict[str, EntryWriter], errors: list[dict],
             failures: dict[str, str]) -> None:
    """Route one result batch: bad images to ``errors``, failed analyses to ``failures``,
    the rest to each entry's writer."""
    ok = batch["error"] == ""
    for i in np.flatnonzero(~ok):
        errors.append({"image_id": str(batch["image_id"][i]), "stage": str(batch["error_stage"][i]),
                       "error": str(batch["error"][i])})
    if not ok.any():
        return
    for entry in writers:
        messages = batch[error_key(entry)][ok]
        bad = messages != ""
        if bad.any():
            failures.setdefault(entry, str(messages[bad][0]))
    ids = pa.array(batch["image_id"][ok].tolist(), pa.string())
    labels = labels_to_arrow(batch["label"][ok])
    grouped: dict[tuple[str, str], dict] = {}
    # Images first: the rows that name them get their shard when they are added.
    for key in sorted(batch, key=lambda k: not k.endswith(SEP + IMAGES)):
        if SEP not in key or key.endswith(SEP + "__error__"):
            continue
        values = batch[key]
        entry, partition, column = key.split(SEP)
        if entry in failures:
            continue
        if column == IMAGES:
            for cell in values:
                if cell is not None and len(cell):
                    images = unpack_partial(cell)
                    for image_key, png in zip(images.column("key").to_pylist(), images.column("png").to_pylist()):
                        writers[entry].add_image(image_key, png)
            continue
        if column == PARTIAL:
            for cell in values:
                if cell is not None and len(cell):
                    table = unpack_partial(cell)
                    if table.num_rows:  # a batch with no rows for the entry also has no schema
                        writers[entry].add(partition, table)
            continue
        grouped.setdefault((entry, partition), {"image_id": ids, "label": labels})[column] = to_arrow(values[ok])
    for (entry, partition), columns in grouped.items():
        writers[entry].add(partition, columns)


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


def run_map_stage(
    manifest: Manifest, index: DatasetIndex, stage: Stage, keys: dict[str, dict], log: Log
) -> tuple[dict[str, dict], list[dict]]:
    """Run one fused map stage; commit every entry; return per-entry stats and error rows."""
    output = manifest.output
    # A reduce entry's partials are committed apart, under .inputs/, for its reduction.
    partial = {a.params.entry_name for a in stage.analyses if a.stage == "reduce"}
    writers = {name: EntryWriter(output / INPUTS if name in partial else output, name, manifest.execution.rows_per_part)
               for name in stage.entries}
    errors: list[dict] = []
    failures: dict[str, str] = {}
    progress = _Progress(len(index), "+".join(stage.entries), log)
    start = time.time()
    ds = _map_dataset(manifest, index, stage)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        _consume(batch, writers, errors, failures)
        progress.add(len(batch["error"]))
    seconds = time.time() - start
    stats = {}
    for name, writer in writers.items():
        common = {"seconds": round(seconds, 3), "stage": "map", "fused_with": [e for e in stage.entries if e != name]}
        if name in failures:
            writer.abort()
            log(f"{name} failed: {failures[name]}")
            stats[name] = {"status": "failed", "error": failures[name], **common}
            continue
        try:
            writer.commit(keys[name])
        except Exception as e:  # noqa: BLE001 -- out of disk, say: this entry fails, the others still commit
            writer.abort()
            message = f"committing {name} failed: {type(e).__name__}: {e}"[:2000]
            log(message)
            stats[name] = {"status": "failed", "error": message, **common}
            continue
        stats[name] = {"status": "complete", "rows": writer.rows, "errors": len(errors), **common}
        if writer.images:
            stats[name].update(images=writer.images, shards=writer.shard_count)
        if name in partial:
            stats[name].update(status="partials", stage="reduce", partial_rows=stats[name].pop("rows"),
                               map_seconds=stats[name].pop("seconds"))
    return stats, errors


# ----------------------------------------------------------------------------- the run


def _prepare_output(output: Path) -> None:
    """Create the output folder and prove it is writable before any work starts."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output: cannot write to {output}: {e.strerror or e}") from None


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


def run_manifest(manifest: Manifest, log: Log = _stderr) -> RunResult:
    """Run every analysis of a validated manifest; skip entries already committed."""
    started = time.time()
    output = manifest.output
    # Everything `convscope validate` checks comes first: an invalid manifest leaves no output behind.
    model = load_model(manifest.model)  # trains the demo CNN here, once, if it is missing
    check_layers(manifest, model)
    index = list_dataset(manifest.dataset)
    check_dataset(manifest, index)
    _prepare_output(output)
    atomic_write_text(output / "manifest.resolved.yaml", manifest.resolved_yaml())
    mhash = model_hash(manifest.model, model)
    del model
    log(f"dataset: {len(index):,} images ({manifest.dataset.kind}), fingerprint {index.fingerprint[:19]}")

    keys = {p.entry_name: entry_key(p, manifest, index.fingerprint, mhash) for p in manifest.analyses}
    for p in manifest.analyses:
        sources = REGISTRY[p.type](p).sources(manifest.analyses)
        if sources:
            keys[p.entry_name] = entry_key(p, manifest, index.fingerprint, mhash, {s: keys[s] for s in sources})
    done, partials_done = set(), set()
    for name, key in keys.items():
        committed = read_success(output / name)
        if committed and committed.get("key") == key["key"]:
            done.add(name)
        elif committed:
            log(f"{name}: inputs changed since it was committed; recomputing")
            invalidate(output, name)
        partials = read_success(output / INPUTS / name)
        if name not in done and partials and partials.get("key") == key["key"]:
            partials_done.add(name)
        elif partials:
            invalidate(output / INPUTS, name)
    analyses: dict[str, dict] = {
        name: {"status": "skipped", "reason": "already committed with the same inputs",
               "rows": (read_success(output / name) or {}).get("rows")} for name in done
    }
    if done:
        log(f"already complete, skipped: {', '.join(sorted(done))}")
    stages = plan(manifest, skip=done, partials_done=partials_done)
    if partials_done:
        log(f"partials already committed (no dataset pass needed): {', '.join(sorted(partials_done))}")
    all_errors: list[dict] = list(index.errors)
    if not any(stage.kind == "map" for stage in stages) and (output / "errors.parquet").exists():
        # No dataset pass this time: the images found bad by the pass that ran before still are.
        import pyarrow.parquet as pq

        previous = pq.read_table(output / "errors.parquet").to_pylist()
        ids = set(index.table.column("image_id").to_pylist())
        all_errors += [e for e in previous if e["stage"] != "list" and e["image_id"] in ids]

    status = "complete"
    if stages:
        init_ray(manifest.execution.address, log)
        _configure_data()
    for stage in stages:
        log(f"{stage.kind} stage: {', '.join(stage.entries)}")
        try:
            if stage.kind == "map":
                stats, errors = run_map_stage(manifest, index, stage, keys, log)
                all_errors.extend(errors)
            elif stage.kind == "reduce":
                stats = run_reduce_stage(manifest, index, stage.analyses, keys, log)
                for name, info in stats.items():
                    before = analyses.get(name, {})
                    info["seconds"] = round(before.get("map_seconds", 0.0) + info.get("reduce_seconds", 0.0), 3)
                    carried = ("map_seconds", "partial_rows", "fused_with", "errors")
                    info.update({k: before[k] for k in carried if k in before})
                    info["stage"] = "reduce"
            else:
                stats = run_model_stage(manifest, index, stage.analyses, keys, log)
                for info in stats.values():
                    info["stage"] = "model"
            analyses.update(stats)
            if any(info["status"] == "failed" for info in stats.values()):
                status = "failed"
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- one failed stage must not lose the others
            status = "failed"
            message = f"{type(e).__name__}: {e}"
            log(f"{stage.kind} stage failed: {message}")
            for name in stage.entries:
                analyses[name] = {"status": "failed", "error": message[:2000],
                                  "traceback": traceback.format_exc()[-4000:]}

    all_errors = list({(e["image_id"], e["stage"], e["error"]): e for e in all_errors}.values())
    if stages or not (output / "errors.parquet").exists():
        atomic_write_table(output / "errors.parquet", pa.Table.from_pylist(
            all_errors, schema=pa.schema([("image_id", pa.string()), ("stage", pa.string()), ("error", pa.string())])))
        atomic_write_table(output / "images.parquet", _images_table(index))
    # Images that could not be used (listing errors about whole shards are counted apart).
    bad = {e["image_id"] for e in all_errors} & set(index.table.column("image_id").to_pylist())
    run_error = None
    limit = manifest.execution.max_error_fraction
    if len(index) and len(bad) / len(index) > limit:
        status = "failed"
        run_error = (f"{len(bad):,} of {len(index):,} images ({len(bad) / len(index):.1%}) could not be used, "
                     f"over execution.max_error_fraction={limit:g}; see errors.parquet "
                     "(the analyses' tables are committed)")
        log(run_error)
    summary = {
        "name": manifest.name,
        "status": status,
        **({"error": run_error} if run_error else {}),
        "seconds": round(time.time() - started, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "manifest": str(manifest.source) if manifest.source else None,
        "dataset": {
            "kind": manifest.dataset.kind, "fingerprint": index.fingerprint, "images": len(index),
            "ok": len(index) - len(bad), "errors": len(bad), "error_rows": len(all_errors),
            "label_names": index.label_names,
        },
        "model": {"source": manifest.model.source, "name": getattr(manifest.model, "name", None),
                  "hash": mhash},
        "execution": {**manifest.execution.model_dump(mode="json"),
                      "address": manifest.execution.address or "embedded"},
        "versions": versions(),
        "analyses": {p.entry_name: {"type": p.type, **analyses.get(p.entry_name, {"status": "not run"})}
                     for p in manifest.analyses},
    }
    write_json(output / "run.json", summary)
    staging = output / STAGING
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return RunResult(output=output, status=status, analyses=summary["analyses"], errors=len(all_errors),
                     error=run_error)
