"""The one result path: workers write their blocks, the driver keeps a ledger and commits.

Every stage (map, reduce, model) turns what a unit of work produced into one
:class:`Result` (tables by partition, rendered images, stats, or an error), and
:func:`write_result` writes it, wherever that work ran, into the entry's staging folder::

    <output>/.staging/<entry>/<partition>/part-<block>-<chunk>.parquet.<attempt>
    <output>/.staging/<entry>/_shards/shard-<block>-<n>.tar.<attempt>

Names carry the block (the first dataset row of a map block, the group of a model stage)
and a fresh attempt id, so a block computed twice (a retried task) never shows twice. Only
a :class:`BlockRecord` (files, rows, bytes, error rows, small stats) travels to the driver,
which records it in the entry's durable ledger (``_ledger/block-<block>.json``, fsynced;
the files were fsynced before). :class:`StagedEntry` commits an entry once all its blocks
are recorded: the recorded files are renamed to their final names (attempt dropped), the
folder to ``<output>/<entry>``, then ``_SUCCESS`` is written, last. A folder without
``_SUCCESS`` is incomplete, whatever it holds. ``_SUCCESS`` holds the entry's key (its
parameters, the dataset fingerprint, the model hash): a rerun skips an entry whose key
matches, and inside an entry, blocks its ledger already has.

Rows of a committed table are in block order (part names sort by block), and within a
block in dataset order: pandas, pyarrow, polars and duckdb read them in dataset order.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.errors import UserError
from pipeline.store import Store

SUCCESS = "_SUCCESS"
STAGING = ".staging"
SHARDS = "_shards"
INPUTS = ".inputs"  # a reduce entry's committed partials, kept until the entry itself commits
LEDGER = "_ledger"
KEY = "_key.json"


def is_sidecar(rel: str) -> bool:
    """Whether a path inside an entry folder (``_heads/part-0.parquet``, ``layer=a/_x/...``) lies in
    a folder whose name starts with ``_``: a sidecar table beside the entry's own (the probes'
    saved heads), or its shards. Readers of an entry's table skip them, as pyarrow's and pandas'
    dataset readers do."""
    return any(part.startswith("_") for part in rel.strip("/").split("/")[:-1])


def table_part(rel: str) -> bool:
    """Whether a path inside an entry folder is a Parquet part of the entry's own table (not a sidecar's)."""
    return rel.rsplit("/", 1)[-1].startswith("part-") and rel.endswith(".parquet") and not is_sidecar(rel)


def table_parts(store: Store, folder: str) -> list[str]:
    """The Parquet parts of the table in ``folder`` of ``store`` (Hive partitions included,
    sidecars left out: :func:`table_part`), as paths from the store's root."""
    return [f for f in store.files(folder, recursive=True) if table_part(f[len(folder) + 1:])]


def partition_values(rel: str) -> dict[str, str]:
    """The Hive partition values in a part's path inside its entry folder.

    >>> partition_values("layer=layer3/checkpoint=epoch01/part-0.parquet")
    {'layer': 'layer3', 'checkpoint': 'epoch01'}
    """
    return dict(piece.split("=", 1) for piece in rel.split("/")[:-1] if "=" in piece)


def to_arrow(values: np.ndarray) -> pa.Array:
    """A column from a numpy array: 1-D as is, (N, D) as ``list<...>`` (float arrays as float32)."""
    if values.ndim == 1:
        if values.dtype == object:
            return pa.array(values.tolist())
        return pa.array(values)
    flat = values.reshape(len(values), -1)
    if np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float32, copy=False)
    width = flat.shape[1]
    offsets = pa.array(np.arange(0, (len(flat) + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1)))


def labels_to_arrow(labels: np.ndarray) -> pa.Array:
    """int labels with -1 for 'unlabelled' -> int64 with nulls."""
    labels = np.asarray(labels, dtype=np.int64)
    return pa.array(labels, mask=labels < 0)


def as_table(table: pa.Table | dict[str, Any]) -> pa.Table:
    """A table as Arrow: a ``pa.Table`` as is, or {column: Arrow or numpy array}."""
    if isinstance(table, pa.Table):
        return table
    columns = {}
    for name, values in table.items():
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            columns[name] = values
        else:
            columns[name] = to_arrow(np.asarray(values))
    return pa.table(columns)


