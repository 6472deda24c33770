"""The result path without Ray: blocks written by workers, the ledger, the commit, resume.

What the map, reduce and model stages share (``pipeline.writers``): a block written twice
counts once, a commit cut short finishes on the next try, a staging folder of other
inputs is never mixed in, and every table matches the schema its analysis declares.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from jobs import REGISTRY
from pipeline.errors import UserError
from pipeline.execute import covered_blocks
from pipeline.store import Store
from pipeline.writers import (
    SUCCESS,
    BlockRecord,
    Result,
    StagedEntry,
    conform,
    write_result,
)

KEY = {"key": "sha256:abc", "type": "features", "dataset": "d", "model": "m"}


def block_result(start: int, n: int, images: bool = True) -> Result:
    ids = [f"img{start + i:03d}" for i in range(n)]
    table = pa.table({"image_id": ids, "value": np.arange(start, start + n, dtype=np.int64), "key": ids})
    pics = [(i, Image.new("RGB", (2, 2), (start + k, 0, 0))) for k, i in enumerate(ids)] if images else []
    return Result(tables={"layer=a": table}, images=pics)


def test_a_block_written_twice_is_committed_once(tmp_path):
    store = Store.open(tmp_path / "out")
    entry = StagedEntry(store, "features", KEY, {"block_rows": 4})
    assert entry.open() == {}
    records = {}
    for start in (0, 4, 8):
        records[start] = write_result(entry.folder, start, block_result(start, 4))
        entry.record(records[start])
    # Block 4 again (a retried task whose first attempt also finished writing): new attempt
    # id, so no file is overwritten; the ledger keeps the record it was given last.
    again = write_result(entry.folder, 4, block_result(4, 4))
    assert {f.staged for f in again.files}.isdisjoint(f.staged for f in records[4].files)
    entry.record(again)
    records[4] = again
    # A write cut short leaves a temporary file; it must not survive the commit either.
    (tmp_path / "out" / ".staging" / "features" / "layer=a" / ".part-x.tmp-1").write_bytes(b"half")

    reopened = StagedEntry(store, "features", KEY, {"block_rows": 4}).open()
    assert sorted(reopened) == [0, 4, 8] and reopened[4].files == again.files
    entry.commit(reopened.values())

    final = tmp_path / "out" / "features"
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()) == [
        "_SUCCESS", "_shards/shard-000000000-00000.tar", "_shards/shard-000000004-00000.tar",
        "_shards/shard-000000008-00000.tar", "layer=a/part-000000000-000.parquet",
        "layer=a/part-000000004-000.parquet", "layer=a/part-000000008-000.parquet"]
    df = pd.read_parquet(final / "layer=a")
    assert df.value.tolist() == list(range(12)), "rows lost, duplicated or out of dataset order"
    assert json.loads((final / SUCCESS).read_text())["rows"] == 12
    assert not (tmp_path / "out" / ".staging" / "features").exists()
    # Every row finds its image through its shard column.
    row = df.iloc[5]
    with tarfile.open(final / row.shard) as tar:
        assert Image.open(io.BytesIO(tar.extractfile(f"{row.key}.png").read())).getpixel((0, 0)) == (5, 0, 0)


def test_a_commit_cut_short_finishes_on_the_next_try(tmp_path):
    store = Store.open(tmp_path / "out")
    entry = StagedEntry(store, "e", KEY)
    entry.open()
    records = [write_result(entry.folder, b, block_result(b, 3, images=False)) for b in (0, 3)]
    for r in records:
        entry.record(r)
    # The first commit renamed one file to its final name, then the process died.
    first = records[0].files[0]
    entry.folder.move(first.staged, first.final)
    resumed = StagedEntry(store, "e", KEY)
    resumed.commit(resumed.open().values())
    assert pd.read_parquet(tmp_path / "out" / "e").value.tolist() == list(range(6))


def test_a_ledger_record_cut_short_does_not_count(tmp_path):
    store = Store.open(tmp_path / "out")
    entry = StagedEntry(store, "e", KEY)
    entry.open()
    record = write_result(entry.folder, 0, block_result(0, 3, images=False))
    entry.record(record)
    # The driver died between writing a record's temporary file and renaming it.
    ledger = tmp_path / "out" / ".staging" / "e" / "_ledger"
    (ledger / ".block-000000003.json.tmp-1a2b3c4d").write_text(json.dumps({**record.to_json(), "block": 3}))
    assert sorted(StagedEntry(store, "e", KEY).open()) == [0]


def test_staging_of_other_inputs_is_discarded(tmp_path):
    store = Store.open(tmp_path / "out")
    entry = StagedEntry(store, "e", KEY, {"block_rows": 4})
    entry.open()
    entry.record(write_result(entry.folder, 0, block_result(0, 4)))
    assert sorted(StagedEntry(store, "e", KEY, {"block_rows": 4}).open()) == [0]
    # Another block size, another key: the old blocks are not mixed in.
    assert StagedEntry(store, "e", KEY, {"block_rows": 8}).open() == {}
    assert StagedEntry(store, "e", {**KEY, "key": "sha256:other"}, {"block_rows": 8}).open() == {}
    assert not list((tmp_path / "out" / ".staging" / "e").rglob("*.parquet*"))
    # A staging folder without a key (left by an older version, or junk) is started afresh.
    junk = tmp_path / "out" / ".staging" / "j"
    junk.mkdir(parents=True)
    (junk / "part-00000.parquet").write_bytes(b"half a file")
    assert StagedEntry(store, "j", KEY).open() == {}
    assert not (junk / "part-00000.parquet").exists()


def test_covered_blocks_needs_an_exact_tiling():
    def rec(start: int, size: int) -> BlockRecord:
        return BlockRecord(block=start, size=size)

    # 20 rows in blocks of 8: block 0 whole, block 1 in two pieces, block 2 (4 rows) whole.
    records = {r.block: r for r in (rec(0, 8), rec(8, 5), rec(13, 3), rec(16, 4))}
    assert covered_blocks(records, 8, 20) == ({0, 1, 2}, [])
    # A piece missing: the block is recomputed, and its other pieces are dropped.
    records = {r.block: r for r in (rec(0, 8), rec(8, 5), rec(16, 4))}
    assert covered_blocks(records, 8, 20) == ({0, 2}, [8])
    assert covered_blocks({}, 8, 20) == (set(), [])


def test_tables_must_match_the_declared_schema():
    schema = pa.schema([("image_id", pa.string()), ("score", pa.float32()), ("top", pa.list_(pa.int64()))])
    exact = pa.table({"image_id": ["a"], "score": pa.array([0.5], pa.float32()), "top": [[1, 2]]})
    assert conform(exact, schema, "x") is exact
    # A block whose values were all missing has no types to infer: those columns are cast.
    blank = conform(pa.table({"image_id": [None], "score": pa.array([0.5], pa.float32()), "top": [[None]]}),
                    schema, "x")
    assert blank.schema.equals(schema) and blank.column("image_id").to_pylist() == [None]
    with pytest.raises(ValueError, match=r"x: the table does not match its declared schema; missing \['top'\]; "
                                         r"not declared \['tops'\]"):
        conform(pa.table({"image_id": ["a"], "score": [1.0], "tops": [[1]]}), schema, "x")
    # Another type is never converted silently (float64 -> float32 would change results).
    with pytest.raises(ValueError, match="score is double, declared float"):
        conform(pa.table({"image_id": ["a"], "score": [0.5], "top": [[1]]}), schema, "x")


def test_every_dataset_pass_declares_its_schema():
    # That every analysis returns exactly what it declares, the end-to-end test of every
    # registered analysis shows: each block any worker writes is checked against it.
    for name, cls in REGISTRY.items():
        fields = cls.Params.model_fields
        raw = {"type": name, **({"layers": ["l"]} if "layers" in fields else {}),
               **({"layer": "l"} if "layer" in fields else {})}
        analysis = cls(cls.Params.model_validate(raw))
        try:
            reads_entries = bool(analysis.sources([analysis.params]))
        except ValueError:  # it reads other entries' tables, and there are none here
            reads_entries = True
        if cls.stage == "model" or reads_entries:
            assert analysis.schema() is None, name  # no pass over the dataset
            continue
        schemas = analysis.schema()
        assert schemas and all(isinstance(s, pa.Schema) for s in schemas.values()), name


def test_store_refuses_what_no_filesystem_serves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no filesystem can serve 'nosuchfs://bucket/run'"):
        Store.open("nosuchfs://bucket/run")
    assert not (tmp_path / "nosuchfs:").exists()
    local = Store.open(f"file://{tmp_path}/x")
    assert local.local and local.root == f"{tmp_path}/x"
    local.write_json("a/b.json", {"n": 1})
    assert json.loads((tmp_path / "x" / "a" / "b.json").read_text()) == {"n": 1}
    assert local.files(recursive=True) == ["a/b.json"] and local.read_json("missing.json") is None
    assert [p.name for p in Path(tmp_path / "x" / "a").iterdir()] == ["b.json"], "a temporary file was left"


def test_blocks_are_whole_batches_and_small_datasets_get_several(tmp_path, image_folder, resnet20_weights):
    from pipeline.execute import BLOCKS_PER_WORKER, block_rows
    from pipeline.manifest import load_manifest

    from .conftest import write_manifest

    path = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                          dataset={"kind": "image_folder", "root": str(image_folder)})

    def rows(images: int, **execution) -> int:
        return block_rows(load_manifest(path, [f"execution.{k}={v}" for k, v in execution.items()]), images)

    assert rows(10_000, batch_size=256, decode_batch_size="auto") == 1024  # CIFAR: ~32 MiB of pixels
    assert rows(10_000, batch_size=300, decode_batch_size="auto") == 1200  # rounded up to whole batches
    assert rows(1000, batch_size=64, decode_batch_size="auto") == 128      # 8 blocks, not 1
    assert rows(1000, batch_size=64, decode_batch_size="auto", workers=2) == 64
    assert -(-1000 // rows(1000, batch_size=1, decode_batch_size="auto")) == BLOCKS_PER_WORKER
    assert rows(1000, batch_size=8, decode_batch_size=20) == 24            # a number is kept, in whole batches
