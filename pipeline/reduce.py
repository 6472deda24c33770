"""The reduce stage: whole-dataset analyses read their committed partials and write results.

The map pass commits each reduce entry's partials under ``<output>/.inputs/<entry>`` (Parquet,
with its own ``_SUCCESS`` and key). Here, per entry, on the driver::

    partials (Parquet) ─► analysis.reduce(inputs, context) ─► tables + Rendered (items to draw)
                       ─► render tasks: each decodes its images, writes its shards (blocks 1..n)
                       ─► the tables with their shard columns (block 0) ─► ledger ─► commit

The driver holds the reduction's result tables and the items to draw (ids, coordinates,
boxes), never a picture: the images are decoded and drawn where the tasks run.

A reduction that fails leaves its partials in place: the next run reduces again without
another pass over the dataset. Partials are removed once the entry is committed.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from jobs import ReduceAnalysis, ReduceInputs, Rendered
from jobs.core.base import Images
from pipeline.checkpoints import entry_folder
from pipeline.datasets import DatasetIndex
from pipeline.decode import decode_batch
from pipeline.manifest import Manifest, ParquetDataset
from pipeline.store import Store
from pipeline.testset import WithTestset, drop_testset_partials, testset_folder, testset_ready, testset_spec
from pipeline.writers import (
    INPUTS,
    BlockRecord,
    BlockWriter,
    Result,
    StagedEntry,
    as_table,
    read_success,
    table_part,
    table_parts,
    write_result,
)

Log = Callable[[str], None]

# Render tasks per CPU of the cluster: a few, so that a slow item does not hold up the others.
TASKS_PER_CPU = 2

# Bytes of one record batch that a reduction streams (Parquet's uncompressed size): wide rows
# (2,048-dim features) come in fewer rows per batch than narrow ones.
BATCH_BYTES = 16 * 2**20


class ParquetInputs:
    """:class:`jobs.ReduceInputs` over a committed partials folder (Hive-style partitions)."""

    def __init__(self, store: Store, folder: str, batch_rows: int = 65536):
        self.store, self.folder, self.batch_rows = store, folder, batch_rows

    def _files(self, partition: str, required: bool = True) -> list[str]:
        folder = f"{self.folder}/{partition}" if partition else self.folder
        files = [f for f in self.store.files(folder) if table_part(f.rsplit("/", 1)[-1])]
        if required and not files:
            raise ValueError(f"no partials for partition {partition or '(root)'!r}: no image of the dataset "
                             "could be used")
        return files

    def partitions(self) -> list[str]:
        found = [i.base_name for i in self.store.list(self.folder) if i.type == pafs.FileType.Directory
                 and "=" in i.base_name]
        return ([""] if self._files("", required=False) else []) + sorted(found)

    def read(self, partition: str = "", columns: Sequence[str] | None = None) -> pa.Table:
        files = self._files(partition)
        return pa.concat_tables(self.store.read_table(f, columns=list(columns) if columns else None) for f in files)

    def batches(self, partition: str = "", columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        for f in self._files(partition):
            with self.store.open_input(f) as handle:
                parquet = pq.ParquetFile(handle)
                rows = self.rows_per_batch(parquet, columns)
                # A few row groups at a time: over a whole file, pyarrow pre-buffers every column
                # chunk it will read (a 100k x 2,048 part: 0.8 GB held at once).
                for groups in row_group_runs(parquet.metadata, columns, BATCH_BYTES):
                    yield from parquet.iter_batches(batch_size=rows, row_groups=groups,
                                                    columns=list(columns) if columns else None)

    def rows_per_batch(self, parquet: pq.ParquetFile, columns: Sequence[str] | None) -> int:
        """``batch_rows``, or fewer where rows are wide: a batch holds at most about BATCH_BYTES."""
        meta = parquet.metadata
        if meta.num_row_groups == 0 or meta.num_rows == 0:
            return self.batch_rows
        group = meta.row_group(0)
        wanted = set(columns) if columns else None
        size = sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
                   if wanted is None or group.column(i).path_in_schema.split(".")[0] in wanted)
        per_row = max(1, size // max(1, group.num_rows))
        return max(1, min(self.batch_rows, BATCH_BYTES // per_row))

    def rows(self, partition: str = "") -> int:
        total = 0
        for f in self._files(partition):
            with self.store.open_input(f) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        return total

    def width(self, partition: str, column: str) -> int:
        for f in self._files(partition):
            with self.store.open_input(f) as handle:
                for rb in pq.ParquetFile(handle).iter_batches(batch_size=1, columns=[column]):
                    if rb.num_rows:
                        return len(rb.column(0)[0].as_py() or [])
        return 0

    def split(self, partition: str, parts: int) -> list[ReduceInputs]:
        files = self._files(partition)
        step = max(1, -(-len(files) // max(1, parts)))
        return [FileInputs(self.store, {partition: files[s:s + step]}, self.batch_rows)
                for s in range(0, len(files), step)]


def row_group_runs(meta: pq.FileMetaData, columns: Sequence[str] | None, limit: int) -> list[list[int]]:
    """The file's row groups in consecutive runs of about ``limit`` bytes of the ``columns``
    read (uncompressed; a group larger than that is a run of its own).

    >>> import io
    >>> buf = io.BytesIO()
    >>> pq.write_table(pa.table({"x": list(range(10))}), buf, row_group_size=3)
    >>> row_group_runs(pq.ParquetFile(buf).metadata, ["x"], limit=250)  # groups of 111, 111, 111, 94 bytes
    [[0, 1], [2, 3]]
    """
    wanted = set(columns) if columns else None
    runs: list[list[int]] = []
    size = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        bytes_ = sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
                     if wanted is None or group.column(i).path_in_schema.split(".")[0] in wanted)
        if not runs or size + bytes_ > limit:
            runs.append([])
            size = 0
        runs[-1].append(g)
        size += bytes_
    return runs


class FileInputs(ParquetInputs):
    """:class:`jobs.ReduceInputs` over chosen part files (a piece of a partition, for one task)."""

    def __init__(self, store: Store, files: dict[str, list[str]], batch_rows: int = 65536):
        super().__init__(store, "", batch_rows)
        self.files = files

    def partitions(self) -> list[str]:
        return list(self.files)

    def _files(self, partition: str, required: bool = True) -> list[str]:
        return self.files.get(partition, [])


class EntryInputs(ParquetInputs):
    """:class:`jobs.ReduceInputs` over other entries' committed tables: one partition per entry,
    read from the entry's folder (``folders``: with checkpoints, ``<entry>/checkpoint=<name>``)."""

    def __init__(self, store: Store, entries: Sequence[str], batch_rows: int = 65536,
                 folders: dict[str, str] | None = None):
        super().__init__(store, "", batch_rows)
        self.entries = list(entries)
        self.folders = folders or {}

    def partitions(self) -> list[str]:
        return list(self.entries)

    def _files(self, partition: str, required: bool = True) -> list[str]:
        if partition not in self.entries:
            raise KeyError(f"{partition!r} is not one of the entries read: {', '.join(self.entries)}")
        # Hive-partitioned entries keep their parts in key=value folders.
        # Sidecar tables (folders starting with "_", as the probes' saved heads) are not the entry's.
        folder = self.folders.get(partition, partition)
        files = table_parts(self.store, folder)
        if required and not files:
            raise ValueError(f"entry {partition!r} has no rows")
        return files