def read_run_info(store: Store, which: str = "") -> dict:
    """A run folder's ``run.json``; UserError, naming the folder (after ``which``, e.g. "run A: "),
    when it is missing or not JSON."""
    try:
        return json.loads(store.read_text("run.json"))
    except FileNotFoundError:
        raise UserError(f"{which}{store.display()}: no run.json; is this the output folder of a finished "
                        "`convscope run`?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{which}{store.display('run.json')}: not valid JSON ({e})") from None


def read_success(store: Store, folder: str) -> dict | None:
    """The committed key of an entry folder, or None when it is not complete."""
    marker = store.read_json(f"{folder}/{SUCCESS}")
    return marker if isinstance(marker, dict) else None


def _untyped(t: pa.DataType) -> bool:
    """A type inferred from values that were all missing (``null``, ``list<null>``)."""
    return pa.types.is_null(t) or (pa.types.is_list(t) and _untyped(t.value_type))


def conform(table: pa.Table, schema: pa.Schema | None, where: str) -> pa.Table:
    """``table`` with exactly the declared ``schema``: the same columns in the same order and
    of the same types. Only columns whose type could not be inferred (every value missing
    in this block) are cast; any other difference is an error, never a silent conversion."""
    if schema is None or table.schema.equals(schema):
        return table
    if table.column_names != schema.names:
        missing = [n for n in schema.names if n not in table.column_names]
        extra = [n for n in table.column_names if n not in schema.names]
        raise ValueError(f"{where}: the table does not match its declared schema"
                         + (f"; missing {missing}" if missing else "") + (f"; not declared {extra}" if extra else "")
                         + ("" if missing or extra else f"; columns {table.column_names}, declared {schema.names}"))
    wrong = [f"{f.name} is {t}, declared {f.type}" for f, t in zip(schema, table.schema.types)
             if not t.equals(f.type) and not _untyped(t)]
    if wrong:
        raise ValueError(f"{where}: columns of another type than declared: {'; '.join(wrong)}")
    return table.cast(schema)


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    """What one unit of work produced for one entry, in every stage.

    ``tables``: {partition: table} (partition ``""`` or a Hive folder such as ``layer=layer3``);
    ``images``: (key, image or PNG bytes) pairs, consumed once, in order; ``stats``: small
    numbers for run.json; ``error``: why the work failed (then nothing else counts).
    """

    tables: dict[str, pa.Table] = field(default_factory=dict)
    images: Iterable[tuple[str, Image.Image | bytes]] = ()
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class FileRecord:
    """A written file, relative to the entry folder: its staged and its final name."""

    staged: str
    final: str
    rows: int
    bytes: int


@dataclass
class BlockRecord:
    """The metadata of one written block: all the driver receives and the ledger keeps.

    ``block``: the first dataset row (map stage) or the group (model stage); ``size``: the
    rows it covers (map) or 1; ``errors``: inputs of the block that could not be used.
    """

    block: int
    size: int = 1
    files: list[FileRecord] = field(default_factory=list)
    rows: int = 0
    images: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    keys: dict[str, list[str]] = field(default_factory=dict)  # image keys by shard: a reduction's render blocks

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> BlockRecord:
        files = [FileRecord(**f) for f in data.get("files", [])]
        return cls(**{**data, "files": files})


def part_name(block: int, chunk: int) -> str:
    return f"part-{block:09d}-{chunk:03d}.parquet"


PNG_LEVEL = 1


def encode_png(image: Image.Image | bytes) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    buf = io.BytesIO()
    # zlib level 1: a third of the default's (6) time for files ~13% larger (the demo's overlays).
    image.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def _encoded(images: Iterable[tuple[str, Image.Image | bytes]], pool: Executor | None, window: int = 64
             ) -> Iterator[tuple[str, bytes]]:
    """(key, PNG bytes) in order; encoded ``window`` at a time on ``pool`` (PIL's encoder
    releases the GIL), so a lazy iterable is never held whole."""
    if pool is None:
        for key, image in images:
            yield key, encode_png(image)
        return
    batch: list[tuple[str, Any]] = []
    for item in images:
        batch.append(item)
        if len(batch) >= window:
            yield from zip([k for k, _ in batch], pool.map(encode_png, [i for _, i in batch]))
            batch = []
    if batch:
        yield from zip([k for k, _ in batch], pool.map(encode_png, [i for _, i in batch]))


