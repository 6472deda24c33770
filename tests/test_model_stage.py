"""The model stage and its analyses of weights and feature maps: filters, activation_maps,
invariance -- hand-made weights and images, brute-force loops, and runs through Ray."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from jobs import REGISTRY, ModelContext
from jobs.model.activation_maps import channel_tiles
from jobs.model.filters import filter_pictures, first_conv, rgb_filters, slice_scale
from jobs.model.invariance import invariance_curves, transform_images
from pipeline.errors import ManifestError
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest
from pipeline.model_stage import groups, run_units
from pipeline.models import check_manifest
from tests.conftest import write_manifest

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()


def context(model: nn.Module, n: int = 0, size: int = 8, seed: int = 0) -> ModelContext:
    rng = np.random.default_rng(seed)
    pixels = {f"img{i}.png": rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(n)}
    return ModelContext(model=model, input_size=(size, size), mean=MEAN, std=STD, pixels=pixels,
                        labels={k: i % 3 for i, k in enumerate(pixels)})


def analysis(kind: str, **params):
    cls = REGISTRY[kind]
    return cls(cls.Params.model_validate({"type": kind, **params}))


def run_local(path):
    return run_manifest(load_manifest(path), log=lambda message: None)


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


# ----------------------------------------------------------------------------- runner pieces


def test_groups_keep_order_bound_size_and_feed_every_worker():
    units = list(range(10))
    assert groups(units, 4, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert groups(units, 16, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # >= 3 groups for 3 workers
    assert groups(units, 16, 1) == [units]
    assert groups([], 4, 2) == []
    assert sum(groups(units, 3, 2), []) == units


def test_model_context_normalises_and_stacks_the_chosen_images():
    ctx = context(tiny_net(), n=2)
    x = ctx.images(["img1.png"])
    assert x.shape == (1, 3, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x[0].permute(1, 2, 0), torch.from_numpy(ctx.pixels["img1.png"]).float() / 255)
    z = ctx.normalize(x)
    assert torch.allclose(z[0, 1], (x[0, 1] - 0.4) / 0.25)
    assert ctx.num_classes() == 3
    assert ctx.label("img0.png") == 0 and ctx.label("nope") is None


# ----------------------------------------------------------------------------- filters


def test_rgb_filters_hand_worked():
    w = torch.tensor([[-1.0, 0.0, 1.0], [2.0, 4.0, 0.0]]).view(2, 3, 1, 1)
    per_filter = rgb_filters(w, "filter")[:, 0, 0]  # (K, 3)
    # filter 0: min -1, max 1 -> (w + 1) / 2; filter 1: min 0, max 4 -> w / 4
    assert per_filter.tolist() == [[0, 128, 255], [128, 255, 0]]
    glob = rgb_filters(w, "global")[:, 0, 0]
    # one scale: 0.5 + w / (2 * 4)
    assert glob.tolist() == [[96, 128, 159], [191, 255, 128]]


def test_slice_scale_per_filter_and_per_layer():
    w = torch.zeros(2, 2, 1, 1)
    w[0, 0], w[0, 1], w[1, 0], w[1, 1] = 1.0, -0.5, 4.0, 2.0
    assert slice_scale(w, "filter").flatten().tolist() == [1.0, -0.5, 1.0, 0.5]
    assert slice_scale(w, "global").flatten().tolist() == [0.25, -0.125, 1.0, 0.5]


def test_filters_rows_and_pictures_match_the_weights():
    net = tiny_net()
    a = analysis("filters", layers=["0", "2"])
    ctx = context(net)
    assert a.units(ctx) == ["0", "2"]
    result = run_units(a, a.units(ctx), ctx)
    tables, images = result.tables, result.images
    t = tables[""].to_pandas()
    assert len(t) == (4 + 5) * 2
    assert set(t["norm"]) == {"filter", "global"}
    deep = t[(t.layer == "2") & (t.channel == 3) & (t.norm == "global")].iloc[0]
    assert (deep.in_channels, deep.height, deep.width) == (4, 3, 3)
    np.testing.assert_allclose(deep.weight, net[2].weight[3].detach().flatten().numpy(), rtol=0, atol=0)
    assert deep.l2 == pytest.approx(float(net[2].weight[3].detach().norm()), rel=1e-6)
    pictures = dict(images)
    assert set(t["key"]) | set(t["grid_key"]) == set(pictures)
    # The first layer's picture is its RGB kernel (3x3) enlarged by whole pixels.
    first = decode(pictures[t[(t.layer == "0") & (t.channel == 1) & (t.norm == "filter")].key.iloc[0]])
    small = rgb_filters(net[0].weight, "filter")[1]
    factor = first.shape[0] // 3
    np.testing.assert_array_equal(first[::factor, ::factor], small)


def test_filters_default_layer_and_model_checks():
    net = tiny_net()
    assert first_conv(net) == "0"
    assert analysis("filters").units(context(net)) == ["0"]
    assert analysis("activation_maps", layers=["2", "6"]).check_model(net, (8, 8)) == [
        (("layers", 1), "layer '6' outputs shape (3,) per image, not (C, H, W) feature maps")]
    assert analysis("filters", layers=["1"]).check_model(net, (8, 8)) == [
        (("layers", 0), "layer '1' is a ReLU, not a Conv2d: filters draws conv weights")]
    assert len(filter_pictures(net[2].weight, "filter", 16)) == 5


def test_filters_on_a_non_conv_layer_is_a_manifest_error(tmp_path, resnet20_weights, image_folder):
    path = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                          dataset={"kind": "image_folder", "root": str(image_folder)},
                          analyses=[{"type": "filters", "layers": ["conv1", "bn1"]}])
    with pytest.raises(ManifestError) as e:
        check_manifest(load_manifest(path))
    assert "analyses[0].layers[1]: layer 'bn1' is a BatchNorm2d, not a Conv2d" in str(e.value)


# ----------------------------------------------------------------------------- activation maps


def test_activation_maps_equal_the_hooked_layer_and_per_image_runs():
    net = tiny_net()
    ctx = context(net, n=3)
    a = analysis("activation_maps", layers=["1", "2"])
    ids = a.units(ctx)
    assert ids == list(ctx.pixels)
    together = run_units(a, ids, ctx).tables[""].to_pandas()
    alone = run_units(a, ids[2:], ctx).tables[""].to_pandas()
    assert len(together) == 3 * (4 + 5)
    with torch.no_grad():
        relu1 = net[1](net[0](ctx.normalize(ctx.images(ids))))
        conv2 = net[2](relu1)
    row = together[(together.image_id == ids[2]) & (together.layer == "2") & (together.channel == 4)].iloc[0]
    np.testing.assert_allclose(row["map"], conv2[2, 4].flatten().numpy(), atol=1e-5)
    assert row["max"] == pytest.approx(float(conv2[2, 4].max()), abs=1e-5)
    assert (row.height, row.width, row.label) == (8, 8, 2)
    # A batch of one gives the same maps as the batch of three.
    same = together[together.image_id == ids[2]].reset_index(drop=True)
    np.testing.assert_allclose(np.stack(same["map"]), np.stack(alone["map"]), atol=1e-5)


def test_channel_tiles_share_the_layer_scale_or_use_their_own():
    maps = torch.zeros(2, 2, 2)
    maps[0, 0, 0], maps[1, 0, 0] = 4.0, 1.0
    layer = channel_tiles(maps, "layer", 2)
    own = channel_tiles(maps, "channel", 2)
    # Channel 1's peak is a quarter of the layer's max, but its own max on its own scale.
    assert layer[1][0, 0].tolist() != layer[0][0, 0].tolist()
    assert own[1][0, 0].tolist() == own[0][0, 0].tolist()
    assert layer[0].shape == (2, 2, 3)


# ----------------------------------------------------------------------------- invariance


def test_translate_is_an_exact_shift_with_zero_fill():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) + 1
    right = transform_images(x, "translate", 1)
    expected = torch.zeros_like(x)
    expected[..., 1:] = x[..., :-1]
    assert torch.equal(right, expected)
    left = transform_images(x, "translate", -2)
    expected = torch.zeros_like(x)
    expected[..., :-2] = x[..., 2:]
    assert torch.equal(left, expected)
    down = transform_images(x, "translate", 1, axis="y")
    expected = torch.zeros_like(x)
    expected[..., 1:, :] = x[..., :-1, :]
    assert torch.equal(down, expected)
    up = transform_images(x, "translate", -3, axis="y")
    expected = torch.zeros_like(x)
    expected[..., :1, :] = x[..., 3:, :]
    assert torch.equal(up, expected)
    # Vertical is horizontal on the transposed image.
    assert torch.equal(transform_images(x, "translate", 2, axis="y"),
                       transform_images(x.transpose(-1, -2), "translate", 2).transpose(-1, -2))
    assert torch.allclose(transform_images(x, "rotate", 360.0), x, atol=1e-4)
    assert torch.allclose(transform_images(x, "scale", 1.0), x)
    with pytest.raises(ValueError, match="unknown transform 'shear'"):
        transform_images(x, "shear", 1.0)  # type: ignore[arg-type]


def test_invariance_curves_match_a_per_image_loop():
    net = tiny_net()
    ctx = context(net, n=3)
    x = ctx.normalize(ctx.images(list(ctx.pixels)))
    labels = torch.tensor([0, 2, -1])
    amounts = [-2.0, 0.0, 3.0]
    curves = invariance_curves(net, x, labels, ["1", "3"], "translate", amounts, chunk=4)
    assert curves["distance"].shape == (2, 3, 3)
    assert torch.all(curves["distance"][:, 1] == 0)  # amount 0 is the identity
    for a, amount in enumerate(amounts):
        for i in range(3):
            with torch.no_grad():
                moved = transform_images(x[i:i + 1], "translate", amount)
                f0, f1 = net[:2](x[i:i + 1]), net[:2](moved)
                probs = torch.softmax(net(moved), dim=1)[0]
            assert float(curves["distance"][0, a, i]) == pytest.approx(float((f1 - f0).norm()), rel=1e-4, abs=1e-4)
            rel = float((f1 - f0).norm() / f0.norm())
            assert float(curves["relative_distance"][0, a, i]) == pytest.approx(rel, rel=1e-4, abs=1e-5)
            if labels[i] >= 0:
                assert float(curves["prob"][a, i]) == pytest.approx(float(probs[labels[i]]), abs=1e-5)
            else:
                assert np.isnan(float(curves["prob"][a, i]))
            assert int(curves["predicted"][a, i]) == int(probs.argmax())


def test_invariance_rows_and_one_plot_per_transform():
    net = tiny_net()
    ctx = context(net, n=2)
    a = analysis("invariance", layers=["1"], scale=[], rotate=[0, 90])
    units = a.units(ctx)
    assert units == [("translate", "x"), ("rotate", None)]  # an empty range leaves a transform out
    result = run_units(a, units, ctx)
    tables, images = result.tables, result.images
    t = tables[""].to_pandas()
    translate = a.amounts("translate", (8, 8))
    assert translate == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert len(t) == 2 * (len(translate) + 2)
    assert set(t["key"]) == {"invariance-translate", "invariance-rotate"}
    assert sorted(key for key, _ in images) == ["invariance-rotate", "invariance-translate"]
    assert set(t[t["transform"] == "translate"].axis) == {"x"} and t[t["transform"] == "rotate"].axis.isna().all()


def test_invariance_vertical_translation_is_its_own_plot():
    net = tiny_net()
    ctx = context(net, n=2)
    both = analysis("invariance", layers=["1"], scale=[], rotate=[], axis=["x", "y"], translate=[0, 2])
    assert both.units(ctx) == [("translate", "x"), ("translate", "y")]
    result = run_units(both, both.units(ctx), ctx)
    t = result.tables[""].to_pandas()
    assert sorted(key for key, _ in result.images) == ["invariance-translate", "invariance-translate-y"]
    assert set(zip(t.axis, t.key)) == {("x", "invariance-translate"), ("y", "invariance-translate-y")}
    # The y rows equal the curves of a vertical shift computed directly.
    x = ctx.normalize(ctx.images(list(ctx.pixels)))
    labels = torch.tensor([ctx.labels.get(i, -1) for i in ctx.pixels])
    direct = invariance_curves(net, x, labels, ["1"], "translate", [0.0, 2.0], axis="y")
    y_rows = t[(t.axis == "y") & (t.amount == 2.0)].sort_values("image_id")
    np.testing.assert_allclose(y_rows.distance.to_numpy(), direct["distance"][0, 1].numpy()[
        np.argsort(list(ctx.pixels))], rtol=1e-6)
    assert (t[t.amount == 0].distance == 0).all()


# ----------------------------------------------------------------------------- through Ray


def test_model_stage_runs_through_ray_and_resumes(ray_session, resnet20_weights, tmp_path, image_folder):
    entries = [
        {"type": "filters", "layers": ["conv1", "layer1.0.conv1"]},
        {"type": "activation_maps", "layers": ["layer1"], "sample": {"n": 3, "seed": 1}},
        {"type": "invariance", "layers": ["layer1", "layer3"], "images": ["class0/000.png", "class2/005.png"],
         "scale": [0.8, 1.0], "rotate": []},
    ]
    path = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                          dataset={"kind": "image_folder", "root": str(image_folder)}, analyses=entries,
                          execution={"workers": 2})
    result = run_local(path)
    assert result.ok, result.analyses
    out = tmp_path / "out"
    filters = pd.read_parquet(out / "filters")
    assert len(filters) == (16 + 16) * 2 and result.analyses["filters"]["stage"] == "model"
    assert result.analyses["filters"]["tasks"] == 2
    maps = pd.read_parquet(out / "activation_maps")
    assert maps.image_id.nunique() == 3 and len(maps) == 3 * 16
    inv = pd.read_parquet(out / "invariance")
    assert set(inv.image_id) == {"class0/000.png", "class2/005.png"}
    assert (inv[(inv.transform == "scale") & (inv.amount == 1.0)].distance == 0).all()
    for name in ("filters", "activation_maps", "invariance"):
        assert (out / name / "_SUCCESS").exists()
        assert pd.read_parquet(out / name).shard.notna().all()
    again = run_local(path)
    assert all(info["status"] == "skipped" for info in again.analyses.values())


def test_unknown_chosen_image_is_a_manifest_error(ray_session, resnet20_weights, tmp_path, image_folder):
    path = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                          dataset={"kind": "image_folder", "root": str(image_folder)},
                          analyses=[{"type": "activation_maps", "layers": ["layer1"], "images": ["nope.png"]}])
    with pytest.raises(ManifestError, match=r"analyses\[0\]\.images: 1 image id\(s\) not in the dataset: 'nope.png'"):
        run_local(path)


# ----------------------------------------------------------------------------- optimisations


IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def demo_context(model, n_images: int = 0) -> ModelContext:
    from pipeline.demo import render

    pixels = {f"shape{i}.png": render(i, 321, 32)[0] for i in range(n_images)}
    labels = {f"shape{i}.png": render(i, 321, 32)[1] for i in range(n_images)}
    return ModelContext(model=model, input_size=(32, 32), pixels=pixels, labels=labels,
                        label_names=["circle", "cross", "square", "triangle"], **IMAGENET)


def test_class_model_images_are_their_class(demo_cnn):
    ctx = demo_context(demo_cnn)
    a = analysis("class_model", steps=60)
    units = a.units(ctx)
    assert units == [(0, 0), (1, 0), (2, 0), (3, 0)]
    tables = run_units(a, units, ctx).tables
    t = tables[""].to_pandas()
    assert list(t["class"]) == [0, 1, 2, 3] and list(t["class_name"]) == ctx.label_names
    assert (t.final_value > t.start_value + 10).all(), t[["start_value", "final_value"]]
    assert (t.probability > 0.9).all() and (t.predicted == t["class"]).all() and (t["rank"] == 1).all()
    # The stored image is the one that was scored.
    image = torch.tensor(np.stack(t["image"])).view(4, 3, 32, 32)
    with torch.no_grad():
        probs = torch.softmax(demo_cnn(ctx.normalize(image)), dim=1)
    np.testing.assert_allclose(probs[range(4), range(4)].numpy(), t.probability, atol=1e-4)
    assert a.summary(tables)["classified_as_target"] == 1.0


def test_a_units_result_does_not_depend_on_its_group(demo_cnn):
    # oneDNN's batched convolutions round differently per batch size, and an optimisation can
    # amplify that; without it, the ascent itself couples no rows.
    ctx = demo_context(demo_cnn)
    for kind, params in [("class_model", {"restarts": 2, "steps": 15}),
                         ("neuron_ascent", {"layer": "relu3", "channels": [1, 4, 6], "steps": 15,
                                            "parameterization": "fourier"})]:
        a = analysis(kind, **params)
        units = a.units(ctx)
        with torch.backends.mkldnn.flags(enabled=False):
            together = run_units(a, units, ctx).tables[""].to_pandas()
            alone = run_units(a, units[2:3], ctx).tables[""].to_pandas()
        np.testing.assert_allclose(together.loc[2, "image"], alone.loc[0, "image"], atol=1e-5)
        assert together.loc[2, "key"] == alone.loc[0, "key"]
    assert len(together) == 3


def test_neuron_ascent_raises_its_channel(demo_cnn):
    ctx = demo_context(demo_cnn)
    a = analysis("neuron_ascent", layer="relu3", channels=[0, 5], steps=40, neuron="center")
    t = run_units(a, a.units(ctx), ctx).tables[""].to_pandas()
    assert list(t.channel) == [0, 5] and set(t.objective) == {"center"}
    assert (t.final_value > 3 * t.start_value + 1).all(), t[["start_value", "final_value"]]
    from jobs.core.hooks import forward_to

    image = torch.tensor(np.stack(t["image"])).view(2, 3, 32, 32)
    with torch.no_grad():
        acts = forward_to(demo_cnn, "relu3", ctx.normalize(image))
    np.testing.assert_allclose([acts[0, 0, 4, 4], acts[1, 5, 4, 4]], t.final_value, rtol=1e-4, atol=1e-5)
    assert analysis("neuron_ascent", layer="relu3").units(ctx)[-1] == (63, 0)


def test_model_checks_name_the_field(demo_cnn):
    assert analysis("class_model", classes=[1, 9]).check_model(demo_cnn, (32, 32)) == [
        (("classes",), "class(es) 9 not in a model with 4 outputs (0..3)")]
    assert analysis("neuron_ascent", layer="relu3", channels=[64]).check_model(demo_cnn, (32, 32)) == [
        (("channels",), "channel(s) 64 not in layer 'relu3', which has 64 (0..63)")]
    assert analysis("neuron_ascent", layer="fc", channels=[3]).check_model(demo_cnn, (32, 32)) == []


def test_inversion_keeps_more_of_the_image_early_than_late(demo_cnn):
    ctx = demo_context(demo_cnn, n_images=2)
    a = analysis("inversion", layers=["relu1", "relu4"], steps=80)
    units = a.units(ctx)
    assert units == [("relu1", "shape0.png"), ("relu1", "shape1.png"), ("relu4", "shape0.png"),
                     ("relu4", "shape1.png")]
    tables = run_units(a, units, ctx).tables
    t = tables[""].to_pandas()
    early, late = t[t.layer == "relu1"], t[t.layer == "relu4"]
    assert early.pixel_error.mean() < 0.6 * late.pixel_error.mean(), t[["layer", "pixel_error"]]
    # pixel_error is the RMSE between the stored reconstruction and the original.
    recon = np.stack(t["image"]).reshape(4, 3, 32, 32)
    original = ctx.images(["shape0.png", "shape1.png", "shape0.png", "shape1.png"]).numpy()
    np.testing.assert_allclose(np.sqrt(((recon - original) ** 2).mean(axis=(1, 2, 3))), t.pixel_error, atol=1e-4)
    summary = a.summary(tables)
    assert summary["pixel_error"]["relu1"] < summary["pixel_error"]["relu4"]


def test_deepdream_amplifies_its_layer(demo_cnn):
    ctx = demo_context(demo_cnn, n_images=2)
    a = analysis("deepdream", layers=["relu3"], size=48, octaves=2)
    t = run_units(a, a.units(ctx), ctx).tables[""].to_pandas()
    assert (t.final_value > 2 * t.start_value).all()
    assert (t.height == 48).all() and len(t["image"][0]) == 3 * 48 * 48


def test_a_failing_entry_fails_alone_and_reruns(ray_session, tmp_path, image_folder):
    from tests.test_run import FLAKY

    (tmp_path / "flaky.py").write_text(FLAKY)
    (tmp_path / "FAIL").write_text("")  # the model now fails on batches of more than one input
    model = {"source": "python", "entrypoint": "flaky:build", "preprocess": {"resize": 32, "crop": 32}}
    entries = [{"type": "class_model", "classes": [0, 2], "steps": 2}, {"type": "filters"}]
    path = write_manifest(tmp_path / "m.yaml", model=model, analyses=entries,
                          dataset={"kind": "image_folder", "root": str(image_folder)})
    result = run_local(path)
    assert result.status == "failed"
    info = result.analyses["class_model"]
    assert info["status"] == "failed" and "boom: the model failed on this batch" in info["error"]
    assert not (tmp_path / "out" / "class_model").exists()
    assert result.analyses["filters"]["status"] == "complete"
    (tmp_path / "FAIL").unlink()
    again = run_local(path)
    assert again.ok
    assert again.analyses["filters"]["status"] == "skipped"
    assert again.analyses["class_model"]["status"] == "complete" and again.analyses["class_model"]["rows"] == 2
