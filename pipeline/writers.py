"""Writers: Parquet parts, ``_SUCCESS`` markers, run.json -- every file appears only complete.

Each analysis entry is written into a staging folder (``<output>/.staging/<entry>``), then
renamed to ``<output>/<entry>`` and sealed with ``_SUCCESS`` (written last, itself by
write-then-rename). A folder without ``_SUCCESS`` is incomplete, whatever it holds.
``_SUCCESS`` records the entry's key (its parameters, the dataset fingerprint and the
model hash): a rerun skips an entry whose key matches and recomputes one whose key does not.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SUCCESS = "_SUCCESS"
STAGING = ".staging"
SHARDS = "_shards"
INPUTS = ".inputs"  # a reduce entry's committed partials, kept until the entry itself commits


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_table(path: Path, table: pa.Table) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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


def read_success(folder: Path) -> dict | None:
    """The committed key of an analysis folder, or None when it is not complete."""
    marker = Path(folder) / SUCCESS
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except ValueError:
        return None


class EntryWriter:
    """Buffers one analysis entry's rows per partition and writes Parquet parts of bounded size."""

    def __init__(self, output: Path, entry: str, rows_per_part: int = 100_000):
        self.output = Path(output)
        self.entry = entry
        self.rows_per_part = rows_per_part
        self.staging = self.output / STAGING / entry
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.buffers: dict[str, list[pa.Table]] = defaultdict(list)
        self.buffered: dict[str, int] = defaultdict(int)
        self.parts: dict[str, int] = defaultdict(int)
        self.rows = 0
        self._shards: ShardWriter | None = None

    @property
    def shards(self) -> ShardWriter:
        """The entry's image shards (``_shards/``), opened on the first image."""
        if self._shards is None:
            self._shards = ShardWriter(self.staging / SHARDS)
        return self._shards

    def add_image(self, key: str, image: Image.Image | bytes) -> None:
        """Store a rendered image; rows added later find it through their ``key`` columns."""
        self.shards.add(key, image)

    def add(self, partition: str, columns: dict[str, Any] | pa.Table) -> None:
        """Buffer rows; ``key`` / ``<prefix>_key`` columns get their ``shard`` column when the
        entry has images (add the images first)."""
        table = columns if isinstance(columns, pa.Table) else pa.table(columns)
        if self._shards is not None:
            table = add_shard_columns(table, self._shards.shards)
        self.buffers[partition].append(table)
        self.buffered[partition] += table.num_rows
        self.rows += table.num_rows
        if self.buffered[partition] >= self.rows_per_part:
            self._flush(partition)

    def _flush(self, partition: str) -> None:
        if not self.buffers[partition]:
            return
        table = pa.concat_tables(self.buffers[partition])
        folder = self.staging / partition if partition else self.staging
        while table.num_rows:
            part, table = table.slice(0, self.rows_per_part), table.slice(self.rows_per_part)
            atomic_write_table(folder / f"part-{self.parts[partition]:05d}.parquet", part)
            self.parts[partition] += 1
        self.buffers[partition] = []
        self.buffered[partition] = 0

    def abort(self) -> None:
        """Drop what was staged: nothing of a failed entry may look like output."""
        if self._shards is not None:
            self._shards.abort()
        shutil.rmtree(self.staging, ignore_errors=True)

    @property
    def images(self) -> int:
        return self._shards.written if self._shards is not None else 0

    @property
    def shard_count(self) -> int:
        return 0 if self._shards is None else self._shards.index + (1 if self._shards.count else 0)

    def commit(self, key: dict) -> Path:
        """Flush, close the image shards, move the staging folder into place, then ``_SUCCESS``."""
        for partition in list(self.buffers):
            self._flush(partition)
        if self._shards is not None:
            self._shards.close()
        final = self.output / self.entry
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.staging, final)
        atomic_write_text(final / SUCCESS, json.dumps({**key, "rows": self.rows}, indent=1, sort_keys=True))
        return final


KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


class ShardWriter:
    """Rendered images as WebDataset-style tar shards: ``_shards/shard-00000.tar`` of ``<key>.png``.

    The folder's leading underscore makes Parquet readers (pandas, pyarrow, polars, duckdb)
    skip it, as they skip ``_SUCCESS``: ``pd.read_parquet(<entry>)`` keeps working. A shard is
    written under a temporary name and renamed when full, so a shard file is always whole;
    the folder itself lives in the entry's staging folder until commit.
    """

    def __init__(self, folder: Path, max_count: int = 1000, max_bytes: int = 256 << 20):
        self.folder = Path(folder)
        self.max_count, self.max_bytes = max_count, max_bytes
        self.index = 0
        self.count = 0
        self.bytes = 0
        self.tar: tarfile.TarFile | None = None
        self.tmp: Path | None = None
        self.shards: dict[str, str] = {}  # key -> shard path relative to the entry folder
        self.written = 0

    @property
    def name(self) -> str:
        return f"{SHARDS}/shard-{self.index:05d}.tar"

    def add(self, key: str, image: Image.Image | bytes) -> str:
        """Append ``<key>.png`` (a PIL image, or PNG bytes encoded elsewhere); return the shard
        (relative to the entry folder) that holds it."""
        if not KEY_PATTERN.match(key):
            raise ValueError(f"image key {key!r} must be letters, digits, '_' or '-' (WebDataset keys have no dots)")
        if key in self.shards:
            raise ValueError(f"image key {key!r} was rendered twice")
        if isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
        if self.tar is not None and (self.count >= self.max_count or self.bytes + len(data) > self.max_bytes):
            self._close_shard()
        if self.tar is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.tmp = self.folder / f".shard-{self.index:05d}.tar.tmp"
            self.tar = tarfile.open(self.tmp, "w")
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
        assert self.tar is not None and self.tmp is not None
        self.tar.close()
        os.replace(self.tmp, self.folder / f"shard-{self.index:05d}.tar")
        self.tar, self.tmp = None, None
        self.index += 1
        self.count = self.bytes = 0

    def close(self) -> None:
        if self.tar is not None:
            self._close_shard()

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        if self.tmp is not None and self.tmp.exists():
            self.tmp.unlink()


def add_shard_columns(table: pa.Table, shards: dict[str, str]) -> pa.Table:
    """For every ``key`` / ``<prefix>_key`` column, add ``shard`` / ``<prefix>_shard`` after it."""
    for name in list(table.column_names):
        if name != "key" and not name.endswith("_key"):
            continue
        shard_name = name[:-3] + "shard"
        values = [None if k is None else shards.get(k) for k in table.column(name).to_pylist()]
        table = table.add_column(table.column_names.index(name) + 1, shard_name, pa.array(values, pa.string()))
    return table


def invalidate(output: Path, entry: str) -> None:
    """Un-commit an entry before recomputing it: its ``_SUCCESS`` goes first."""
    folder = Path(output) / entry
    marker = folder / SUCCESS
    if marker.exists():
        marker.unlink()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
