"""Multifaceted visualisation: the top images of a unit clustered, each facet started from its mean."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from jobs import REGISTRY
from jobs.core.base import ModelContext

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def colour_net() -> nn.Module:
    """1x1 conv: channel 0 fires on red or blue, channel 1 on red only, channel 2 on blue only."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        # Inputs are (p - 0.5) / 0.25: a full channel gives about +2, an empty one -2.
        conv.weight[0, 0] = conv.weight[0, 2] = 1.0
        conv.weight[1, 0] = 1.0
        conv.weight[2, 2] = 1.0
        conv.bias.copy_(torch.tensor([1.0, -1.0, -1.0]))
    return nn.Sequential(OrderedDict([("conv", conv), ("relu", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(1)),
                                      ("flat", nn.Flatten()), ("fc", nn.Linear(3, 2))])).eval()


def pool_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = {}
    for i in range(12):
        colour = [(255, 0, 0), (0, 0, 255), (0, 255, 0)][i % 3]
        px = np.zeros((6, 6, 3), np.uint8)
        px[...] = colour
        images[f"img{i:02d}"] = np.clip(px.astype(int) + rng.integers(0, 30, px.shape), 0, 255).astype(np.uint8)
    return images


def analysis(**params):
    cls = REGISTRY["neuron_ascent"]
    return cls(cls.Params.model_validate({"type": "neuron_ascent", "layer": "relu", "channels": [0], "steps": 2,
                                          "l2": 0, "blur_every": 0, "jitter": 0, **params}))


def test_facets_are_the_units_clusters():
    a = analysis(facets={"k": 2, "top": 8, "layer": "relu"})
    pixels = pool_images()
    ctx = ModelContext(model=colour_net(), input_size=(6, 6), mean=MEAN, std=STD, pixels=pixels,
                       labels={k: 0 for k in pixels})
    assert set(a.select(list(pixels)) or []) == set(pixels)  # a sample of 500: every image here
    units = a.units(ctx)
    assert units == [(0, 0), (0, 1)]
    starts, members = a.facet_starts(units, ctx, (6, 6))
    reds = {k for i, k in enumerate(sorted(pixels)) if i % 3 == 0}
    blues = {k for i, k in enumerate(sorted(pixels)) if i % 3 == 1}
    assert {frozenset(m) for m in members} == {frozenset(reds), frozenset(blues)}  # green never fires
    for start, chosen in zip(starts, members):
        expected = torch.stack([torch.from_numpy(pixels[i]).permute(2, 0, 1).float() / 255 for i in chosen]).mean(0)
        torch.testing.assert_close(start, expected)
    table = a.run(units, ctx).tables[""]
    assert table.column("facet").to_pylist() == [0, 1]
    assert [set(m) for m in table.column("facet_images").to_pylist()] == [set(m) for m in members]


def test_facets_need_pixel_images():
    with pytest.raises(ValidationError, match="parameterization: pixel"):
        analysis(facets={"k": 2}, parameterization="fourier")


def test_class_model_facets_cluster_the_penultimate_features():
    cls = REGISTRY["class_model"]
    a = cls(cls.Params.model_validate({"type": "class_model", "classes": [1], "steps": 1, "facets": {"k": 2}}))
    pixels = pool_images()
    ctx = ModelContext(model=colour_net(), input_size=(6, 6), mean=MEAN, std=STD, pixels=pixels,
                       labels={k: 0 for k in pixels})
    assert a.facet_layer(ctx) == "fc"
    units = a.units(ctx)
    starts, members = a.facet_starts(units, ctx, (8, 8))
    assert starts.shape == (2, 3, 8, 8) and sum(len(m) for m in members) == 12  # top 50 > 12: every image
