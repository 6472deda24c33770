"""End to end on a local Ray: the output contract, exactness, invariance, errors, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import REGISTRY
from pipeline.cli import main as cli
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest
from pipeline.zoo import CifarResNet

from .conftest import make_images, write_manifest


def run(path: Path, *overrides: str):
    result = run_manifest(load_manifest(path, list(overrides)), log=lambda m: None)
    return result


def read(out: Path, entry: str, layer: str | None = None) -> pd.DataFrame:
    folder = out / entry / (f"layer={layer}" if layer else "")
    return pd.read_parquet(folder).sort_values("image_id").reset_index(drop=True)


def reference_features(root: Path, layers: list[str], weights: Path) -> dict[str, dict[str, np.ndarray]]:
    """A plain PyTorch pass, written independently of convscope's decoding and hooks."""
    model = CifarResNet(20)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    paths = sorted(root.rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
    x = (x.float() / 255 - mean) / std
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in layers]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    ids = [p.relative_to(root).as_posix() for p in paths]
    result = {n: dict(zip(ids, out[n].mean(dim=(2, 3)).numpy())) for n in layers}
    result["logits"] = dict(zip(ids, logits.numpy()))
    return result


def test_output_contract_and_exactness(ray_session, resnet20_weights, tmp_path, image_folder):
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    result = run(manifest)
    out = tmp_path / "out"
    assert result.ok
    for name in ("manifest.resolved.yaml", "run.json", "errors.parquet", "images.parquet",
                 "features/_SUCCESS", "predictions/_SUCCESS"):
        assert (out / name).is_file(), name
    assert not (out / ".staging").exists()
    schema = pq.read_schema(next((out / "features" / "layer=layer1").glob("part-*.parquet")))
    assert str(schema.field("vector").type) == "list<element: float>"
    assert schema.field("image_id").type == "string" and schema.field("label").type == "int64"

    ref = reference_features(image_folder, ["layer1", "layer3"], resnet20_weights)
    for layer in ("layer1", "layer3"):
        df = read(out, "features", layer)
        assert len(df) == 18
        got = np.stack(df.vector.to_numpy())
        want = np.stack([ref[layer][i] for i in df.image_id])
        assert np.abs(got - want).max() <= 1e-5
    pred = read(out, "predictions")
    logits = np.stack([ref["logits"][i] for i in pred.image_id])
    assert np.abs(np.stack(pred.logits.to_numpy()) - logits).max() <= 1e-5
    assert (pred.pred.to_numpy() == logits.argmax(1)).all()
    assert pred.label.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert all(len(t) == 5 for t in pred.top5)

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["dataset"]["images"] == 18 and info["dataset"]["ok"] == 18 and info["dataset"]["errors"] == 0
    assert info["analyses"]["features"]["rows"] == 36 and info["analyses"]["predictions"]["rows"] == 18
    assert info["model"]["hash"].startswith("sha256:") and info["versions"]["torch"]
    images = pd.read_parquet(out / "images.parquet")
    assert images.label_name.tolist()[:1] == ["class0"] and len(images) == 18


@pytest.mark.parametrize("fast,tol,rounds", [(["execution.channels_last=true"], 1e-4, False),
                                             (["execution.channels_last=true", "execution.precision=bfloat16"], 0.1,
                                              True)])
def test_fast_path_agrees_with_float32(ray_session, resnet20_weights, tmp_path, image_folder, fast, tol, rounds):
    """channels_last (any device) and bf16 autocast: the same features up to their rounding
    (bf16 must show some: else autocast never ran)."""
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    run(manifest, f"output={tmp_path / 'exact'}")
    run(manifest, f"output={tmp_path / 'fast'}", *fast)
    for layer in ("layer1", "layer3"):
        a, b = read(tmp_path / "exact", "features", layer), read(tmp_path / "fast", "features", layer)
        assert a.image_id.tolist() == b.image_id.tolist()
        a, b = np.stack(a.vector.to_numpy()), np.stack(b.vector.to_numpy())
        err = np.abs(a - b).max() / np.abs(a).max()
        assert err <= tol
        assert err > 0 or not rounds
    info = json.loads((tmp_path / "fast" / "run.json").read_text())
    assert info["execution"]["channels_last"] is True


