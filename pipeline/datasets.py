"""Datasets: list what a manifest names as an index table (``pipeline.decode`` reads it).

Listing (on the driver, cheap) yields one row per image: ``image_id`` (stable across runs:
the path relative to the root, or the dataset's own id), ``label`` (-1 when unlabelled)
and where its bytes are (``ref``: a file, a tar member at an offset, or a Parquet row).
"""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.manifest import (
    DatasetSpec,
    ImageFolderDataset,
    ListDataset,
    ParquetDataset,
    ShapesDataset,
    WebDatasetDataset,
)

INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("ref", pa.string()),      # "file" | "tar" | "parquet"
    ("source", pa.string()),   # file path, tar path or Parquet file path
    ("offset", pa.int64()),    # tar member data offset, Parquet row; -1 for plain files
    ("size", pa.int64()),      # bytes (files, tar members); -1 when unknown
])


@dataclass
class DatasetIndex:
    """Every image of a dataset (after sample and limit), plus what the listing learnt."""

    table: pa.Table
    label_names: list[str] | None = None
    errors: list[dict] = field(default_factory=list)
    extra: pa.Table | None = None  # per-image metadata such as object boxes, keyed by image_id

    @property
    def fingerprint(self) -> str:
        """sha256 over ids, labels, refs and sizes: changes when the selected images change."""
        h = hashlib.sha256()
        for col in ("image_id", "label", "ref", "source", "offset", "size"):
            arr = self.table.column(col).combine_chunks()
            for buf in arr.buffers():
                if buf is not None:
                    h.update(buf)
        return "sha256:" + h.hexdigest()

    def __len__(self) -> int:
        return self.table.num_rows


def _table(rows: dict[str, list]) -> pa.Table:
    return pa.table(rows, schema=INDEX_SCHEMA)


def _file_rows(paths: list[Path], ids: list[str], labels: list[int]) -> dict[str, list]:
    sizes = []
    for p in paths:
        try:
            sizes.append(p.stat().st_size)
        except OSError:
            sizes.append(-1)
    return {
        "image_id": ids, "label": labels, "ref": ["file"] * len(ids),
        "source": [str(p) for p in paths], "offset": [-1] * len(ids), "size": sizes,
    }


def _image_folder(spec: ImageFolderDataset | ShapesDataset, extensions: list[str]) -> DatasetIndex:
    root = spec.root
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"dataset.root: {root} has no class folders (expected root/<class>/<image>)")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    paths, ids, labels = [], [], []
    for label, cls in enumerate(classes):
        for p in sorted((root / cls).rglob("*")):
            if p.suffix.lower() in exts and not p.name.startswith("."):
                paths.append(p)
                ids.append(p.relative_to(root).as_posix())
                labels.append(label)
    if not paths:
        raise UserError(f"dataset.root: no images with extensions {sorted(exts)} under {root}")
    return DatasetIndex(_table(_file_rows(paths, ids, labels)), label_names=classes)


def _list(spec: ListDataset) -> DatasetIndex:
    root = spec.root or spec.path.parent
    text = spec.path.read_text(encoding="utf-8")
    entries: list[tuple[str, str, int]] = []  # (path, id, label)
    if spec.path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise UserError(f"dataset.path: CSV {spec.path} needs a 'path' column (found {reader.fieldnames})")
        for n, row in enumerate(reader, start=2):
            label = row.get("label")
            try:
                lab = int(label) if label not in (None, "") else -1
            except ValueError:
                raise UserError(f"dataset.path: {spec.path} line {n}: label {label!r} is not an integer") from None
            entries.append((row["path"], row.get("image_id") or row["path"], lab))
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, line, -1))
    if not entries:
        raise UserError(f"dataset.path: {spec.path} lists no images")
    ids = [e[1] for e in entries]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"dataset.path: {spec.path} lists image id {dup!r} more than once")
    paths = [Path(e[0]) if Path(e[0]).is_absolute() else root / e[0] for e in entries]
    return DatasetIndex(_table(_file_rows(paths, ids, [e[2] for e in entries])))


def _column(table: pa.Table | None, name: str) -> list:
    """Column ``name`` of ``table`` as a list; ``table`` holds the spec's named columns, None when it names none."""
    if table is None:
        raise ValueError(f"column {name!r} was not read")
    return table.column(name).to_pylist()


