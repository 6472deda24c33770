"""The demo: its generator, its model's training, and the manifest end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from jobs.attribution.base import ATTRIBUTION, neuron_target
from pipeline.demo import train_demo_model
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest
from pipeline.zoo import DemoCNN

from .conftest import ROOT, smaller


def test_training_is_seeded_and_learns(tmp_path):
    a = train_demo_model(tmp_path / "a.pt", n_train=1024, epochs=4, size=32, log=lambda m: None)
    train_demo_model(tmp_path / "b.pt", n_train=1024, epochs=4, size=32, log=lambda m: None)
    sa = torch.load(tmp_path / "a.pt", weights_only=True)
    sb = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    DemoCNN().load_state_dict(sa)
    assert a > 0.4  # well above chance (0.25) after a few dozen steps


@pytest.mark.slow
def test_demo_manifest_end_to_end(ray_session, tmp_path):
    """What the README's demo command runs, into a temporary folder (trains the CNN: ~1 min),
    with attribution on 50 of the manifest's 200 sampled images (deletion and insertion scoring,
    34 forwards per map, is most of the demo's time) and 40 steps of each optimisation where the
    manifest has 100 to 200 (nothing here reads their pictures); every entry still runs."""
    path = ROOT / "manifests" / "demo.yaml"
    manifest = load_manifest(path, output=tmp_path / "demo",
                             overrides=[f"dataset.root={tmp_path / 'shapes'}",
                                        f"model.weights={tmp_path / 'demo_cnn.pt'}",
                                        *smaller(path, {**{name: {"sample.n": 50} for name in ATTRIBUTION},
                                                        "adversarial": {"sample.n": 20},
                                                        "saliency_segmentation": {"sample.n": 16},
                                                        "class_model": {"steps": 40},
                                                        "neuron_ascent": {"steps": 40, "facets.sample.n": 100},
                                                        "inversion": {"steps": 40}})])
    result = run_manifest(manifest, log=lambda m: None)
    assert result.ok
    info = json.loads((tmp_path / "demo" / "run.json").read_text())
    assert info["dataset"]["images"] == 1000 and info["dataset"]["errors"] == 0
    pred = pd.read_parquet(tmp_path / "demo" / "predictions")
    assert (pred.pred == pred.label).mean() > 0.9  # the demo CNN really learnt the task
    images = pd.read_parquet(tmp_path / "demo" / "images.parquet")
    assert images.box.notna().all() and set(images.label_name) == {"circle", "cross", "square", "triangle"}
    # Every class-explaining attribution method is sanity-checked; with no block randomised each
    # map is itself. The unit projections explain no class: the checks leave them out.
    checks = pd.read_parquet(tmp_path / "demo" / "sanity_checks")
    units = {p.entry_name for p in manifest.analyses if neuron_target(p) is not None}
    methods = {p.entry_name for p in manifest.analyses if p.type in ATTRIBUTION} - units
    assert set(checks.method) == methods and len(methods) == 8
    assert units == {"neuron_guided_backprop", "neuron_deconvnet"}
    # The neuron-level analyses: every layer's correspondence, a mask per map, a search per image.
    corr = pd.read_parquet(tmp_path / "demo" / "correspondence")
    assert set(corr.layer) == {"relu1", "relu2", "relu3", "relu4"} and corr.delta.between(0, 1).all()
    masks = pd.read_parquet(tmp_path / "demo" / "saliency_segmentation")
    assert len(masks[masks.image_id.notna()]) == 8 * 16 and masks.iou.dropna().between(0, 1).all()
    assert len(pd.read_parquet(tmp_path / "demo" / "adversarial")) == 20
    for name in units:
        projected = pd.read_parquet(tmp_path / "demo" / name)
        assert len(projected) == 50 and (projected.neuron_layer == "relu4").all()
        assert projected.target.isna().all() and (projected.neuron_value >= 0).all()
    untouched = checks[(checks.test == "mprt_cascading") & (checks.step == 0) & checks.image_id.notna()]
    assert len(untouched) == 8 * 8 * 4 and (untouched.value == 1.0).all()
    # The short fine-tune: a new head on the frozen features, scored on the held-out half.
    tuned = pd.read_parquet(tmp_path / "demo" / "finetune")
    assert tuned.phase.tolist() == ["start", "head", "fine_tune"]
    assert info["analyses"]["finetune"]["held_out_accuracy"] > 0.9
