"""Map similarity and sensitivity against independent computations (SciPy, scikit-image, Quantus)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from jobs.attribution.robustness import perturbations, sensitivity
from jobs.attribution.similarity import METRICS, similarity


def maps(m: int = 4, h: int = 12, w: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, h, w))
    return a, a + rng.normal(scale=0.7, size=a.shape)


def test_spearman_by_hand_and_against_scipy():
    from scipy.stats import spearmanr

    # Ranks by hand: a = 1..9 has ranks 1..9; b swaps the two largest: ranks 1..7, 9, 8.
    a = np.arange(1.0, 10.0).reshape(1, 3, 3)
    b = a.copy()
    b[0, 2, 1], b[0, 2, 2] = 9.0, 8.0
    d2 = 1 + 1  # squared rank differences
    assert similarity(a, b, ["spearman"])["spearman"][0] == pytest.approx(1 - 6 * d2 / (9 * (81 - 1)), abs=1e-15)
    # A tie takes the average rank: [1, 2, 2, 3] ranks 1, 2.5, 2.5, 4; [4, 3, 2, 1] ranks 4, 3, 2, 1.
    # Centred: (-1.5, 0, 0, 1.5) and (1.5, 0.5, -0.5, -1.5); rho = -4.5 / sqrt(4.5 * 5).
    tie = similarity(np.array([[[1.0, 2.0], [2.0, 3.0]]]), np.array([[[4.0, 3.0], [2.0, 1.0]]]), ["spearman"])
    assert tie["spearman"][0] == pytest.approx(-4.5 / np.sqrt(4.5 * 5), abs=1e-15)
    x, y = maps()
    x[1, 0, :4] = x[1, 0, 4]  # ties
    got = similarity(x, torch.from_numpy(y), ["spearman", "spearman_abs"])
    for i in range(len(x)):
        assert got["spearman"][i] == pytest.approx(spearmanr(x[i].ravel(), y[i].ravel())[0], abs=1e-12)
        assert got["spearman_abs"][i] == pytest.approx(spearmanr(abs(x[i].ravel()), abs(y[i].ravel()))[0], abs=1e-12)
    assert got["spearman"].dtype == np.float64 and got["spearman"].shape == (len(x),)
    flipped = similarity(x, -x, ["spearman", "spearman_abs"])
    np.testing.assert_allclose(flipped["spearman"], -1.0, atol=1e-15)
    np.testing.assert_array_equal(flipped["spearman_abs"], 1.0)


@pytest.mark.parametrize("shape", [(8, 8), (5, 5), (16, 16), (12, 20), (32, 32)])
def test_ssim_and_hog_against_quantus_and_skimage(shape):
    from quantus.functions.similarity_func import ssim as quantus_ssim
    from skimage.feature import hog

    x, y = maps(m=3, h=shape[0], w=shape[1])
    got = similarity(torch.from_numpy(x).float(), y.astype(np.float32), ["ssim", "hog"])
    x, y = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    side = min(shape)
    window = min(7, side) if min(7, side) % 2 else min(7, side) - 1
    cell = max(2, side // 8)
    block = 2 if side >= 2 * cell else 1
    for i in range(len(x)):
        nx, ny = abs(x[i]) / abs(x[i]).max(), abs(y[i]) / abs(y[i]).max()
        assert got["ssim"][i] == pytest.approx(quantus_ssim(nx, ny, win_size=window), abs=1e-12)
        hx, hy = (hog(v, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(block, block))
                  for v in (nx, ny))
        assert got["hog"][i] == pytest.approx(np.corrcoef(hx, hy)[0, 1], abs=1e-12)
    assert (got["ssim"] < 1).all() and (got["hog"] < 1).all()
    if side >= 7:  # Quantus' own default window (skimage's 7)
        assert got["ssim"][0] == pytest.approx(quantus_ssim(abs(x[0]) / abs(x[0]).max(), abs(y[0]) / abs(y[0]).max()))


def test_ssim_and_hog_compare_the_normalised_absolute_maps():
    x, _ = maps(h=16, w=16)
    scaled = -3.0 * x  # the same normalised absolute map
    got = similarity(x, scaled, METRICS)
    np.testing.assert_array_equal(got["ssim"], 1.0)
    np.testing.assert_array_equal(got["hog"], 1.0)
    np.testing.assert_array_equal(got["spearman_abs"], 1.0)
    np.testing.assert_allclose(got["spearman"], -1.0, atol=1e-15)
    zero = similarity(np.zeros((1, 8, 8)), np.abs(x[:1, :8, :8]), ["ssim", "hog"])
    assert 0 <= zero["ssim"][0] < 0.01 and np.isnan(zero["hog"][0])  # a flat map has a zero HOG


@pytest.mark.parametrize("size", [3, 8, 32])
def test_identical_maps_score_exactly_one(size):
    x, _ = maps(h=size, w=size)
    x[0] = 0.0  # a constant map too
    got = similarity(x, x.copy(), METRICS)
    for metric in METRICS:
        np.testing.assert_array_equal(got[metric], 1.0, err_msg=metric)
    other = similarity(x, x + 1e-3 * np.arange(size * size).reshape(1, size, size), ["spearman"])["spearman"]
    assert np.isnan(other[0])  # a constant map against a varying one: undefined
    x[1, 0, 0] = np.nan
    assert all(np.isnan(v[1]) for v in similarity(x, x.copy(), METRICS).values())


def test_similarity_names_bad_input():
    x, y = maps()
    with pytest.raises(ValueError, match="unknown similarity 'pearson'; choose from spearman, spearman_abs, ssim, hog"):
        similarity(x, y, ["pearson"])
    with pytest.raises(ValueError, match="one shape"):
        similarity(x, y[:, :5], ["ssim"])
    with pytest.raises(ValueError, match=r"\(M, H, W\)"):
        similarity(x[0], y[0], ["ssim"])
    with pytest.raises(ValueError, match="at least 3 x 3"):
        similarity(x[:, :2], y[:, :2], ["spearman", "hog"])
    with pytest.raises(ValueError, match="sequence of names"):
        similarity(x, y, "ssim")
    assert similarity(x[:, :2], y[:, :2], ["spearman"])["spearman"].shape == (4,)
    assert similarity(x[:0], y[:0], METRICS)["hog"].shape == (0,)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


def gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Signed input gradient of the target logit, summed over channels: (N, H, W)."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x).gather(1, targets[:, None]).sum()
    return torch.autograd.grad(out, x)[0].sum(dim=1)


def test_sensitivity_equals_quantus_fed_the_same_noise():
    quantus = pytest.importorskip("quantus")
    model = tiny_model()
    x = torch.randn(3, 3, 8, 8)
    targets = torch.tensor([0, 2, 1])
    seeds, samples, radius = [11, 12, 13], 5, 0.05
    heat = gradient(model, x, targets)
    ours = sensitivity(lambda xs, ts, index: gradient(model, xs, ts), x, targets, heat, seeds, samples, radius)
    noise = perturbations(x, seeds, samples, radius).numpy()  # (N, samples, C, H, W)

    def explain_func(model, inputs, targets, **kwargs):
        return gradient(model, torch.as_tensor(inputs), torch.as_tensor(targets).long())[:, None].numpy()

    for name, cls in (("max_sensitivity", quantus.MaxSensitivity), ("avg_sensitivity", quantus.AvgSensitivity)):
        calls = iter(range(samples))

        def replay(arr, indices, calls=calls, **kwargs):
            # Quantus perturbs the whole batch (N <= batch_size: one batch) once per sample, in
            # order, passing it flattened to (N, C*H*W): sample s of every image.
            assert arr.shape == (len(x), x[0].numel()) and indices.shape == arr.shape
            return arr + noise[:, next(calls)].reshape(len(arr), -1)

        metric = cls(nr_samples=samples, perturb_func=replay, abs=False, normalise=False,
                     return_nan_when_prediction_changes=False, disable_warnings=True)
        scores = metric(model=model, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=heat[:, None].numpy(),
                        explain_func=explain_func, device="cpu", channel_first=True, batch_size=64)
        assert next(calls, None) is None  # every sample was used, none twice
        np.testing.assert_allclose(ours[name].numpy(), scores, rtol=1e-5, atol=1e-7, err_msg=name)
        assert ours[name].dtype == torch.float32 and ours[name].shape == (3,)
    assert (ours["max_sensitivity"] >= ours["avg_sensitivity"]).all() and (ours["avg_sensitivity"] > 0).all()


def test_sensitivity_batched_equals_per_image_and_checks_input():
    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
    x[2] *= 5  # a wider value range: a wider radius
    targets = torch.tensor([0, 1, 2, 0])
    seeds = [5, 6, 7, 8]

    def explain(xs, ts, index):
        return gradient(model, xs, ts)

    heat = gradient(model, x, targets)
    many = sensitivity(explain, x, targets, heat, seeds, 3, 0.1)
    for i in range(4):
        one = sensitivity(explain, x[i:i + 1], targets[i:i + 1], heat[i:i + 1], seeds[i:i + 1], 3, 0.1)
        for key in many:
            assert one[key][0] == pytest.approx(float(many[key][i]), rel=1e-5)
    # By hand for image 1: its generator's draws, sample 0 first.
    g = torch.Generator().manual_seed(6)
    span = float(x[1].max() - x[1].min())
    sens = []
    for _ in range(3):
        delta = (torch.rand((3, 8, 8), generator=g) * 2 - 1) * (0.1 * span)
        moved = gradient(model, (x[1] + delta)[None], targets[1:2])[0]
        sens.append(float(torch.linalg.norm(moved - heat[1]) / torch.linalg.norm(heat[1])))
    assert float(many["max_sensitivity"][1]) == pytest.approx(max(sens), rel=1e-5)
    assert float(many["avg_sensitivity"][1]) == pytest.approx(sum(sens) / 3, rel=1e-5)
    # The noise lies within each image's radius.
    noise = perturbations(x, seeds, 3, 0.1)
    spans = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    assert (noise.flatten(1).abs().amax(dim=1) <= 0.1 * spans + 1e-6).all()
    # One call on all the copies, image-major; index names each copy's image, targets follow it.
    seen = []

    def record(xs, ts, index):
        seen.append((xs.clone(), ts.tolist(), index.tolist()))
        return gradient(model, xs, ts)

    sensitivity(record, x, targets, heat, seeds, 2, 0.1)
    assert len(seen) == 1 and seen[0][2] == [0, 0, 1, 1, 2, 2, 3, 3] and seen[0][1] == [0, 0, 1, 1, 2, 2, 0, 0]
    expected = (x[:, None] + perturbations(x, seeds, 2, 0.1)).reshape(8, 3, 8, 8)
    torch.testing.assert_close(seen[0][0], expected, rtol=0, atol=0)
    # A zero map has no relative change.
    zero = sensitivity(explain, x[:1], targets[:1], torch.zeros(1, 8, 8), seeds[:1], 2, 0.1)
    assert torch.isnan(zero["max_sensitivity"]).all() and torch.isnan(zero["avg_sensitivity"]).all()
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        sensitivity(explain, x, targets, heat, seeds, 0, 0.1)
    with pytest.raises(ValueError, match="one entry per image"):
        sensitivity(explain, x, targets, heat, seeds[:2], 2, 0.1)
    with pytest.raises(ValueError, match=r"heat must be \(N, H, W\)"):
        sensitivity(explain, x, targets, heat[:, :4], seeds, 2, 0.1)
    with pytest.raises(ValueError, match="radius must be > 0"):
        sensitivity(explain, x, targets, heat, seeds, 2, 0.0)
    with pytest.raises(ValueError, match="explain must return"):
        sensitivity(lambda xs, ts, index: gradient(model, xs, ts)[:, :4], x, targets, heat, seeds, 2, 0.1)
