"""Map similarity, sensitivity and bootstrap intervals against independent computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from jobs import REGISTRY, LocalContext, TableInputs
from jobs.attribution.robustness import perturbations, sensitivity
from jobs.attribution.similarity import METRICS, similarity
from jobs.core.kernels import bootstrap_interval


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
    assert similarity(a, b, ["spearman"])["spearman"][0] == pytest.approx(1 - 6 * d2 / (9 * (81 - 1)))
    x, y = maps()
    got = similarity(x, y, ["spearman", "spearman_abs"])
    for i in range(len(x)):
        assert got["spearman"][i] == pytest.approx(spearmanr(x[i].ravel(), y[i].ravel())[0], abs=1e-12)
        assert got["spearman_abs"][i] == pytest.approx(spearmanr(abs(x[i].ravel()), abs(y[i].ravel()))[0], abs=1e-12)
    flipped = similarity(x, -x, ["spearman", "spearman_abs"])
    np.testing.assert_allclose(flipped["spearman"], -1.0)
    np.testing.assert_array_equal(flipped["spearman_abs"], 1.0)


def test_ssim_and_hog_against_skimage_and_quantus():
    from quantus.functions.similarity_func import ssim as quantus_ssim
    from skimage.feature import hog

    x, y = maps(h=16, w=16)
    got = similarity(torch.from_numpy(x), torch.from_numpy(y), ["ssim", "hog"])
    for i in range(len(x)):
        nx, ny = abs(x[i]) / abs(x[i]).max(), abs(y[i]) / abs(y[i]).max()
        assert got["ssim"][i] == pytest.approx(quantus_ssim(nx, ny), abs=1e-12)
        hx, hy = (hog(v, orientations=9, pixels_per_cell=(4, 4), cells_per_block=(2, 2)) for v in (nx, ny))
        assert got["hog"][i] == pytest.approx(np.corrcoef(hx, hy)[0, 1], abs=1e-12)
    assert (got["ssim"] < 1).all() and (got["hog"] < 1).all()


@pytest.mark.parametrize("size", [3, 8, 32])
def test_identical_maps_score_exactly_one(size):
    x, _ = maps(h=size, w=size)
    x[0] = 0.0  # a constant map too
    got = similarity(x, x.copy(), METRICS)
    for metric in METRICS:
        np.testing.assert_array_equal(got[metric], 1.0, err_msg=metric)
    other = similarity(x, x + 1e-3 * np.arange(size * size).reshape(1, size, size), ["spearman"])["spearman"]
    assert np.isnan(other[0])  # a constant map against a varying one: undefined


def test_similarity_names_bad_input():
    x, y = maps()
    with pytest.raises(ValueError, match="unknown similarity 'pearson'; choose from spearman, spearman_abs"):
        similarity(x, y, ["pearson"])
    with pytest.raises(ValueError, match="one shape"):
        similarity(x, y[:, :5], ["ssim"])
    with pytest.raises(ValueError, match=r"\(M, H, W\)"):
        similarity(x[0], y[0], ["ssim"])


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
    for name, cls in (("max_sensitivity", quantus.MaxSensitivity), ("avg_sensitivity", quantus.AvgSensitivity)):
        calls = iter(range(samples))

        def replay(arr, indices, calls=calls, **kwargs):
            # Quantus perturbs the whole batch once per sample: sample s of every image.
            s = next(calls)
            return arr + noise[:, s].reshape(len(arr), -1)

        def explain_func(model, inputs, targets, **kwargs):
            return gradient(model, torch.as_tensor(inputs), torch.as_tensor(targets).long())[:, None].numpy()

        metric = cls(nr_samples=samples, perturb_func=replay, disable_warnings=True)
        scores = metric(model=model, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=heat[:, None].numpy(),
                        explain_func=explain_func, device="cpu", channel_first=True)
        np.testing.assert_allclose(ours[name].numpy(), scores, rtol=1e-5, err_msg=name)
    assert (ours["max_sensitivity"] >= ours["avg_sensitivity"]).all() and (ours["avg_sensitivity"] > 0).all()


def test_sensitivity_batched_equals_per_image_and_checks_input():
    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
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
    # The noise is within the radius, seeded, and the index names each copy's image.
    noise = perturbations(x, seeds, 3, 0.1)
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    assert (noise.flatten(2).abs().amax(dim=(1, 2)) <= 0.1 * span + 1e-6).all()
    seen = []
    sensitivity(lambda xs, ts, index: seen.append(index.tolist()) or gradient(model, xs, ts), x, targets, heat,
                seeds, 2, 0.1)
    assert seen == [[0, 0, 1, 1, 2, 2, 3, 3]]
    with pytest.raises(ValueError, match="samples must be >= 1"):
        sensitivity(explain, x, targets, heat, seeds, 0, 0.1)
    with pytest.raises(ValueError, match="one entry per image"):
        sensitivity(explain, x, targets, heat, seeds[:2], 2, 0.1)


def test_bootstrap_interval_against_a_plain_loop():
    rng = np.random.default_rng(0)
    values = rng.normal(size=50)
    values[3] = np.nan
    clean = values[~np.isnan(values)]
    draw = np.random.default_rng(7).integers(0, len(clean), size=(300, len(clean)))
    means = [sum(clean[j] for j in row) / len(clean) for row in draw]
    expected = tuple(np.quantile(means, [0.05, 0.95]))
    assert bootstrap_interval(values, 300, 0.9, 7) == pytest.approx(expected, abs=1e-12)
    assert bootstrap_interval(np.array([])) != bootstrap_interval(np.array([]))  # (nan, nan)
    # Drawn in blocks when large: the same numbers as one draw.
    big = rng.normal(size=5000)
    one = np.random.default_rng(3).integers(0, 5000, size=(1000, 5000))
    expected = np.quantile(big[one].mean(axis=1), [0.025, 0.975])
    assert bootstrap_interval(big, seed=3) == pytest.approx(expected, abs=1e-15)


def test_bootstrap_interval_covers_the_mean_with_the_normal_width():
    rng = np.random.default_rng(1)
    for _ in range(5):
        v = rng.exponential(size=40)
        lo, hi = bootstrap_interval(v, seed=int(rng.integers(100)))
        assert lo <= v.mean() <= hi
    v = rng.normal(size=2000)
    lo, hi = bootstrap_interval(v, resamples=2000)
    assert hi - lo == pytest.approx(2 * 1.96 * v.std() / np.sqrt(len(v)), rel=0.15)


def test_summary_intervals_equal_bootstrap_of_each_group():
    import pyarrow as pa

    rng = np.random.default_rng(2)
    n = 30
    table = pa.table({"image_id": [f"i{j}" for j in range(n)], "label": pa.array([j % 2 for j in range(n)], pa.int64()),
                      "method": ["saliency"] * n, "deletion_auc": rng.uniform(size=n),
                      "insertion_auc": rng.uniform(size=n),
                      "pointing": [np.nan if j % 5 == 0 else float(j % 3 == 0) for j in range(n)],
                      "box_energy": rng.uniform(size=n)})
    cls = REGISTRY["attribution_summary"]
    a = cls(cls.Params(type="attribution_summary", bootstrap={"resamples": 500, "seed": 4}))
    out = a.reduce(TableInputs({"saliency": table}), LocalContext(model=nn.Identity(), pixels={}, input_size=(1, 1)))
    df = out.tables[""].to_pandas()
    src = table.to_pandas()
    for label, group in [(None, src), (0, src[src.label == 0]), (1, src[src.label == 1])]:
        row = df[df.label.isna()].iloc[0] if label is None else df[df.label == label].iloc[0]
        for score, column in (("deletion_auc", "deletion_auc"), ("pointing_game", "pointing")):
            lo, hi = bootstrap_interval(group[column].to_numpy(), 500, 0.95, 4)
            assert (row[f"{score}_lo"], row[f"{score}_hi"]) == (lo, hi)
            assert lo <= row[score] <= hi
    assert list(df.columns[df.columns.get_loc("deletion_auc"):][:3]) == ["deletion_auc", "deletion_auc_lo",
                                                                        "deletion_auc_hi"]
    plain = cls(cls.Params(type="attribution_summary", bootstrap=None)).reduce(
        TableInputs({"saliency": table}), LocalContext(model=nn.Identity(), pixels={}, input_size=(1, 1)))
    assert not any(c.endswith("_lo") for c in pd.DataFrame(plain.tables[""].to_pandas()).columns)
