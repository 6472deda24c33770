"""Attribution analyses as the runner calls them: targets, samples, invariances, independent
references, overlays, the summary, boxes, and a local-Ray run."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jobs import REGISTRY, LocalContext, TableInputs
from jobs.attribution.base import ATTRIBUTION, TopTargets, choose_targets, sample_ids
from jobs.attribution.occlusion import pixel_drop
from jobs.core.base import unit_seed
from pipeline.decode import decode_batch, transform_box
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest

from .conftest import write_manifest
from .harness import map_table, normalise

# Smallest useful parameters of every attribution analysis, for a model with layers conv2/relu2.
PARAMS = {
    "saliency": {},
    "guided_backprop": {},
    "deconvnet": {},
    "cam": {"layer": "relu2"},
    "grad_cam": {"layer": "relu1"},
    "guided_grad_cam": {"layer": "relu2"},
    "occlusion": {"window": 4, "stride": 3, "feature": {"layer": "relu2", "channel": 1}},
}
MAPS = {"occlusion": ["prob_map", "label_map", "feature_map"]}


class TinyNet(nn.Module):
    """conv-ReLU-pool-conv-ReLU-GAP-linear: CAM-able, ReLU modules or functional ReLUs."""

    def __init__(self, functional: bool = False, classes: int = 3):
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        if self.functional:  # the same network written as the shared ResNet-20 is
            h = F.max_pool2d(F.relu(self.conv1(x)), 2)
            h = torch.relu(self.conv2(h))
        else:
            h = self.relu2(self.conv2(F.max_pool2d(self.relu1(self.conv1(x)), 2)))
        return self.fc(h.mean(dim=(2, 3)))


def tiny(functional: bool = False) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(functional).eval()


def data(n: int = 5, size: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    ids = [f"c{i % 2}/{i:03d}.png" for i in range(n)]
    labels = [i % 3 for i in range(n)]
    boxes = np.array([[1, 1, 6, 6]] * (n - 1) + [[-1] * 4])
    return ids, pixels, labels, boxes


def analysis(name: str, **extra):
    cls = REGISTRY[name]
    return cls(cls.Params(type=name, **{**PARAMS.get(name, {}), **extra}))


def rows_by_key(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas().set_index(["image_id", "target"]).sort_index()


def test_choose_targets_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 0.0]])
    labels = torch.tensor([2, -1])

    def pick(target):
        return [t.tolist() for t in choose_targets(logits, labels, target)]

    assert pick("predicted") == [[0, 1], [1, 0], [1, 1]]  # the tie 5 = 5 goes to class 0
    assert pick("label") == [[0], [2], [2]]  # unlabelled image 1 gets no map
    assert pick(2) == [[0, 1], [2, 2], [2, 3]]
    assert pick(TopTargets(top=2)) == [[0, 0, 1, 1], [1, 2, 0, 1], [1, 2, 1, 2]]
    with pytest.raises(ValueError, match="3 classes"):
        choose_targets(logits, labels, 3)


def test_sample_is_seeded_exact_and_order_free():
    ids = [f"img{i:03d}" for i in range(50)]
    chosen = sample_ids(ids, 10, seed=1)
    assert len(chosen) == len(set(chosen)) == 10 and set(chosen) <= set(ids)
    assert sample_ids(ids[::-1], 10, seed=1) == chosen
    assert sample_ids(ids, 10, seed=2) != chosen
    assert sample_ids(ids, 80, seed=1) == ids


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_batched_equals_per_image(name):
    assert set(PARAMS) == ATTRIBUTION, "add the new attribution analysis to PARAMS"
    ids, pixels, labels, boxes = data()
    model = tiny()
    a = analysis(name, target=TopTargets(top=2), steps=4, chunk=5)
    one, images_one = map_table(a, model, ids, pixels, labels, batch_size=1, boxes=boxes)
    many, images_many = map_table(a, model, ids, pixels, labels, batch_size=5, boxes=boxes)
    assert one.num_rows == many.num_rows == 2 * len(ids)
    assert set(images_one) == set(images_many) == set(one.column("key").to_pylist())
    a1, a5 = rows_by_key(one), rows_by_key(many)
    for column in MAPS.get(name, ["map"]):
        np.testing.assert_allclose(np.stack(a1[column]), np.stack(a5[column]), rtol=1e-4, atol=1e-6)
    for column in ("score", "deletion_auc", "insertion_auc", "pointing", "box_energy"):
        np.testing.assert_allclose(a1[column], a5[column], rtol=1e-4, atol=1e-5, err_msg=column)
    # The boxless image scores NaN; the others are in range.
    assert a5["pointing"].isna().sum() == 2 and a5["pointing"].dropna().isin([0.0, 1.0]).all()
    assert ((a5["deletion_auc"] >= 0) & (a5["deletion_auc"] <= 1)).all()
    assert (a5["vmin"] <= a5["vmax"]).all()


def test_saliency_equals_autograd_on_each_image():
    ids, pixels, labels, _ = data()
    model = tiny()
    table, _ = map_table(analysis("saliency", target="label", metrics=False, render=False), model, ids, pixels,
                         labels, batch_size=5)
    x = normalise(pixels)
    for row in table.to_pylist():
        i = ids.index(row["image_id"])
        xi = x[i:i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xi)[0, row["target"]], xi)
        expected = grad[0].abs().amax(dim=0)
        assert (row["channels"], row["height"], row["width"]) == (1, 12, 12)
        np.testing.assert_allclose(np.reshape(row["map"], (12, 12)), expected.numpy(), rtol=1e-5, atol=1e-7)


def test_smoothgrad_equals_a_plain_loop_over_noisy_copies():
    ids, pixels, labels, _ = data(n=3)
    model = tiny()
    sg = {"samples": 4, "sigma": 0.2, "seed": 3}
    table, _ = map_table(analysis("saliency", smoothgrad=sg, metrics=False, render=False, chunk=5), model, ids,
                         pixels, labels, batch_size=3)
    x = normalise(pixels)
    for row in table.to_pylist():
        i = ids.index(row["image_id"])
        gen = torch.Generator().manual_seed(unit_seed(3, row["image_id"]))
        span = float(x[i].max() - x[i].min())
        total = torch.zeros(12, 12)
        for _ in range(4):
            xi = (x[i] + torch.randn(x[i].shape, generator=gen) * 0.2 * span)[None].requires_grad_(True)
            (grad,) = torch.autograd.grad(model(xi)[0, row["target"]], xi)
            total += grad[0].abs().amax(dim=0)
        np.testing.assert_allclose(np.reshape(row["map"], (12, 12)), (total / 4).numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet", "guided_grad_cam"])
def test_relu_modules_and_functional_relus_give_the_same_maps(name):
    ids, pixels, labels, _ = data()
    # The functional variant has no relu2 module to hook: Grad-CAM reads conv2 in both.
    layer = {"layer": "conv2"} if name == "guided_grad_cam" else {}
    a = analysis(name, signed=True, metrics=False, render=False, **layer)
    modules, _ = map_table(a, tiny(functional=False), ids, pixels, labels, batch_size=5)
    functional, _ = map_table(a, tiny(functional=True), ids, pixels, labels, batch_size=5)
    np.testing.assert_allclose(np.stack(rows_by_key(modules)["map"]), np.stack(rows_by_key(functional)["map"]),
                               rtol=1e-5, atol=1e-8)
    plain, _ = map_table(analysis("saliency", signed=True, metrics=False, render=False), tiny(), ids, pixels,
                         labels, batch_size=5)
    assert not np.allclose(np.stack(rows_by_key(modules)["map"]), np.stack(rows_by_key(plain)["map"]))


def test_cam_equals_a_hand_loop_over_channels():
    ids, pixels, labels, _ = data()
    model = tiny()
    table, _ = map_table(analysis("cam", target=1, metrics=False, render=False), model, ids, pixels, labels)
    acts = {}
    model.relu2.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(normalise(pixels))
    w = model.fc.weight.detach()
    for row in table.to_pylist():
        a = acts["a"][ids.index(row["image_id"])]
        expected = sum(float(w[1, k]) * a[k] for k in range(a.shape[0]))
        assert (row["height"], row["width"]) == (6, 6)
        np.testing.assert_allclose(np.reshape(row["map"], (6, 6)), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_cam_refuses_a_model_without_a_gap_linear_head():
    class FlatHead(TinyNet):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8 * 36, 3)

        def forward(self, x):
            h = self.relu2(self.conv2(F.max_pool2d(self.relu1(self.conv1(x)), 2)))
            return self.fc(h.flatten(1))

    ids, pixels, labels, _ = data()
    with pytest.raises(ValueError, match="use grad_cam"):
        map_table(analysis("cam"), FlatHead().eval(), ids, pixels, labels)


def test_occlusion_equals_one_forward_per_position():
    from scripts.bench_occlusion import occlusion_loop

    ids, pixels, labels, _ = data(n=3)
    model = tiny()
    table, _ = map_table(analysis("occlusion", fill="mean", metrics=False, render=False, chunk=7), model, ids, pixels,
                         labels, batch_size=3)
    x = normalise(pixels)
    for row in table.to_pylist():
        i = ids.index(row["image_id"])
        ref = occlusion_loop(model, x[i:i + 1], torch.tensor([row["target"]]), window=4, stride=3, fill="mean",
                             feature=("relu2", 1))
        assert (row["height"], row["width"]) == (3, 3)
        np.testing.assert_allclose(row["prob_map"], ref["prob_map"].flatten().numpy(), atol=1e-5)
        assert row["label_map"] == ref["label_map"].flatten().tolist()
        np.testing.assert_allclose(row["feature_map"], ref["feature_map"].flatten().numpy(), rtol=1e-5, atol=1e-5)


def test_pixel_drop_is_the_mean_over_covering_windows():
    drop = torch.arange(1.0, 10.0).view(1, 3, 3)  # 3x3 positions of a 4-px window, stride 3, on 11x11
    got = pixel_drop(drop, (11, 11), window=4, stride=3)
    expected = torch.zeros(11, 11)
    for y in range(11):
        for x in range(11):
            covering = [float(drop[0, py, px]) for py in range(3) for px in range(3)
                        if 3 * py <= y < 3 * py + 4 and 3 * px <= x < 3 * px + 4]
            expected[y, x] = sum(covering) / len(covering) if covering else 0.0
    torch.testing.assert_close(got[0], expected)


def test_overlays_are_rendered_per_row_with_their_range():
    ids, pixels, labels, boxes = data(n=2)
    table, images = map_table(analysis("grad_cam", cell=40, metrics=False), tiny(), ids, pixels, labels, boxes=boxes)
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == len(keys) == 2 and set(images) == set(keys)
    for key in keys:
        assert "." not in key and "/" not in key
        assert images[key].height >= 48  # 12 px enlarged to at least 40, plus padding
    # Grad-CAM is never negative: its colour scale starts at 0 and ends at the map's maximum.
    assert (table.column("vmin").to_numpy() == 0).all()
    np.testing.assert_allclose(table.column("vmax").to_numpy(),
                               [np.max(m) for m in table.column("map").to_pylist()], rtol=0.05)


def test_summary_means_by_method_and_class():
    def entry(method, labels, deletion, insertion, pointing, energy):
        n = len(labels)
        return pa.table({"image_id": [f"i{j}" for j in range(n)], "label": pa.array(labels, pa.int64()),
                         "method": [method] * n, "deletion_auc": deletion, "insertion_auc": insertion,
                         "pointing": pointing, "box_energy": [energy] * n})

    inputs = TableInputs({
        "saliency": entry("saliency", [0, 0, 1], [0.2, 0.4, 0.6], [0.5, 0.7, 0.9], [1.0, 0.0, np.nan], 0.6),
        "grad_cam": entry("grad_cam", [0, 0, 1], [0.1, 0.1, 0.4], [0.9, 0.9, 0.3], [1.0, 1.0, 1.0], 0.5),
    })
    a = REGISTRY["attribution_summary"](REGISTRY["attribution_summary"].Params(type="attribution_summary"))
    out = a.reduce(inputs, LocalContext(model=nn.Identity(), pixels={}, input_size=(1, 1), label_names=["a", "b"]))
    df = out.tables[""].to_pandas()
    overall = df[df["label"].isna()].set_index("method")
    assert overall.loc["saliency", "deletion_auc"] == pytest.approx(0.4)
    assert overall.loc["saliency", "pointing_game"] == pytest.approx(0.5)  # NaN (no box) does not count
    assert overall.loc["saliency", "boxed"] == 2
    assert overall.loc["grad_cam", "insertion_auc"] == pytest.approx(0.7)
    per_class = df.dropna(subset=["label"]).set_index(["method", "label"])
    assert per_class.loc[("saliency", 0), "deletion_auc"] == pytest.approx(0.3)
    assert per_class.loc[("saliency", 1), "label_name"] == "b"
    assert per_class.loc[("saliency", 1), "maps"] == 1
    assert out.stats["best"] == {"deletion_auc": "grad_cam", "insertion_auc": "grad_cam",
                                 "pointing_game": "grad_cam", "box_energy": "saliency"}


def test_summary_names_bad_sources(tmp_path, image_folder):
    from pipeline.errors import ManifestError

    base = {"dataset": {"kind": "image_folder", "root": str(image_folder)},
            "model": {"source": "builtin", "name": "cifar_resnet20"}}
    path = write_manifest(tmp_path / "m.yaml", **base, analyses=[
        {"type": "predictions"}, {"type": "saliency", "name": "sal"},
        {"type": "attribution_summary", "methods": ["sal", "predictions", "nope"]}])
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    text = str(e.value)
    assert "analyses[2]" in text and "'predictions' is a predictions entry" in text and "'nope'" in text
    path = write_manifest(tmp_path / "m.yaml", **base, analyses=[{"type": "predictions"},
                                                                  {"type": "attribution_summary"}])
    with pytest.raises(ManifestError, match="needs at least one attribution entry"):
        load_manifest(path)


def test_boxes_follow_resize_and_crop():
    assert transform_box([10, 20, 30, 40], (100, 100), resize=50, crop=None) == [5, 10, 15, 20]
    # 200 wide x 100 high -> resize 50 -> 100x50 -> centre crop 50: 25 px cut on the left.
    assert transform_box([30, 0, 60, 10], (200, 100), resize=50, crop=50) == [0, 0, 5, 5]
    assert transform_box([0, 0, 40, 10], (200, 100), resize=50, crop=50) == [-1] * 4  # cropped away
    assert transform_box([3, 3, 5, 5], (10, 10), resize=15, crop=None) == [4, 4, 8, 8]  # edges round outwards
    assert transform_box(None, (10, 10), None, None) == [-1] * 4


def test_decode_batch_moves_boxes_into_the_model_frame(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(path)
    batch = {"image_id": np.array(["a.png", "b.png"], dtype=object), "label": np.array([0, 0]),
             "ref": np.array(["file", "file"], dtype=object),
             "source": np.array([str(path), str(path)], dtype=object),
             "offset": np.array([-1, -1]), "size": np.array([-1, -1]),
             "box": np.array([np.array([30, 0, 60, 10]), None], dtype=object)}
    out = decode_batch(batch, resize=50, crop=50)
    assert out["box"].tolist() == [[0, 0, 5, 5], [-1, -1, -1, -1]]


def test_runs_on_ray_with_boxes_samples_and_any_worker_count(ray_session, tmp_path):
    """The demo's generated shapes (with boxes) through the runner: worker count and batch size
    do not change a map; the sample is exact; overlays resolve; the summary reads every method."""
    analyses = [
        {"type": "grad_cam", "layer": "relu3", "sample": {"n": 10, "seed": 1}, "steps": 4},
        {"type": "saliency", "name": "smoothgrad", "smoothgrad": {"samples": 3}, "sample": {"n": 10, "seed": 1},
         "steps": 4},
        {"type": "occlusion", "window": 8, "stride": 8, "target": "label", "steps": 4, "render": False},
        {"type": "attribution_summary"},
    ]
    outputs = {}
    for workers, batch in ((1, 8), (2, 3)):
        out = tmp_path / f"out{workers}"
        path = write_manifest(tmp_path / f"m{workers}.yaml", output=str(out),
                              dataset={"kind": "shapes", "root": str(tmp_path / "shapes"), "n": 16, "size": 32},
                              model={"source": "builtin", "name": "demo_cnn"}, analyses=analyses,
                              execution={"batch_size": batch, "decode_batch_size": batch, "workers": workers})
        result = run_manifest(load_manifest(path), log=lambda m: None)
        assert result.ok, result.analyses
        outputs[workers] = out
    for entry, rows in (("grad_cam", 10), ("smoothgrad", 10), ("occlusion", 16)):
        a = pd.read_parquet(outputs[1] / entry).sort_values(["image_id", "target"]).reset_index(drop=True)
        b = pd.read_parquet(outputs[2] / entry).sort_values(["image_id", "target"]).reset_index(drop=True)
        assert len(a) == len(b) == rows
        assert a["image_id"].tolist() == b["image_id"].tolist()
        column = "prob_map" if entry == "occlusion" else "map"
        np.testing.assert_allclose(np.stack(a[column]), np.stack(b[column]), rtol=1e-4, atol=1e-6)
        assert a["pointing"].notna().all(), "every shapes image has a box"
    assert set(pd.read_parquet(outputs[1] / "grad_cam")["image_id"]) == \
        set(pd.read_parquet(outputs[1] / "smoothgrad")["image_id"]), "one seed, one sample"
    # Every overlay is in the shard its row names.
    df = pd.read_parquet(outputs[2] / "grad_cam")
    for shard, group in df.groupby("shard"):
        with tarfile.open(outputs[2] / "grad_cam" / shard) as tar:
            names = set(tar.getnames())
            for key in group["key"]:
                assert f"{key}.png" in names
                from PIL import Image
                Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())).verify()
    summary = pd.read_parquet(outputs[1] / "attribution_summary")
    overall = summary[summary["label"].isna()].set_index("method")
    assert sorted(overall.index) == ["grad_cam", "occlusion", "smoothgrad"]
    assert (overall["boxed"] == overall["maps"]).all()
    assert overall.loc["occlusion", "maps"] == 16
