"""The reduce stage: whole-dataset analyses read their committed partials and write results.

The map pass commits each reduce entry's partials under ``<output>/.inputs/<entry>`` (Parquet,
with its own ``_SUCCESS`` and key). Here, per entry, on the driver::

    partials (Parquet) ─► analysis.reduce(inputs, context) ─► Result (tables + rendered images)
                       ─► <output>/.staging/<entry> (parts, _shards/*.tar) ─► ledger ─► commit

A reduction that fails leaves its partials in place: the next run reduces again without
another pass over the dataset. Partials are removed once the entry is committed.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from jobs import ReduceAnalysis, ReduceInputs
from pipeline.datasets import DatasetIndex
from pipeline.decode import decode_batch
from pipeline.manifest import Manifest, ParquetDataset
from pipeline.store import Store
from pipeline.writers import INPUTS, Result, StagedEntry, as_table, read_success, write_result

Log = Callable[[str], None]

# Bytes of one record batch that a reduction streams (Parquet's uncompressed size): wide rows
# (2,048-dim features) come in fewer rows per batch than narrow ones.
BATCH_BYTES = 64 * 2**20


class ParquetInputs:
    """:class:`jobs.ReduceInputs` over a committed partials folder (Hive-style partitions)."""

    def __init__(self, store: Store, folder: str, batch_rows: int = 65536):
        self.store, self.folder, self.batch_rows = store, folder, batch_rows

    def _files(self, partition: str, required: bool = True) -> list[str]:
        folder = f"{self.folder}/{partition}" if partition else self.folder
        files = [f for f in self.store.files(folder) if f.rsplit("/", 1)[-1].startswith("part-")
                 and f.endswith(".parquet")]
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
                yield from parquet.iter_batches(batch_size=self.rows_per_batch(parquet, columns),
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
    """:class:`jobs.ReduceInputs` over other entries' committed tables: one partition per entry."""

    def __init__(self, store: Store, entries: Sequence[str], batch_rows: int = 65536):
        super().__init__(store, "", batch_rows)
        self.entries = list(entries)

    def partitions(self) -> list[str]:
        return list(self.entries)

    def _files(self, partition: str, required: bool = True) -> list[str]:
        if partition not in self.entries:
            raise KeyError(f"{partition!r} is not one of the entries read: {', '.join(self.entries)}")
        # Hive-partitioned entries keep their parts in key=value folders.
        files = [f for f in self.store.files(partition, recursive=True)
                 if f.rsplit("/", 1)[-1].startswith("part-") and f.endswith(".parquet")]
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


class RunContext:
    """:class:`jobs.ReduceContext` for a run: the model, decoded images, Ray for parallel work."""

    def __init__(self, manifest: Manifest, index: DatasetIndex, log: Log):
        from pipeline.models import input_size_of
        from pipeline.worker import resolve_device

        self.manifest, self.index, self._log = manifest, index, log
        ex = manifest.execution
        self.device = resolve_device(ex.device)
        self.input_size = input_size_of(manifest.model)
        self.label_names = index.label_names
        self.workers = ex.workers
        self._model: torch.nn.Module | None = None
        self._rows: dict[str, int] | None = None

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
        if self._rows is None:
            self._rows = {i: n for n, i in enumerate(self.index.table.column("image_id").to_pylist())}
        rows = [self._rows[i] for i in dict.fromkeys(image_ids)]
        if not rows:
            return {}
        sub = self.index.table.take(pa.array(rows, pa.int64()))
        batch = {c: np.asarray(sub.column(c).to_pylist(), dtype=object) for c in sub.column_names}
        from pipeline.models import preprocess_of

        pre = preprocess_of(self.manifest.model)
        column = self.manifest.dataset.image_column if isinstance(self.manifest.dataset, ParquetDataset) else "image"
        out = decode_batch(batch, pre.resize, pre.crop, column)
        return {str(i): out["pixels"][n] for n, i in enumerate(out["image_id"]) if out["error"][n] == ""}

    def parallel_map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None,
                     gpu: bool = False) -> list:
        """``[fn(shared, item) for item in items]`` as Ray tasks; ``shared`` goes to the object store once."""
        import ray

        if len(items) <= 1:
            return [fn(resolve(shared), item) for item in items]
        gpus = 1 if gpu and self.device.type == "cuda" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # Tasks that read the run's store (pieces of partials) need its credentials, as the map workers do.
        env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_"))}
        task = ray.remote(_apply).options(num_cpus=1, num_gpus=gpus,
                                          **({"runtime_env": {"env_vars": env}} if env else {}))
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


def reduce_entry(manifest: Manifest, store: Store, analysis: ReduceAnalysis, ctx: RunContext, key: dict) -> dict:
    """Reduce one entry from its committed partials and commit it; return its run.json stats.

    The reduction is one block of the entry: once it is recorded, a rerun (after a crash
    before the commit) commits it without reducing again.
    """
    name = analysis.params.entry_name
    start = time.time()
    staged = StagedEntry(store, name, key)
    record = staged.open().get(0)
    if record is None:
        sources = analysis.sources(manifest.analyses)
        inputs = EntryInputs(store, sources) if sources else ParquetInputs(store, f"{INPUTS}/{name}")
        check_memory(analysis, inputs, driver_memory(manifest))
        output = analysis.reduce(inputs, ctx)
        result = Result(tables={p: as_table(t) for p, t in output.tables.items()}, images=output.images,
                        stats=output.stats)
        record = write_result(staged.folder, 0, result, rows_per_part=manifest.execution.rows_per_part, where=name)
        staged.record(record)
    staged.commit([record])
    store.delete(f"{INPUTS}/{name}")
    stats = {"status": "complete", "rows": record.rows, "reduce_seconds": round(time.time() - start, 3),
             "images": record.images, "shards": sum(f.final.endswith(".tar") for f in record.files)}
    stats.update(record.stats)
    return stats


def run_reduce_stage(manifest: Manifest, store: Store, index: DatasetIndex, analyses: list[ReduceAnalysis],
                     keys: dict[str, dict], log: Log) -> dict[str, dict]:
    """Reduce every entry in turn; one failure does not stop the others."""
    ctx = RunContext(manifest, index, log)
    stats: dict[str, dict] = {}
    for analysis in analyses:
        name = analysis.params.entry_name
        sources = analysis.sources(manifest.analyses)
        if not sources and read_success(store, f"{INPUTS}/{name}") is None:
            continue  # its dataset pass failed, and said so
        missing = [s for s in sources if (read_success(store, s) or {}).get("key") != keys[s]["key"]]
        if missing:
            stats[name] = {"status": "failed", "error": f"needs the tables of {', '.join(missing)}, "
                                                        "which did not complete in this run"}
            log(f"{name} failed: {stats[name]['error']}")
            continue
        log(f"reducing {name}")
        start = time.time()
        try:
            stats[name] = reduce_entry(manifest, store, analysis, ctx, keys[name])
            log(f"  {name}: {stats[name]['rows']:,} rows, {stats[name]['images']:,} images "
                f"in {time.time() - start:.1f} s")
        except Exception as e:  # noqa: BLE001 -- recorded; the partials stay for the next run
            message = f"{type(e).__name__}: {e}"
            log(f"{name} failed: {message}")
            stats[name] = {"status": "failed", "error": message[:2000], "traceback": traceback.format_exc()[-4000:],
                           "reduce_seconds": round(time.time() - start, 3)}
    return stats