def resolve(shared: Any) -> Any:
    """``shared`` with its object-store handles replaced by their values (see ``RunContext.put``):
    a handle, or handles (and lists of handles) inside a tuple, list or dict."""
    import ray

    def one(value: Any) -> Any:
        if isinstance(value, ray.ObjectRef):
            return ray.get(value)
        if isinstance(value, list) and value and all(isinstance(v, ray.ObjectRef) for v in value):
            return ray.get(value)
        return value

    if isinstance(shared, tuple):
        return tuple(one(v) for v in shared)
    if isinstance(shared, list):
        return [one(v) for v in shared]
    if isinstance(shared, dict):
        return {k: one(v) for k, v in shared.items()}
    return one(shared)


def _apply(fn: Callable[[Any, Any], Any], shared: Any, item: Any) -> Any:
    return fn(resolve(shared), item)


class ImageSource:
    """The dataset's images as the model saw them (resized, cropped; uint8 (H, W, 3)), decodable
    in any process: the listing's rows and the preprocessing. Call it with image ids.

    It pickles as it is (the listing is an Arrow table), so the runner puts it in the object
    store once and every render task decodes the images it draws itself.
    """

    def __init__(self, table: pa.Table, resize: Any, crop: Any, column: str | None):
        self.table, self.resize, self.crop, self.column = table, resize, crop, column

    @classmethod
    def of(cls, manifest: Manifest, index: DatasetIndex) -> ImageSource:
        from pipeline.models import preprocess_of

        pre = preprocess_of(manifest.model)
        column = manifest.dataset.image_column if isinstance(manifest.dataset, ParquetDataset) else "image"
        return cls(index.table, pre.resize, pre.crop, column)

    def __call__(self, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """{id: pixels} of the ids that decode, in the order asked (an id asked twice, once)."""
        wanted = list(dict.fromkeys(image_ids))
        if not wanted:
            return {}
        # A hash of the few ids asked, probed by the listing's: no lookup of the whole dataset to build.
        hits = pc.index_in(self.table.column("image_id"), value_set=pa.array(wanted, pa.string()))
        rows = np.flatnonzero(hits.is_valid().to_numpy(zero_copy_only=False))
        order = np.asarray(hits.take(pa.array(rows, pa.int64())).to_numpy(zero_copy_only=False))
        sub = self.table.take(pa.array(rows[np.argsort(order, kind="stable")], pa.int64()))
        batch = {c: np.asarray(sub.column(c).to_pylist(), dtype=object) for c in sub.column_names}
        out = decode_batch(batch, self.resize, self.crop, self.column)
        return {str(i): out["pixels"][n] for n, i in enumerate(out["image_id"]) if out["error"][n] == ""}


class RunContext:
    """:class:`jobs.ReduceContext` for a run: the model, decoded images, Ray for parallel work."""

    def __init__(self, manifest: Manifest, index: DatasetIndex, log: Log, remote_args: dict | None = None):
        """``remote_args``: the run store's (:meth:`pipeline.store.Store.remote_args`), for the tasks
        of :meth:`parallel_map`."""
        from pipeline.models import input_size_of
        from pipeline.worker import resolve_device

        self.manifest, self.index, self._log = manifest, index, log
        self.remote_args = dict(remote_args or {})
        ex = manifest.execution
        self.device = resolve_device(ex.device)
        self.input_size = input_size_of(manifest.model)
        self.label_names = index.label_names
        self.workers = ex.worker_count
        self.source = ImageSource.of(manifest, index)
        self._model: torch.nn.Module | None = None
        pre = manifest.model.preprocess
        self.mean = tuple(pre.mean) if pre is not None else (0.485, 0.456, 0.406)
        self.std = tuple(pre.std) if pre is not None else (0.229, 0.224, 0.225)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from pipeline.models import load_model

            self._model = load_model(self.manifest.model).to(self.device).eval()
        return self._model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        # jobs.ReduceContext declares ``model`` a plain (settable) attribute.
        self._model = model

    def images(self, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Decode ``image_ids`` as the model saw them (resized, cropped; uint8 (H, W, 3))."""
        return self.source(image_ids)

    @property
    def image_reader(self) -> ImageSource:
        """What ``images`` reads with, picklable: tasks decode their own images with it."""
        return self.source

    def cpus(self) -> int:
        """The CPUs of the Ray cluster (1 when Ray is not running)."""
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1

    def parallel_map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None,
                     gpu: bool = False) -> list:
        """``[fn(shared, item) for item in items]`` as Ray tasks; ``shared`` goes to the object store once."""
        import ray

        if len(items) <= 1:
            return [fn(resolve(shared), item) for item in items]
        gpus = 1 if gpu and self.device.type == "cuda" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # Tasks that read the run's store (pieces of partials) need its credentials, as the map
        # workers do; the store's own remote args, the same for every task of the run, so that
        # one worker process (torch imported once) runs them all: Ray starts a process for each
        # new runtime environment.
        task = ray.remote(_apply).options(num_cpus=1, num_gpus=gpus, **self.remote_args)
        ref = ray.put(shared)
        return ray.get([task.remote(fn, ref, item) for item in items])

    def put(self, value: Any) -> Any:
        """Store ``value`` in the object store once; tasks of ``parallel_map`` read it from there."""
        import ray

        return ray.put(value)

    def get(self, handle: Any) -> Any:
        """The value behind a handle of ``put`` (arrays: read-only views of the object store)."""
        import ray

        return ray.get(handle)

    def log(self, message: str) -> None:
        self._log(f"  {message}")


def machine_memory() -> int:
    """This machine's memory in bytes, or its container's limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def driver_memory(manifest: Manifest) -> int:
    """``execution.driver_memory``, or half of the machine's memory when it is not set."""
    chosen = manifest.execution.driver_memory
    return int(chosen) if chosen is not None else machine_memory() // 2


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory(analysis: ReduceAnalysis, inputs: ReduceInputs, budget: int) -> None:
    """Refuse a reduction whose plan is over ``budget``, naming what it would hold and the fix."""
    plan = analysis.memory_plan(inputs)
    if plan is not None and plan.bytes > budget:
        raise MemoryError(f"{analysis.params.entry_name} would hold about {gib(plan.bytes)} on the driver "
                          f"({plan.what}), over execution.driver_memory ({gib(budget)}). {plan.fix}; or raise "
                          "execution.driver_memory if this machine has the memory")


def render_block(draw: Callable[[Any, Any, Images], Iterable[tuple[str, Any]]], shared: Any, items: Sequence[Any],
                 images: Images, folder: Store, block: int, where: str = "") -> dict:
    """Draw ``items`` and write their shards as block ``block`` of the staged entry ``folder``;
    return its record (as JSON), with the keys each shard holds."""
    shared = resolve(shared)
    writer = BlockWriter(folder, block, where=where)
    try:
        writer.add_images(image for item in items for image in draw(shared, item, images))
        record = writer.close()
    except BaseException:
        writer.abort()
        raise
    for key, shard in writer.shards.shards.items():
        record.keys.setdefault(shard, []).append(key)
    return record.to_json()


def render_blocks(rendered: Rendered, ctx: RunContext, folder: Store, where: str) -> list[BlockRecord]:
    """Draw a reduction's pictures in Ray tasks (TASKS_PER_CPU per CPU of the cluster), each task a
    contiguous group of the items written as its own block (1, 2, ...) of the staged entry."""
    import ray

    items = list(rendered.items)
    if not items:
        return []
    tasks = max(1, min(len(items), TASKS_PER_CPU * ctx.cpus()))
    step = -(-len(items) // tasks)
    groups = [items[s:s + step] for s in range(0, len(items), step)]
    ctx.log(f"{where}: drawing {len(items):,} item(s) of pictures in {len(groups)} task(s)")
    if len(groups) == 1 or not ray.is_initialized():
        return [BlockRecord.from_json(render_block(rendered.draw, rendered.shared, group, ctx.source, folder,
                                                   block, where)) for block, group in enumerate(groups, 1)]
    task = ray.remote(render_block).options(num_cpus=1, **folder.remote_args())
    shared, source = ray.put(rendered.shared), ray.put(ctx.source)
    refs = [task.remote(rendered.draw, shared, group, source, folder, block, where)
            for block, group in enumerate(groups, 1)]
    return [BlockRecord.from_json(r) for r in ray.get(refs)]


def reduce_entry(manifest: Manifest, store: Store, analysis: ReduceAnalysis, ctx: RunContext, key: dict,
                 checkpoint: str | None = None) -> dict:
    """Reduce one entry (of one ``checkpoint`` of a series) from its committed partials and commit
    it; return its run.json stats.

    The tables are block 0 of the entry, written last; a :class:`jobs.Rendered` output's
    pictures are blocks 1, 2, ... written by render tasks before it. Once block 0 is
    recorded, a rerun (after a crash before the commit) commits the entry without reducing
    again; render blocks recorded without it are drawn again with the next reduction.
    """
    name = entry_folder(analysis.params.entry_name, checkpoint)
    start = time.time()
    staged = StagedEntry(store, name, key)
    records = staged.open()
    if 0 not in records:
        staged.forget(records)  # pictures of a reduction that never wrote its tables
        sources = analysis.sources(manifest.analyses)
        inputs: ReduceInputs = (
            EntryInputs(store, sources, folders={s: entry_folder(s, checkpoint) for s in sources}) if sources
            else ParquetInputs(store, f"{INPUTS}/{name}"))
        if testset_spec(analysis.params) is not None:
            test = ParquetInputs(store, f"{INPUTS}/{testset_folder(analysis.params.entry_name, checkpoint)}")
            inputs = WithTestset(inputs, test)
        check_memory(analysis, inputs, driver_memory(manifest))
        output = analysis.reduce(inputs, ctx)
        images: Iterable[tuple[str, Any]] = output.images
        records = {}
        if isinstance(images, Rendered):
            for drawn in render_blocks(images, ctx, staged.folder, name):
                staged.record(drawn)
                records[drawn.block] = drawn
            images = ()
        result = Result(tables={p: as_table(t) for p, t in output.tables.items()}, images=images,
                        stats=output.stats)
        shards: dict[str, list[str]] = {}
        for drawn in records.values():
            shards.update(drawn.keys)
        record = write_result(staged.folder, 0, result, rows_per_part=manifest.execution.rows_per_part, where=name,
                              shards=shards)
        staged.record(record)
        records[0] = record
    staged.commit(records.values())
    store.delete(f"{INPUTS}/{name}")
    if testset_spec(analysis.params) is not None:
        drop_testset_partials(store, analysis.params.entry_name, checkpoint)
    every = list(records.values())
    stats = {"status": "complete", "rows": records[0].rows, "reduce_seconds": round(time.time() - start, 3),
             "images": sum(r.images for r in every),
             "shards": sum(f.final.endswith(".tar") for r in every for f in r.files)}
    stats.update(records[0].stats)
    return stats


def run_reduce_stage(manifest: Manifest, store: Store, index: DatasetIndex, analyses: list[ReduceAnalysis],
                     keys: dict[str, dict], log: Log, checkpoint: str | None = None) -> dict[str, dict]:
    """Reduce every entry in turn (with the model of ``manifest``, one ``checkpoint`` of a series;
    ``keys`` and the stats are by folder); one failure does not stop the others."""
    ctx = RunContext(manifest, index, log, store.remote_args())
    stats: dict[str, dict] = {}
    for analysis in analyses:
        name = entry_folder(analysis.params.entry_name, checkpoint)
        sources = [entry_folder(s, checkpoint) for s in analysis.sources(manifest.analyses)]
        if not sources and read_success(store, f"{INPUTS}/{name}") is None:
            continue  # its dataset pass failed, and said so
        if testset_spec(analysis.params) is not None and not testset_ready(store, analysis.params.entry_name,
                                                                            checkpoint, keys):
            stats[name] = {"status": "failed", "error": "its test_dataset pass did not complete (see the log)"}
            log(f"{name} failed: {stats[name]['error']}")
            continue
        missing = [s for s in sources if (read_success(store, s) or {}).get("key") != keys[s]["key"]]
        if missing:
            stats[name] = {"status": "failed", "error": f"needs the tables of {', '.join(missing)}, "
                                                        "which did not complete in this run"}
            log(f"{name} failed: {stats[name]['error']}")
            continue
        log(f"reducing {name}")
        start = time.time()
        try:
            stats[name] = reduce_entry(manifest, store, analysis, ctx, keys[name], checkpoint)
            log(f"  {name}: {stats[name]['rows']:,} rows, {stats[name]['images']:,} images "
                f"in {time.time() - start:.1f} s")
        except Exception as e:  # noqa: BLE001 -- recorded; the partials stay for the next run
            message = f"{type(e).__name__}: {e}"
            log(f"{name} failed: {message}")
            stats[name] = {"status": "failed", "error": message[:2000], "traceback": traceback.format_exc()[-4000:],
                           "reduce_seconds": round(time.time() - start, 3)}
    return stats
