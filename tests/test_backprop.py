"""The backprop kernels against per-image autograd, module backward hooks and hand-worked numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jobs.attribution.backprop import (
    cam,
    find_cam_head,
    grad_cam,
    input_gradients,
    layer_gradients,
    reduce_channels,
    relu_rule,
)
from jobs.core.kernels import upsample

# ---------------------------------------------------------------- tiny models


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so eval-mode BatchNorm is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


class ModuleNet(nn.Module):
    """conv-bn-ReLU-conv-ReLU-GAP-linear with nn.ReLU modules."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.act2 = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.fc(h.mean(dim=(2, 3)))


class FunctionalNet(ModuleNet):
    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


class InplaceFunctionalNet(ModuleNet):
    def forward(self, x):
        h = torch.relu_(self.bn1(self.conv1(x)))
        h = F.relu(self.conv2(h), inplace=True)
        return self.fc(h.mean(dim=(2, 3)))


class MethodNet(ModuleNet):
    def forward(self, x):
        h = self.bn1(self.conv1(x)).relu()
        h = F.relu_(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


class IgnoresReturnNet(ModuleNet):
    """In-place ReLUs whose return value is dropped: only true in-place semantics work."""

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        F.relu(h, inplace=True)
        h = self.conv2(h)
        h.relu_()
        return self.fc(h.mean(dim=(2, 3)))


VARIANTS = [
    lambda: ModuleNet(inplace=True),
    FunctionalNet,
    InplaceFunctionalNet,
    MethodNet,
    IgnoresReturnNet,
]


def _module_net() -> ModuleNet:
    torch.manual_seed(0)
    return _randomise_bn(ModuleNet()).eval()


def _same_weights(model: nn.Module, make) -> nn.Module:
    other = make().eval()
    other.load_state_dict(model.state_dict())
    return other


def _hook_reference(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, rule: str) -> torch.Tensor:
    """Guided / deconvnet through full backward hooks on the nn.ReLU modules.

    ReLU's own backward already applies the forward mask to grad_input, so clamping it gives
    guided backprop; replacing grad_input by the clamped grad_output gives deconvnet.
    """

    def hook(module, grad_input, grad_output):
        if rule == "guided":
            return (grad_input[0].clamp(min=0),)
        return (grad_output[0].clamp(min=0),)

    handles = [m.register_full_backward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        xg = x.clone().requires_grad_(True)
        score = model(xg).gather(1, targets[:, None]).sum()
        (g,) = torch.autograd.grad(score, xg)
    finally:
        for h in handles:
            h.remove()
    return g


def _inputs(n: int = 5, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


# ---------------------------------------------------------------- saliency


def test_saliency_batched_equals_per_image_autograd():
    model = _module_net()
    x, t = _inputs(5)
    got = input_gradients(model, x, t)
    assert got.shape == x.shape and got.dtype == torch.float32
    for i in range(5):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(model(xi)[0, t[i]], xi)
        assert torch.allclose(got[i], ref[0], atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_works_inside_inference_mode_with_inference_tensors():
    model = _module_net()
    x, t = _inputs(3)
    expected = input_gradients(model, x, t, "guided")
    with torch.inference_mode():
        xi = x.clone()
        got = input_gradients(model, xi, t, "guided")
        acts, grads, logits = layer_gradients(model, xi, "conv2", t)
    assert torch.equal(got, expected)
    assert acts.shape == grads.shape == (3, 8, 4, 4) and logits.shape == (3, 4)


# ---------------------------------------------------------------- guided backprop / deconvnet


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_rule_matches_backward_hook_reference(rule):
    model = _module_net()
    x, t = _inputs(4)
    got = input_gradients(model, x, t, rule)
    ref = _hook_reference(model, x, t, rule)
    assert torch.allclose(got, ref, atol=1e-6)
    assert not torch.allclose(got, input_gradients(model, x, t), atol=1e-4)  # the rule did something


@pytest.mark.parametrize("rule", [None, "guided", "deconvnet"])
@pytest.mark.parametrize("make", VARIANTS)
def test_every_relu_spelling_gives_the_module_result(rule, make):
    model = _module_net()
    other = _same_weights(model, make)
    x, t = _inputs(4)
    with torch.no_grad():
        assert torch.allclose(other(x), model(x), atol=1e-6)
    ref = input_gradients(model, x, t, rule)
    assert torch.allclose(input_gradients(other, x, t, rule), ref, atol=1e-6)
    with relu_rule(rule or "guided") as mode:
        other(x.clone().requires_grad_(True))
    assert mode.calls == 2  # each ReLU rewritten once: F.relu's inner torch.relu is not seen again


class _SliceNet(nn.Module):
    def __init__(self, inplace_view: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.inplace_view = inplace_view

    def forward(self, x):
        h = self.conv(x)
        if self.inplace_view:
            h[:, :3].relu_()  # in place on a view: autograd must rebase the base's history
        else:
            h = torch.cat([F.relu(h[:, :3]), h[:, 3:]], dim=1)
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("rule", [None, "guided", "deconvnet"])
def test_inplace_relu_on_a_view(rule):
    torch.manual_seed(2)
    view = _SliceNet(True).eval()
    cat = _SliceNet(False).eval()
    cat.load_state_dict(view.state_dict())
    x, t = _inputs(3)
    assert torch.allclose(input_gradients(view, x, t, rule), input_gradients(cat, x, t, rule), atol=1e-6)


def _linear_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    ).eval()


def _hand_backward(net: nn.Sequential, x: torch.Tensor, t: torch.Tensor, rule: str | None):
    """Explicit backward of linear-ReLU-linear-ReLU-linear; returns (d/dx, d/d(first linear out))."""
    w1, b1 = net[1].weight, net[1].bias
    w2, b2 = net[3].weight, net[3].bias
    w3 = net[5].weight
    with torch.no_grad():
        h1 = x.flatten(1) @ w1.T + b1
        h2 = h1.clamp(min=0) @ w2.T + b2
        m1, m2 = (h1 > 0).float(), (h2 > 0).float()
        g3 = w3[t]
        if rule is None:
            g1 = ((g3 * m2) @ w2) * m1
        elif rule == "guided":
            g1 = ((g3.clamp(min=0) * m2) @ w2).clamp(min=0) * m1
        else:  # deconvnet: the forward mask is ignored, the backward signal is rectified
            g1 = (g3.clamp(min=0) @ w2).clamp(min=0)
        return (g1 @ w1).view_as(x), g1


@pytest.mark.parametrize("rule", [None, "guided", "deconvnet"])
def test_rules_match_hand_written_backward(rule):
    net = _linear_net()
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(6, 1, 2, 2, generator=g), torch.randint(0, 3, (6,), generator=g)
    gx, g1 = _hand_backward(net, x, t, rule)
    assert torch.allclose(input_gradients(net, x, t, rule), gx, atol=1e-6)
    _, grads, _ = layer_gradients(net, x, "1", t, rule)
    assert torch.allclose(grads, g1, atol=1e-6)


def test_hand_worked_two_layer_example():
    # h = W1 x = [3, -1, -1, 2] for x = [1, 2]; class 0 score = w2 . relu(h), w2 = [2, 1, 1, -3].
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 0.0], [0.0, 1.0]]))
        net[3].weight.copy_(torch.tensor([[2.0, 1.0, 1.0, -3.0], [0.0, 0.0, 0.0, 0.0]]))
    x = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    t = torch.tensor([0])
    # plain:     W1^T (w2 * [h>0])         = W1^T [2, 0, 0, -3] = [2, -1]
    # guided:    W1^T (max(w2,0) * [h>0])  = W1^T [2, 0, 0, 0]  = [2, 2]
    # deconvnet: W1^T max(w2,0)            = W1^T [2, 1, 1, 0]  = [2, 1]
    assert input_gradients(net, x, t).flatten().tolist() == [2.0, -1.0]
    assert input_gradients(net, x, t, "guided").flatten().tolist() == [2.0, 2.0]
    assert input_gradients(net, x, t, "deconvnet").flatten().tolist() == [2.0, 1.0]


