"""finetune: parameters, the split, which parameters train and at which rate, and the Ray Train run
(reproducible, its checkpoint scoring what it reports)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from jobs.core.base import OneWorker, TrainData
from jobs.dataset.probes import split as probes_split
from jobs.model.finetune import (
    Finetune,
    FinetuneParams,
    blocks,
    head_name,
    held_out_split,
    param_groups,
    penultimate_features,
    trained_modules,
)
from pipeline import train_stage
from pipeline.errors import ManifestError
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest
from pipeline.models import check_manifest
from pipeline.report import build_report
from pipeline.zoo import CifarResNet

from .conftest import CIFAR, RESNET20, ROOT, make_images, needs_shared, write_manifest

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def manifest_with(tmp_path: Path, weights: Path, images: Path, **entry) -> Path:
    return write_manifest(tmp_path / "m.yaml", weights=weights, dataset={"kind": "image_folder", "root": str(images)},
                          analyses=[{"type": "finetune", **entry}])


@pytest.mark.parametrize("entry, message", [
    ({"train_layers": "heads"}, "analyses[0].train_layers: expected head, all or {top: n} (got 'heads'; "
                                "did you mean 'head'?)"),
    ({"train_layers": {"bottom": 2}}, "analyses[0].train_layers: expected head, all or {top: n}: a mapping "
                                      "with the one key 'top' (got keys 'bottom')"),
    ({"train_layers": {"top": 0}}, "analyses[0].train_layers: top: expected a whole number of blocks >= 1"),
    ({"schedule": "three_step"}, "analyses[0].schedule: Input should be 'two_step' or 'one_step' "
                                 "(got 'three_step'; did you mean 'two_step'?)"),
    ({"schedule": "one_step", "head_epochs": 2}, "head_epochs: only schedule 'two_step' trains the head alone"),
    ({"split": {"held_out": 1.0}}, "analyses[0].split.held_out: Input should be less than 1"),
    ({"split": {"held_out": 0.5, "sed": 1}}, "analyses[0].split.sed: unknown field 'sed'; did you mean "
                                            "'seed'? Valid: held_out, seed"),
    ({"lr_body": -0.1}, "analyses[0].lr_body: Input should be greater than 0"),
])
def test_params_are_checked_before_anything_runs(tmp_path, resnet20_weights, image_folder, entry, message):
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest_with(tmp_path, resnet20_weights, image_folder, **entry), [])
    assert message in re.sub(r" \(line \d+\)", "", str(err.value))


def test_params_round_trip_as_the_workers_and_the_resolved_manifest_see_them():
    for entry in ({"type": "finetune"}, {"type": "finetune", "schedule": "one_step", "epochs": 3}):
        params = FinetuneParams.model_validate(entry)
        assert FinetuneParams.model_validate(params.model_dump(mode="json")) == params
    assert FinetuneParams.model_validate({"type": "finetune"}).head_epochs == 2
    assert FinetuneParams.model_validate({"type": "finetune", "schedule": "one_step"}).head_epochs is None


def test_top_blocks_are_checked_against_the_model(tmp_path, resnet20_weights, image_folder):
    manifest = load_manifest(manifest_with(tmp_path, resnet20_weights, image_folder, train_layers={"top": 6}), [])
    with pytest.raises(ManifestError) as err:
        check_manifest(manifest)
    assert ("analyses[0].train_layers.top: top 6: the model has 5 blocks with parameters "
            "(conv1, bn1, layer1, layer2, layer3)") in str(err.value)


def test_a_label_the_head_lacks_is_refused_before_any_work(tmp_path, resnet20_weights, image_folder):
    from pipeline.errors import UserError

    (image_folder / "class3").mkdir()  # an 11th class folder: label 10, past the 10 outputs
    for i in range(7):
        (image_folder / f"class{4 + i}").mkdir()
        Image.new("RGB", (32, 32)).save(image_folder / f"class{4 + i}" / "a.png")
    Image.new("RGB", (32, 32)).save(image_folder / "class3" / "a.png")
    manifest = load_manifest(manifest_with(tmp_path, resnet20_weights, image_folder), [])
    with pytest.raises(UserError, match=r"analyses\[0\]: label 10 is not a class of the model's head \(10 outputs\)"):
        run_manifest(manifest, log=lambda m: None)
    assert not Path(manifest.output).exists()  # nothing started, nothing written


@needs_shared
def test_the_cifar10_finetune_manifest_validates():
    manifest = load_manifest(ROOT / "manifests" / "cifar10-finetune.yaml")
    assert manifest.dataset.root == CIFAR and manifest.model.weights == RESNET20
    check_manifest(manifest)
    (entry,) = manifest.analyses
    assert isinstance(entry, FinetuneParams) and entry.train_layers == "head" and entry.split.held_out == 0.5


def test_which_modules_train():
    model = CifarResNet(20)
    assert head_name(model) == "linear"
    assert blocks(model) == ["conv1", "bn1", "layer1", "layer2", "layer3"]  # linear holds only the head
    assert trained_modules(model, "head") == ["linear"]
    assert trained_modules(model, FinetuneParams(train_layers={"top": 1}).train_layers) == ["layer3", "linear"]
    assert trained_modules(model, "all") == [""]
    # A head nested in a block: the block counts, and brings the head along.
    nested = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                 torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    assert head_name(nested) == "2.2" and blocks(nested) == ["0", "2"]
    assert trained_modules(nested, FinetuneParams(train_layers={"top": 1}).train_layers) == ["2"]
    groups = param_groups(nested, ["2"], lr_head=0.1, lr_body=0.01)
    assert [(g["name"], g["lr"], g["names"]) for g in groups] == [
        ("head", 0.1, ["2.2.weight", "2.2.bias"]), ("body", 0.01, ["2.0.weight", "2.0.bias"])]


def test_the_split_is_stratified_seeded_and_independent_of_order():
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(60)]
    labels = np.repeat([0, 1, 2], 20)
    labels[:3] = -1  # unlabelled: in neither side
    train, held = held_out_split(ids, labels, 0.5, seed=3)
    assert not set(train) & set(held) and set(train) | set(held) == set(range(3, 60))
    assert len(held) == 29  # half of the 57 labelled images, rounded up
    for c in range(3):  # stratified: each class halved (to one image)
        n = int((labels == c).sum() - (labels[:3] == c).sum())
        assert abs(int((labels[held] == c).sum()) - n / 2) <= 1
    # Deterministic, whatever the dataset order; another seed, another split.
    perm = rng.permutation(60)
    train2, held2 = held_out_split([ids[i] for i in perm], labels[perm], 0.5, seed=3)
    assert {ids[perm[i]] for i in held2} == {ids[i] for i in held}
    assert {ids[i] for i in held_out_split(ids, labels, 0.5, seed=4)[1]} != {ids[i] for i in held}
    # The same split a probes entry with test_size 0.5 and the same seed makes.
    _, probe_held = probes_split(labels[3:], 0.5, 3)
    assert sorted(3 + probe_held) == sorted(held)
    with pytest.raises(ValueError, match="at least 2 labelled images per class"):
        held_out_split(["a", "b", "c"], np.array([0, 0, 1]), 0.5, 0)


def tiny_data(n_per_class: int = 6, size: int = 16, seed: int = 0) -> TrainData:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    pixels = rng.integers(0, 256, size=(len(labels), size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        pixels[i, c * 4:c * 4 + 6] = 255
    ids = [f"{c}/{i:03d}.png" for i, c in enumerate(labels)]
    train, held = held_out_split(ids, labels, 0.5, 0)
    return TrainData(image_ids=ids, labels=labels, pixels=pixels, train=train, held_out=held, mean=MEAN, std=STD)


def tiny_resnet() -> CifarResNet:
    torch.manual_seed(1)
    return CifarResNet(20, num_classes=3).eval()


def test_lr_groups_are_applied_and_frozen_parameters_stay_bit_identical():
    """One step over the whole train split: the head moves by lr_head x its gradient, layer3 by
    lr_body x its gradient, everything else (parameters and BatchNorm statistics) not at all."""
    data = tiny_data()
    model = tiny_resnet()
    before = copy.deepcopy(model)
    params = FinetuneParams(train_layers={"top": 1}, schedule="one_step", epochs=1, batch_size=len(data.train),
                            lr_head=0.5, lr_body=0.05, momentum=0.0, weight_decay=0.0, probe=False)
    out = Finetune(params).fit(model, data, torch.device("cpu"), OneWorker())
    assert [r["phase"] for r in out.rows] == ["start", "fine_tune"]
    assert out.rows[1]["lr_head"] == 0.5 and out.rows[1]["lr_body"] == 0.05 and out.rows[1]["steps"] == 1
    # The gradient of the same step, computed here: layer3 and the head in train mode, the rest eval.
    reference = copy.deepcopy(before)
    reference.eval()
    reference.layer3.train()
    loss = torch.nn.functional.cross_entropy(reference(data.inputs(data.train, torch.device("cpu"))),
                                             data.targets(data.train, torch.device("cpu")))
    loss.backward()
    grads = {k: p.grad for k, p in reference.named_parameters()}
    after = dict(model.named_parameters())
    for name, p in before.named_parameters():
        if name.startswith("linear."):
            torch.testing.assert_close(after[name], p - 0.5 * grads[name], rtol=0, atol=1e-6)
        elif name.startswith("layer3."):
            torch.testing.assert_close(after[name], p - 0.05 * grads[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(after[name], p), name
    untouched = {k: v for k, v in before.state_dict().items() if not k.startswith(("layer3.", "linear."))}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in untouched.items())
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.state_dict().items()
               if k.startswith("layer3.") and "running_mean" in k)  # layer3 trained in train mode


def test_two_step_schedule_and_the_probe():
    data = tiny_data()
    params = FinetuneParams(train_layers="all", head_epochs=1, epochs=2, batch_size=4)
    out = Finetune(params).fit(tiny_resnet(), data, torch.device("cpu"), OneWorker())
    assert [(r["epoch"], r["phase"], r["phase_epoch"]) for r in out.rows] == [
        (0, "start", 0), (1, "head", 1), (2, "fine_tune", 1), (3, "fine_tune", 2)]
    assert out.rows[1]["trained"] == ["linear"] and out.rows[1]["lr_body"] is None
    assert out.rows[2]["trained"] == [""] and out.rows[2]["lr_body"] == params.lr_body
    assert out.rows[1]["steps"] == 3 and out.rows[3]["steps"] == 9  # 9 train images, batches of 4
    assert out.rows[2]["trainable_parameters"] > out.rows[1]["trainable_parameters"] == 64 * 3 + 3
    assert 0 <= out.stats["probe_held_out_accuracy"] <= 1 and out.stats["probe_train_accuracy"] == 1.0
    assert out.stats["held_out_accuracy"] == out.rows[-1]["held_out_accuracy"]


class LogSoftmaxAfter(torch.nn.Module):
    """The same classifier with an operation after its head: its output is not the head's."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.inner(x), dim=1)


