"""A checkpoint series (``model.checkpoints``): every analysis per checkpoint, one decode per batch.

A run over two checkpoints must give, checkpoint by checkpoint, the tables of a run of that
checkpoint alone (the ``checkpoint`` partition dropped), decode every image once for both, and
resume per checkpoint; a bad series is refused before any work starts, naming the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import execute
from pipeline.errors import ManifestError, UserError
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest
from pipeline.models import check_manifest
from pipeline.writers import STAGING, SUCCESS

from .conftest import make_images, write_manifest

TINY = '''
import torch
import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).mean((2, 3)))


def build():
    return Tiny()
'''

ANALYSES = [
    {"type": "features", "layers": ["relu1", "relu2"]},
    {"type": "predictions", "top_k": 2},
    {"type": "activation_stats", "layers": ["relu1", "relu2"]},
    {"type": "top_patches", "layers": ["relu2"], "k": 2, "channels": "0:3", "cell": 16, "project": ["deconvnet"]},
    {"type": "grad_cam", "layer": "relu2", "sample": {"n": 5, "seed": 0}},
    {"type": "filters", "layers": ["conv1"], "cell": 8},
    {"type": "probes", "layers": ["relu2"]},
]
# (entry, partition) of every table compared.
TABLES = [("features", "layer=relu1"), ("features", "layer=relu2"), ("predictions", None), ("activation_stats", None),
          ("top_patches", None),
          ("grad_cam", None), ("filters", None), ("probes", None)]


def _checkpoints(folder: Path) -> list[Path]:
    """Two states of the tiny model: its seeded start, and every weight moved a little."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_model", folder / "tiny_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.build()
    paths = [folder / "ckpts" / "epoch01.pt", folder / "ckpts" / "epoch02.pt"]
    paths[0].parent.mkdir()
    torch.save(model.state_dict(), paths[0])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    torch.save(model.state_dict(), paths[1])
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    make_images(root / "images", classes=3, per_class=6, size=16)  # 18 images: 2 blocks, 3 batches
    (root / "tiny_model.py").write_text(TINY)
    return root, _checkpoints(root)


def _manifest(root: Path, name: str, model: dict, analyses: list[dict] | None = None) -> Path:
    spec = {"source": "python", "entrypoint": "tiny_model:build", "python_path": [str(root)],
            "preprocess": {"resize": 16, "crop": 16}, **model}
    dataset = {"kind": "image_folder", "root": str(root / "images")}
    return write_manifest(root / f"{name}.yaml", model=spec, dataset=dataset, analyses=analyses or ANALYSES,
                          output=str(root / name), execution={"batch_size": 8, "decode_batch_size": 16})


def _run(path: Path, *overrides: str):
    return run_manifest(load_manifest(path, list(overrides)), log=lambda m: None)


