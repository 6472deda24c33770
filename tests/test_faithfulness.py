"""Faithfulness metrics against brute-force loops and hand-derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from jobs.attribution.faithfulness import box_energy, deletion_insertion, pointing_game
from jobs.core.kernels import gaussian_blur

LN3 = math.log(3.0)  # softmax([ln 3, 0]) = [0.75, 0.25]


class TinyConv(nn.Module):
    """conv -> ReLU -> max-pool -> linear, 3 classes on 8x8: single pixels move the output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1)) * 4  # sharper softmax


class Recorder(nn.Module):
    """Wraps a model and keeps the batch size of every forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.model(x)


def one_pixel_model(c: int, h: int, w: int, row: int, col: int) -> nn.Module:
    """Linear, 2 classes: logit 0 = the input's channel-0 value at (row, col); logit 1 = 0."""
    linear = nn.Linear(c * h * w, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[0, row * w + col] = 1.0
    return nn.Sequential(nn.Flatten(), linear).eval()


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TinyConv().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        targets = model(x).argmax(dim=1)
    maps = torch.stack(
        [
            torch.randn(8, 8),  # all distinct
            torch.randint(0, 3, (8, 8)).float(),  # three levels: many ties
            torch.zeros(8, 8),  # one level: the order is the pixel index
        ]
    )
    return model, x, maps, targets


def reference(model, x, maps, targets, steps, sigma):
    """Deletion and insertion one image, one step, one pixel at a time."""
    n, _, h, w = x.shape
    blurred = gaussian_blur(x, sigma)
    out = {"deletion_curve": [], "insertion_curve": [], "deletion_auc": [], "insertion_auc": []}
    with torch.no_grad():
        for i in range(n):
            m = maps[i].flatten().tolist()
            order = sorted(range(h * w), key=lambda p: (-m[p], p))
            curves = {"deletion": [], "insertion": []}
            for s in range(steps + 1):
                k = round(s * h * w / steps)
                deleted = x[i].clone()
                inserted = blurred[i].clone()
                for p in order[:k]:
                    r, c = divmod(p, w)
                    deleted[:, r, c] = 0.0  # all channels of the pixel
                    inserted[:, r, c] = x[i, :, r, c]
                for kind, img in (("deletion", deleted), ("insertion", inserted)):
                    prob = torch.softmax(model(img[None]), dim=1)[0, int(targets[i])]
                    curves[kind].append(float(prob))
            for kind, curve in curves.items():
                out[f"{kind}_curve"].append(curve)
                out[f"{kind}_auc"].append(np.trapezoid(curve, dx=1.0 / steps))
    return {k: torch.tensor(np.array(v), dtype=torch.float32) for k, v in out.items()}


@pytest.mark.parametrize("steps,sigma", [(16, None), (5, 1.0), (7, 0.5)])
def test_matches_brute_force(setup, steps, sigma):
    model, x, maps, targets = setup
    got = deletion_insertion(model, x, maps, targets, steps=steps, chunk=7, insertion_sigma=sigma)
    want = reference(model, x, maps, targets, steps, max(8, 8) / 8 if sigma is None else sigma)
    for key in want:
        assert got[key].dtype == torch.float32 and got[key].device.type == "cpu"
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)
    # The clean image ends insertion and starts deletion.
    torch.testing.assert_close(got["deletion_curve"][:, 0], got["insertion_curve"][:, -1], atol=1e-6, rtol=0)


def test_chunk_and_batch_invariance(setup):
    model, x, maps, targets = setup
    recorder = Recorder(model)
    runs = {}
    for chunk in (1, 5, 1000):
        recorder.sizes.clear()
        runs[chunk] = deletion_insertion(recorder, x, maps, targets, steps=6, chunk=chunk)
        assert max(recorder.sizes) <= chunk
        assert sum(recorder.sizes) == 2 * 3 * 7
    for chunk in (5, 1000):
        for key in runs[1]:
            torch.testing.assert_close(runs[chunk][key], runs[1][key], atol=1e-6, rtol=0)
    for i in range(3):
        alone = deletion_insertion(model, x[i : i + 1], maps[i : i + 1], targets[i : i + 1], steps=6)
        for key in alone:
            torch.testing.assert_close(alone[key][0], runs[1000][key][i], atol=1e-6, rtol=0)


