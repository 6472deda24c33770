"""``correspondence`` against a plain loop: occlude, difference, sign, Hamming over every pair."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from jobs import LocalContext
from jobs.core.base import unit_seed
from jobs.dataset.correspondence import (
    Correspondence,
    consistency,
    pack,
    pairwise_hamming,
    random_box,
    unpack,
)
from tests.harness import gather, map_batches, normalise


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 5, 3, stride=2, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(5, 3)),
    ])).eval()


def test_hamming_and_packing_by_hand():
    signs = np.array([[1, 0, -1, 1], [1, 1, -1, -1], [0, 0, 0, 0]], np.int8)
    assert pairwise_hamming(signs).tolist() == [[0, 2, 3], [2, 0, 4], [3, 4, 0]]
    delta, std, pairs = consistency(signs)
    # Ordered pairs: (2 + 3 + 2 + 4 + 3 + 4) / 6 / 4 dims; per image means 2.5, 3, 3.5 (/ 4).
    assert pairs == 6 and delta == pytest.approx(18 / 6 / 4)
    assert std == pytest.approx(np.std([2.5 / 4, 3 / 4, 3.5 / 4]))
    assert np.array_equal(unpack(*pack(signs), dims=4), signs)
    assert np.isnan(consistency(signs[:1])[0])


def test_random_box_keeps_the_size_and_stays_inside():
    for seed in range(20):
        x0, y0, x1, y1 = random_box(np.array([2, 3, 9, 7]), (12, 10), seed)
        assert (x1 - x0, y1 - y0) == (7, 4) and x0 >= 0 and y0 >= 0 and x1 <= 10 and y1 <= 12


def test_equals_a_plain_loop():
    model = tiny_net()
    rng = np.random.default_rng(1)
    n, size = 7, 12
    pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    boxes = np.array([[1 + i % 3, 2, 6 + i % 3, 8] for i in range(n)])
    boxes[4] = -1  # no box: left out
    ids = [f"img{i}" for i in range(n)]
    labels = [0, 1, 0, 1, 0, 0, 1]
    analysis = Correspondence(Correspondence.Params(layers=["relu1", "conv2"], sample=None, seed=3, chunk=2))
    parts = map_batches(analysis, model, ids, pixels, labels, batch_size=3, boxes=boxes)
    ctx = LocalContext(model=model, pixels=dict(zip(ids, pixels)), input_size=(size, size),
                       label_names=["a", "b"])
    table = analysis.reduce(gather(parts), ctx).tables[""]
    got = table.to_pandas() if hasattr(table, "to_pandas") else None
    assert got is not None
    # The loop: one image at a time, each occluded copy alone.
    x = normalise(pixels)
    kept = [i for i in range(n) if boxes[i][0] >= 0]
    for layer in ("relu1", "conv2"):
        module = dict(model.named_modules())[layer]
        for occluder in ("part", "random"):
            vectors = {}
            for i in kept:
                box = boxes[i] if occluder == "part" else random_box(boxes[i], (size, size), unit_seed(3, ids[i]))
                covered = x[i:i + 1].clone()
                covered[..., box[1]:box[3], box[0]:box[2]] = 0
                seen: list[torch.Tensor] = []
                handle = module.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.detach().clone()))
                with torch.no_grad():
                    model(x[i:i + 1])
                    model(covered)
                handle.remove()
                eps = (seen[0] - seen[1]).flatten()
                tol = 1e-5 * seen[0].abs().max()
                vectors[i] = [0 if abs(e) <= tol else (1 if e > 0 else -1) for e in eps.tolist()]
            for label in (None, 0, 1):
                group = [i for i in kept if label is None or labels[i] == label]
                dims = len(vectors[group[0]])
                distance = {(i, j): sum(a != b for a, b in zip(vectors[i], vectors[j])) / dims
                            for i in group for j in group if i != j}
                expected = sum(distance.values()) / len(distance)
                per_image = [np.mean([distance[i, j] for j in group if j != i]) for i in group]
                row = got[(got.layer == layer) & (got.occluder == occluder)
                          & (got.label.isna() if label is None else got.label == label)]
                assert len(row) == 1
                assert row.delta.iloc[0] == pytest.approx(expected, abs=2e-3)
                assert row.delta_std.iloc[0] == pytest.approx(np.std(per_image), abs=2e-3)
                assert row.images.iloc[0] == len(group) and row.dims.iloc[0] == dims
    assert set(got.label_name.dropna()) == {"a", "b"}


def test_needs_boxes():
    analysis = Correspondence(Correspondence.Params(layers=["relu1"], sample=None))
    pixels = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="needs object boxes"):
        map_batches(analysis, tiny_net(), ["a", "b"], pixels, [0, 1], batch_size=2)
    outside = Correspondence(Correspondence.Params(layers=["relu1"], sample=None, part=(2, 2, 9, 4)))
    with pytest.raises(ValueError, match=r"part \[2, 2, 9, 4\] is not a box"):
        map_batches(outside, tiny_net(), ["a", "b"], pixels, [0, 1], batch_size=2)


def test_a_fixed_part_equals_the_same_object_box_everywhere():
    model = tiny_net()
    pixels = np.random.default_rng(4).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    ids, labels = ["a", "b", "c", "d"], [0, 0, 1, 1]
    fixed = Correspondence(Correspondence.Params(layers=["relu2"], sample=None, part=(1, 2, 5, 6)))
    boxed = Correspondence(Correspondence.Params(layers=["relu2"], sample=None))
    ctx = LocalContext(model=model, pixels=dict(zip(ids, pixels)), input_size=(8, 8))
    a = fixed.reduce(gather(map_batches(fixed, model, ids, pixels, labels, 4)), ctx).tables[""]
    b = boxed.reduce(gather(map_batches(boxed, model, ids, pixels, labels, 4, boxes=np.tile([1, 2, 5, 6], (4, 1)))),
                     ctx).tables[""]
    assert a.equals(b)
