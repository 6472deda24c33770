"""A run folder as the output contract describes it, read for the report (local or a URI)."""

from __future__ import annotations

import copy
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from jobs.core.base import safe_key
from pipeline.checkpoints import entry_folder
from pipeline.store import Store
from pipeline.writers import SHARDS, SUCCESS, partition_values, read_run_info, table_parts


class Run:
    """A run folder as the output contract describes it, and the report being written."""

    def __init__(self, run_dir: Path | str | Store, out: Path):
        self.store = run_dir if isinstance(run_dir, Store) else Store.open(run_dir)
        self.out = Path(out)
        self.name = self.store.display().rstrip("/").rsplit("/", 1)[-1]
        self.info = read_run_info(self.store)
        self.label_names: list[str] | None = (self.info.get("dataset") or {}).get("label_names")
        self._extracted: dict[str, dict[str, str]] = {}
        # With a checkpoint series: the checkpoint whose tables and images this Run reads (see ``at``).
        self.checkpoint: str | None = None

    @property
    def checkpoints(self) -> list[str]:
        """The names of the run's checkpoint series, in order ([] for a model of one weights file)."""
        return [c["name"] for c in (self.info.get("model") or {}).get("checkpoints") or []]

    def at(self, checkpoint: str | None) -> Run:
        """This run read at one checkpoint of its series: tables and images of ``<entry>/checkpoint=<name>``."""
        other = copy.copy(self)
        other.checkpoint = checkpoint
        return other

    def folder(self, entry: str) -> str:
        """Where the entry's table is read from: the entry, or its folder of this Run's checkpoint."""
        return entry_folder(entry, self.checkpoint)

    @property
    def analyses(self) -> dict[str, dict]:
        return self.info.get("analyses") or {}

    def committed(self, entry: str) -> bool:
        return self.store.is_file(f"{entry}/{SUCCESS}")

    def parts(self, entry: str) -> list[str]:
        """The entry's Parquet parts (paths relative to the run), partitions included, sorted;
        sidecar tables (folders starting with ``_``, as ``probes/_heads``) are not among them."""
        folder = self.folder(entry)
        return table_parts(self.store, folder)

    def schema(self, part: str):
        with self.store.open_input(part) as f:
            return pq.read_schema(f)

    def table(self, entry: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        frames = []
        for f in self.parts(entry):
            t = self.store.read_table(f, columns=list(columns) if columns else None)
            df = t.to_pandas()
            # Hive partitions (features/layer=layer3/...) as columns.
            for key, value in partition_values(f[len(self.folder(entry)) + 1:]).items():
                df[key] = value
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def label(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "unlabelled"
        i = int(value)
        if self.label_names and 0 <= i < len(self.label_names):
            return self.label_names[i]
        return str(i)

    def images(self, entry: str) -> dict[str, str]:
        """{key: path relative to the report} of the entry's rendered images, copied out once."""
        source = self.folder(entry)
        if source not in self._extracted:
            found: dict[str, str] = {}
            name = safe_key(source)
            folder = self.out / "img" / name
            for shard in [f for f in self.store.files(f"{source}/{SHARDS}") if f.endswith(".tar")]:
                with self.store.open_input(shard) as handle, tarfile.open(fileobj=handle) as tar:
                    for member in tar:
                        member_name = Path(member.name).name
                        # Only plain PNG files with safe names; anything else in a tar is ignored.
                        if (not member.isfile() or not member_name.endswith(".png")
                                or safe_key(member_name[:-4]) != member_name[:-4]):
                            continue
                        folder.mkdir(parents=True, exist_ok=True)
                        data = tar.extractfile(member)
                        if data is not None:
                            (folder / member_name).write_bytes(data.read())
                            found[member_name[:-4]] = f"img/{name}/{member_name}"
            self._extracted[source] = found
        return self._extracted[source]

    def picture(self, name: str, pixels: np.ndarray) -> str:
        """Write a picture the report draws itself (uint8 (h, w, 3)) as ``img/report/<name>.png``;
        its path relative to the report."""
        from PIL import Image

        folder = self.out / "img" / "report"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels, np.uint8)).save(folder / f"{safe_key(name)}.png")
        return f"img/report/{safe_key(name)}.png"

    def image(self, entry: str, key: Any) -> str | None:
        return None if key is None or (isinstance(key, float) and np.isnan(key)) else self.images(entry).get(str(key))
