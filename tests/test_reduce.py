"""The reduce stage on a local Ray: partials committed apart, reductions resumed, shards."""

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

from jobs.dataset.activation_stats import ActivationStats
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest
from pipeline.writers import INPUTS, ShardWriter, add_shard_columns

from .conftest import write_manifest


def run(path: Path, *overrides: str, log=None):
    return run_manifest(load_manifest(path, list(overrides)), log=log or (lambda m: None))


def stats_entry(layers=("layer1", "layer3")):
    return {"type": "activation_stats", "layers": list(layers)}


def test_reduce_is_invariant_to_batching_and_workers(ray_session, resnet20_weights, tmp_path, image_folder):
    tables = []
    for i, (batch, workers) in enumerate([(1, 1), (5, 2)]):
        manifest = write_manifest(tmp_path / f"m{i}.yaml", weights=resnet20_weights, output=str(tmp_path / f"out{i}"),
                                  dataset={"kind": "image_folder", "root": str(image_folder)},
                                  analyses=[stats_entry(), {"type": "predictions"}],
                                  execution={"batch_size": batch, "decode_batch_size": batch, "workers": workers})
        result = run(manifest)
        assert result.ok, result.analyses
        info = result.analyses["activation_stats"]
        assert info["stage"] == "reduce" and info["rows"] == 16 + 64
        assert info["fused_with"] == ["predictions"]  # one pass over the dataset for both
        assert not (tmp_path / f"out{i}" / INPUTS).exists()  # partials go once the entry commits
        tables.append(pd.read_parquet(tmp_path / f"out{i}" / "activation_stats").sort_values(["layer", "channel"]))
    a, b = tables
    assert a[["layer", "channel", "count", "dead"]].equals(b[["layer", "channel", "count", "dead"]])
    for column in ("mean", "std", "min", "max", "zero_fraction"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-5, atol=1e-6)


def test_failed_reduction_keeps_partials_and_resumes_without_a_pass(
        ray_session, resnet20_weights, tmp_path, image_folder, monkeypatch):
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)},
                              analyses=[stats_entry(["layer2"]), {"type": "predictions"}])
    out = tmp_path / "out"
    original = ActivationStats.reduce

    def broken(self, inputs, ctx):
        raise RuntimeError("reduction interrupted")

    monkeypatch.setattr(ActivationStats, "reduce", broken)
    result = run(manifest)
    assert result.status == "failed"
    assert result.analyses["activation_stats"]["status"] == "failed"
    assert "reduction interrupted" in result.analyses["activation_stats"]["error"]
    assert result.analyses["predictions"]["status"] == "complete"  # the other entry is kept
    assert not (out / "activation_stats" / "_SUCCESS").exists()
    assert (out / INPUTS / "activation_stats" / "_SUCCESS").exists()

    monkeypatch.setattr(ActivationStats, "reduce", original)
    logs: list[str] = []
    result = run(manifest, log=logs.append)
    assert result.ok
    assert any("no dataset pass needed): activation_stats" in m for m in logs)
    assert not any(m.startswith("map stage") for m in logs)  # nothing left to compute per image
    assert result.analyses["predictions"]["status"] == "skipped"
    assert (out / "activation_stats" / "_SUCCESS").exists()
    assert len(pd.read_parquet(out / "activation_stats")) == 32
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["analyses"]["activation_stats"]["status"] == "complete"

    # Changed parameters invalidate committed partials as well as the entry.
    result = run(manifest, "analyses[0].layers=[layer3]", log=logs.append)
    assert result.ok and len(pd.read_parquet(out / "activation_stats")) == 64


