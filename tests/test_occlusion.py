"""Occlusion sweeps: the chunked kernel against a one-forward-per-position loop and by hand."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from jobs.attribution.occlusion import forwards_needed, occlusion_sweep
from scripts import bench_occlusion
from scripts.bench_occlusion import occlusion_loop


def tiny_net(seed: int = 0) -> nn.Module:
    """3 classes on 3x12x12 inputs; ``relu1`` is in place, so ``conv1``'s hook must copy."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)),
        ("relu1", nn.ReLU(inplace=True)),
        ("conv2", nn.Conv2d(4, 6, 3, stride=2)),
        ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flat", nn.Flatten()),
        ("fc", nn.Linear(6, 3)),
    ])).eval()


def tiny_batch(n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    return x, torch.arange(n) % 3


def assert_same(got: dict, ref: dict, atol: float = 1e-5) -> None:
    assert got["prob_map"].dtype == torch.float32 and got["label_map"].dtype == torch.int64
    assert got["prob_map"].shape == ref["prob_map"].shape
    torch.testing.assert_close(got["prob_map"], ref["prob_map"], atol=atol, rtol=0)
    assert torch.equal(got["label_map"], ref["label_map"])
    torch.testing.assert_close(got["clean_prob"], ref["clean_prob"], atol=atol, rtol=0)
    assert ("feature_map" in got) == ("feature_map" in ref)
    if "feature_map" in ref:
        torch.testing.assert_close(got["feature_map"], ref["feature_map"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got["clean_feature"], ref["clean_feature"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fill", ["zero", "mean", "blur"])
@pytest.mark.parametrize("feature", [None, ("conv1", 2)])
def test_sweep_matches_plain_loop(fill, feature):
    # 12 - 5 = 7 is not a multiple of 3: corners 0, 3, 6, and pixels 11 are never covered.
    model = tiny_net()
    x, targets = tiny_batch()
    got = occlusion_sweep(model, x, targets, window=5, stride=3, fill=fill, feature=feature, chunk=7)
    ref = occlusion_loop(model, x, targets, 5, 3, fill, feature=feature)
    assert got["prob_map"].shape == (4, 3, 3)
    assert_same(got, ref)
    # Occlusion must actually change something, or the comparison says little.
    assert (got["prob_map"] - got["clean_prob"][:, None, None]).abs().max() > 1e-3


def test_blur_sigma_and_rectangular_images():
    model = tiny_net()
    x = torch.randn(2, 3, 12, 9, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([2, 0])
    got = occlusion_sweep(model, x, targets, 4, 2, "blur", blur_sigma=1.3, feature=("fc", 1))
    ref = occlusion_loop(model, x, targets, 4, 2, "blur", blur_sigma=1.3, feature=("fc", 1))
    assert got["prob_map"].shape == (2, 5, 3)
    assert_same(got, ref)


def test_clean_feature_is_copied_before_in_place_relu():
    # Computed straight from conv1, no hooks: negative values must survive relu1(inplace).
    model = tiny_net()
    x, targets = tiny_batch(2)
    got = occlusion_sweep(model, x, targets, 6, 6, feature=("conv1", 0))
    with torch.no_grad():
        expected = model.conv1(x)[:, 0].sum(dim=(1, 2))
    torch.testing.assert_close(got["clean_feature"], expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fill", ["zero", "blur"])
def test_chunk_size_and_batching_do_not_change_results(fill):
    model = tiny_net()
    x, targets = tiny_batch(4)
    kw = dict(window=5, stride=3, fill=fill, feature=("conv2", 3))
    base = occlusion_sweep(model, x, targets, chunk=1000, **kw)
    for chunk in (1, 7):
        assert_same(occlusion_sweep(model, x, targets, chunk=chunk, **kw), base)
    for i in range(4):
        alone = occlusion_sweep(model, x[i:i + 1], targets[i:i + 1], chunk=5, **kw)
        assert_same(alone, {k: v[i:i + 1] for k, v in base.items()})


def region_model() -> nn.Module:
    """Logits ``[sum of x[0, 4:6, 6:8], 0]`` for 1x12x12 inputs: a fixed linear layer."""
    fc = nn.Linear(144, 2)
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.zero_()
        for r in (4, 5):
            for c in (6, 7):
                fc.weight[0, r * 12 + c] = 1.0
    return nn.Sequential(OrderedDict([("flat", nn.Flatten()), ("fc", fc)])).eval()


def test_hand_worked_region():
    # A constant image of value a: with k of the region's 4 pixels under a zero square,
    # the class-0 logit is (4 - k) a against 0, so p0 = 1 / (1 + exp(-(4 - k) a)).
    # Window 3, stride 2: corners 0, 2, 4, 6, 8 each way; the square at corner y covers
    # 0, 1, 2, 0, 0 of rows 4-5, and at corner x 0, 0, 1, 2, 0 of columns 6-7.
    a, window, stride = 1.0, 3, 2
    x = torch.full((2, 1, 12, 12), a)
    targets = torch.tensor([0, 1])
    got = occlusion_sweep(region_model(), x, targets, window, stride, "zero", feature=("fc", 0), chunk=10)

    corners = range(0, 12 - window + 1, stride)
    hits = [[len(set(range(y, y + window)) & {4, 5}) * len(set(range(c, c + window)) & {6, 7})
             for c in corners] for y in corners]
    p0 = [[1 / (1 + math.exp(-(4 - k) * a)) for k in row] for row in hits]
    assert hits[2][3] == 4 and hits[1][2] == 1 and hits[0][0] == 0
    torch.testing.assert_close(got["prob_map"][0], torch.tensor(p0), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["prob_map"][1], 1 - torch.tensor(p0), atol=1e-6, rtol=0)
    # Class 0 wins unless the whole region is covered, where the logits tie at 0 and the
    # lower index (class 0) is taken: the label map is all zeros.
    assert torch.equal(got["label_map"], torch.zeros(2, 5, 5, dtype=torch.long))
    torch.testing.assert_close(got["feature_map"][0], torch.tensor([[(4.0 - k) * a for k in row] for row in hits]))
    torch.testing.assert_close(got["clean_prob"], torch.tensor([1 / (1 + math.exp(-4 * a)),
                                                                1 - 1 / (1 + math.exp(-4 * a))]))
    # The image's own mean is a, so a mean-filled square changes nothing.
    same = occlusion_sweep(region_model(), x, targets, window, stride, "mean")
    torch.testing.assert_close(same["prob_map"], got["clean_prob"][:, None, None].expand(2, 5, 5))


def test_forward_count():
    # 2 images, window 3 / stride 3 on 12x12: 4x4 = 16 positions, 32 occluded copies.
    # With chunk 256: exactly 2 forwards -- one for the 2 clean images, one for all 32 copies.
    model = tiny_net()
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, inputs: sizes.append(inputs[0].shape[0]))
    try:
        x, targets = tiny_batch(2)
        out = occlusion_sweep(model, x, targets, 3, 3, chunk=256)
        assert out["prob_map"].shape == (2, 4, 4)
        assert sizes == [2, 32]
        assert forwards_needed(2, 16, 256) == 2
        sizes.clear()
        occlusion_sweep(model, x, targets, 3, 3, chunk=10)
        assert sizes == [2, 10, 10, 10, 2] and forwards_needed(2, 16, 10) == 5
    finally:
        handle.remove()


def test_invalid_arguments():
    model = tiny_net()
    x, targets = tiny_batch(2)
    with pytest.raises(ValueError, match="larger than the 12x12 image"):
        occlusion_sweep(model, x, targets, 13, 1)
    with pytest.raises(ValueError, match="window must be at least 1"):
        occlusion_sweep(model, x, targets, 0, 1)
    with pytest.raises(ValueError, match="stride must be at least 1"):
        occlusion_sweep(model, x, targets, 3, 0)
    with pytest.raises(ValueError, match="unknown occlusion fill"):
        occlusion_sweep(model, x, targets, 3, 3, fill="noise")
    with pytest.raises(ValueError, match=r"no layer 'conv9'.*'conv1', 'relu1', 'conv2'"):
        occlusion_sweep(model, x, targets, 3, 3, feature=("conv9", 0))
    with pytest.raises(ValueError, match="channel 4 is out of range: layer 'conv1' has 4 channels"):
        occlusion_sweep(model, x, targets, 3, 3, feature=("conv1", 4))
    with pytest.raises(ValueError, match="targets must lie in"):
        occlusion_sweep(model, x, torch.tensor([0, 3]), 3, 3)
    # The hook is gone after a failure.
    assert not model.conv1._forward_hooks


def test_bench_main_runs_on_tiny_random_sizes(capsys):
    result = bench_occlusion.main(["--random", "--images", "2", "--window", "16", "--stride", "16"])
    assert result["images"] == 2 and result["positions_per_image"] == 4
    assert result["ratio"] > 0
    assert result["max_abs_prob_diff"] <= 1e-5 and result["label_agreement"] == 1.0
    assert "random-weights" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the strongest feature map


def test_strongest_channel_equals_a_loop_over_its_own_channel():
    model = tiny_net(seed=1)
    x, targets = tiny_batch(n=5, seed=4)
    got = occlusion_sweep(model, x, targets, window=4, stride=3, feature=("conv2", None), chunk=6)
    with torch.no_grad():
        totals = torch.stack([model.conv2(model.relu1(model.conv1(x[i:i + 1]).clone()))[0].flatten(1).sum(1)
                              for i in range(len(x))])
    assert got["feature_channel"].tolist() == totals.argmax(dim=1).tolist()
    assert len(set(got["feature_channel"].tolist())) > 1  # the images really differ in their strongest map
    for i in range(len(x)):
        c = int(got["feature_channel"][i])
        ref = occlusion_loop(model, x[i:i + 1], targets[i:i + 1], 4, 3, "zero", feature=("conv2", c))
        torch.testing.assert_close(got["feature_map"][i:i + 1], ref["feature_map"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got["clean_feature"][i:i + 1], ref["clean_feature"], atol=1e-4, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
def test_strongest_projection_is_the_deconvnet_gradient_of_its_peak():
    pytest.importorskip("captum.attr", reason="captum (a test extra) is the reference")
    from captum.attr import NeuronDeconvolution

    from jobs.attribution.occlusion import strongest_projection

    model = tiny_net(seed=3)
    model.relu1.inplace = False  # captum's ReLU hooks need out-of-place ReLUs
    x, _ = tiny_batch(n=3, seed=4)
    channels = torch.tensor([0, 5, 2])
    got = strongest_projection(model, x, "relu2", channels, chunk=2)
    with torch.no_grad():
        acts = model.relu2(model.conv2(model.relu1(model.conv1(x))))
    method = NeuronDeconvolution(model, model.relu2)
    for i, c in enumerate(channels.tolist()):
        flat = int(acts[i, c].argmax())
        y, xx = divmod(flat, acts.shape[-1])
        expected = method.attribute(x[i:i + 1].clone().requires_grad_(True), neuron_selector=(c, y, xx))
        torch.testing.assert_close(got[i:i + 1], expected.float(), rtol=1e-5, atol=1e-6)


def test_occlusion_rows_with_the_strongest_feature_map():
    import numpy as np

    from jobs.attribution.occlusion import Occlusion
    from tests.harness import map_table

    model = tiny_net(seed=1)
    px = np.random.default_rng(2).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    analysis = Occlusion(Occlusion.Params(window=4, stride=4, metrics=False, cell=24,
                                          feature={"layer": "conv2", "channel": "strongest"}))
    table, images = map_table(analysis, model, ["a", "b", "c"], px, batch_size=2)
    assert table.column_names == analysis.schema()[""].names
    rows = table.to_pylist()
    for row in rows:
        assert 0 <= row["feature_channel"] < 6 and len(row["feature_projection"]) == 3 * 12 * 12
        assert row["projection_key"] in images and images[row["projection_key"]].size == (24, 24)
    fixed = Occlusion(Occlusion.Params(window=4, stride=4, metrics=False, render=False,
                                       feature={"layer": "conv2", "channel": rows[0]["feature_channel"]}))
    alone, _ = map_table(fixed, model, ["a"], px[:1])
    np.testing.assert_allclose(rows[0]["feature_map"], alone.column("feature_map")[0].as_py(), rtol=1e-5, atol=1e-5)
