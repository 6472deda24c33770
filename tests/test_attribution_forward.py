"""Attribution methods choose their targets from their own forward: the rows do not depend on
whether another fused analysis ran the batch's shared forward, and that forward is not paid for
when no analysis of the batch reads it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs import REGISTRY, MapBatch
from jobs.attribution.backprop import ClassForward
from jobs.attribution.base import TopTargets
from jobs.core.base import SharedForwardError

from .harness import map_table, normalise
from .test_attribution import PARAMS, analysis, data, tiny

# The methods whose own forward (with a graph) chooses the targets, and its forwards per batch.
OWN_FORWARDS = {"saliency": 1, "guided_backprop": 1, "deconvnet": 1, "grad_cam": 1, "guided_grad_cam": 2}
TARGETS = [TopTargets(top=2), "label", "predicted", 1]


def predictions():
    cls = REGISTRY["predictions"]
    return cls(cls.Params(type="predictions", top_k=2))


class Forwards:
    """Counts the model's top-level forwards (every ``model(x)``, whoever calls it)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    """Equal tables, bit for bit (NaN equal to NaN: the pointing game of a boxless image)."""
    assert a.column_names == b.column_names
    for column in a.column_names:
        np.testing.assert_array_equal(np.asarray(a.column(column).to_pylist()),
                                      np.asarray(b.column(column).to_pylist()), err_msg=column, strict=True)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("name", sorted(OWN_FORWARDS))
