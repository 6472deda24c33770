"""Incremental occlusion inference (Nakandala et al., SIGMOD 2019) against the batched sweep."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jobs.attribution import incremental
from jobs.attribution.incremental import IncrementalRunner, Unsupported, cached_plan, incremental_plan
from jobs.attribution.occlusion import OcclusionParams, fill_source, occlusion_sweep


@pytest.fixture(autouse=True)
def always_incremental(monkeypatch):
    """Tiny models save little work; the comparisons here must run the incremental path anyway."""
    monkeypatch.setattr(incremental, "WORTH_IT", 1.0)


def _calibrate(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random but non-trivial BatchNorm statistics; the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


class Residual(nn.Module):
    """Every supported kind: strided/dilated/padded convs, BN, ReLU module and F.relu, both
    poolings with padding, a residual add whose branch has a strided conv, GAP + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.branch = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.short = nn.Conv2d(6, 8, 1, stride=2)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.avg_ex = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False)
        self.drop = nn.Dropout(0.3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        y = F.relu(self.dil(self.branch(x))) * 0.5 + self.short(x)
        y = self.avg_ex(self.avg(F.leaky_relu(y, 0.1)))
        return self.fc(self.drop(self.gap(y)).flatten(1))


def sequential() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 5, stride=2, padding=2)), ("bn1", nn.BatchNorm2d(4)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 6, 3)), ("relu2", nn.ReLU6()), ("pool", nn.AvgPool2d(2)),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(6, 3)),
    ]))