def _read(folder: Path) -> pd.DataFrame:
    df = pd.read_parquet(folder)
    for column in df.columns:
        if isinstance(df[column].dtype, pd.CategoricalDtype):  # Hive partitions read back as categories
            df[column] = df[column].astype(str)
    keys = [c for c in ("image_id", "layer", "channel", "rank", "key") if c in df.columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def test_series_equals_one_run_per_checkpoint_and_decodes_once(ray_session, setup, monkeypatch):
    root, paths = setup
    decodes = root / "decodes.log"
    original = execute.decode_batch

    def counting(batch, *args, **kwargs):  # pickled by value into the decode tasks
        with open(str(decodes), "a") as f:
            f.write("".join(f"{i}\n" for i in batch["image_id"]))
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(execute, "decode_batch", counting)
    checkpoints = [{"name": "epoch01", "weights": str(paths[0])}, {"name": "epoch02", "weights": str(paths[1])}]
    series = _manifest(root, "series", {"checkpoints": checkpoints})
    result = _run(series)
    assert result.ok, result.analyses
    decoded = decodes.read_text().split()
    assert len(decoded) == 18 and len(set(decoded)) == 18, "every image is decoded once for both checkpoints"

    out = root / "series"
    info = json.loads((out / "run.json").read_text())
    for entry, _ in TABLES:
        assert (out / entry / SUCCESS).is_file()
        record = info["analyses"][entry]
        assert record["status"] == "complete" and sorted(record["checkpoints"]) == ["epoch01", "epoch02"]
        assert record["rows"] == sum(c["rows"] for c in record["checkpoints"].values())
    assert [c["name"] for c in info["model"]["checkpoints"]] == ["epoch01", "epoch02"]
    assert not (out / STAGING).exists() and not (out / ".inputs").exists()

    # The entry folder reads as one table with a checkpoint column.
    preds = pd.read_parquet(out / "predictions")
    assert sorted(preds["checkpoint"].astype(str).unique()) == ["epoch01", "epoch02"] and len(preds) == 36

    for n, path in enumerate(paths):
        single = _manifest(root, f"single{n}", {"weights": str(path)})
        assert _run(single).ok
        for entry, partition in TABLES:
            got = _read(out / entry / f"checkpoint=epoch0{n + 1}" / (partition or ""))
            want = _read(root / f"single{n}" / entry / (partition or ""))
            assert "checkpoint" not in want.columns
            pd.testing.assert_frame_equal(got.drop(columns=["checkpoint"], errors="ignore"), want, check_exact=True)
    # Each checkpoint keeps its own probes' heads, as a single run does.
    from pipeline.heads import load_heads

    with pytest.raises(UserError, match="a checkpoint series; its heads are per checkpoint"):
        load_heads(out / "probes")
    for n in range(2):
        got_heads = load_heads(out / "probes" / f"checkpoint=epoch0{n + 1}")
        want_heads = load_heads(root / f"single{n}" / "probes")
        assert np.array_equal(got_heads["relu2"].weight, want_heads["relu2"].weight)
    # compare reads a checkpoint of the series (RUN@CHECKPOINT) as the run of that checkpoint alone.
    from pipeline.compare import compare_runs

    got = compare_runs(f"{out}@epoch01", f"{out}@epoch02", output=root / "compare-series")
    want = compare_runs(root / "single0", root / "single1", output=root / "compare-single")
    assert got.summary["a"]["checkpoint"] == "epoch01" and got.summary["b"]["checkpoint"] == "epoch02"
    assert got.summary["entries"] == want.summary["entries"]
    for table in ("accuracy", "per_class", "flips", "channels", "attribution", "probes"):
        pd.testing.assert_frame_equal(pd.read_parquet(got.output / table), pd.read_parquet(want.output / table))
    assert len(pd.read_parquet(got.output / "probes")) and len(pd.read_parquet(got.output / "channels"))
    # The two checkpoints differ: the comparison above is not trivially true.
    a, b = (_read(out / "features" / f"checkpoint={c}" / "layer=relu2") for c in ("epoch01", "epoch02"))
    assert not a["vector"].apply(list).equals(b["vector"].apply(list))

    # Resume per checkpoint: a checkpoint's folder lost (and the entry's seal) is all that runs again.
    from pipeline.store import Store

    Store.open(out).delete(f"features/{SUCCESS}")
    Store.open(out).delete("features/checkpoint=epoch02")
    decodes.unlink()
    again = _run(series)
    assert again.ok, again.analyses
    rerun = json.loads((out / "run.json").read_text())["analyses"]
    assert rerun["predictions"]["status"] == "skipped"
    assert rerun["features"]["checkpoints"]["epoch01"]["status"] == "skipped"
    assert rerun["features"]["checkpoints"]["epoch02"]["status"] == "complete"
    assert len(decodes.read_text().split()) == 18
    assert (out / "features" / SUCCESS).is_file()
    pd.testing.assert_frame_equal(_read(out / "features" / "checkpoint=epoch01" / "layer=relu2"), a)
    # A checkpoint's folder lost under an entry still sealed: that folder runs again, and the
    # entry is not reported as skipped.
    want = _read(out / "predictions" / "checkpoint=epoch02")
    Store.open(out).delete("predictions/checkpoint=epoch02")
    decodes.unlink()
    assert _run(series).ok
    rerun = json.loads((out / "run.json").read_text())["analyses"]
    assert rerun["predictions"]["status"] == "complete"
    assert rerun["predictions"]["checkpoints"]["epoch02"]["status"] == "complete"
    assert len(decodes.read_text().split()) == 18 and (out / "predictions" / SUCCESS).is_file()
    pd.testing.assert_frame_equal(_read(out / "predictions" / "checkpoint=epoch02"), want)

    # The report: an evolution page with the accuracy chart and each checkpoint's top patch and filters.
    from pipeline.report import build_report

    build_report(out)
    page = (out / "report" / "evolution.html").read_text()
    assert "<svg" in page and "accuracy per checkpoint" in page
    for name in ("epoch01", "epoch02"):
        for image in (f"img/top_patches_checkpoint_{name}/relu2-c0000-r01.png",
                      f"img/filters_checkpoint_{name}/conv1-filter-grid.png"):
            assert f'src="{image}"' in page and (out / "report" / image).is_file()
    assert "evolution.html" in (out / "report" / "index.html").read_text()
    # ... dead units and probe accuracy per layer as lines over the checkpoints, the patches' projections.
    from pipeline.report.evolution import dead_units, probe_accuracy
    from pipeline.report.run import Run

    assert "dead channels per layer" in page and "probe test accuracy per layer" in page
    run = Run(out, out / "report")
    records = {entry: info["analyses"][entry]["checkpoints"] for entry in ("probes", "activation_stats")}
    assert probe_accuracy(run, "probes").to_dict("index") == {
        c: r["test_accuracy"] for c, r in records["probes"].items()}
    assert dead_units(run, "activation_stats").to_dict("index") == {
        c: {layer: float(n) for layer, n in r["dead_channels"].items()} for c, r in records["activation_stats"].items()}
    for name in ("epoch01", "epoch02"):
        image = f"img/report/evolution-top_patches-{name}-relu2-0-deconvnet.png"
        assert f'src="{image}"' in page and (out / "report" / image).is_file()


def _problem(root: Path, model: dict, field: str, message: str) -> None:
    """Loading a manifest with ``model`` fails with ``message`` at ``field`` (and its line)."""
    with pytest.raises(ManifestError) as err:
        load_manifest(_manifest(root, "bad", model, [{"type": "predictions"}]))
    assert re.search(rf"{re.escape(field)}( \(line \d+\))?: {re.escape(message)}", str(err.value)), str(err.value)


def test_series_validation(setup):
    root, paths = setup
    a, b = str(paths[0]), str(paths[1])
    _problem(root, {"weights": a, "checkpoints": [{"name": "a", "weights": a}]},
             "model.checkpoints", "give weights or checkpoints, not both")
    _problem(root, {"checkpoints": [{"name": "a", "weights": a}, {"name": "a", "weights": b}]},
             "model.checkpoints", "[1].name: 'a' is already the name of checkpoints[0]")
    _problem(root, {"checkpoints": [{"name": "epoch=1", "weights": a}]},
             "model.checkpoints[0].name", "checkpoint name 'epoch=1' must start with a letter")
    _problem(root, {"checkpoints": [{"name": "a", "weights": str(root / "missing.pt")}]},
             "model.checkpoints", "[0].weights: file does not exist")
    _problem(root, {"weights_glob": "ckpts/*.pth"}, "model.weights_glob", "matches no file")
    _problem(root, {"weights_glob": "ckpts/*.pt", "checkpoints": [{"name": "a", "weights": a}]},
             "model.weights_glob", "give checkpoints or weights_glob, not both")
    _problem(root, {"weights_glob": "ckpts/*.pt", "weights": a}, "model.weights_glob",
             "give weights or weights_glob, not both")
    (root / "ckpts2").mkdir(exist_ok=True)
    torch.save({}, root / "ckpts2" / "1.pt")
    _problem(root, {"weights_glob": "ckpts2/*.pt"}, "model.weights_glob", "checkpoint name '1' must start with")
    _problem(root, {"checkpoints": []}, "model.checkpoints", "List should have at least 1 item")
    # Every checkpoint must load into the model before anything runs, and the error names which.
    torch.save({"not_a_layer.weight": torch.zeros(1)}, root / "unfit.pt")
    unfit = load_manifest(_manifest(root, "unfit", {"checkpoints": [{"name": "a", "weights": a},
                                                                    {"name": "b", "weights": str(root / "unfit.pt")}]},
                                    [{"type": "predictions"}]))
    with pytest.raises(UserError, match=r"model\.checkpoints\[1\]\.weights \(b\): checkpoint .*unfit\.pt does not fit"):
        check_manifest(unfit)
    # A training entry writes one fine-tuned model: it does not run per checkpoint.
    with pytest.raises(ManifestError) as err:
        load_manifest(_manifest(root, "train", {"checkpoints": [{"name": "a", "weights": a}]},
                                [{"type": "predictions"}, {"type": "finetune"}]))
    assert "analyses[1].type" in str(err.value) and "does not run per checkpoint" in str(err.value), str(err.value)


def test_weights_glob_names_checkpoints_by_their_stems(setup):
    root, paths = setup
    manifest = load_manifest(_manifest(root, "glob", {"weights_glob": "ckpts/epoch*.pt"}, [{"type": "predictions"}]))
    assert [(c.name, c.weights) for c in manifest.model.checkpoints] == [("epoch01", paths[0]), ("epoch02", paths[1])]
    # The resolved manifest lists what the pattern found, and validates again as it is.
    assert "weights_glob" not in manifest.resolved_yaml() or "weights_glob: null" in manifest.resolved_yaml()
    assert "epoch02.pt" in manifest.resolved_yaml()


def test_demo_checkpoint_manifest_validates_and_training_saves_epochs(tmp_path):
    from pipeline.demo import checkpoint_path, train_demo_model

    from .conftest import ROOT

    manifest = load_manifest(ROOT / "manifests" / "demo-checkpoints.yaml")  # missing demo checkpoints train
    assert [c.name for c in manifest.model.checkpoints] == ["epoch01", "epoch02", "epoch08"]
    assert [c.weights.name for c in manifest.model.checkpoints] == [
        "demo_cnn_epoch01.pt", "demo_cnn_epoch02.pt", "demo_cnn_epoch08.pt"]
    final = tmp_path / "demo_cnn.pt"
    saved = {e: checkpoint_path(final, e) for e in (1, 2)}
    train_demo_model(final, n_train=64, epochs=2, size=32, log=lambda message: None, checkpoints=saved)
    first, last = (torch.load(saved[e], weights_only=True) for e in (1, 2))
    assert all(torch.equal(v, torch.load(final, weights_only=True)[k]) for k, v in last.items())
    assert not all(torch.equal(v, last[k]) for k, v in first.items())