def test_the_head_trains_on_cached_features_as_on_the_whole_model():
    data = tiny_data()
    rows = np.arange(len(data.labels))
    model = tiny_resnet()
    features, last = penultimate_features(model, data, rows, torch.device("cpu"), batch_size=4)
    assert last and features.shape == (len(rows), 64)
    _, wrapped_last = penultimate_features(LogSoftmaxAfter(tiny_resnet()), data, rows, torch.device("cpu"), 4)
    assert not wrapped_last  # so it trains through the whole model every step
    params = FinetuneParams(schedule="one_step", epochs=2, batch_size=4, probe=False)
    cached, whole = tiny_resnet(), LogSoftmaxAfter(tiny_resnet())
    calls = {"cached": 0, "whole": 0}  # forwards through the body (its first block)

    def counter(name):
        def hook(*_):
            calls[name] += 1
        return hook

    cached.layer1.register_forward_hook(counter("cached"))
    whole.inner.layer1.register_forward_hook(counter("whole"))
    a = Finetune(params).fit(cached, data, torch.device("cpu"), OneWorker())
    b = Finetune(params).fit(whole, data, torch.device("cpu"), OneWorker())
    # The cached path runs the body for one pass over the images, not once per step and evaluation.
    assert calls["cached"] <= -(-len(rows) // 4) < calls["whole"], calls
    # Cross-entropy of log-softmax outputs is that of the logits: the same training, up to rounding.
    torch.testing.assert_close(cached.linear.weight, whole.inner.linear.weight, rtol=1e-4, atol=1e-5)
    assert [r["held_out_accuracy"] for r in a.rows] == [r["held_out_accuracy"] for r in b.rows]


def plain_accuracy(weights: Path, images: Path, held_out: list[str], labels: list[int], mean, std) -> float:
    """Held-out accuracy of a checkpoint, by a plain loop written apart from convscope's decoding."""
    model = CifarResNet(20)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    correct = 0
    with torch.no_grad():
        for image_id, label in zip(held_out, labels):
            rgb = np.asarray(Image.open(images / image_id).convert("RGB"), dtype=np.float32) / 255.0
            x = (torch.from_numpy(rgb).permute(2, 0, 1) - m) / s
            correct += int(model(x[None]).argmax(1).item() == label)
    return correct / len(held_out)


def test_one_worker_task_equals_ray_train_and_its_checkpoint_scores_what_it_reports(ray_session, resnet20_weights,
                                                                                 tmp_path, monkeypatch):
    monkeypatch.setattr(train_stage, "DECODE_CHUNK", 10)  # the images decoded by several tasks
    images = tmp_path / "images"
    make_images(images, classes=3, per_class=8)
    corrupt = sorted(images.iterdir())[0] / "corrupt.png"  # recorded in errors.parquet and left out
    corrupt.write_bytes(b"not a png")
    entry = {"train_layers": "head", "head_epochs": 1, "epochs": 1, "batch_size": 4, "lr_head": 0.1, "seed": 7}
    path = manifest_with(tmp_path, resnet20_weights, images, **entry)
    outs = []
    for n in (1, 2):
        # The first run trains in a Ray task (one worker), the second on Ray Train: the same weights.
        monkeypatch.setattr(train_stage, "TRAIN_ONE_WORKER_ON_RAY_TRAIN", n == 2)
        manifest = load_manifest(path, [f"output={tmp_path / f'out{n}'}"])
        result = run_manifest(manifest, log=lambda m: None)
        assert result.ok, result.analyses
        outs.append(tmp_path / f"out{n}" / "finetune")
    first, second = (torch.load(out / "_model.pt", weights_only=True) for out in outs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # head: every other parameter and buffer as it was; the head trained.
    original = torch.load(resnet20_weights, weights_only=True)
    assert all(torch.equal(first[k], v) for k, v in original.items() if not k.startswith("linear."))
    assert not torch.equal(first["linear.weight"], original["linear.weight"])

    out = outs[0]
    assert (out / "_SUCCESS").exists()
    split = pd.read_parquet(out / "_split.parquet")
    assert split.groupby(["label", "split"]).size().tolist() == [4] * 6  # 8 per class, halved
    table = pd.read_parquet(out)  # the entry folder reads as its table alone
    assert table.phase.tolist() == ["start", "head", "fine_tune"] and table.epoch.tolist() == [0, 1, 2]
    stats = json.loads((out.parent / "run.json").read_text())["analyses"]["finetune"]
    assert stats["status"] == "complete" and stats["stage"] == "train" and stats["undecodable"] == 1
    errors = pd.read_parquet(out.parent / "errors.parquet")
    assert errors[["stage", "error"]].values.tolist() == [["train", "could not be decoded"]]
    assert errors.image_id.iloc[0].endswith("corrupt.png") and not split.image_id.str.endswith("corrupt.png").any()
    assert stats["held_out_accuracy"] == table.held_out_accuracy.iloc[-1]
    assert 0 <= stats["probe_held_out_accuracy"] <= 1 and stats["seconds"] > 0
    held = split[split.split == "held_out"]
    pre = manifest.model.preprocess
    assert plain_accuracy(out / "_model.pt", images, held.image_id.tolist(), held.label.tolist(), pre.mean,
                          pre.std) == pytest.approx(stats["held_out_accuracy"], abs=1e-12)
    # The report's page: the curves, and the fine-tuned model against the linear probe.
    page = (Path(build_report(out.parent)).parent / "finetune.html").read_text()
    assert page.count("<svg") == 3 and "linear probe (frozen features)" in page
    assert f"Held-out accuracy after fine-tuning <b>{stats['held_out_accuracy']:.3f}</b>" in page
