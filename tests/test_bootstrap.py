"""The percentile bootstrap interval of the mean, and attribution_summary's intervals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pydantic
import pytest
from torch import nn

from jobs import REGISTRY, LocalContext, TableInputs
from jobs.core.kernels import bootstrap_interval


def loop_interval(values, resamples, level, seed):
    """The documented draw, means and linear quantiles, one value at a time."""
    v = [float(x) for x in values if not math.isnan(x)]
    n = len(v)
    draw = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = sorted(sum(v[int(i)] for i in row) / n for row in draw)

    def quantile(q):
        pos = q * (len(means) - 1)
        below = math.floor(pos)
        above = min(below + 1, len(means) - 1)
        return means[below] + (pos - below) * (means[above] - means[below])

    return quantile((1 - level) / 2), quantile((1 + level) / 2)


@pytest.mark.parametrize(("n", "resamples", "level", "seed"), [(1, 10, 0.95, 0), (2, 7, 0.5, 3), (17, 200, 0.9, 1),
                                                                (50, 1000, 0.95, 0), (301, 11, 0.99, 7)])
def test_matches_a_plain_loop_over_the_documented_draw(n, resamples, level, seed):
    values = np.random.default_rng(100 + n).normal(size=n)
    values[::5] = np.nan if n > 4 else values[::5]  # dropped first
    lo, hi = bootstrap_interval(values, resamples, level, seed)
    assert isinstance(lo, float) and isinstance(hi, float)
    expected = loop_interval(values, resamples, level, seed)
    assert (lo, hi) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n", [5001, 4097])
def test_large_draws_are_the_same_numbers_as_one_draw(n):
    # 1,000 x n indices are drawn in blocks of rows; the numbers are those of one call (4097: blocks of
    # an odd number of indices, so a block can end halfway through one of the generator's 64-bit words).
    values = np.random.default_rng(5).exponential(size=n)
    draw = np.random.default_rng(2).integers(0, len(values), size=(1000, len(values)))
    expected = np.quantile(values[draw].mean(axis=1), [0.025, 0.975])
    assert bootstrap_interval(values, 1000, 0.95, 2) == pytest.approx(tuple(expected), rel=1e-12)


def test_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_interval(np.array([])))
    assert all(math.isnan(x) for x in bootstrap_interval(np.array([np.nan, np.nan])))
    assert bootstrap_interval(np.array([2.5])) == (2.5, 2.5)
    assert bootstrap_interval(np.array([np.nan, 4.0, np.nan]), resamples=3) == (4.0, 4.0)
    assert bootstrap_interval(np.array([1.0, 2.0]), seed=4) == bootstrap_interval(np.array([1.0, 2.0]), seed=4)
    assert bootstrap_interval(np.array([1, 2, 3]))[0] >= 1.0  # integers are fine


@pytest.mark.parametrize("seed", range(5))
def test_the_interval_holds_the_mean(seed):
    rng = np.random.default_rng(seed)
    values = rng.gamma(2.0, size=int(rng.integers(5, 300)))
    lo, hi = bootstrap_interval(values, 500, 0.95, seed)
    assert lo <= values.mean() <= hi and lo < hi


def test_width_matches_the_normal_approximation():
    n = 2000
    values = np.random.default_rng(11).normal(3.0, 2.0, size=n)
    lo, hi = bootstrap_interval(values, 2000, 0.95, 0)
    expected = 2 * 1.96 * values.std(ddof=1) / math.sqrt(n)
    assert hi - lo == pytest.approx(expected, rel=0.15)
    assert lo < values.mean() < hi


SCORES = {"deletion_auc": "deletion_auc", "insertion_auc": "insertion_auc", "pointing_game": "pointing",
          "box_energy": "box_energy"}


def maps(method, n, seed):
    rng = np.random.default_rng(seed)
    boxed = rng.random(n) < 0.7
    return pd.DataFrame({
        "image_id": [f"i{j}" for j in range(n)], "label": rng.integers(0, 3, n), "method": method,
        "deletion_auc": rng.random(n), "insertion_auc": rng.random(n),
        "pointing": np.where(boxed, (rng.random(n) < 0.6).astype(float), np.nan),
        "box_energy": np.where(boxed, rng.random(n), np.nan)})


def summary(frames, **params):
    inputs = TableInputs({m: pa.Table.from_pandas(df, preserve_index=False) for m, df in frames.items()})
    cls = REGISTRY["attribution_summary"]
    a = cls(cls.Params(type="attribution_summary", **params))
    out = a.reduce(inputs, LocalContext(model=nn.Identity(), pixels={}, input_size=(1, 1), label_names=["a", "b", "c"]))
    return out.tables[""]


def test_summary_intervals_are_each_groups_bootstrap():
    frames = {"saliency": maps("saliency", 40, 0), "grad_cam": maps("grad_cam", 30, 1)}
    table = summary(frames, bootstrap={"resamples": 300, "level": 0.9, "seed": 5})
    names = table.column_names
    for score in SCORES:
        i = names.index(score)
        assert names[i + 1:i + 3] == [f"{score}_lo", f"{score}_hi"]
        assert table.schema.field(f"{score}_lo").type == pa.float64() == table.schema.field(f"{score}_hi").type
    df = table.to_pandas()
    assert len(df) == 2 + 2 * 3
    for row in df.itertuples():
        group = frames[row.method]
        if not pd.isna(row.label):
            group = group[group["label"] == row.label]
        for score, column in SCORES.items():
            values = group[column].dropna().to_numpy()
            lo, hi = bootstrap_interval(values, 300, 0.9, 5)
            assert getattr(row, f"{score}_lo") == pytest.approx(lo, rel=1e-12)
            assert getattr(row, f"{score}_hi") == pytest.approx(hi, rel=1e-12)
            assert getattr(row, score) == pytest.approx(values.mean())
            assert lo <= getattr(row, score) <= hi


def test_summary_default_and_no_intervals():
    frames = {"saliency": maps("saliency", 20, 2)}
    df = summary(frames).to_pandas()
    overall = df[df["label"].isna()].iloc[0]
    assert (overall["deletion_auc_lo"], overall["deletion_auc_hi"]) == pytest.approx(
        bootstrap_interval(frames["saliency"]["deletion_auc"].to_numpy(), 1000, 0.95, 0))
    plain = summary(frames, bootstrap=None)
    assert not [c for c in plain.column_names if c.endswith(("_lo", "_hi"))]
    assert plain.column("deletion_auc").to_pylist() == pytest.approx(df["deletion_auc"].tolist())
    # A group without boxes: NaN mean and NaN interval.
    unboxed = maps("saliency", 10, 3).assign(pointing=np.nan, box_energy=np.nan)
    row = summary({"saliency": unboxed}).to_pandas().iloc[0]
    assert np.isnan(row["pointing_game"]) and np.isnan(row["pointing_game_lo"]) and np.isnan(row["box_energy_hi"])


@pytest.mark.parametrize("bootstrap", [{"resamples": 0}, {"level": 1.0}, {"level": 0}, {"seed": 0, "extra": 1}])
def test_summary_bootstrap_params_are_checked(bootstrap):
    with pytest.raises(pydantic.ValidationError):
        REGISTRY["attribution_summary"].Params(type="attribution_summary", bootstrap=bootstrap)
