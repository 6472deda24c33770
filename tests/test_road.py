"""ROAD: the noisy linear imputation and the MoRF/LeRF curves, by hand and against quantus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from jobs.attribution.faithfulness import noisy_linear_imputation, road

PERCENTAGES = [12.5, 25.0, 50.0, 75.0, 87.5]  # on 8x8: 8, 16, 32, 48, 56 pixels, exact under floor and round


def tiny_model(channels: int, seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, classes),
    ).eval()


class Recorder(nn.Module):
    """Wraps a model and keeps every batch it is given."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.sizes: list[int] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        self.inputs.append(x.clone())
        return self.model(x)


def ramp(c: int, h: int, w: int) -> torch.Tensor:
    """Channel k holds a_k * y + b_k * x + c_k."""
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(w, dtype=torch.float64)[None, :]
    coef = torch.tensor([[0.5, -1.25, 2.0], [-0.75, 0.3, -1.0], [0.0, 1.0, 0.25]], dtype=torch.float64)[:c]
    return torch.stack([a * ys + b * xs + k for a, b, k in coef.tolist()])


def test_linear_ramp_interior_is_imputed_exactly():
    x = ramp(3, 10, 9)
    removed = torch.zeros(10, 9, dtype=torch.bool)
    removed[2:8, 3:7] = True  # a block with a kept ring around it
    removed[1, 1] = True
    removed[8, 7] = True
    out = noisy_linear_imputation(x, removed, 0.0, None)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=1e-10)


def test_border_pixels_use_the_renormalised_mean():
    # One removed corner pixel with kept neighbours: (1/6 (right + down) + 1/12 diagonal) / (5/12).
    x = torch.arange(16, dtype=torch.float64).view(1, 4, 4)
    removed = torch.zeros(4, 4, dtype=torch.bool)
    removed[0, 0] = True
    out = noisy_linear_imputation(x, removed, 0.0, None)
    expected = (x[0, 0, 1] / 6 + x[0, 1, 0] / 6 + x[0, 1, 1] / 12) / (5 / 12)
    assert out[0, 0, 0].item() == pytest.approx(expected.item(), abs=1e-12)
    assert torch.equal(out.view(-1)[1:], x.view(-1)[1:])


def test_constant_image_stays_constant_and_kept_pixels_are_untouched():
    x = torch.full((2, 8, 8), 0.7)
    removed = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.8
    removed[3, 3] = False
    out = noisy_linear_imputation(x, removed, 0.0, None)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)

    noisy = noisy_linear_imputation(x, removed, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(noisy[:, ~removed], x[:, ~removed])
    changed = noisy[:, removed] - 0.7
    assert (changed != 0).all() and 0.3 < changed.std().item() < 0.7
    again = noisy_linear_imputation(x, removed, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(noisy, again)


def test_imputation_matches_quantus():
    perturb_func = pytest.importorskip("quantus.functions.perturb_func")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 9, 7)).astype(np.float32)
    for count in (1, 20, 62):
        indices = rng.choice(63, count, replace=False)
        expected = perturb_func.noisy_linear_imputation(x, indices, noise=0.0)
        removed = torch.zeros(63, dtype=torch.bool)
        removed[torch.from_numpy(indices)] = True
        out = noisy_linear_imputation(torch.from_numpy(x), removed.view(9, 7), 0.0, None)
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


def predicted_classes(model, x, maps, classes, **kw):
    """Argmax of the model on our imputed inputs, per curve point, from one ROAD run per class."""
    n = x.shape[0]
    runs = [road(model, x, maps, torch.full((n,), c), PERCENTAGES, noise=0.0, **kw) for c in range(classes)]
    morf = torch.stack([r["morf_curve"] for r in runs]).argmax(dim=0)
    lerf = torch.stack([r["lerf_curve"] for r in runs]).argmax(dim=0)
    return morf, lerf


def test_road_accuracy_matches_quantus():
    quantus = pytest.importorskip("quantus")
    model = tiny_model(1, seed=2)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    # Continuous maps (no ties) that rank large pixels first, so predictions change along the curves.
    maps = x[:, 0].abs() + 0.01 * torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(4))
    morf, lerf = predicted_classes(model, x, maps, 3)
    assert len(set(morf.flatten().tolist())) > 1 and len(set(lerf.flatten().tolist())) > 1  # not vacuous

    # Quantus scores MoRF only, as "prediction == label" averaged over the batch: one image per call
    # gives the per-image curve, and one call per label recovers the predicted class at every point.
    # LeRF is quantus's MoRF on the reversed map 1 - map (quantus rejects all-negative maps).
    metric = quantus.ROAD(percentages=PERCENTAGES, noise=0.0, abs=False, normalise=False, disable_warnings=True)
    for i in range(4):
        for a, ours in ((maps[i], morf[i]), (maps.max() + 1 - maps[i], lerf[i])):
            for label in range(3):
                scores = metric(
                    model=model,
                    x_batch=x[i : i + 1].numpy(),
                    y_batch=np.array([label]),
                    a_batch=a[None, None].numpy(),
                    channel_first=True,
                    device="cpu",
                )
                assert list(scores) == PERCENTAGES
                assert [int(v) for v in scores.values()] == (ours == label).int().tolist(), (i, label)


