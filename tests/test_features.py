"""The features and predictions kernels, against hand-worked numbers."""

from __future__ import annotations

import torch

from jobs import REGISTRY
from jobs.core.base import MapBatch
from jobs.core.kernels import pool
from jobs.dataset.features import Features, FeaturesParams
from jobs.dataset.predictions import Predictions, PredictionsParams, top_k


def test_pool_by_hand():
    # One image, two channels of 2x2: [[0,1],[2,3]] and [[4,5],[6,7]].
    a = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert pool(a, "avg").tolist() == [[1.5, 5.5]]
    assert pool(a, "max").tolist() == [[3.0, 7.0]]
    assert pool(a, "none").tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert pool(a, "grid", 2).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]  # a 2x2 grid of 1x1 cells
    assert pool(a, "grid", 1).tolist() == [[1.5, 5.5]]
    # A 4x4 map in a 2x2 grid: each cell averages a 2x2 block.
    b = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert pool(b, "grid", 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    # A linear layer's (N, C) output is already a vector.
    assert pool(torch.ones(3, 5), "avg").shape == (3, 5)


def test_top_k_by_hand_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    classes, probs = top_k(logits, 3)
    assert classes.tolist() == [[1, 2, 0], [3, 0, 1]]  # equal logits: lower class first
    p = torch.softmax(logits, 1)
    assert torch.allclose(probs, p.gather(1, classes))


def _batch(acts, logits):
    return MapBatch(image_ids=["a", "b"], labels=torch.tensor([0, 1]), images=torch.zeros(2, 3, 4, 4),
                    logits=logits, activations=acts, model=torch.nn.Identity())


def test_analyses_return_rows_per_partition():
    acts = {"l1": torch.arange(16.0).reshape(2, 2, 2, 2), "l2": torch.ones(2, 3)}
    rows = Features(FeaturesParams(type="features", layers=["l1", "l2"], pool="max")).map_batch(_batch(acts, None))
    assert set(rows) == {"layer=l1", "layer=l2"}
    assert rows["layer=l1"]["vector"].tolist() == [[3, 7], [11, 15]]
    out = Predictions(PredictionsParams(type="predictions", top_k=2)).map_batch(
        _batch({}, torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])))[""]
    assert out["pred"].tolist() == [1, 0]
    assert out["top5"].tolist() == [[1, 2], [0, 1]]
    assert out["logits"].shape == (2, 3)


def test_registry_names_match_modules():
    # The manifest key, the module and the registered name are one word.
    for name, cls in REGISTRY.items():
        assert cls.name == name
        assert cls.__module__ == f"jobs.{cls.family}.{name}"
        assert cls.Params.model_fields["type"].default == name