@pytest.mark.parametrize("batch,workers", [(1, 1), (5, 2)])
def test_results_do_not_depend_on_batch_size_or_workers(ray_session, resnet20_weights, tmp_path, image_folder, batch,
                                                         workers):
    base = write_manifest(tmp_path / "a.yaml", weights=resnet20_weights,
                          dataset={"kind": "image_folder", "root": str(image_folder)},
                          execution={"batch_size": 18, "decode_batch_size": 18})
    run(base, f"output={tmp_path / 'a'}")
    run(base, f"output={tmp_path / 'b'}", f"execution.batch_size={batch}", f"execution.workers={workers}",
        "execution.decode_batch_size=4")
    for layer in ("layer1", "layer3"):
        a, b = read(tmp_path / "a", "features", layer), read(tmp_path / "b", "features", layer)
        assert a.image_id.tolist() == b.image_id.tolist()
        assert np.abs(np.stack(a.vector.to_numpy()) - np.stack(b.vector.to_numpy())).max() <= 1e-5
    # Order is preserved: the part files list images in dataset order, whatever the workers.
    raw = pd.read_parquet(tmp_path / "b" / "predictions")
    assert raw.image_id.tolist() == sorted(raw.image_id)


def test_an_elastic_actor_pool_gives_the_same_tables(ray_session, resnet20_weights, tmp_path, image_folder):
    """workers: auto (two actors on the session's two CPUs), growing from one, writes what one actor does."""
    base = write_manifest(tmp_path / "a.yaml", weights=resnet20_weights,
                          dataset={"kind": "image_folder", "root": str(image_folder)},
                          execution={"batch_size": 4, "decode_batch_size": 4})
    assert run(base, f"output={tmp_path / 'a'}").ok
    assert run(base, f"output={tmp_path / 'b'}", "execution.workers=auto", "execution.min_workers=1").ok
    for entry, layer in (("features", "layer1"), ("features", "layer3"), ("predictions", None)):
        folder = f"{entry}/layer={layer}" if layer else entry
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / folder),
                                      pd.read_parquet(tmp_path / "b" / folder),
                                      check_exact=True)  # unsorted: dataset order, whichever actor wrote a block
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["execution"]["min_workers"] == 1 and info["analyses"]["features"]["blocks"] == 5
    assert info["execution"]["workers"] == 2  # auto, on two CPUs


def test_corrupt_images_are_recorded_and_skipped(ray_session, resnet20_weights, tmp_path):
    root = tmp_path / "images"
    make_images(root, classes=2, per_class=4)
    (root / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing sensible")
    (root / "class1" / "empty.png").write_bytes(b"")
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(root)})
    result = run(manifest)
    out = tmp_path / "out"
    assert result.ok and result.errors == 2
    errors = pd.read_parquet(out / "errors.parquet").sort_values("image_id")
    assert errors.image_id.tolist() == ["class0/broken.png", "class1/empty.png"]
    assert set(errors.stage) == {"decode"}
    assert "empty file" in errors.error.iloc[1]
    assert len(read(out, "predictions")) == 8
    info = json.loads((out / "run.json").read_text())
    assert info["dataset"]["ok"] + info["dataset"]["errors"] == info["dataset"]["images"] == 10


def test_all_images_bad_in_a_batch_keeps_schema(ray_session, resnet20_weights, tmp_path):
    root = tmp_path / "images"
    make_images(root, classes=1, per_class=3)
    for i in range(4):
        (root / "class0" / f"zz{i}.png").write_bytes(b"junk")
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(root)},
                              execution={"batch_size": 2, "decode_batch_size": 2})
    result = run(manifest)
    assert result.ok and result.errors == 4
    assert len(read(tmp_path / "out", "features", "layer1")) == 3


def test_resume_skips_committed_and_finishes_the_rest(ray_session, resnet20_weights, tmp_path, image_folder):
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    out = tmp_path / "out"
    run(manifest)
    before = (out / "features" / "_SUCCESS").read_text()
    first = read(out, "predictions")
    # A crash after features committed but before predictions did: predictions' folder is
    # there without _SUCCESS (and a stray staging folder too).
    (out / "predictions" / "_SUCCESS").unlink()
    (out / ".staging" / "predictions").mkdir(parents=True)
    (out / ".staging" / "predictions" / "part-00000.parquet").write_bytes(b"half a file")
    result = run(manifest)
    assert result.analyses["features"]["status"] == "skipped"
    assert result.analyses["predictions"]["status"] == "complete"
    assert (out / "features" / "_SUCCESS").read_text() == before
    pd.testing.assert_frame_equal(read(out, "predictions"), first)
    # Changed parameters: the entry is recomputed, not reused.
    result = run(manifest, "analyses[0].pool=max")
    assert result.analyses["features"]["status"] == "complete"
    assert result.analyses["predictions"]["status"] == "skipped"


