"""Neuron targets: the gradient of one activation, against captum's neuron methods and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.attribution.backprop import neuron_gradients, neuron_positions, reduce_channels
from jobs.attribution.base import NeuronTarget
from jobs.attribution.deconvnet import Deconvnet
from jobs.attribution.guided_backprop import GuidedBackprop
from jobs.attribution.saliency import Saliency
from tests.harness import map_table, normalise
from tests.test_backprop import FunctionalNet, ModuleNet, _randomise_bn

captum_neuron = pytest.importorskip("captum.attr", reason="captum (a test extra) is the reference")

# (rule, captum class) for every rule the neuron targets take.
RULES = [(None, "NeuronGradient"), ("guided", "NeuronGuidedBackprop"), ("deconvnet", "NeuronDeconvolution")]


def nets(seed: int = 0) -> tuple[ModuleNet, FunctionalNet]:
    torch.manual_seed(seed)
    modules = _randomise_bn(ModuleNet()).eval()
    functional = FunctionalNet().eval()
    functional.load_state_dict(modules.state_dict())
    return modules, functional


def inputs(n: int = 5, size: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_positions_by_hand():
    acts = torch.zeros(2, 2, 3, 4)
    acts[0, 1, 2, 3] = 5.0
    acts[1, 1, 0, 1] = acts[1, 1, 2, 0] = 7.0  # a tie: the first in row-major order wins
    assert neuron_positions(acts, 1, "max").tolist() == [[2, 3], [0, 1]]
    assert neuron_positions(acts, 0, "center").tolist() == [[1, 2], [1, 2]]
    assert neuron_positions(acts, 0, (2, 1)).tolist() == [[2, 1], [2, 1]]
    assert neuron_positions(torch.ones(3, 4), 2, "max").tolist() == [[0, 0]] * 3  # (N, K): one unit a channel
    with pytest.raises(ValueError, match="outside the layer's 3x4 map"):
        neuron_positions(acts, 0, (3, 0))
    with pytest.raises(ValueError, match="channel 2 is out of range: the layer has 2 channels"):
        neuron_positions(acts, 2, "max")


@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
@pytest.mark.parametrize("layer", ["bn1", "act1", "conv2", "act2"])
@pytest.mark.parametrize("rule,reference", RULES)
def test_equals_captum_neuron_methods(layer, rule, reference):
    model, _ = nets()
    x = inputs()
    grads, pos, values = neuron_gradients(model, x, layer, 3, "max", rule)
    module = dict(model.named_modules())[layer]
    method = getattr(captum_neuron, reference)(model, module)
    with torch.no_grad():
        acts = {}
        handle = module.register_forward_hook(lambda _m, _i, out: acts.setdefault("a", out.clone()))
        model(x)
        handle.remove()
    for i in range(len(x)):
        y, xx = pos[i].tolist()
        # captum picks the unit by a fixed (channel, y, x); ours is where channel 3 peaks.
        assert acts["a"][i, 3].argmax().item() == y * acts["a"].shape[-1] + xx
        assert values[i].item() == pytest.approx(acts["a"][i, 3, y, xx].item(), rel=1e-5, abs=1e-6)
        expected = method.attribute(x[i:i + 1].clone().requires_grad_(True), neuron_selector=(3, y, xx))
        torch.testing.assert_close(grads[i:i + 1], expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", [None, "guided", "deconvnet"])
def test_functional_relus_equal_modules(rule):
    modules, functional = nets(seed=3)
    x = inputs(seed=4)
    a = neuron_gradients(modules, x, "conv2", 5, "center", rule)
    b = neuron_gradients(functional, x, "conv2", 5, "center", rule)
    for left, right in zip(a, b):
        torch.testing.assert_close(left, right)
    assert a[0].abs().sum() > 0


def test_batched_equals_per_image():
    model, _ = nets(seed=5)
    x = inputs(n=6, seed=6)
    grads, pos, values = neuron_gradients(model, x, "act2", 1, "max", "guided")
    for i in range(len(x)):
        g, p, v = neuron_gradients(model, x[i:i + 1], "act2", 1, "max", "guided")
        torch.testing.assert_close(g, grads[i:i + 1], rtol=1e-5, atol=1e-6)
        assert p.tolist() == pos[i:i + 1].tolist()


def pixels(n: int = 6, size: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("cls,rule", [(Saliency, None), (GuidedBackprop, "guided"), (Deconvnet, "deconvnet")])
def test_analysis_rows_name_the_unit(cls, rule):
    model, _ = nets(seed=7)
    px = pixels()
    ids = [f"img{i}" for i in range(len(px))]
    params = cls.Params(target={"neuron": {"layer": "act1", "channel": 2}}, metrics=True, cell=8)
    table, images = map_table(cls(params), model, ids, px, labels=[0, 1, 2, 3, 0, 1], batch_size=4)
    rows = table.to_pylist()
    assert len(rows) == len(px) and len(images) == len(px)
    grads, pos, values = neuron_gradients(model, normalise(px), "act1", 2, "max", rule)
    expected = reduce_channels(grads, signed=False)
    for i, row in enumerate(rows):
        assert row["image_id"] == ids[i] and row["target"] is None and row["rank"] is None and row["score"] is None
        assert (row["neuron_layer"], row["neuron_channel"]) == ("act1", 2)
        assert [row["neuron_y"], row["neuron_x"]] == pos[i].tolist()
        assert row["neuron_value"] == pytest.approx(values[i].item(), rel=1e-5)
        assert np.isnan(row["deletion_auc"]) and np.isnan(row["insertion_auc"])
        np.testing.assert_allclose(np.asarray(row["map"]).reshape(expected.shape[1:]), expected[i].numpy(),
                                   rtol=1e-5, atol=1e-7)
    assert all("nact1-2" in key for key in images)


def test_smoothgrad_keeps_the_clean_position():
    model, _ = nets(seed=8)
    px = pixels(n=3, seed=9)
    ids = ["a", "b", "c"]
    params = Saliency.Params(target={"neuron": {"layer": "conv2", "channel": 0}}, metrics=False, render=False,
                             smoothgrad={"samples": 3, "sigma": 0.1})
    table, _ = map_table(Saliency(params), model, ids, px, batch_size=2)
    clean = neuron_gradients(model, normalise(px), "conv2", 0, "max")[1]
    assert [[r["neuron_y"], r["neuron_x"]] for r in table.to_pylist()] == clean.tolist()
    # One image alone gives the same map as in a batch (per-image seeds, positions fixed).
    alone, _ = map_table(Saliency(params), model, ids[1:2], px[1:2], batch_size=1)
    np.testing.assert_allclose(alone.column("map")[0].values.to_numpy(),
                               table.column("map")[1].values.to_numpy(), rtol=1e-5, atol=1e-7)


def test_check_model_names_the_field():
    model, _ = nets()
    bad_channel = Saliency(Saliency.Params(target={"neuron": {"layer": "conv2", "channel": 8}}))
    problems = bad_channel.check_model(model, (12, 12))
    assert problems and problems[0][0] == ("target", "neuron", "channel") and "8 channels" in problems[0][1]
    bad_at = GuidedBackprop(GuidedBackprop.Params(target={"neuron": {"layer": "conv2", "channel": 1, "at": [6, 0]}}))
    problems = bad_at.check_model(model, (12, 12))
    assert problems and problems[0][0] == ("target", "neuron", "at") and "6x6" in problems[0][1]
    good = Deconvnet(Deconvnet.Params(target={"neuron": {"layer": "conv2", "channel": 7, "at": [5, 5]}}))
    assert good.check_model(model, (12, 12)) == []
    assert (("target", "neuron", "layer"), "conv2") in good.layers()
    assert isinstance(good.params.target, NeuronTarget)


def test_class_only_methods_refuse_neuron_targets():
    from pydantic import ValidationError

    from jobs.attribution.grad_cam import GradCam

    with pytest.raises(ValidationError):
        GradCam.Params(layer="conv2", target={"neuron": {"layer": "conv2", "channel": 0}})


def test_rows_follow_the_declared_schema():
    model, _ = nets(seed=2)
    analysis = GuidedBackprop(GuidedBackprop.Params(target={"neuron": {"layer": "conv2", "channel": 1}}, cell=8))
    table, _ = map_table(analysis, model, ["a", "b"], pixels(n=2))
    assert table.column_names == analysis.schema()[""].names


def test_summary_and_checks_take_class_maps_by_default():
    from jobs import REGISTRY

    def params(kind: str, **fields):
        return REGISTRY[kind].Params.model_validate({"type": kind, **fields})

    unit = {"neuron": {"layer": "conv2", "channel": 0}}
    entries = [params("saliency"), params("guided_backprop", name="unit_gbp", target=unit),
               params("grad_cam", layer="conv2")]
    summary = REGISTRY["attribution_summary"](params("attribution_summary"))
    assert summary.sources(entries) == ["saliency", "grad_cam"]
    named = REGISTRY["attribution_summary"](params("attribution_summary", methods=["unit_gbp"]))
    assert named.sources(entries) == ["unit_gbp"]  # a unit's pointing game, asked for by name
    checks = REGISTRY["sanity_checks"](params("sanity_checks"))
    bound = checks.bind(entries)
    assert [e["name"] or e["type"] for e in bound.method_entries] == ["saliency", "grad_cam"]
    with pytest.raises(ValueError, match="'unit_gbp' explain.*neuron"):
        REGISTRY["sanity_checks"](params("sanity_checks", methods=["unit_gbp"])).bind(entries)


def test_report_caption_names_the_unit():
    from types import SimpleNamespace

    from pipeline.report.views.attribution import caption_of

    run = SimpleNamespace(label=lambda v: f"class{v}")
    unit = SimpleNamespace(entry="unit_gbp", neuron_layer="relu4", neuron_channel=3, neuron_y=2, neuron_x=5,
                           neuron_value=1.25, target=None, score=None)
    assert "unit relu4[3] at (2, 5)" in caption_of(unit, run) and "1.25" in caption_of(unit, run)
    cls = SimpleNamespace(entry="saliency", neuron_layer=None, target=1, score=0.5, deletion_auc=0.1,
                          insertion_auc=0.9)
    assert "class class1" in caption_of(cls, run)