class SigmoidGate(nn.Module):
    """``x * sigmoid(conv(x))``: a product of two changed maps is not supported."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = x * torch.sigmoid(self.gate(x))
        return self.fc(x.mean(dim=(2, 3)))


class Upsampled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.up(self.conv(x)).mean(dim=(2, 3)))


def both(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, window: int, stride: int,
         **kw) -> tuple[dict, dict]:
    got = occlusion_sweep(model, x, targets, window, stride, incremental=True, **kw)
    ref = occlusion_sweep(model, x, targets, window, stride, incremental=False, **kw)
    return got, ref


def assert_close(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    torch.testing.assert_close(got["prob_map"], ref["prob_map"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["clean_prob"], ref["clean_prob"], atol=1e-6, rtol=0)
    assert torch.equal(got["label_map"], ref["label_map"])
    for key in ("feature_map", "clean_feature"):
        if key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-4, rtol=1e-5)
    if "feature_channel" in ref:
        assert torch.equal(got["feature_channel"], ref["feature_channel"])


def images(n: int, size: int | tuple[int, int], seed: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def used_incremental(model: nn.Module, shape: tuple[int, ...]) -> bool:
    return isinstance(cached_plan(model, shape), incremental.Plan)


@pytest.mark.parametrize("window,stride", [(3, 2), (5, 3), (4, 4), (7, 1), (16, 16)])
def test_every_layer_kind_matches_the_sweep(window, stride):
    torch.manual_seed(0)
    model = _calibrate(Residual())
    x = images(2, 16)
    targets = torch.tensor([1, 4])
    got, ref = both(model, x, targets, window, stride, chunk=37)
    assert used_incremental(model, (3, 16, 16))
    assert_close(got, ref)
    assert (ref["prob_map"] - ref["clean_prob"][:, None, None]).abs().max() > 1e-4


@pytest.mark.parametrize("fill", ["zero", "mean", "blur"])
def test_fills_and_rectangular_images(fill):
    torch.manual_seed(1)
    model = _calibrate(sequential())
    x = images(3, (13, 10))
    got, ref = both(model, x, torch.tensor([0, 1, 2]), 4, 3, fill=fill, chunk=16)
    assert used_incremental(model, (3, 13, 10))
    assert_close(got, ref)


@pytest.mark.parametrize("feature", [("conv2", 3), ("conv1", None), ("relu2", None), ("fc", 1), ("gap", 2)])
def test_feature_totals(feature):
    torch.manual_seed(2)
    model = _calibrate(sequential())
    x = images(3, 14, seed=3)
    got, ref = both(model, x, torch.tensor([2, 0, 1]), 5, 2, feature=feature, chunk=20)
    assert_close(got, ref)


def test_batch_and_chunk_invariance():
    torch.manual_seed(3)
    model = _calibrate(Residual())
    x = images(3, 12, seed=5)
    targets = torch.tensor([0, 3, 2])
    base = occlusion_sweep(model, x, targets, 4, 2, chunk=1000)
    for chunk in (1, 7, 50):
        assert_close(occlusion_sweep(model, x, targets, 4, 2, chunk=chunk), base)
    for i in range(3):
        alone = occlusion_sweep(model, x[i:i + 1], targets[i:i + 1], 4, 2, chunk=9)
        assert_close(alone, {k: v[i:i + 1] for k, v in base.items()})


@pytest.mark.parametrize("make", [SigmoidGate, Upsampled])
def test_unsupported_models_fall_back_to_the_sweep(make):
    torch.manual_seed(4)
    model = make().eval()
    with pytest.raises(Unsupported, match="not supported"):
        incremental_plan(model, (3, 10, 10))
    x = images(2, 10)
    got, ref = both(model, x, torch.tensor([0, 2]), 3, 2)
    assert_close(got, ref)


def test_hooks_force_the_sweep():
    model = _calibrate(sequential())
    calls: list[int] = []
    handle = model.conv2.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        x = images(1, 10)
        occlusion_sweep(model, x, torch.tensor([0]), 4, 3)
        assert calls == [1, 9]  # the clean image, then all 9 copies through the real model
    finally:
        handle.remove()


def test_untraceable_model_falls_back():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow does not trace
                x = self.conv(x)
            return x.mean(dim=(2, 3))

    model = Branchy().eval()
    assert "does not trace" in str(cached_plan(model, (3, 8, 8)))
    got, ref = both(model, images(2, 8), torch.tensor([0, 1]), 3, 3)
    assert_close(got, ref)


def test_regions_stay_small_and_memory_bounded():
    # Demo-like stack: the first conv's region is the 12px square plus the kernel's reach.
    from pipeline.zoo import DemoCNN

    model = _calibrate(DemoCNN())
    plan = incremental_plan(model, (3, 64, 64))
    x = images(2, 64)
    runner = IncrementalRunner(plan, x, fill_source(x, "zero", 12), 12, 4, None, chunk=64)
    geo = runner.geo
    boxes = {n.name: r.box for n, r in geo.regions.items()}
    assert boxes["x"] == (12, 12) and boxes["conv1"] == (14, 14) and boxes["pool1"] == (8, 8)
    assert all(n.name in ("gap", "flatten", "fc") for n in geo.full)
    assert runner.group <= 2  # clean activations of at most 2 images at a time (196 positions, chunk 64)


def test_demo_cnn_matches_the_sweep():
    from pipeline.zoo import DemoCNN

    torch.manual_seed(5)
    model = _calibrate(DemoCNN())
    x = images(2, 64, seed=7)
    got, ref = both(model, x, torch.tensor([1, 3]), 12, 4, chunk=128, feature=("conv3", None))
    assert used_incremental(model, (3, 64, 64))
    assert_close(got, ref)


def test_cifar_resnet20_matches_the_sweep():
    from pipeline.zoo import CifarResNet

    torch.manual_seed(6)
    model = _calibrate(CifarResNet(20))
    x = images(2, 32, seed=8)
    got, ref = both(model, x, torch.tensor([4, 9]), 8, 4, chunk=64, feature=("layer1.2.conv2", 5))
    assert used_incremental(model, (3, 32, 32))  # the option-A shortcut (slice + channel pad) traces
    assert_close(got, ref)



def tiny_bottleneck_resnet() -> nn.Module:
    """torchvision's ResNet-50 layer kinds at toy width: stem, maxpool, two ``Bottleneck`` blocks
    (the second strided, both with a conv + BN shortcut), adaptive avgpool, flatten, linear."""
    from torchvision.models.resnet import Bottleneck

    def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)), ("bn1", nn.BatchNorm2d(8)),
        ("relu", nn.ReLU(inplace=True)), ("maxpool", nn.MaxPool2d(3, stride=2, padding=1)),
        ("layer1", Bottleneck(8, 4, downsample=shortcut(8, 16, 1))),
        ("layer2", Bottleneck(16, 8, stride=2, downsample=shortcut(16, 32, 2))),
        ("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(32, 5)),
    ]))


def test_torchvision_bottlenecks_match_the_sweep():
    torch.manual_seed(9)
    model = _calibrate(tiny_bottleneck_resnet())
    x = images(2, 32, seed=10)
    got, ref = both(model, x, torch.tensor([0, 3]), 8, 4, chunk=64, feature=("layer2.conv2", None))
    plan = cached_plan(model, (3, 32, 32))
    assert isinstance(plan, incremental.Plan)
    source = fill_source(x, "zero", 8)
    assert IncrementalRunner(plan, x, source, 8, 4, None, 64).geo.work < 1  # regions, not a full rerun
    assert_close(got, ref)

def test_manifest_switch():
    assert OcclusionParams().incremental is True
    assert OcclusionParams(incremental=False).incremental is False
    assert "Nakandala" in (OcclusionParams.model_fields["incremental"].description or "")


def test_feature_of_a_block_falls_back():
    # "layer1.0" is traced through (not one node): the feature is taken from the plain sweep.
    from pipeline.zoo import CifarResNet

    torch.manual_seed(7)
    model = _calibrate(CifarResNet(20))
    x = images(1, 32, seed=9)
    got, ref = both(model, x, torch.tensor([3]), 16, 16, feature=("layer1.0", None))
    assert_close(got, ref)


def test_functional_pooling():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.fc = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.max_pool2d(torch.relu(self.conv(x)), 3, 2, 1)
            x = F.avg_pool2d(x, 2, stride=1, padding=1, count_include_pad=False)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(8)
    model = Functional().eval()
    x = images(2, 15, seed=10)
    got, ref = both(model, x, torch.tensor([0, 2]), 5, 2, chunk=11)
    assert used_incremental(model, (3, 15, 15))
    assert_close(got, ref)


def test_too_little_saving_runs_the_sweep(monkeypatch):
    from pipeline.zoo import CifarResNet, DemoCNN

    monkeypatch.setattr(incremental, "WORTH_IT", 0.6)
    x = images(1, 64)
    demo = IncrementalRunner(incremental_plan(_calibrate(DemoCNN()), (3, 64, 64)), x, fill_source(x, "zero", 12),
                             12, 4, None, chunk=64)
    assert demo.geo.work < 0.35  # ~1/4 of the multiply-adds
    resnet = _calibrate(CifarResNet(20))
    x = images(1, 32)
    runner = IncrementalRunner(incremental_plan(resnet, (3, 32, 32)), x, fill_source(x, "zero", 8), 8, 4, None, 64)
    assert runner.geo.work > 0.6  # the region fills the 16x16 maps in the second stage
    calls: list[int] = []
    got, ref = both(resnet, x, torch.tensor([1]), 8, 4)
    assert_close(got, ref)
    handle = resnet.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    try:
        occlusion_sweep(resnet, x, torch.tensor([1]), 8, 4, incremental=False)
    finally:
        handle.remove()
    assert calls == [1, 49]