def test_one_pixel_model_by_hand():
    # 1x4x4 image, the model sees only pixel (2, 3) (flat index 11), valued ln 3, target 0.
    # Clean p = 0.75; deleted (value 0) p = 0.5; blurred value b gives q = sigmoid(b).
    torch.manual_seed(1)
    model = one_pixel_model(1, 4, 4, 2, 3)
    x = torch.rand(1, 1, 4, 4)
    x[0, 0, 2, 3] = LN3
    b = float(gaussian_blur(x, 0.5)[0, 0, 2, 3])
    p, q = 0.75, 1 / (1 + math.exp(-b))
    assert abs(q - p) > 0.01  # the blur must actually change the pixel

    first = torch.zeros(1, 4, 4)
    first[0, 2, 3] = 1.0  # ranked first; every other pixel ties at 0
    last = torch.ones(1, 4, 4)
    last[0, 2, 3] = 0.0  # ranked last
    targets = torch.tensor([0])

    got = deletion_insertion(model, x, first, targets, steps=16, insertion_sigma=0.5)
    torch.testing.assert_close(got["deletion_curve"][0], torch.tensor([p] + [0.5] * 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["insertion_curve"][0], torch.tensor([q] + [p] * 16), atol=1e-6, rtol=0)
    # (sum - (first + last) / 2) / 16
    assert got["deletion_auc"].item() == pytest.approx((p / 2 + 15.5 * 0.5) / 16, abs=1e-6)  # 0.5078125
    assert got["deletion_auc"].item() == pytest.approx(0.5078125, abs=1e-6)
    assert got["insertion_auc"].item() == pytest.approx((q / 2 + 15.5 * p) / 16, abs=1e-6)

    got = deletion_insertion(model, x, last, targets, steps=16, insertion_sigma=0.5)
    torch.testing.assert_close(got["deletion_curve"][0], torch.tensor([p] * 16 + [0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["insertion_curve"][0], torch.tensor([q] * 16 + [p]), atol=1e-6, rtol=0)
    assert got["deletion_auc"].item() == pytest.approx((15.5 * p + 0.25) / 16, abs=1e-6)  # 0.7421875
    assert got["deletion_auc"].item() == pytest.approx(0.7421875, abs=1e-6)
    assert got["insertion_auc"].item() == pytest.approx((15.5 * q + p / 2) / 16, abs=1e-6)


def test_rounding_of_step_sizes_by_hand():
    # 2x2 image, steps=3: pixels changed per step round(0), round(4/3), round(8/3), 4 = 0, 1, 3, 4.
    # The seen pixel (0, 1) is second in the order, so it goes at step 2.
    model = one_pixel_model(3, 2, 2, 0, 1)
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0, 0, 1] = LN3
    maps = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    got = deletion_insertion(model, x, maps, torch.tensor([0]), steps=3)
    torch.testing.assert_close(got["deletion_curve"][0], torch.tensor([0.75, 0.75, 0.5, 0.5]), atol=1e-6, rtol=0)
    # (0.75 + 0.75 + 0.5 + 0.5 - (0.75 + 0.5) / 2) / 3 = 1.875 / 3
    assert got["deletion_auc"].item() == pytest.approx(0.625, abs=1e-6)
    # Target 1 (p = 0.25 clean, 0.5 deleted): deleting the evidence for class 0 helps class 1.
    got = deletion_insertion(model, x, maps, torch.tensor([1]), steps=3)
    torch.testing.assert_close(got["deletion_curve"][0], torch.tensor([0.25, 0.25, 0.5, 0.5]), atol=1e-6, rtol=0)
    assert got["deletion_auc"].item() == pytest.approx((1.5 - 0.375) / 3, abs=1e-6)


def test_deletion_insertion_validation(setup):
    model, x, maps, targets = setup
    with pytest.raises(ValueError, match=r"\(3, 8, 9\)"):
        deletion_insertion(model, x, torch.zeros(3, 8, 9), targets)
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        deletion_insertion(model, x, maps[:2], targets)
    with pytest.raises(ValueError, match="steps"):
        deletion_insertion(model, x, maps, targets, steps=0)


def peak_map(y: int, x: int) -> torch.Tensor:
    m = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 100
    m[y, x] = 1.0
    return m


def test_pointing_game_by_hand():
    boxes = torch.tensor(
        [
            [1, 0, 3, 2],  # peak (x=2, y=1) inside
            [0, 0, 2, 4],  # x1 = 2: the peak's column is just outside
            [2, 1, 3, 2],  # single-pixel box at the peak: x0, y0 inclusive
            [0, 0, 4, 1],  # y1 = 1: the peak's row is just outside
            [-1, -1, -1, -1],  # no box
            [3, 0, 4, 1],  # tie (0, 3) vs (3, 0): the row-major first, (x=3, y=0), is inside
            [0, 3, 1, 4],  # ...and the later one does not count
        ],
        dtype=torch.int32,
    )
    tie = torch.zeros(4, 4)
    tie[0, 3] = tie[3, 0] = 2.0
    maps = torch.stack([peak_map(1, 2)] * 5 + [tie] * 2)
    got = pointing_game(maps, boxes)
    assert got.dtype == torch.float32
    want = torch.tensor([1.0, 0.0, 1.0, 0.0, float("nan"), 1.0, 0.0])
    torch.testing.assert_close(got, want, equal_nan=True)


def test_box_energy_by_hand():
    m = torch.tensor(
        [
            [1.0, -2.0, 0.0, 0.0],
            [0.0, 3.0, 0.0, 0.0],
            [0.0, 0.0, -5.0, 0.0],
            [0.0, 0.0, 0.0, 4.0],
        ]
    )  # positive mass 1 + 3 + 4 = 8
    boxes = torch.tensor(
        [
            [0, 0, 2, 2],  # 1 + 3; the -2 is clipped, not subtracted
            [2, 2, 4, 4],  # 4; the -5 is clipped
            [1, 1, 4, 4],  # 3 + 4
            [0, 0, 1, 1],  # half-open: only (0, 0)
            [0, 0, 4, 4],  # everything
            [-1, -1, -1, -1],
            [0, 0, 2, 2],  # on a map with no positive mass
        ]
    )
    maps = torch.stack([m] * 6 + [-m.abs()])
    got = box_energy(maps, boxes)
    assert got.dtype == torch.float32
    want = torch.tensor([4 / 8, 4 / 8, 7 / 8, 1 / 8, 1.0, float("nan"), 0.0])
    torch.testing.assert_close(got, want, equal_nan=True)


def test_box_validation():
    with pytest.raises(ValueError, match="boxes"):
        pointing_game(torch.zeros(2, 4, 4), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="boxes"):
        box_energy(torch.zeros(2, 4, 4), torch.zeros(2, 3, dtype=torch.long))


def test_default_chunk_follows_the_device_and_the_image_size():
    from jobs.core.kernels import CPU_CHUNK, GPU_CHUNK, chunk_size

    assert chunk_size(None, torch.zeros(2, 3, 32, 32)) == CPU_CHUNK == 64
    assert chunk_size(None, torch.zeros(2, 3, 224, 224)) == 8  # 2^20 values hold 6 such images; 8 at least
    assert chunk_size(None, torch.zeros(2, 3, 160, 160)) == 13
    assert chunk_size(None, torch.zeros(2, 3, 64, 64, device="meta")) == GPU_CHUNK == 256  # not a CPU
    assert chunk_size(5, torch.zeros(2, 3, 64, 64)) == 5


@pytest.mark.parametrize(("shape", "sigma"), [((4, 3, 64, 64), 8.0), ((2, 3, 17, 30), 2.5), ((1, 1, 5, 5), 3.0),
                                              ((1, 3, 1, 9), 1.0), ((2, 2, 40, 12), 0.5)])
def test_separable_blur_equals_torchvision(shape, sigma):
    from torchvision.transforms.v2.functional import gaussian_blur as reference

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    h, w = shape[-2:]

    def size(limit: int) -> int:  # +-3 sigma, odd, at most the image
        return max(1, min(2 * math.ceil(3 * sigma) + 1, limit if limit % 2 else limit - 1))

    want = reference(x, kernel_size=[size(w), size(h)], sigma=[sigma, sigma])
    torch.testing.assert_close(gaussian_blur(x, sigma), want, atol=2e-6, rtol=0)