def _parquet(spec: ParquetDataset) -> DatasetIndex:
    files = sorted(spec.path.rglob("*.parquet")) if spec.path.is_dir() else [spec.path]
    if not files:
        raise UserError(f"dataset.path: no .parquet files under {spec.path}")
    rows: dict[str, list] = {k: [] for k in INDEX_SCHEMA.names}
    for f in files:
        schema = pq.read_schema(f)
        wanted = [c for c in (spec.id_column, spec.label_column, spec.path_column, spec.image_column) if c]
        for c in wanted:
            if c not in schema.names:
                field_name = next(k for k in ("id_column", "label_column", "path_column", "image_column")
                                  if getattr(spec, k) == c)
                raise UserError(f"dataset.{field_name}: column {c!r} is not in {f} (columns: {schema.names})")
        cols = [c for c in (spec.id_column, spec.label_column, spec.path_column) if c]
        t = pq.read_table(f, columns=cols) if cols else None
        n = pq.ParquetFile(f).metadata.num_rows
        rel = f.relative_to(spec.path).as_posix() if spec.path.is_dir() else f.name
        if spec.id_column:
            ids = [str(v) for v in _column(t, spec.id_column)]
        else:
            ids = [f"{rel}#{i}" for i in range(n)]
        if spec.label_column:
            labels = [-1 if v is None else int(v) for v in _column(t, spec.label_column)]
        else:
            labels = [-1] * n
        rows["image_id"] += ids
        rows["label"] += labels
        if spec.path_column:
            base = spec.root or f.parent
            paths = [Path(p) if Path(p).is_absolute() else base / p for p in _column(t, spec.path_column)]
            file_rows = _file_rows(paths, ids, labels)
            for k in ("ref", "source", "offset", "size"):
                rows[k] += file_rows[k]
        else:
            rows["ref"] += ["parquet"] * n
            rows["source"] += [str(f)] * n
            rows["offset"] += list(range(n))
            rows["size"] += [-1] * n
    if len(set(rows["image_id"])) != len(rows["image_id"]):
        raise UserError(f"dataset.id_column: ids in {spec.path} are not unique")
    return DatasetIndex(_table(rows))


_IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "ppm", "gif", "tif", "tiff"}


def _webdataset(spec: WebDatasetDataset) -> DatasetIndex:
    shards = sorted(spec.path.rglob("*.tar")) if spec.path.is_dir() else [spec.path]
    if not shards:
        raise UserError(f"dataset.path: no .tar shards under {spec.path}")
    rows: dict[str, list] = {k: [] for k in INDEX_SCHEMA.names}
    errors: list[dict] = []
    seen: dict[str, Path] = {}
    for shard in shards:
        images: dict[str, tarfile.TarInfo] = {}
        labels: dict[str, int] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    name = m.name
                    base = name.rsplit("/", 1)[-1]
                    key_part, _, ext = base.partition(".")
                    key = (name.rsplit("/", 1)[0] + "/" if "/" in name else "") + key_part
                    ext = ext.lower()
                    if ext in _IMAGE_EXTS and key not in images:
                        images[key] = m
                    elif ext == spec.label_extension:
                        f = tar.extractfile(m)
                        text = f.read().decode("utf-8", "replace").strip() if f else ""
                        try:
                            labels[key] = int(text)
                        except ValueError:
                            errors.append({"image_id": key, "stage": "list",
                                           "error": f"{shard}: {name} holds {text[:40]!r}, not an integer label"})
        except (tarfile.TarError, OSError, EOFError) as e:
            errors.append({"image_id": shard.name, "stage": "list",
                           "error": f"{shard}: unreadable tar after {len(images)} images: {e}"})
        for key, m in images.items():
            if key in seen:
                raise UserError(f"dataset.path: key {key!r} is in both {seen[key]} and {shard}")
            seen[key] = shard
            rows["image_id"].append(key)
            rows["label"].append(labels.get(key, -1))
            rows["ref"].append("tar")
            rows["source"].append(str(shard))
            rows["offset"].append(m.offset_data)
            rows["size"].append(m.size)
    if not rows["image_id"]:
        raise UserError(f"dataset.path: no image members in {spec.path}")
    return DatasetIndex(_table(rows), errors=errors)


def list_dataset(spec: DatasetSpec) -> DatasetIndex:
    """The index of every image the dataset spec selects (sample, then limit)."""
    if isinstance(spec, ShapesDataset):
        from pipeline.demo import ensure_shapes

        ensure_shapes(spec.root, n=spec.n, size=spec.size, seed=spec.seed)
        index = _image_folder(spec, [".png"])
        index.extra = pq.read_table(spec.root / "boxes.parquet")
    elif isinstance(spec, ImageFolderDataset):
        index = _image_folder(spec, spec.extensions)
    elif isinstance(spec, ListDataset):
        index = _list(spec)
    elif isinstance(spec, ParquetDataset):
        index = _parquet(spec)
    elif isinstance(spec, WebDatasetDataset):
        index = _webdataset(spec)
    else:  # pragma: no cover
        raise TypeError(f"unknown dataset spec {spec!r}")
    table = index.table
    if spec.sample is not None:
        n = min(spec.sample.n, table.num_rows)
        picked = np.sort(np.random.default_rng(spec.sample.seed).choice(table.num_rows, size=n, replace=False))
        table = table.take(pa.array(picked))
    if spec.limit is not None:
        table = table.slice(0, spec.limit)
    index.table = table
    return index