def test_dataset_kinds_run_end_to_end(ray_session, resnet20_weights, tmp_path, image_folder):
    import pyarrow as pa

    files = sorted(image_folder.rglob("*.png"))
    pq.write_table(pa.table({"id": [f.stem + f.parent.name for f in files], "image": [f.read_bytes() for f in files],
                             "y": [int(f.parent.name[-1]) for f in files]}), tmp_path / "d.parquet")
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "parquet", "path": str(tmp_path / "d.parquet"),
                                       "id_column": "id", "label_column": "y"})
    assert run(manifest).ok
    assert len(read(tmp_path / "out", "predictions")) == 18
    ref = reference_features(image_folder, ["layer3"], resnet20_weights)["layer3"]
    df = read(tmp_path / "out", "features", "layer3")
    by_id = {f.stem + f.parent.name: f.relative_to(image_folder).as_posix() for f in files}
    want = np.stack([ref[by_id[i]] for i in df.image_id])
    assert np.abs(np.stack(df.vector.to_numpy()) - want).max() <= 1e-5


FLAKY = """
import pathlib
import torch.nn as nn

FLAG = pathlib.Path(__file__).with_name("FAIL")


class Flaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.flat = nn.Flatten(2)  # (N, 4, H*W): 3-D, which pool 'grid' refuses
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if FLAG.exists() and x.shape[0] > 1:
            raise RuntimeError("boom: the model failed on this batch")
        return self.fc(self.flat(self.conv(x)).mean(2))


def build():
    return Flaky()
"""