def test_shard_writer_layout_and_shard_columns(tmp_path):
    writer = ShardWriter(tmp_path / "_shards", max_count=2)
    colours = {}
    for i in range(5):
        colour = (i * 40, 0, 0)
        colours[f"k-{i}"] = colour
        writer.add(f"k-{i}", Image.new("RGB", (3, 2), colour))
    writer.close()
    assert sorted(p.name for p in (tmp_path / "_shards").iterdir()) == [f"shard-0000{i}.tar" for i in range(3)]
    for key, shard in writer.shards.items():
        with tarfile.open(tmp_path / shard) as tar:
            img = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read()))
            assert img.getpixel((0, 0)) == colours[key]
    with pytest.raises(ValueError, match="no dots"):
        writer.add("layer3.2-c0001", Image.new("RGB", (1, 1)))
    with pytest.raises(ValueError, match="twice"):
        writer.add("k-0", Image.new("RGB", (1, 1)))

    table = pa.table({"key": ["k-0", "k-4", None], "grid_key": ["k-1", "missing", "k-2"]})
    table = add_shard_columns(table, writer.shards)
    assert table.column_names == ["key", "shard", "grid_key", "grid_shard"]
    assert table.column("shard").to_pylist() == ["_shards/shard-00000.tar", "_shards/shard-00002.tar", None]
    assert table.column("grid_shard").to_pylist() == ["_shards/shard-00000.tar", None, "_shards/shard-00001.tar"]


def test_rendered_images_are_found_from_the_tables(ray_session, resnet20_weights, tmp_path, image_folder):
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)},
                              analyses=[{"type": "top_patches", "layers": ["layer1", "layer3"], "k": 3,
                                         "channels": "0:4"},
                                        {"type": "neighbours", "layer": "layer3", "k": 2,
                                         "queries": ["class0/000.png", "class2/005.png"]}])
    result = run(manifest)
    assert result.ok, result.analyses
    out = tmp_path / "out"
    top = pd.read_parquet(out / "top_patches")
    assert len(top) == 2 * 4 * 3 and result.analyses["top_patches"]["images"] == 2 * 4 * 3 + 2 * 4
    layer1 = top[top.layer == "layer1"].iloc[0]
    with tarfile.open(out / "top_patches" / layer1.shard) as tar:
        crop = Image.open(io.BytesIO(tar.extractfile(f"{layer1.key}.png").read()))
    x0, y0, x1, y1 = layer1.box
    assert crop.size == (x1 - x0, y1 - y0)
    # The crop is the model's input image at the box (this dataset needs no resize or crop).
    source = np.asarray(Image.open(image_folder / layer1.image_id).convert("RGB"))
    assert np.array_equal(np.asarray(crop), source[y0:y1, x0:x1])
    with tarfile.open(out / "top_patches" / layer1.grid_shard) as tar:
        assert f"{layer1.grid_key}.png" in tar.getnames()

    nb = pd.read_parquet(out / "neighbours")
    assert sorted(set(nb.image_id)) == ["class0/000.png", "class2/005.png"]
    assert set(nb.space) == {"feature", "pixel"} and nb["rank"].max() == 2
    assert (nb.image_id != nb.neighbour_id).all()
    with tarfile.open(out / "neighbours" / nb.shard.iloc[0]) as tar:
        strip = Image.open(io.BytesIO(tar.extractfile(f"{nb.key.iloc[0]}.png").read()))
    assert strip.width > 3 * strip.height - 20  # the query and its two neighbours side by side


def test_unknown_query_ids_fail_before_ray(resnet20_weights, tmp_path, image_folder):
    from pipeline.cli import main as cli

    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)},
                              analyses=[{"type": "neighbours", "layer": "layer3", "queries": ["nope.png"]}])
    assert cli(["validate", str(manifest)]) == 2


