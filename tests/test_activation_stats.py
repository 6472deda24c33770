"""activation_stats against a brute-force pass over every activation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.dataset.activation_stats import ActivationStats, ActivationStatsParams, Moments, batch_moments
from tests.harness import as_table, normalise, run_local


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 5, 3, stride=2), torch.nn.Flatten(), torch.nn.Linear(5 * 7 * 7, 3))


def _data(n=23, size=16, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return [f"img{i:03d}" for i in range(n)], pixels


def _brute(model, pixels, layer_index):
    with torch.no_grad():
        a = model[: layer_index + 1](normalise(pixels)).double()
    a = a.reshape(a.shape[0], a.shape[1], -1).transpose(0, 1).reshape(a.shape[1], -1)
    return {"mean": a.mean(1), "std": a.std(1, unbiased=False), "min": a.amin(1), "max": a.amax(1),
            "zero_fraction": (a == 0).double().mean(1), "count": a.shape[1]}


@pytest.mark.parametrize("batch_size", [1, 4, 23])
def test_equals_brute_force_for_every_batch_size(batch_size):
    # The forward itself runs in float32 (its rounding depends on the batch); the merge is float64.
    model = _model().eval()
    ids, pixels = _data()
    analysis = ActivationStats(ActivationStatsParams(layers=["1", "2", "4"]))
    table = as_table(run_local(analysis, model, ids, pixels, batch_size=batch_size)).to_pandas()
    for layer, index in (("1", 1), ("2", 2), ("4", 4)):
        got = table[table.layer == layer].sort_values("channel")
        ref = _brute(model, pixels, index)
        assert got.channel.tolist() == list(range(len(ref["mean"])))
        assert (got["count"] == ref["count"]).all()
        for column in ("mean", "std", "min", "max", "zero_fraction"):
            np.testing.assert_allclose(got[column].to_numpy(), ref[column].numpy(), rtol=1e-6, atol=1e-6,
                                       err_msg=f"{layer} {column}")
        np.testing.assert_array_equal(got["dead"].to_numpy(), ref["max"].numpy() <= 0)
    # A ReLU output has exact zeros; the linear layer's output (N, C) counts one position per image.
    assert table[table.layer == "1"].zero_fraction.gt(0).all()
    assert table[table.layer == "4"]["count"].eq(len(ids)).all()


def test_dead_channel_is_flagged():
    model = _model().eval()
    with torch.no_grad():
        model[0].bias[2] = -1e3  # channel 2 never fires after the ReLU
    ids, pixels = _data(n=6)
    table = as_table(run_local(ActivationStats(ActivationStatsParams(layers=["1"])), model, ids, pixels)).to_pandas()
    assert table.dead.tolist() == [False, False, True, False]
    assert table.zero_fraction[2] == 1.0


def test_merge_by_hand_and_in_any_grouping():
    # Two batches of one channel: [0, 2] and [4, 0, 6] -> mean 2.4, population var 5.44.
    a = batch_moments(torch.tensor([[[0.0, 2.0]]]))
    b = batch_moments(torch.tensor([[[4.0, 0.0, 6.0]]]))
    rows = {k: np.concatenate([a[k], b[k]]) for k in a}
    together = Moments()
    together.add(rows["channel"].astype(np.int64), rows["count"], rows["mean"], rows["m2"], rows["min"], rows["max"],
                 rows["zeros"])
    apart = Moments()
    for m in (a, b):
        apart.add(m["channel"].astype(np.int64), m["count"], m["mean"], m["m2"], m["min"], m["max"], m["zeros"])
    for m in (together, apart):
        assert m.n.tolist() == [5]
        assert m.mean[0] == pytest.approx(2.4)
        assert m.m2[0] / 5 == pytest.approx(5.44)
        assert (m.min[0], m.max[0], m.zeros[0]) == (0.0, 6.0, 2)