def test_relu_rule_keeps_forward_and_leaves_no_trace():
    model = _same_weights(_module_net(), IgnoresReturnNet)
    x, t = _inputs(4)
    with torch.no_grad():
        plain_logits = model(x)
    plain_grad = input_gradients(model, x, t)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = set(vars(model))
    for rule in ("guided", "deconvnet"):
        with relu_rule(rule):
            assert torch.equal(model(x.clone().requires_grad_(True)), plain_logits)
            with torch.no_grad():
                assert torch.equal(model(x), plain_logits)
    with pytest.raises(RuntimeError, match="boom"), relu_rule("guided"):
        raise RuntimeError("boom")
    assert torch._C._len_torch_function_stack() == 0
    assert torch.equal(input_gradients(model, x, t), plain_grad)
    layer_gradients(model, x, "conv2", t, "guided")
    assert all(p.grad is None for p in model.parameters())
    assert set(vars(model)) == attrs
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown backprop rule"):
        input_gradients(model, x, t, "lrp")


# ---------------------------------------------------------------- CAM and Grad-CAM kernels


def _two_channel_maps() -> torch.Tensor:
    a0 = torch.zeros(4, 4)
    a0[:2, :2] = 4.0  # top-left quadrant
    a1 = torch.zeros(4, 4)
    a1[0] = 1.0  # top row
    return torch.stack([a0, a1])