def test_neighbours_spread_over_ray_tasks_equal_brute_force(ray_session, resnet20_weights, tmp_path, image_folder,
                                                           monkeypatch):
    from jobs.dataset import neighbours

    from .test_neighbours import brute_force

    monkeypatch.setattr(neighbours, "PARALLEL_MIN", 1)  # tiny: spread anyway, over real tasks
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)},
                              analyses=[{"type": "features", "layers": ["layer3"]},
                                        {"type": "neighbours", "layer": "layer3", "k": 3, "queries": "all",
                                         "spaces": ["feature"], "strips": 2}],
                              execution={"batch_size": 4, "decode_batch_size": 4, "workers": 2})
    result = run(manifest)
    assert result.ok, result.analyses
    out = tmp_path / "out"
    features = pd.read_parquet(out / "features" / "layer=layer3")
    x = np.stack(features.vector.to_numpy()).astype(np.float32)
    ref_d, ref_i = brute_force(x, x, 3, "cosine", exclude=np.arange(len(x)))
    nb = pd.read_parquet(out / "neighbours")
    ids = features.image_id.tolist()
    assert nb.image_id.tolist() == [i for i in ids for _ in range(3)]
    assert nb.neighbour_id.tolist() == [ids[j] for j in ref_i.reshape(-1)]
    np.testing.assert_allclose(nb.distance.to_numpy(), ref_d.reshape(-1), rtol=1e-5, atol=1e-6)
    assert nb.key.notna().sum() == 2 * 3 and result.analyses["neighbours"]["images"] == 2


def test_a_reduction_over_the_driver_memory_budget_is_refused_with_the_fix(ray_session, resnet20_weights, tmp_path,
                                                                           image_folder):
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)},
                              analyses=[{"type": "neighbours", "layer": "layer3", "k": 2}, {"type": "predictions"}],
                              execution={"batch_size": 8, "decode_batch_size": 8, "driver_memory": "2KiB"})
    result = run(manifest)
    entry = result.analyses["neighbours"]
    assert entry["status"] == "failed" and result.analyses["predictions"]["status"] == "complete"
    assert "over execution.driver_memory (0.0 GiB)" in entry["error"] and "queries: {sample" in entry["error"]
    out = tmp_path / "out"
    assert not (out / "neighbours").exists() and (out / INPUTS / "neighbours").exists()  # partials kept
    # With the budget raised, the rerun reduces from the kept partials.
    again = run(manifest, "execution.driver_memory=1GiB")
    assert again.analyses["neighbours"]["status"] == "complete"


def _pictures(entry: Path) -> dict[str, bytes]:
    """Every PNG of an entry's shards, by key (a key in two shards fails)."""
    found: dict[str, bytes] = {}
    for shard in sorted((entry / "_shards").iterdir()):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key = member.name.removesuffix(".png")
                assert key not in found, f"{key} in two shards"
                found[key] = tar.extractfile(member).read()
    return found


def _keys_resolve(entry: Path, table: pd.DataFrame, pictures: dict[str, bytes]) -> None:
    """Every ``*key`` of the table is in the shard its ``*shard`` column names."""
    for column in [c for c in table.columns if c == "key" or c.endswith("_key")]:
        shard_column = column[:-3] + "shard"
        pairs = table[[column, shard_column]].dropna().drop_duplicates()
        assert len(pairs), column
        for shard, keys in pairs.groupby(shard_column)[column]:
            with tarfile.open(entry / shard) as tar:
                assert {f"{k}.png" for k in keys} <= set(tar.getnames())


RENDERING = [{"type": "top_patches", "layers": ["layer1", "layer3"], "k": 3, "channels": "0:6"},
             {"type": "neighbours", "layer": "layer3", "k": 2, "queries": "all", "strips": 7},
             {"type": "embedding", "layers": ["layer3"], "methods": ["pca"], "atlas_cells": 3, "thumb": 8}]