def test_failed_analysis_is_reported_and_others_kept(ray_session, tmp_path, image_folder):
    (tmp_path / "flaky.py").write_text(FLAKY)
    model = {"source": "python", "entrypoint": "flaky:build", "preprocess": {"resize": 32, "crop": 32}}
    manifest = write_manifest(tmp_path / "m.yaml", model=model, analyses=[{"type": "predictions"}],
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    assert run(manifest).ok
    # Add an entry, and make the model fail: the committed entry stays committed.
    (tmp_path / "FAIL").write_text("")
    manifest = write_manifest(tmp_path / "m.yaml", model=model,
                              analyses=[{"type": "predictions"}, {"type": "features", "layers": ["conv"]}],
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    result = run(manifest)
    assert result.status == "failed"
    assert result.analyses["features"]["status"] == "failed"
    assert "boom" in result.analyses["features"]["error"]
    assert result.analyses["predictions"]["status"] == "skipped"
    assert (tmp_path / "out" / "predictions" / "_SUCCESS").exists()
    assert not (tmp_path / "out" / "features" / "_SUCCESS").exists()
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["status"] == "failed" and info["analyses"]["features"]["status"] == "failed"
    # Fixed: the rerun finishes the failed entry only.
    (tmp_path / "FAIL").unlink()
    result = run(manifest)
    assert result.ok and result.analyses["features"]["status"] == "complete"


def test_a_failing_analysis_does_not_take_its_stage_down(ray_session, tmp_path, image_folder):
    (tmp_path / "flaky.py").write_text(FLAKY)
    model = {"source": "python", "entrypoint": "flaky:build", "preprocess": {"resize": 32, "crop": 32}}
    manifest = write_manifest(tmp_path / "m.yaml", model=model,
                              dataset={"kind": "image_folder", "root": str(image_folder)},
                              analyses=[{"type": "predictions"},
                                        {"type": "features", "layers": ["flat"], "pool": "grid"},
                                        {"type": "features", "name": "conv", "layers": ["conv"]}])
    result = run(manifest)
    assert result.status == "failed"
    assert result.analyses["features"]["status"] == "failed"
    assert "pool 'grid' needs (N, C, H, W)" in result.analyses["features"]["error"]
    assert result.analyses["predictions"]["status"] == "complete"
    assert result.analyses["conv"]["status"] == "complete" and result.analyses["conv"]["rows"] == 18
    assert not (tmp_path / "out" / "features").exists()
    assert not (tmp_path / "out" / ".staging" / "features").exists()


def test_cli_exit_codes(ray_session, resnet20_weights, tmp_path, image_folder, capsys):
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    assert cli(["validate", str(manifest)]) == 0
    assert cli(["validate", str(manifest), "--set", "analyses[0].layers=[layer9]"]) == 2
    err = capsys.readouterr().err
    assert "analyses[0].layers[0]: unknown layer 'layer9'" in err and "Traceback" not in err
    assert cli(["run", str(manifest), "--output", str(tmp_path / "cli-out")]) == 0
    assert (tmp_path / "cli-out" / "features" / "_SUCCESS").exists()
    assert "complete" in capsys.readouterr().out
    assert cli(["layers", "builtin:cifar_resnet20"]) == 0
    assert "layer3.2.conv2" in capsys.readouterr().out
    assert cli(["layers", "torchvision:resnet1"]) == 2
    assert "did you mean 'resnet18'" in capsys.readouterr().err


def test_unwritable_output_fails_before_work(ray_session, resnet20_weights, tmp_path, image_folder):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    assert cli(["run", str(manifest), "--output", str(blocker / "out")]) == 2


def test_every_registered_analysis_runs_end_to_end(ray_session, resnet20_weights, tmp_path, image_folder):
    # One entry per registered analysis, with its smallest valid parameters.
    minimal = {"features": {"layers": ["layer2"]}, "predictions": {},
               "activation_stats": {"layers": ["layer1"]},
               "top_patches": {"layers": ["layer2"], "k": 2, "project": ["guided_backprop"]},
               "neighbours": {"layer": "layer3", "k": 2}, "embedding": {"layers": ["layer3"], "methods": ["pca"]},
               "probes": {"layers": ["layer3"]},
               "saliency": {"smoothgrad": {"samples": 2}, "sample": {"n": 5}, "steps": 2},
               "guided_backprop": {"sample": {"n": 5}, "steps": 2},
               "deconvnet": {"sample": {"n": 5}, "target": {"neuron": {"layer": "layer2", "channel": 3}}},
               "cam": {"layer": "layer3", "steps": 2}, "grad_cam": {"layer": "layer2", "target": "label"},
               "guided_grad_cam": {"layer": "layer3", "target": {"top": 2}, "sample": {"n": 5}, "steps": 2},
               "occlusion": {"window": 16, "stride": 16, "feature": {"layer": "layer3", "channel": 1}, "steps": 2},
               "attribution_summary": {},
               "adversarial": {"sample": {"n": 3}, "epsilons": [0.01, 0.1], "steps": 2},
               "correspondence": {"layers": ["layer1", "layer3"], "sample": {"n": 4}, "part": [8, 8, 16, 16]},
               "saliency_segmentation": {"methods": ["saliency", "grad_cam"], "sample": {"n": 2}, "min_seeds": 3},
               "sanity_checks": {"methods": ["saliency", "grad_cam"], "sample": {"n": 2},
                                 "sensitivity": {"samples": 2}, "road": {"percentages": [50]}},
               "filters": {}, "activation_maps": {"layers": ["layer1"], "sample": {"n": 2}},
               "class_model": {"classes": [0, 3], "steps": 3},
               "neuron_ascent": {"layer": "layer2", "channels": [0], "steps": 3, "facets": {"k": 2, "top": 4,
                                                                                         "sample": {"n": 8}}},
               "inversion": {"layers": ["layer1"], "sample": {"n": 2}, "steps": 3},
               "deepdream": {"layers": ["layer2"], "sample": {"n": 2}, "steps": 2, "octaves": 2},
               "invariance": {"layers": ["layer1"], "sample": {"n": 2}, "scale": [1.0], "rotate": [0, 90],
                              "translate": [0, 4], "axis": ["x", "y"]},
               "finetune": {"schedule": "one_step", "epochs": 1, "batch_size": 9, "probe": False}}
    assert set(minimal) == set(REGISTRY), "add the new analysis to this table"
    entries = [{"type": name, **params} for name, params in minimal.items()]
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)},
                              analyses=entries)
    result = run(manifest)
    assert result.ok, [(n, a.get("error")) for n, a in result.analyses.items() if a.get("status") != "complete"]
    for name in minimal:
        assert (tmp_path / "out" / name / "_SUCCESS").exists()
        assert result.analyses[name]["rows"] > 0