def test_batched_equals_single_and_chunking_does_not_matter():
    model = tiny_model(3)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    maps = torch.stack(
        [
            torch.randn(8, 8, generator=torch.Generator().manual_seed(6)),
            torch.randint(0, 3, (8, 8), generator=torch.Generator().manual_seed(7)).float(),  # ties
            torch.zeros(8, 8),
        ]
    )
    maps[0, 2, 2] = float("nan")
    targets = torch.tensor([0, 1, 2])
    seeds = [11, 22, 33]
    pct = [10.0, 30.0, 60.0, 95.0]
    batched = road(model, x, maps, targets, pct, noise=0.2, seeds=seeds)
    assert set(batched) == {"morf_curve", "lerf_curve", "morf_auc", "lerf_auc"}
    for key, value in batched.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert value.shape == ((3, 4) if key.endswith("curve") else (3,))
    torch.testing.assert_close(batched["morf_auc"], batched["morf_curve"].mean(dim=1))
    torch.testing.assert_close(batched["lerf_auc"], batched["lerf_curve"].mean(dim=1))

    chunked = road(model, x, maps, targets, pct, noise=0.2, seeds=seeds, chunk=1)
    for key in batched:
        # Forward numerics may differ in the last bit between batch sizes; the inputs may not.
        torch.testing.assert_close(chunked[key], batched[key], rtol=0, atol=1e-6)
    seen = {}
    for size in (1, 5, 256):
        recorder = Recorder(model)
        road(recorder, x, maps, targets, pct, noise=0.2, seeds=seeds, chunk=size)
        assert max(recorder.sizes) <= size and sum(recorder.sizes) == 3 * 2 * 4
        seen[size] = torch.cat(recorder.inputs)
    assert torch.equal(seen[1], seen[5]) and torch.equal(seen[1], seen[256])
    for i in range(3):
        alone = slice(i, i + 1)
        one_by_one = road(model, x[alone], maps[alone], targets[alone], pct, noise=0.2, seeds=seeds[alone])
        for key in batched:
            torch.testing.assert_close(one_by_one[key], batched[key][alone], rtol=0, atol=1e-6)

    reseeded = road(model, x, maps, targets, pct, noise=0.2, seeds=[12, 22, 33])
    assert not torch.equal(reseeded["morf_curve"][0], batched["morf_curve"][0])
    assert torch.equal(reseeded["morf_curve"][1:], batched["morf_curve"][1:])


def test_morf_and_lerf_remove_the_expected_pixels():
    # Logit 0 = the value at pixel (0, 0), logit 1 = 0; the image is 5 there and 0 elsewhere.
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 5.0
    linear = nn.Linear(16, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[0, 0] = 1.0
    model = nn.Sequential(nn.Flatten(), linear).eval()
    maps = torch.arange(16, dtype=torch.float32).flip(0).view(1, 4, 4)  # pixel (0, 0) is the most relevant
    out = road(model, x, maps, torch.tensor([0]), [6.25, 93.75], noise=0.0)
    clean = torch.softmax(torch.tensor([5.0, 0.0]), 0)[0].item()
    # MoRF removes (0, 0) first (1 and 15 pixels): it imputes from zeros, so the logit drops to 0.
    assert out["morf_curve"][0].tolist() == pytest.approx([0.5, 0.5])
    # LeRF removes the last 1 and 15 pixels of the order: (0, 0) is always kept.
    assert out["lerf_curve"][0].tolist() == pytest.approx([clean, clean])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"maps": torch.zeros(2, 8, 7)}, "maps must be"),
        ({"percentages": [0.0, 50.0]}, "between 0 and 100"),
        ({"percentages": [50.0, 100.0]}, "between 0 and 100"),
        ({"percentages": [-5.0]}, "between 0 and 100"),
        ({"percentages": []}, "non-empty"),
        ({"percentages": [99.5]}, "nothing is kept"),
        ({"targets": torch.zeros(3, dtype=torch.long)}, "targets must be"),
        ({"seeds": [1]}, "one seed per image"),
        ({"noise": -0.1}, "noise must be"),
        ({"chunk": 0}, "chunk must be"),
    ],
)
def test_invalid_inputs_raise(change, message):
    kw = {
        "maps": torch.zeros(2, 8, 8),
        "targets": torch.zeros(2, dtype=torch.long),
        "percentages": [50.0],
        "noise": 0.0,
        "seeds": None,
        "chunk": 4,
    }
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        road(tiny_model(3), torch.zeros(2, 3, 8, 8), **kw)


def test_imputation_invalid_inputs_raise():
    x = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="removed must be"):
        noisy_linear_imputation(x, torch.zeros(4, 5, dtype=torch.bool), 0.0, None)
    with pytest.raises(ValueError, match="bool mask"):
        noisy_linear_imputation(x, torch.zeros(4, 4), 0.0, None)
    with pytest.raises(ValueError, match="nothing is kept"):
        noisy_linear_imputation(x, torch.ones(4, 4, dtype=torch.bool), 0.0, None)
    with pytest.raises(ValueError, match="x must be"):
        noisy_linear_imputation(x[None], torch.zeros(4, 4, dtype=torch.bool), 0.0, None)