class BlockWriter:
    """One block of one entry on its way into the entry's staging folder ``store``.

    Images are encoded and packed into shards as they are added (a block never holds its
    rendered pictures whole); tables are checked against their declared schema (``schemas``,
    by partition) as they are added and written on :meth:`close`, with the ``shard`` column
    of every ``key`` column, in parts of at most ``rows_per_part`` rows.
    """

    def __init__(self, store: Store, block: int, schemas: dict[str, pa.Schema] | None = None,
                 rows_per_part: int = 100_000, pool: Executor | None = None, where: str = ""):
        self.store, self.block, self.schemas = store, block, schemas
        self.rows_per_part, self.pool, self.where = rows_per_part, pool, where
        self.attempt = uuid.uuid4().hex[:12]
        self.shards = ShardWriter(store, stem=f"shard-{block:09d}", attempt=self.attempt)
        self.tables: dict[str, list[pa.Table]] = {}
        self.elsewhere: dict[str, str] = {}  # key -> shard of images other blocks of the entry wrote

    def add_images(self, images: Iterable[tuple[str, Image.Image | bytes]]) -> None:
        for key, png in _encoded(images, self.pool):
            self.shards.add(key, png)

    def add_shards(self, shards: dict[str, list[str]]) -> None:
        """Name images that other blocks of the entry wrote ({shard: keys}), so that this block's
        tables get their ``shard`` columns; a key drawn twice is an error."""
        for shard, keys in shards.items():
            for key in keys:
                if key in self.elsewhere or key in self.shards.shards:
                    raise ValueError(f"{self.where}: image key {key!r} was rendered twice".lstrip(": "))
                self.elsewhere[key] = shard

    def add_tables(self, tables: dict[str, pa.Table]) -> None:
        for partition, table in tables.items():
            if not table.num_rows:
                continue  # a batch with no rows for the entry has no columns either
            if self.schemas is not None:
                if partition not in self.schemas:
                    raise ValueError(f"{self.where}: partition {partition!r} is not declared "
                                     f"(declared: {', '.join(map(repr, self.schemas)) or 'none'})")
                table = conform(table, self.schemas[partition], f"{self.where} partition {partition!r}".strip())
            self.tables.setdefault(partition, []).append(table)

    def close(self, stats: dict[str, Any] | None = None) -> BlockRecord:
        """Write the tables; return the block's record (all its files are written by then)."""
        record = BlockRecord(block=self.block, stats=dict(stats or {}))
        self.shards.close()
        record.files.extend(self.shards.files)
        record.images = self.shards.written
        shards = {**self.elsewhere, **self.shards.shards}
        for partition in sorted(self.tables):
            table = pa.concat_tables(self.tables[partition])
            if shards:
                table = add_shard_columns(table, shards)
            folder = f"{partition}/" if partition else ""
            for chunk, start in enumerate(range(0, table.num_rows, self.rows_per_part)):
                part = table.slice(start, self.rows_per_part)
                final = folder + part_name(self.block, chunk)
                size = self.store.write_table(f"{final}.{self.attempt}", part)
                record.files.append(FileRecord(f"{final}.{self.attempt}", final, part.num_rows, size))
                if not is_sidecar(final):  # the entry's rows are its own table's
                    record.rows += part.num_rows
        self.tables = {}
        return record

    def abort(self) -> None:
        """Stop: what was written stays unrecorded, and goes with the staging folder."""
        self.shards.abort()
        self.tables = {}


