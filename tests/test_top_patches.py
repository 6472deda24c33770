"""top_patches against brute force, and receptive fields against hand formulas and gradients."""

from __future__ import annotations

import functools
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from jobs.core.base import MapBatch, TableInputs
from jobs.core.render import EMPTY
from jobs.dataset.top_patches import TopPatches, TopPatchesParams, receptive_field
from pipeline.models import capture
from pipeline.zoo import CifarResNet, DemoCNN
from tests.conftest import CIFAR, RESNET20, needs_shared
from tests.harness import TaskContext, as_table, normalise, run_local

SIZE = 16


class Tiny(nn.Module):
    """conv -> ReLU -> max-pool -> strided conv -> linear: four kinds of layer output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.conv2(self.pool(self.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def tiny() -> nn.Module:
    torch.manual_seed(1)
    return Tiny().eval()


def demo() -> nn.Module:
    torch.manual_seed(2)
    return DemoCNN().eval()


def resnet() -> nn.Module:
    """A CIFAR ResNet-20 with BatchNorm statistics calibrated on noise: O(1) activations, as trained."""
    torch.manual_seed(3)
    model = CifarResNet(20)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 3, SIZE, SIZE))
    return model.eval()


MODELS = {
    "tiny": (tiny, ["conv1", "relu", "conv2", "fc"]),
    "demo": (demo, ["relu1", "conv3"]),
    "resnet": (resnet, ["layer1", "layer2.0", "linear"]),
}


def dataset(n: int = 20, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Noise images with a bright square; ids whose string order is neither numeric nor list order."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        y, x = rng.integers(0, SIZE - 4, 2)
        pixels[i, y:y + 4, x:x + 4] = 255
    ids = [f"im{v}" for v in rng.permutation(n * 7)[:n]]
    return ids, pixels


def brute_force(model: nn.Module, layers: list[str], ids: list[str], pixels: np.ndarray, k: int, score: str,
                channels: list[int] | None = None, bottom: bool = False) -> list[tuple]:
    """Every candidate of every channel, sorted in Python by (activation desc, image_id, y, x)
    (``bottom``: activation ascending; an image's candidate is still its maximum)."""
    sign = 1.0 if bottom else -1.0
    with torch.inference_mode(), capture(model, layers) as acts:
        model(normalise(pixels))
    out = []
    for layer in layers:
        a = acts[layer].float()
        a = (a[:, :, None, None] if a.dim() == 2 else a).numpy()
        n, c, h, w = a.shape
        for ch in channels if channels is not None else range(c):
            cands = []
            for i in range(n):
                m = a[i, ch]
                if score == "max":
                    p = int(np.argmax(m))  # numpy: the first maximum in row-major order
                    cands.append((sign * float(m.flat[p]), ids[i], p // w, p % w))
                else:
                    cands += [(sign * float(m[y, x]), ids[i], y, x) for y in range(h) for x in range(w)]
            for rank, (key, image_id, y, x) in enumerate(sorted(cands)[:k], 1):
                out.append((layer, ch, rank, image_id, y, x, sign * key))
    return out


def rows_of(output) -> list[tuple]:
    t = as_table(output).to_pydict()
    return list(zip(t["layer"], t["channel"], t["rank"], t["image_id"], t["y"], t["x"], t["activation"]))


def assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert [r[:6] for r in got] == [r[:6] for r in want]
    np.testing.assert_allclose([r[6] for r in got], [r[6] for r in want], rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def model_named(name: str) -> nn.Module:
    return MODELS[name][0]()


@pytest.mark.parametrize("score", ["max", "all"])
@pytest.mark.parametrize("name", list(MODELS))
def test_equals_brute_force(name, score):
    model, layers = model_named(name), MODELS[name][1]
    ids, pixels = dataset()
    k = 5
    want = brute_force(model, layers, ids, pixels, k, score)
    params = TopPatchesParams(layers=layers, k=k, score=score, render=False)
    for batch_size in (1, 3, 7):
        assert_same(rows_of(run_local(TopPatches(params), model, ids, pixels, batch_size=batch_size)), want)
    # The dataset's order does not matter either.
    perm = np.random.default_rng(5).permutation(len(ids))
    shuffled = run_local(TopPatches(params), model, [ids[i] for i in perm], pixels[perm], batch_size=3)
    assert_same(rows_of(shuffled), want)


def integer_model() -> nn.Module:
    """Small integer weights on inputs of +-2 (pixels 0 or 255): every sum is exact in float32,
    whatever the kernel's summation order, so equal activations really are equal."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1))
    with torch.no_grad():
        for m in (model[0], model[3]):
            m.weight.copy_(torch.randint(-2, 3, m.weight.shape).float())
            m.bias.zero_()
        # All-positive: the all-255 images peak at every interior position, more ties than k.
        model[0].weight[0] = 1.0
    return model.eval()


@pytest.mark.parametrize("k", [2, 9])
@pytest.mark.parametrize("score", ["max", "all"])
def test_ties_follow_image_id_then_position(score, k):
    rng = np.random.default_rng(1)
    pixels = (rng.random((10, SIZE, SIZE, 3)) < 0.3).astype(np.uint8) * 255
    # Duplicates under other ids, and flat images whose every position is equal.
    pixels = np.concatenate([pixels, pixels[[0, 0, 3]], np.zeros((2, SIZE, SIZE, 3), np.uint8),
                             np.full((2, SIZE, SIZE, 3), 255, np.uint8)])
    ids = [f"im{i}" for i in rng.permutation(10)] + ["dup-b", "dup-a", "im10", "zero-1", "zero-0", "one-1",
                                                     "one-0"]
    model, layers = integer_model(), ["0", "1", "3"]
    want = brute_force(model, layers, ids, pixels, k, score)
    values = [r[6] for r in want]
    assert len(set(values)) <= len(values) / 2  # mostly ties: the case under test
    params = TopPatchesParams(layers=layers, k=k, score=score, render=False)
    for batch_size in (1, 3, 7):
        perm = np.random.default_rng(batch_size).permutation(len(ids))
        out = run_local(TopPatches(params), model, [ids[i] for i in perm], pixels[perm], batch_size=batch_size)
        assert rows_of(out) == want  # exact, activations included


def test_fewer_candidates_than_k():
    ids, pixels = dataset(3)
    model = model_named("tiny")
    out = run_local(TopPatches(TopPatchesParams(layers=["fc"], k=9)), model, ids, pixels, batch_size=2)
    assert_same(rows_of(out), brute_force(model, ["fc"], ids, pixels, 9, "max"))
    images = dict(out.images)
    assert len(images) == 3 * 3 + 3  # three entries per channel, and the grids keep k cells


def test_channels_list_and_range():
    model = model_named("demo")
    ids, pixels = dataset(9)
    for channels, chosen in (([7, 2, 11], [2, 7, 11]), ("3:6", [3, 4, 5]), (" 0 : 2 ", [0, 1])):
        params = TopPatchesParams(layers=["relu1", "conv2"], k=3, score="all", channels=channels, render=False)
        got = rows_of(run_local(TopPatches(params), model, ids, pixels, batch_size=4))
        assert_same(got, brute_force(model, ["relu1", "conv2"], ids, pixels, 3, "all", chosen))


@pytest.mark.parametrize("bad", ["5:2", "3:3", "a:b", "-1:3", "3", "1:2:3", ":4", ""])
def test_bad_channel_range_rejected(bad):
    with pytest.raises(ValidationError, match="start:stop"):
        TopPatchesParams(layers=["x"], channels=bad)


@pytest.mark.parametrize("bad, message", [([], "empty"), ([1, -2], "non-negative"), ([1, 1], "unique")])
def test_bad_channel_list_rejected(bad, message):
    with pytest.raises(ValidationError, match=message):
        TopPatchesParams(layers=["x"], channels=bad)


def test_other_params_checked():
    for bad in ({"layers": []}, {"layers": ["a"], "k": 0}, {"layers": ["a"], "score": "mean"},
                {"layers": ["a", "a"]}, {"layers": ["a"], "cell": 0}, {"layers": ["a"], "extra": 1}):
        with pytest.raises(ValidationError):
            TopPatchesParams(**bad)


@pytest.mark.parametrize("channels", [[3, 16], "10:17"])
def test_channel_out_of_range(channels):
    acts = {"conv": torch.zeros(2, 16, 4, 4)}
    batch = MapBatch(image_ids=["a", "b"], labels=torch.tensor([0, 1]), images=torch.zeros(2, 3, 8, 8),
                     logits=torch.zeros(2, 2), activations=acts, model=nn.Identity())
    analysis = TopPatches(TopPatchesParams(layers=["conv"], channels=channels))
    with pytest.raises(ValueError, match=r"layer 'conv' has 16 channels .*channel 16 does not exist"):
        analysis.map_batch(batch)


# --- receptive fields -------------------------------------------------------------------------

STACK = [  # (kind, kernel, stride, padding, dilation)
    ("conv", 3, 1, 1, 1),
    ("pool", 2, 2, 0, 1),
    ("conv", 3, 2, 1, 2),
    ("conv", 3, 1, 0, 1),
]


def stack_model() -> nn.Sequential:
    torch.manual_seed(4)
    layers, chans = [], 3
    for kind, k, s, p, d in STACK:
        if kind == "pool":
            layers.append(nn.MaxPool2d(k, s, p))
        else:
            layers += [nn.Conv2d(chans, 4, k, s, p, d)]
            chans = 4
    return nn.Sequential(*layers).eval()


def out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def exact_field(specs, n_in: int, position: int) -> tuple[int, int]:
    """Backwards through ``specs``: the set of input indices each tap reaches, padding taps dropped."""
    sizes = [n_in]
    for _, k, s, p, d in specs:
        sizes.append(out_size(sizes[-1], k, s, p, d))
    reach = {position}
    for (_, k, s, p, d), n in zip(reversed(specs), reversed(sizes[:-1])):
        reach = {o * s - p + m * d for o in reach for m in range(k)} & set(range(n))
    return min(reach), max(reach) + 1


def closed_form(specs) -> tuple[int, int, int]:
    """(first, jump, size): position o sees [first + o*jump, first + o*jump + size) before clipping."""
    first, jump, size = 0, 1, 1
    for _, k, s, p, d in specs:
        first, size, jump = first - p * jump, size + (k - 1) * d * jump, jump * s
    return first, jump, size


def test_receptive_field_of_a_conv_stack():
    model = stack_model()
    h, w = 22, 27
    for depth in range(1, len(STACK) + 1):
        specs = STACK[:depth]
        rows, cols = receptive_field(model, str(depth - 1), (h, w))
        first, jump, size = closed_form(specs)
        for ranges, n in ((rows, h), (cols, w)):
            assert len(ranges) == functools.reduce(lambda m, sp: out_size(m, *sp[1:]), specs, n)
            interior = 0
            for o, (lo, hi) in enumerate(ranges.tolist()):
                assert (lo, hi) == exact_field(specs, n, o)
                start = first + o * jump
                if start >= 0 and start + size <= n:  # not clipped: the textbook formula holds
                    assert (lo, hi) == (start, start + size)
                    interior += 1
            assert interior > 0
    # 3 px, +1 px for the pool (jump 2), +2*2*2 for the dilated conv (jump 4 after it), +2*4: 20 px.
    assert closed_form(STACK)[2] == 20


class Residual(nn.Module):
    """Two paths that see different windows (rows [o, o+3) and [o-2, o+1)), added, then pooled."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=(0, 1))
        self.b = nn.Conv2d(3, 2, 3, padding=(0, 1))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.a(F.pad(x, (0, 0, 0, 2))) + self.b(F.pad(x, (0, 0, 2, 0)))
        return self.pool(out)


def test_receptive_field_of_a_residual_block_is_the_union():
    torch.manual_seed(5)
    model = Residual().eval()
    h, w = 12, 10
    rows, cols = receptive_field(model, "pool", (h, w))
    # Pooled row o covers sum rows 2o and 2o+1: rows [2o - 2, 2o + 4) from the two paths together.
    assert rows.tolist() == [[max(0, 2 * o - 2), min(h, 2 * o + 4)] for o in range(h // 2)]
    assert cols.tolist() == [[max(0, 2 * o - 1), min(w, 2 * o + 3)] for o in range(w // 2)]
    # Each path alone sees less than the sum.
    rows_a, _ = receptive_field(model, "a", (h, w))
    assert rows_a.tolist() == [[r, min(h, r + 3)] for r in range(h)]


def test_receptive_field_of_cifar_resnet():
    model = CifarResNet(20).eval()
    rows, cols = receptive_field(model, "layer1", (32, 32))
    # conv1 and six 3x3 stride-1 convs: 1 + 2 * 7 = 15 px, centred.
    want = [[max(0, r - 7), min(32, r + 8)] for r in range(32)]
    assert rows.tolist() == want and cols.tolist() == want
    # layer2.0: a stride-2 conv and a conv on its grid (jump 2): 15 + 2 + 2 * 2 = 21 px; the
    # shortcut's every-second-pixel path lies inside.
    rows, _ = receptive_field(model, "layer2.0", (32, 32))
    assert rows.tolist() == [[max(0, 2 * o - 10), min(32, 2 * o + 11)] for o in range(16)]
    # After global pooling every output sees the whole image.
    rows, cols = receptive_field(model, "linear", (32, 32))
    assert rows.tolist() == [[0, 32]] and cols.tolist() == [[0, 32]]


def test_receptive_field_matches_gradient_support():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(3, 2, 3, 2, 1, dilation=2),
                          nn.Conv2d(2, 2, 3, padding=1)).eval()
    for m in model:
        if isinstance(m, nn.Conv2d):
            nn.init.uniform_(m.weight, 0.1, 1.0)  # positive: no cancellation hides a pixel
    h, w = 21, 18
    rows, cols = receptive_field(model, "3", (h, w))
    x = torch.rand(1, 3, h, w, requires_grad=True)
    out = model(x)
    assert out.shape[2:] == (len(rows), len(cols))
    for r in range(len(rows)):
        for c in range(len(cols)):
            (grad,) = torch.autograd.grad(out[0, 0, r, c], x, retain_graph=True)
            ys, xs = np.nonzero(grad.abs().sum(dim=1)[0].numpy())
            assert [ys.min(), ys.max() + 1, xs.min(), xs.max() + 1] == [*rows[r], *cols[c]]


def test_receptive_field_leaves_the_model_as_it_was():
    model = DemoCNN()
    model.train()
    model.bn2.eval()
    flags = torch._C._get_nnpack_enabled(), torch.backends.cudnn.enabled
    receptive_field(model, "relu2", (16, 16))
    assert model.training and model.conv1.training and not model.bn2.training
    assert all(not m._forward_hooks for m in model.modules())
    assert (torch._C._get_nnpack_enabled(), torch.backends.cudnn.enabled) == flags


def test_max_pool_propagates_nan():
    x = torch.full((1, 1, 4, 4), -5.0)
    x[0, 0, 1, 2] = float("nan")
    assert torch.isnan(F.max_pool2d(x, 2)).tolist() == [[[[False, True], [False, False]]]]


# --- boxes, crops and grids -------------------------------------------------------------------

def test_boxes_crops_and_grids():
    model = model_named("demo")
    ids, pixels = dataset(10)
    layers = ["conv1", "pool2", "relu4"]
    params = TopPatchesParams(layers=layers, k=4, channels="0:5", cell=40)
    out = run_local(TopPatches(params), model, ids, pixels, batch_size=4)
    t = as_table(out).to_pydict()
    assert set(t) == {"layer", "channel", "rank", "image_id", "activation", "y", "x", "box", "key", "grid_key"}
    sizes = out.stats["receptive_field"]
    fields = {layer: receptive_field(model, layer, (SIZE, SIZE)) for layer in layers}
    for layer, (rows, cols) in fields.items():
        assert sizes[layer] == [int(np.ptp(rows, axis=1).max()), int(np.ptp(cols, axis=1).max())]
    assert sizes["conv1"] == [3, 3] and sizes["pool2"] == [10, 10]
    for layer, y, x, box in zip(t["layer"], t["y"], t["x"], t["box"]):
        rows, cols = fields[layer]
        assert box == [cols[x][0], rows[y][0], cols[x][1], rows[y][1]]

    images = list(out.images)
    keys = [key for key, _ in images]
    assert len(images) == len(t["key"]) + 3 * 5  # every entry, and a grid per channel
    assert len(set(keys)) == len(keys) and not any("." in key or "/" in key for key in keys)
    assert set(keys) == set(t["key"]) | set(t["grid_key"])
    byid = dict(zip(ids, pixels))
    crops = dict(images)
    for key, image_id, (x0, y0, x1, y1) in zip(t["key"], t["image_id"], t["box"]):
        assert crops[key].size == (x1 - x0, y1 - y0)
        assert np.array_equal(np.asarray(crops[key]), byid[image_id][y0:y1, x0:x1])
    for key in set(t["grid_key"]):
        side = min(crops[key].size)
        assert side >= 2 * 40  # a 2x2 grid of cells of at least 40 px
    assert "conv1-c0003-r02" in keys and "relu4-c0000-grid" in keys


def test_clipped_crop_sits_at_its_offset_in_the_grid():
    model = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
        model[0].weight[0, :, 1, 1] = 1.0  # the centre tap: output (y, x) reads pixel (y, x)
    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    pixels[0, 0, 0] = 255
    out = run_local(TopPatches(TopPatchesParams(layers=["0"], k=1, cell=3)), model, ["a"], pixels, batch_size=1)
    t = as_table(out).to_pydict()
    assert (t["y"], t["x"], t["box"]) == ([0], [0], [[0, 0, 2, 2]])  # a 3x3 field cut by the corner
    assert out.stats["receptive_field"] == {"0": [3, 3]}
    grid = np.asarray(dict(out.images)["0-c0000-grid"])
    assert grid.shape == (2 + 3 + 2, 2 + 3 + 2, 3)  # one 3 px cell with 2 px around it
    cell = grid[2:5, 2:5]
    # The crop fills the cell's bottom-right 2x2; the clipped top row and left column stay grey.
    assert cell[1:, 1:].tolist() == pixels[0, :2, :2].tolist()
    assert (cell[0] == EMPTY).all() and (cell[:, 0] == EMPTY).all()


def test_render_off():
    ids, pixels = dataset(5)
    out = run_local(TopPatches(TopPatchesParams(layers=["conv1"], k=2, render=False)), model_named("tiny"),
                    ids, pixels, batch_size=2)
    assert "key" not in as_table(out).column_names and "grid_key" not in as_table(out).column_names
    assert list(out.images) == []
    assert as_table(out).schema.field("box").type == pa.list_(pa.int32())


@needs_shared
@pytest.mark.parametrize("score", ["max", "all"])
def test_equals_brute_force_on_the_trained_cifar_model(score):
    """The real trained ResNet-20 on real CIFAR-10 images, whatever the batch size."""
    from PIL import Image

    from pipeline.models import load_weights

    model = CifarResNet(20)
    load_weights(model, RESNET20)
    model.eval()
    paths = sorted(CIFAR.rglob("*.*"))[::170][:60]  # a spread over the ten classes
    ids = [p.relative_to(CIFAR).as_posix() for p in paths]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    layers = ["layer1", "layer3"]
    want = brute_force(model, layers, ids, pixels, 5, score)
    params = TopPatchesParams(layers=layers, k=5, score=score, render=False)
    for batch_size in (1, 16):
        assert_same(rows_of(run_local(TopPatches(params), model, ids, pixels, batch_size=batch_size)), want)


# --- the tree-wise merge ------------------------------------------------------------------------

def tied_partials(n: int, seed: int) -> pa.Table:
    """Partial rows with few distinct scores (NaN and -inf among them) and repeated (image, y, x)."""
    rng = np.random.default_rng(seed)
    return pa.table({
        "channel": pa.array(rng.integers(0, 3, n), pa.int32()),
        "activation": pa.array(rng.choice([1.0, 2.0, 2.5, np.nan, -np.inf], n), pa.float32()),
        "image_id": pa.array([f"im{i}" for i in rng.integers(0, 4, n)], pa.string()),
        "y": pa.array(rng.integers(0, 2, n), pa.int32()),
        "x": pa.array(rng.integers(0, 2, n), pa.int32()),
    })


def sequential_top_k(table: pa.Table, layer: str, k: int) -> list[tuple]:
    """Every partial row sorted in Python by (channel, score desc with NaN as -inf, image_id, y, x, row)."""
    t = table.to_pydict()
    rows = list(zip(t["channel"], t["activation"], t["image_id"], t["y"], t["x"]))

    def order(i: int) -> tuple:
        channel, act, image_id, y, x = rows[i]
        return channel, -(-math.inf if math.isnan(act) else act), image_id, y, x, i

    out, rank = [], {}
    for i in sorted(range(len(rows)), key=order):
        channel, act, image_id, y, x = rows[i]
        rank[channel] = rank.get(channel, 0) + 1
        if rank[channel] <= k:
            out.append((layer, channel, rank[channel], image_id, y, x, "nan" if math.isnan(act) else act))
    return out


def exact_rows(output) -> list[tuple]:
    return [(*r[:6], "nan" if math.isnan(r[6]) else r[6]) for r in rows_of(output)]


@pytest.mark.parametrize("k", [1, 4])
def test_tree_merge_equals_the_sequential_merge(k):
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU()).eval()  # two 2x2 layers: "0", "1"
    nan, inf = float("nan"), float("inf")
    # Rows the total order calls equal (NaN ties -inf) at one (image, y, x), in different pieces:
    # the earlier row must stay first, as in the sequential merge.
    by_hand = pa.table({"channel": pa.array([0, 0, 0, 0, 1, 1, 0], pa.int32()),
                        "activation": pa.array([nan, 1.0, -inf, nan, 2.0, 2.0, -inf], pa.float32()),
                        "image_id": ["im1", "im0", "im1", "im0", "im0", "im0", "im0"],
                        "y": pa.array([0, 0, 0, 1, 0, 1, 1], pa.int32()),
                        "x": pa.array([0, 0, 0, 1, 1, 0, 1], pa.int32())})
    tables = {"layer=0": tied_partials(40, 0), "layer=1": by_hand}
    want = sequential_top_k(tables["layer=0"], "0", k) + sequential_top_k(tables["layer=1"], "1", k)
    params = TopPatchesParams(layers=["0", "1"], k=k, render=False)
    for workers in (1, 3):
        ctx = TaskContext(model=model, pixels={}, input_size=(2, 2), workers=workers)
        out = TopPatches(params).reduce(TableInputs(tables, batch_rows=3), ctx)
        assert exact_rows(out) == want, workers
        # 2 x workers pieces per layer (the 7-row layer in pieces of at least two rows), all in one map.
        assert ctx.tasks == [{1: 2 + 2, 3: 6 + 4}[workers]]
    # One piece in all merges in-process.
    ctx = TaskContext(model=model, pixels={}, input_size=(2, 2), workers=3)
    one = {"layer=0": tables["layer=0"].slice(0, 1)}
    out = TopPatches(TopPatchesParams(layers=["0", "1"], k=k, render=False)).reduce(TableInputs(one), ctx)
    assert exact_rows(out) == sequential_top_k(one["layer=0"], "0", k) and ctx.tasks == []


@pytest.mark.parametrize("batch_size", [3, 20])  # fewer images than k per batch, and more
def test_partial_channels_counts_the_channels_map_batch_wrote(batch_size):
    from jobs.dataset.top_patches import partial_channels
    from tests.harness import gather, map_batches

    ids, pixels = dataset(20)
    for k in (1, 4):
        analysis = TopPatches(TopPatchesParams(layers=["conv1", "conv2", "fc"], k=k))
        inputs = gather(map_batches(analysis, tiny(), ids, pixels, [-1] * 20, batch_size))
        for rows in (1, 5, 1000):  # record batches that cut the first map batch, or hold it all
            inputs.batch_rows = rows
            got = {layer: partial_channels(inputs, f"layer={layer}", k) for layer in ("conv1", "conv2", "fc")}
            assert got == {"conv1": 6, "conv2": 5, "fc": 3}, (k, rows)
    # One channel: each batch's run of at most k rows ends where the next batch's starts.
    one = TableInputs({"layer=l": pa.table({"channel": pa.array([7] * 12, pa.int32())})}, batch_rows=2)
    assert partial_channels(one, "layer=l", 3) == 1
    empty = TableInputs({"layer=l": pa.table({"channel": pa.array([], pa.int32())})})
    assert partial_channels(empty, "layer=l", 3) == 0


def _candidates_table(batches: int, channels: int, k: int) -> pa.Table:
    """Partials as map_batch writes them: per batch, every channel once, ascending, k rows each."""
    n = batches * channels * k
    return pa.table({"channel": pa.array(np.tile(np.repeat(np.arange(channels), k), batches), pa.int32()),
                     "activation": pa.array(np.arange(n, dtype=np.float32)),
                     "image_id": pa.array([f"im{i % 50}" for i in range(n)]),
                     "y": pa.array(np.zeros(n, np.int32)), "x": pa.array(np.zeros(n, np.int32))})


def test_memory_plan_counts_the_pieces_their_merge_and_the_table():
    from jobs.dataset import top_patches as tp

    # Two layers of 1,000 partial rows (4 channels x k=2, 125 batches), split into 63 pieces of 16 rows.
    tables = {"layer=a": _candidates_table(125, 4, 2), "layer=b": _candidates_table(125, 4, 2)}
    inputs = TableInputs(tables)
    assert len(inputs.split("layer=a", 2 * tp.PLAN_WORKERS)) == 63
    candidates, kept = 63 * 4 * 2, 4 * 2  # each piece's k best per channel; the merged k per channel
    plan = TopPatches(TopPatchesParams(layers=["a", "b", "gone"], k=2)).memory_plan(inputs)
    assert plan is not None
    assert plan.bytes == tp.CANDIDATE_BYTES * (2 * candidates + 2 * kept + tp.MERGE_COPIES * candidates) + \
        tp.ROW_BYTES * 2 * kept
    assert "16 result rows (2 layer(s), up to 4 channels x k=2)" in plan.what and "1,008 candidates" in plan.what
    # Chosen channels are counted from the parameters.
    three = TopPatches(TopPatchesParams(layers=["a"], k=2, channels=[0, 1, 3])).memory_plan(inputs)
    span = TopPatches(TopPatchesParams(layers=["a"], k=2, channels="1:4")).memory_plan(inputs)
    assert three.bytes == span.bytes == tp.CANDIDATE_BYTES * (378 + 6 + tp.MERGE_COPIES * 378) + tp.ROW_BYTES * 6
    # Pieces never return more rows than they hold: 100 rows in 50 pieces of 2.
    small = TableInputs({"layer=a": _candidates_table(13, 4, 2).slice(0, 100)})
    assert TopPatches(TopPatchesParams(layers=["a"], k=2)).memory_plan(small).bytes == \
        tp.CANDIDATE_BYTES * (100 + 8 + tp.MERGE_COPIES * 100) + tp.ROW_BYTES * 8
    assert TopPatches(TopPatchesParams(layers=["gone"])).memory_plan(inputs) is None


def test_memory_plan_of_one_piece_counts_a_record_batch_merged_here(tmp_path):
    import pyarrow.parquet as pq

    from jobs.dataset import top_patches as tp
    from pipeline.reduce import ParquetInputs
    from pipeline.store import Store

    (tmp_path / "layer=a").mkdir()
    pq.write_table(_candidates_table(10, 4, 3), tmp_path / "layer=a" / "part-0-10.parquet")
    inputs = ParquetInputs(Store.open(tmp_path), "")
    plan = TopPatches(TopPatchesParams(layers=["a"], k=3)).memory_plan(inputs)
    # One file, one piece: merged on the driver, a record batch (all 120 rows here) at a time.
    assert plan.bytes == tp.CANDIDATE_BYTES * (12 + 12 + tp.MERGE_COPIES * 120 + 120) + tp.ROW_BYTES * 12


def test_memory_plan_refuses_over_the_budget_with_the_fix():
    from pipeline.reduce import check_memory

    inputs = TableInputs({"layer=a": _candidates_table(125, 4, 2)})
    analysis = TopPatches(TopPatchesParams(layers=["a"], k=2))
    plan = analysis.memory_plan(inputs)
    check_memory(analysis, inputs, plan.bytes)  # at the budget: runs
    with pytest.raises(MemoryError, match=r"top_patches would hold .*over execution\.driver_memory .*"
                                          r"channels: '0:64'.*smaller k"):
        check_memory(analysis, inputs, plan.bytes - 1)


@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
def test_projections_equal_captum_neuron_methods_cropped_to_the_box():
    captum = pytest.importorskip("captum.attr", reason="captum (a test extra) is the reference")
    model = model_named("demo")
    ids, pixels = dataset(8)
    params = TopPatchesParams(layers=["relu2", "relu4"], k=3, channels="0:3", cell=16,
                              project=["deconvnet", "guided_backprop", "deconvnet"])
    assert params.project == ["deconvnet", "guided_backprop"]
    out = run_local(TopPatches(params), model, ids, pixels, batch_size=4)
    t = as_table(out).to_pylist()
    byid = dict(zip(ids, pixels))
    modules = dict(model.named_modules())
    for row in t:
        x = normalise(byid[row["image_id"]][None]).requires_grad_(True)
        x0, y0, x1, y1 = row["box"]
        for method, reference in (("deconvnet", captum.NeuronDeconvolution),
                                  ("guided_backprop", captum.NeuronGuidedBackprop)):
            expected = reference(model, modules[row["layer"]]).attribute(
                x, neuron_selector=(row["channel"], row["y"], row["x"]))[0, :, y0:y1, x0:x1]
            got = np.asarray(row[f"projection_{method}"], np.float32).reshape(3, y1 - y0, x1 - x0)
            np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert any(np.abs(row["projection_deconvnet"]).sum() > 0 for row in t)
    images = dict(out.images)
    for method in ("deconvnet", "guided_backprop"):
        for key in {row[f"{method}_grid_key"] for row in t}:
            assert images[key].size == images[key.replace(f"-{method}-grid", "-grid")].size


@pytest.mark.parametrize("score", ["max", "all"])
def test_bottom_equals_brute_force(score):
    """``select: bottom``: the least activating, ascending, ties as for top (image_id, y, x)."""
    model, layers = model_named("tiny"), MODELS["tiny"][1]
    ids, pixels = dataset()
    want = brute_force(model, layers, ids, pixels, 4, score, bottom=True)
    params = TopPatchesParams(layers=layers, k=4, score=score, select="bottom", render=False)
    for batch_size in (1, 6):
        assert_same(rows_of(run_local(TopPatches(params), model, ids, pixels, batch_size=batch_size)), want)


@pytest.mark.parametrize("score", ["max", "all"])
def test_per_class_equals_brute_force_within_each_class(score):
    model, layers = model_named("tiny"), MODELS["tiny"][1]
    ids, pixels = dataset()
    labels = [i % 3 for i in range(len(ids))]
    labels[4] = -1  # unlabelled: in no class
    params = TopPatchesParams(layers=layers, k=3, score=score, per_class=True, render=True, cell=8)
    for batch_size in (1, 4):
        out = run_local(TopPatches(params), model, ids, pixels, labels=labels, batch_size=batch_size)
        t = as_table(out).to_pydict()
        assert t["label"] and set(t["label"]) == {0, 1, 2}
        for label in (0, 1, 2):
            mine = [i for i in range(len(ids)) if labels[i] == label]
            want = brute_force(model, layers, [ids[i] for i in mine], pixels[mine], 3, score)
            got = [r for r, lab in zip(rows_of(out), t["label"]) if lab == label]
            assert_same(got, want)
        keys = [key for key, _ in out.images]
        assert len(keys) == len(set(keys)) and "relu-l2-c0000-grid" in keys