def test_grad_cam_by_hand():
    acts = _two_channel_maps().expand(2, 2, 4, 4)
    grads = torch.zeros(2, 2, 4, 4)
    grads[0, 0] = 0.5  # image 0: constant gradients, alpha = [0.5, -1]
    grads[0, 1] = -1.0
    grads[1, 0, 3, 3] = 8.0  # image 1: one pixel each, alpha = [8/16, 16/16] = [0.5, 1]
    grads[1, 1, 2, 2] = 16.0
    expected = torch.tensor(
        [
            # relu(0.5 * A0 - A1)
            [[1, 1, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
            # relu(0.5 * A0 + A1)
            [[3, 3, 1, 1], [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(grad_cam(acts, grads), expected)


def test_cam_by_hand():
    acts = _two_channel_maps().expand(2, 2, 4, 4)
    weights = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    expected = torch.tensor(
        [
            # A0 - 2 A1: negative values stay (raw CAM)
            [[2, 2, -2, -2], [4, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
            # 3 A1
            [[3, 3, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(cam(acts, weights), expected)


def test_upsample_by_hand():
    # align_corners=False: output pixel j samples input coordinate (j + 0.5) / 2 - 0.5,
    # i.e. -0.25, 0.25, 0.75, 1.25 -> clamped weights 0, 0.25, 0.75, 1.
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    cols = [0.0, 0.25, 0.75, 1.0]
    rows = [2 * c for c in cols]
    expected = torch.tensor([[[r + c for c in cols] for r in rows]])
    assert torch.allclose(upsample(maps, (4, 4)), expected)
    assert torch.equal(upsample(maps, (2, 2)), maps)


def test_reduce_channels_by_hand():
    grads = torch.tensor([[[[1.0, -5.0, 0.0]], [[-2.0, 3.0, 0.0]]]])  # (1, 2, 1, 3)
    assert reduce_channels(grads, signed=False).tolist() == [[[2.0, 5.0, 0.0]]]
    assert torch.equal(reduce_channels(grads, signed=True), grads)


# ---------------------------------------------------------------- layer gradients


class InplaceAfterLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.conv2(h), inplace=True)
        return self.fc(h.mean(dim=(2, 3)))


def test_layer_gradients_equal_manual_head_despite_inplace_relu():
    torch.manual_seed(5)
    model = _randomise_bn(InplaceAfterLayer()).eval()
    x, t = _inputs(3)
    acts, grads, logits = layer_gradients(model, x, "bn1", t)
    with torch.no_grad():
        a = model.bn1(model.conv1(x))
        expected_logits = model(x)
    a_req = a.clone().requires_grad_(True)
    head = model.fc(F.relu(model.conv2(F.relu(a_req))).mean(dim=(2, 3)))
    (ref,) = torch.autograd.grad(head.gather(1, t[:, None]).sum(), a_req)
    assert (acts < 0).any()  # captured before the in-place ReLU rewrote it
    assert torch.allclose(acts, a, atol=1e-6)
    assert torch.allclose(grads, ref, atol=1e-6)
    assert torch.allclose(logits, expected_logits, atol=1e-6)


def test_layer_gradients_layer_errors_and_tuple_output():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x), "aux"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.relu(self.pair(x)[0])
            return self.fc(self.relu(h).mean(dim=(2, 3)))  # self.relu runs twice

    torch.manual_seed(6)
    net = Net().eval()
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    acts, grads, _ = layer_gradients(net, x, "pair", t)
    with torch.no_grad():
        assert torch.allclose(acts, net.pair.conv(x))
    # relu(relu(A)) = relu(A): dy/dA = W[t] / 16 where A > 0.
    expected = net.fc.weight[t][:, :, None, None].detach() / 16 * (acts > 0)
    assert torch.allclose(grads, expected.expand_as(grads), atol=1e-7)
    with pytest.raises(ValueError, match=r"no layer 'nope'.*valid layers: pair, pair.conv, relu, fc"):
        layer_gradients(net, x, "nope", t)
    with pytest.raises(ValueError, match="ran 2 times"):
        layer_gradients(net, x, "relu", t)
    assert all(not m._forward_hooks for m in net.modules())


class GapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 8, 3, padding=1, stride=2),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_grad_cam_equals_relu_cam_over_area_for_gap_linear():
    # With logits = W mean_ij(A) + b, dy_c/dA_k[i,j] = W[c,k] / (h w), so
    # Grad-CAM = relu(sum_k W[c,k] A_k) / (h w) = relu(CAM) / (h w).
    torch.manual_seed(7)
    model = _randomise_bn(GapNet()).eval()
    x, t = _inputs(4)
    acts, grads, _ = layer_gradients(model, x, "features", t)
    w = find_cam_head(model, "features", x)
    assert torch.equal(w, model.fc.weight.detach())
    h, wd = acts.shape[2:]
    assert torch.allclose(grad_cam(acts, grads), cam(acts, w[t]).clamp(min=0) / (h * wd), atol=1e-6)


def test_find_cam_head_refuses_other_heads():
    msg = (
        r"cam needs a model whose logits are a linear layer applied to the global average pool "
        r"of layer '{}'; .*; use grad_cam for other models"
    )
    torch.manual_seed(8)
    x = torch.randn(2, 3, 4, 4)

    flat = nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 3)
    )
    with pytest.raises(ValueError, match=msg.format("1")):
        find_cam_head(flat, "1", x)

    # Shapes fit, but the pool is a max, not a mean: only the numeric check can tell.
    maxpool = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(5, 3)
    )
    with pytest.raises(ValueError, match=msg.format("1")):
        find_cam_head(maxpool, "1", x)

    # A ReLU between the layer and the pool breaks the identity too.
    model = _randomise_bn(GapNet()).eval()
    with pytest.raises(ValueError, match=msg.format("features.3")):
        find_cam_head(model, "features.3", x)

    no_linear = nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=msg.format("0").replace(".*", "the model has no nn.Linear")):
        find_cam_head(no_linear, "0", x)


# ---------------------------------------------------------------- the project's CIFAR ResNet


def test_cifar_resnet_functional_relus_are_all_rewritten():
    from pipeline.zoo import CifarResNet

    torch.manual_seed(9)
    model = CifarResNet(20).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    with torch.no_grad():
        plain_logits = model(x)
    with relu_rule("guided") as mode:
        logits = model(x.clone().requires_grad_(True))
    assert mode.calls == 19  # stem + 2 per block x 9 blocks
    assert torch.equal(logits, plain_logits)
    plain = input_gradients(model, x, t)
    for rule in ("guided", "deconvnet"):
        g = input_gradients(model, x, t, rule)
        assert torch.isfinite(g).all()
        assert not torch.allclose(g, plain, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