def write_result(store: Store, block: int, result: Result, schemas: dict[str, pa.Schema] | None = None,
                 rows_per_part: int = 100_000, pool: Executor | None = None, where: str = "",
                 shards: dict[str, list[str]] | None = None) -> BlockRecord:
    """Write one block of one entry (a whole :class:`Result`) into its staging folder
    ``store``; return its record. ``shards`` names the images other blocks of the entry wrote
    ({shard: keys}) for the tables' ``shard`` columns. Nothing is written for a failed result."""
    if result.error is not None:
        return BlockRecord(block=block, stats=dict(result.stats), error=result.error)
    writer = BlockWriter(store, block, schemas, rows_per_part, pool, where)
    try:
        writer.add_shards(shards or {})
        writer.add_images(result.images)
        writer.add_tables(result.tables)
        return writer.close(result.stats)
    except BaseException:
        writer.abort()
        raise


KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


class ShardWriter:
    """Rendered images as WebDataset-style tar shards: ``_shards/<stem>-00000.tar`` of ``<key>.png``,
    in the entry folder ``store``.

    The folder's leading underscore makes Parquet readers (pandas, pyarrow, polars, duckdb)
    skip it, as they skip ``_SUCCESS``: ``pd.read_parquet(<entry>)`` keeps working. A shard
    is built in memory (at most ``max_bytes``) and written whole, so a shard file is always
    complete; with an ``attempt`` it is staged as ``<name>.<attempt>`` (see
    :class:`StagedEntry`), while ``shards`` maps each key to the final name, relative to the
    entry folder.
    """

    def __init__(self, store: Store | Any, max_count: int = 1000, max_bytes: int = 256 << 20,
                 stem: str = "shard", attempt: str | None = None):
        if not isinstance(store, Store):  # a local ``.../_shards`` folder: its parent is the entry
            store = Store.open(Path(store).parent)
        self.store, self.stem, self.attempt = store, stem, attempt
        self.max_count, self.max_bytes = max_count, max_bytes
        self.index = 0
        self.count = 0
        self.bytes = 0
        self.buf: io.BytesIO | None = None
        self.tar: tarfile.TarFile | None = None
        self.shards: dict[str, str] = {}  # key -> shard path relative to the entry folder
        self.files: list[FileRecord] = []
        self.written = 0

    @property
    def name(self) -> str:
        return f"{SHARDS}/{self.stem}-{self.index:05d}.tar"

    def add(self, key: str, image: Image.Image | bytes) -> str:
        """Append ``<key>.png`` (a PIL image, or PNG bytes encoded elsewhere); return the shard
        (relative to the entry folder) that holds it."""
        if not KEY_PATTERN.match(key):
            raise ValueError(f"image key {key!r} must be letters, digits, '_' or '-' (WebDataset keys have no dots)")
        if key in self.shards:
            raise ValueError(f"image key {key!r} was rendered twice")
        data = encode_png(image)
        if self.tar is not None and (self.count >= self.max_count or self.bytes + len(data) > self.max_bytes):
            self._close_shard()
        if self.tar is None:
            self.buf = io.BytesIO()
            self.tar = tarfile.open(fileobj=self.buf, mode="w")
        info = tarfile.TarInfo(f"{key}.png")
        info.size = len(data)
        info.mtime = 0  # identical inputs give identical shards
        self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.bytes += len(data)
        self.written += 1
        self.shards[key] = self.name
        return self.name

    def _close_shard(self) -> None:
        assert self.tar is not None and self.buf is not None
        self.tar.close()
        final = self.name
        staged = f"{final}.{self.attempt}" if self.attempt else final
        size = self.store.write_bytes(staged, self.buf.getvalue())
        self.files.append(FileRecord(staged, final, self.count, size))
        self.tar, self.buf = None, None
        self.index += 1
        self.count = self.bytes = 0

    def close(self) -> None:
        if self.tar is not None:
            self._close_shard()

    def abort(self) -> None:
        self.tar, self.buf = None, None


def add_shard_columns(table: pa.Table, shards: dict[str, str]) -> pa.Table:
    """For every ``key`` / ``<prefix>_key`` column, add ``shard`` / ``<prefix>_shard`` after it."""
    for name in list(table.column_names):
        if name != "key" and not name.endswith("_key"):
            continue
        shard_name = name[:-3] + "shard"
        values = [None if k is None else shards.get(k) for k in table.column(name).to_pylist()]
        table = table.add_column(table.column_names.index(name) + 1, shard_name, pa.array(values, pa.string()))
    return table


