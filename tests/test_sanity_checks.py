"""sanity_checks: the model randomisation, the checks against Quantus, invariances, the manifest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from jobs import REGISTRY
from jobs.attribution.sanity_checks import Randomiser, SanityChecks, explain, other_classes, randomisation_blocks

from .conftest import write_manifest
from .harness import gather, map_batches, normalise, run_local
from .test_attribution import PARAMS, TinyNet, data


class BNNet(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, GAP, linear; BN statistics away from their defaults, so that
    re-initialising any block changes it."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.block = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, classes)
        for bn in (self.bn1, self.block[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.block(h).mean(dim=(2, 3)))


def bnnet(classes: int = 3) -> BNNet:
    torch.manual_seed(0)
    return BNNet(classes).eval()


def changed(model: nn.Module, original: dict[str, torch.Tensor]) -> set[str]:
    """The top-level children whose parameters or buffers differ from ``original``."""
    return {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, original[k])}


def checks(methods: list[dict], **params) -> SanityChecks:
    p = SanityChecks.Params(type="sanity_checks", **params)
    return SanityChecks(p.model_copy(update={"method_entries": methods}))


def method(name: str, **extra) -> dict:
    return REGISTRY[name].Params(type=name, **{**PARAMS.get(name, {}), **extra}).model_dump(mode="json")


def test_blocks_are_randomised_from_the_logits_down():
    model = bnnet()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    assert randomisation_blocks(model, "children") == ["fc", "block", "bn1", "conv1"]
    assert randomisation_blocks(model, "modules") == ["fc", "block.1", "block.0", "bn1", "conv1"]
    r = Randomiser(model, "children", seed=3)
    cascading = [(step, block, changed(m, original), {k: v.clone() for k, v in m.state_dict().items()})
                 for step, block, m in r.steps("cascading")]
    assert [(s, b, c) for s, b, c, _ in cascading] == [
        (0, "", set()), (1, "fc", {"fc"}), (2, "block", {"fc", "block"}), (3, "bn1", {"fc", "block", "bn1"}),
        (4, "conv1", {"fc", "block", "bn1", "conv1"})]
    independent = [(step, block, changed(m, original)) for step, block, m in r.steps("independent")]
    assert independent == [(0, "", set()), (1, "fc", {"fc"}), (2, "block", {"block"}), (3, "bn1", {"bn1"}),
                           (4, "conv1", {"conv1"})]
    # A block's random parameters are drawn once, from the seed and its name: a second
    # randomiser draws the same, another seed does not.
    *_, (_, _, final) = list(Randomiser(bnnet(), "children", seed=3).steps("cascading"))
    assert all(torch.equal(final.state_dict()[k], cascading[-1][3][k]) for k in original)
    *_, (_, _, final4) = list(Randomiser(bnnet(), "children", seed=4).steps("cascading"))
    assert not torch.equal(final4.state_dict()["fc.weight"], cascading[-1][3]["fc.weight"])
    # The model itself is never changed.
    assert not changed(model, original)


def test_a_block_is_redrawn_by_its_own_initialisation():
    model = bnnet()
    *_, (_, _, m) = list(Randomiser(model, ["fc", "bn1"], seed=0).steps("cascading"))
    w = m.fc.weight
    # nn.Linear's reset_parameters: uniform within 1/sqrt(fan_in); BatchNorm's: identity statistics.
    assert not torch.equal(w, model.fc.weight) and float(w.detach().abs().max()) <= 1 / np.sqrt(8)
    assert torch.equal(m.bn1.running_var, torch.ones(6)) and torch.equal(m.bn1.weight, torch.ones(6))
    problems = checks([], randomisation={"blocks": ["layer9", "block.2", "fc"]}).check_model(model, (12, 12))
    assert problems == [(("randomisation", "blocks", 0), "unknown layer 'layer9'"),
                        (("randomisation", "blocks", 1), "'block.2' holds no parameters to randomise")]


def tiny_batch(model: nn.Module, n: int = 4, size: int = 12):
    ids, pixels, labels, _ = data(n=n, size=size)
    return ids, pixels, labels


def pivot(table: pd.DataFrame, test: str, metric: str) -> pd.DataFrame:
    rows = table[(table.test == test) & (table.metric == metric)]
    return rows.pivot_table(index=["method", "image_id"], columns="step", values="value")


@pytest.mark.parametrize("order", ["cascading", "independent"])
def test_mprt_equals_quantus(order):
    quantus = pytest.importorskip("quantus")
    from quantus.helpers.model.pytorch_model import PyTorchModel

    model = bnnet()
    ids, pixels, labels = tiny_batch(model)
    a = checks([method("saliency")], tests=[f"mprt_{order}"], randomisation={"metrics": ["spearman_abs"], "seed": 1})
    ours = gather(map_batches(a, model, ids, pixels, labels, batch_size=4)).read("").to_pandas()
    table = pivot(ours, f"mprt_{order}", "spearman_abs").loc["saliency"].loc[ids]

    x = normalise(pixels)
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    saliency = REGISTRY["saliency"](REGISTRY["saliency"].Params(type="saliency"))

    def explain_func(model, inputs, targets, **kwargs):
        heat = explain(saliency, model, torch.as_tensor(inputs), torch.as_tensor(targets), ids[:len(inputs)], 64)
        return heat[:, None].numpy()

    randomiser = Randomiser(model, "children", seed=1)

    def generator(self, order=None, seed=None, kind=order):
        for step, block, m in randomiser.steps(kind):
            if step:
                yield block, m

    orig = PyTorchModel.get_random_layer_generator
    PyTorchModel.get_random_layer_generator = generator
    try:
        metric = quantus.MPRT(layer_order="top_down" if order == "cascading" else "independent",
                              similarity_func=quantus.similarity_func.correlation_spearman,
                              disable_warnings=True)
        scores = metric(model=model, x_batch=x.numpy(), y_batch=predicted, a_batch=None, explain_func=explain_func,
                        device="cpu", channel_first=True, batch_size=8)
    finally:
        PyTorchModel.get_random_layer_generator = orig
    blocks = randomiser.blocks
    np.testing.assert_allclose(table[0].to_numpy(), scores["original"], atol=1e-6)
    for step, block in enumerate(blocks, start=1):
        np.testing.assert_allclose(table[step].to_numpy(), scores[block], atol=1e-6, err_msg=block)


def test_random_logit_equals_quantus():
    quantus = pytest.importorskip("quantus")
    from jobs.attribution.similarity import similarity

    model = bnnet(classes=2)  # with two classes the "random other class" is the other one
    ids, pixels, labels = tiny_batch(model)
    a = checks([method("saliency")], tests=["random_logit"])
    ours = gather(map_batches(a, model, ids, pixels, labels, batch_size=4)).read("").to_pandas()
    x = normalise(pixels)
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    saliency = REGISTRY["saliency"](REGISTRY["saliency"].Params(type="saliency"))

    def explain_func(model, inputs, targets, **kwargs):
        return explain(saliency, model, torch.as_tensor(inputs), torch.as_tensor(targets), ids[:len(inputs)],
                       64)[:, None].numpy()

    def ssim_2d(a, b, batched=True, **kwargs):
        # Quantus flattens the maps before its SSIM; the sanity checks compare them as images.
        return similarity(a.reshape(len(a), 12, 12), b.reshape(len(b), 12, 12), ["ssim"])["ssim"]

    for metric, func in (("ssim", ssim_2d), ("spearman_abs", quantus.similarity_func.correlation_spearman)):
        check = quantus.RandomLogit(num_classes=2, similarity_func=func, abs=True, disable_warnings=True)
        scores = check(model=model, x_batch=x.numpy(), y_batch=predicted, a_batch=None, explain_func=explain_func,
                       device="cpu", channel_first=True)
        got = ours[ours.metric == metric].set_index("image_id").loc[ids, "value"].to_numpy()
        np.testing.assert_allclose(got, scores, atol=1e-6, err_msg=metric)
    assert (ours.value < 1).all()  # the other class's map is another map


def test_other_classes_are_seeded_and_never_the_target():
    ids = [f"i{j}" for j in range(50)]
    targets = torch.tensor([j % 4 for j in range(50)])
    picks = other_classes(ids, targets, 4, seed=0)
    assert (picks != targets).all() and set(picks.tolist()) == {0, 1, 2, 3}
    assert torch.equal(picks[7:9], other_classes(ids[7:9], targets[7:9], 4, seed=0))


ALL = ["mprt_cascading", "mprt_independent", "random_logit", "max_sensitivity", "avg_sensitivity", "road"]


def test_batched_equals_per_image_for_every_method_and_test():
    torch.manual_seed(0)
    model = TinyNet().eval()
    ids, pixels, labels, _ = data(n=3, size=12)
    methods = [method(name, chunk=5) for name in sorted(PARAMS)]
    a = checks(methods, tests=ALL, sensitivity={"samples": 2}, road={"percentages": [25, 75]})
    one = gather(map_batches(a, model, ids, pixels, labels, batch_size=1)).read("").to_pandas()
    many = gather(map_batches(a, model, ids, pixels, labels, batch_size=3)).read("").to_pandas()
    key = ["method", "test", "step", "metric", "image_id", "target"]
    one, many = one.set_index(key).sort_index(), many.set_index(key).sort_index()
    assert len(one) == len(many) and one.index.equals(many.index)
    np.testing.assert_allclose(one.value, many.value, rtol=1e-4, atol=1e-5)
    assert set(many.index.get_level_values("method")) == set(PARAMS)
    assert set(many.index.get_level_values("test")) == {"mprt_cascading", "mprt_independent", "random_logit",
                                                        "sensitivity", "road"}


def test_no_block_randomised_gives_similarity_one_and_the_last_less():
    model = bnnet()
    ids, pixels, labels = tiny_batch(model)
    methods = [method("saliency"), method("grad_cam", layer="block"), method("guided_backprop")]
    a = checks(methods, tests=["mprt_cascading"])
    df = gather(map_batches(a, model, ids, pixels, labels, batch_size=4)).read("").to_pandas()
    first = df[df.step == 0]
    assert len(first) == 3 * len(ids) * 4 and (first.value == 1.0).all()
    last = df[(df.step == df.step.max()) & (df.metric == "spearman_abs")]
    assert (last.value < 0.999).all()


def test_reduce_adds_means_with_bootstrap_intervals():
    from jobs.core.kernels import bootstrap_interval

    model = bnnet()
    ids, pixels, labels, _ = data(n=6, size=12)
    a = checks([method("saliency"), method("grad_cam", layer="block")], tests=["mprt_cascading", "road"],
               road={"percentages": [50]}, bootstrap={"resamples": 200, "seed": 5})
    out = run_local(a, model, ids, pixels, labels, batch_size=4).tables[""].to_pandas()
    per_image, agg = out[out.image_id.notna()], out[out.image_id.isna()]
    assert per_image.n.isna().all() and agg.n.notna().all()
    expected = per_image.groupby(["method", "test", "step", "metric"], dropna=False).value.mean()
    got = agg.set_index(["method", "test", "step", "metric"]).value
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False, atol=1e-12)
    row = agg[(agg.method == "saliency") & (agg.test == "road") & (agg.metric == "morf_auc")].iloc[0]
    values = per_image[(per_image.method == "saliency") & (per_image.metric == "morf_auc")].value.to_numpy()
    assert (row.lo, row.hi) == bootstrap_interval(values, 200, 0.95, 5)
    assert row.n == len(ids)
    assert (agg.lo <= agg.value + 1e-12).all() and (agg.value <= agg.hi + 1e-12).all()


def test_manifest_binds_the_checked_methods(tmp_path, image_folder):
    from pipeline.errors import ManifestError
    from pipeline.manifest import load_manifest

    base = {"dataset": {"kind": "image_folder", "root": str(image_folder)},
            "model": {"source": "builtin", "name": "cifar_resnet20"}}
    path = write_manifest(tmp_path / "m.yaml", **base, analyses=[
        {"type": "saliency", "name": "sal", "sample": {"n": 3}}, {"type": "grad_cam", "layer": "layer3"},
        {"type": "sanity_checks"}])
    manifest = load_manifest(path)
    bound = manifest.analyses[2].method_entries
    assert [e["name"] or e["type"] for e in bound] == ["sal", "grad_cam"]
    assert bound[0]["sample"] is None and bound[0]["render"] is False
    path = write_manifest(tmp_path / "m.yaml", **base, analyses=[
        {"type": "saliency"}, {"type": "predictions"},
        {"type": "sanity_checks", "methods": ["predictions", "nope"]}])
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    text = str(e.value)
    assert "analyses[2]" in text and "'predictions' is a predictions entry" in text and "'nope'" in text
    path = write_manifest(tmp_path / "m.yaml", **base, analyses=[{"type": "predictions"}, {"type": "sanity_checks"}])
    with pytest.raises(ManifestError, match="needs at least one attribution entry"):
        load_manifest(path)