def test_rows_do_not_depend_on_a_fused_analysis_running_the_shared_forward(name, target):
    ids, pixels, labels, boxes = data(n=7)
    labels[3] = -1  # an unlabelled image gets no map with target: label
    model = tiny()
    a = analysis(name, target=target, steps=4, chunk=3)
    alone, images_alone = map_table(a, model, ids, pixels, labels, batch_size=4, boxes=boxes)
    fused, images_fused = map_table(a, model, ids, pixels, labels, batch_size=4, boxes=boxes,
                                    fused=[predictions()])
    assert alone.num_rows > 0
    assert_same_rows(alone, fused)
    assert set(images_alone) == set(images_fused)
    for key, image in images_alone.items():
        assert np.array_equal(np.asarray(image), np.asarray(images_fused[key])), key


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_targets_ranks_and_scores_come_from_the_clean_logits(target):
    ids, pixels, labels, _ = data(n=7)
    labels[3] = -1
    model = tiny()
    with torch.no_grad():
        logits = model(normalise(pixels)).float()
    probs = torch.softmax(logits, dim=1)
    order = torch.argsort(-logits, dim=1, stable=True)
    for name in OWN_FORWARDS:
        table, _ = map_table(analysis(name, target=target, metrics=False, render=False, chunk=3), model, ids,
                             pixels, labels, batch_size=4)
        got = [(r["image_id"], r["target"], r["rank"], r["score"]) for r in table.to_pylist()]
        expected = []
        for i, image_id in enumerate(ids):
            if target == "label":
                classes = [labels[i]] if labels[i] >= 0 else []
            elif target == "predicted":
                classes = [int(order[i, 0])]
            elif isinstance(target, TopTargets):
                classes = order[i, :target.top].tolist()
            else:
                classes = [target]
            for c in classes:
                rank = int((order[i] == c).nonzero()) + 1
                expected.append((image_id, c, rank, float(probs[i, c])))
        assert [g[:3] for g in got] == [e[:3] for e in expected], name
        np.testing.assert_allclose([g[3] for g in got], [e[3] for e in expected], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", sorted(OWN_FORWARDS))
def test_no_separate_inference_forward_per_batch(name):
    ids, pixels, labels, _ = data(n=6)
    model = tiny()
    a = analysis(name, target=TopTargets(top=2), metrics=False, render=False)
    with Forwards(model) as alone:
        map_table(a, model, ids, pixels, labels, batch_size=3)
    assert alone.calls == 2 * OWN_FORWARDS[name]  # two batches, none of them the shared forward
    # Beside an analysis that reads the logits, the batch's one shared forward is added.
    with Forwards(model) as fused:
        map_table(a, model, ids, pixels, labels, batch_size=3, fused=[predictions()])
    assert fused.calls == 2 * (OWN_FORWARDS[name] + 1)


def test_smoothgrad_targets_come_from_the_shared_forward_once():
    ids, pixels, labels, _ = data(n=4)
    model = tiny()
    a = analysis("saliency", smoothgrad={"samples": 3}, metrics=False, render=False, chunk=12)
    with Forwards(model) as alone:
        one, _ = map_table(a, model, ids, pixels, labels, batch_size=4)
    with Forwards(model) as fused:
        two, _ = map_table(a, model, ids, pixels, labels, batch_size=4, fused=[predictions()])
    assert alone.calls == fused.calls == 2  # the clean forward that chooses, one chunk of noisy copies
    assert_same_rows(one, two)


@pytest.mark.parametrize("rule", [None, "guided", "deconvnet"])
def test_a_rule_forward_returns_the_plain_logits(rule):
    model = tiny()
    x = normalise(data(n=5)[1])
    with torch.no_grad():
        plain = model(x)
    assert torch.equal(ClassForward(model, x, rule=rule).logits, plain)
    assert torch.equal(ClassForward(model, x, rule=rule, layer="relu1").logits, plain)


@pytest.mark.parametrize("layer", [None, "relu1"])
@pytest.mark.parametrize("rule", [None, "guided"])
def test_gradients_of_repeated_rows_equal_one_backward_per_pair(layer, rule):
    from jobs.attribution.backprop import input_gradients, layer_gradients

    model = tiny()
    x = normalise(data(n=4)[1])
    rows = torch.tensor([0, 0, 1, 3, 3, 3])
    targets = torch.tensor([2, 0, 1, 0, 1, 2])
    got = ClassForward(model, x, rule=rule, layer=layer).gradients(rows, targets)
    for m, (r, t) in enumerate(zip(rows.tolist(), targets.tolist())):
        xi, ti = x[r:r + 1], torch.tensor([t])
        one = input_gradients(model, xi, ti, rule) if layer is None else layer_gradients(model, xi, layer, ti, rule)[1]
        torch.testing.assert_close(got[m], one[0], rtol=1e-5, atol=1e-7)


def test_the_shared_forward_runs_once_when_read_and_subsets_share_it():
    model = tiny()
    x = normalise(data(n=4)[1])
    calls = []

    def forward():
        calls.append(1)
        with torch.no_grad():
            return model(x), {}

    batch = MapBatch(image_ids=list("abcd"), labels=torch.zeros(4, dtype=torch.long), images=x, model=model,
                     forward=forward)
    part = batch.subset(np.array([False, True, True, False]))
    assert not batch.forward_done and not part.forward_done and not calls
    torch.testing.assert_close(part.logits, model(x[1:3]).detach())
    assert batch.forward_done and len(calls) == 1
    _ = batch.logits, batch.activations, batch.subset(np.ones(4, bool)).logits
    assert len(calls) == 1


def test_a_failed_shared_forward_fails_every_reader_without_a_retry():
    calls = []

    def forward():
        calls.append(1)
        raise RuntimeError("out of memory")

    batch = MapBatch(image_ids=["a"], labels=torch.zeros(1, dtype=torch.long), images=torch.zeros(1, 3, 4, 4),
                     model=torch.nn.Identity(), forward=forward)
    for _ in range(2):
        with pytest.raises(SharedForwardError, match="RuntimeError: out of memory"):
            _ = batch.activations
        with pytest.raises(SharedForwardError, match="out of memory"):
            _ = batch.subset(np.ones(1, bool)).logits
    assert len(calls) == 1


def test_every_method_with_its_own_forward_is_listed():
    from jobs.attribution.base import AttributionAnalysis

    own = {name for name in PARAMS if REGISTRY[name].attribute_own is not AttributionAnalysis.attribute_own}
    assert own == set(OWN_FORWARDS)