# ----------------------------------------------------------------------------- ledger and commit


class StagedEntry:
    """One entry on its way to ``<base>/<entry>``: the blocks written so far, and the commit.

    ``layout`` says how the entry's work is cut into blocks (block size, groups of units); a
    staging folder left by a run with another key or layout is discarded, never mixed in.
    """

    def __init__(self, store: Store, entry: str, key: dict, layout: dict | None = None, base: str = ""):
        self.store, self.entry, self.key = store, entry, key
        prefix = f"{base}/" if base else ""
        self.final = f"{prefix}{entry}"
        self.staging = f"{prefix}{STAGING}/{entry}"
        self.marker = {"key": key["key"], "layout": layout or {}}
        self.folder = store.child(self.staging)

    def open(self) -> dict[int, BlockRecord]:
        """The blocks recorded by an earlier run with the same key and layout (then kept), or
        none (the staging folder is started afresh)."""
        if self.store.read_json(f"{self.staging}/{KEY}") == self.marker:
            records = {}
            for rel in self.folder.files(LEDGER):
                if not re.fullmatch(r"block-\d+\.json", rel.rsplit("/", 1)[-1]):
                    continue  # a record whose write was cut short (its temporary file) is not in
                data = self.folder.read_json(rel)
                if isinstance(data, dict):
                    record = BlockRecord.from_json(data)
                    records[record.block] = record
            return records
        self.store.delete(self.staging)
        self.folder.write_json(KEY, self.marker)
        return {}

    def record(self, record: BlockRecord) -> None:
        """Add a finished block to the ledger, durably (its files are already written)."""
        self.folder.write_json(f"{LEDGER}/block-{record.block:09d}.json", record.to_json(), indent=None)

    def forget(self, blocks: Iterable[int]) -> None:
        """Drop blocks from the ledger (they will be computed again)."""
        for block in blocks:
            self.folder.delete(f"{LEDGER}/block-{block:09d}.json")

    def commit(self, records: Iterable[BlockRecord], marker: dict | None = None) -> str:
        """Rename the recorded files into ``<base>/<entry>`` and seal it with ``_SUCCESS``."""
        files = [f for r in sorted(records, key=lambda r: r.block) for f in r.files]
        rows = sum(f.rows for f in files if f.final.endswith(".parquet") and not is_sidecar(f.final))
        seal = {**self.key, "rows": rows, **(marker or {})}
        if self.store.local:
            for f in files:
                if self.folder.is_file(f.staged):
                    self.folder.move(f.staged, f.final)
                elif not self.folder.is_file(f.final):  # renamed by a commit that was cut short
                    raise FileNotFoundError(f"{self.folder.display(f.staged)}: a recorded file is missing")
            keep = {f.final for f in files}
            for rel in self.folder.files(recursive=True):
                if rel not in keep and not rel.startswith(f"{LEDGER}/") and rel != KEY:
                    self.folder.delete(rel)  # a block written twice, or a write cut short
            self.folder.delete(LEDGER)
            self.folder.delete(KEY)
            _remove_empty_dirs(self.folder)
            self.store.replace_dir(self.staging, self.final)
        else:
            # Object stores have no folder rename: copy server-side, seal, then drop staging.
            self.store.delete(self.final)
            for f in files:
                self.store.copy(f"{self.staging}/{f.staged}", f"{self.final}/{f.final}")
        self.store.write_text(f"{self.final}/{SUCCESS}", _json(seal))
        if not self.store.local:
            self.store.delete(self.staging)
        return self.final

    def abort(self) -> None:
        """Drop what was staged: nothing of a failed entry may look like output."""
        self.store.delete(self.staging)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def _remove_empty_dirs(store: Store) -> None:
    """Remove the empty folders under a local ``store`` (partitions that only held leftovers)."""
    for root, _, _ in os.walk(store.root, topdown=False):
        if root != store.root:
            try:
                os.rmdir(root)  # fails, as it should, when the folder is not empty
            except OSError:
                pass


def invalidate(store: Store, entry: str) -> None:
    """Un-commit an entry before recomputing it: its ``_SUCCESS`` goes first."""
    store.delete(f"{entry}/{SUCCESS}")