def test_pictures_are_drawn_in_tasks_as_one_driver_side_drawing_would(ray_session, resnet20_weights, tmp_path,
                                                                      image_folder, monkeypatch):
    from jobs.dataset import embedding, neighbours, top_patches
    from pipeline import reduce

    # Small items, so that a tiny dataset still makes several of them, drawn in several tasks.
    monkeypatch.setattr(top_patches, "FETCH_CHUNK", 5)
    monkeypatch.setattr(neighbours, "RENDER_CHUNK", 3)
    monkeypatch.setattr(embedding, "THUMB_CHUNK", 4)
    # Each analysis twice in one run: "<type>" drawn in tasks, "<type>_here" as one group here.
    original = reduce.render_blocks

    def render_blocks(rendered, ctx, folder, where):
        with monkeypatch.context() as m:
            m.setattr(reduce, "TASKS_PER_CPU", 0 if where.endswith("_here") else 2)
            return original(rendered, ctx, folder, where)

    monkeypatch.setattr(reduce, "render_blocks", render_blocks)
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)},
                              analyses=RENDERING + [{**a, "name": f"{a['type']}_here"} for a in RENDERING])
    logs: list[str] = []
    result = run(manifest, log=logs.append)
    assert result.ok, result.analyses
    out = tmp_path / "out"
    for entry in ("top_patches", "neighbours", "embedding"):
        drawn = [m.strip() for m in logs if m.strip().startswith(f"{entry}: drawing")]
        assert len(drawn) == 1 and not drawn[0].endswith(" in 1 task(s)"), drawn  # several tasks, several blocks
        assert [m.strip() for m in logs if m.strip().startswith(f"{entry}_here: drawing")][0].endswith(" 1 task(s)")
        tables, pictures = {}, {}
        for name in (entry, f"{entry}_here"):
            tables[name] = pd.read_parquet(out / name)
            pictures[name] = _pictures(out / name)
            _keys_resolve(out / name, tables[name], pictures[name])
        assert len(list((out / entry / "_shards").iterdir())) > 1
        # The same pictures, byte for byte, and the same tables but for which shard holds what.
        assert pictures[entry] == pictures[f"{entry}_here"] and len(pictures[entry]) > 0
        keys = [c for c in tables[entry].columns if not c.endswith("shard")]
        pd.testing.assert_frame_equal(tables[entry][keys], tables[f"{entry}_here"][keys])


def test_a_crash_before_the_tables_draws_the_pictures_again(ray_session, resnet20_weights, tmp_path, image_folder,
                                                            monkeypatch):
    from jobs.dataset import top_patches
    from pipeline import reduce

    monkeypatch.setattr(top_patches, "FETCH_CHUNK", 5)
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)}, analyses=RENDERING[:1])
    original = reduce.write_result

    def crash(*args, **kwargs):
        raise RuntimeError("driver killed after the pictures")

    monkeypatch.setattr(reduce, "write_result", crash)
    result = run(manifest)
    assert result.analyses["top_patches"]["status"] == "failed"
    out = tmp_path / "out"
    ledger = out / ".staging" / "top_patches" / "_ledger"
    assert len(list(ledger.iterdir())) > 1  # the render blocks were recorded, the tables were not

    monkeypatch.setattr(reduce, "write_result", original)
    result = run(manifest)
    assert result.ok, result.analyses
    table = pd.read_parquet(out / "top_patches")
    pictures = _pictures(out / "top_patches")
    _keys_resolve(out / "top_patches", table, pictures)
    # Exactly the pictures the table names: none of the first attempt's files is left behind.
    assert set(pictures) == set(table.key) | set(table.grid_key)
    assert result.analyses["top_patches"]["images"] == len(pictures)


def _runtime_env(shared, item) -> dict:
    import ray

    return dict(ray.get_runtime_context().runtime_env)


def test_reduce_tasks_share_the_runs_runtime_environment(ray_session, resnet20_weights, tmp_path, image_folder,
                                                         monkeypatch):
    """A reduction's tasks get the store's remote args and nothing else: Ray starts fresh worker
    processes (each importing torch again) for every new runtime environment, so a credential
    variable of the driver's shell must not give them one of their own on a local run."""
    from pipeline.datasets import list_dataset
    from pipeline.reduce import RunContext
    from pipeline.store import Store

    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                                            dataset={"kind": "image_folder", "root": str(image_folder)}))
    index = list_dataset(manifest.dataset)
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca.pem")
    local = Store.open(str(tmp_path / "out"))
    ctx = RunContext(manifest, index, lambda m: None, local.remote_args())
    assert ctx.parallel_map(_runtime_env, [0, 1]) == [{}, {}]
    remote = RunContext(manifest, index, lambda m: None, {"runtime_env": {"env_vars": {"AWS_REGION": "x"}}})
    assert [e.get("env_vars") for e in remote.parallel_map(_runtime_env, [0, 1])] == [{"AWS_REGION": "x"}] * 2
