"""Models: every source builds, checkpoints in every common wrapping load, nothing unpickles code."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.manifest import BuiltinModel, PythonModel, TorchScriptModel, TorchvisionModel
from pipeline.models import capture, layer_names, layer_shapes, load_model, load_weights, model_hash
from pipeline.zoo import CifarResNet

from .conftest import RESNET20, needs_shared


def test_builtin_cifar_resnet_layers():
    model = load_model(BuiltinModel(source="builtin", name="cifar_resnet20"))
    names = layer_names(model)
    assert {"conv1", "layer1.0.conv1", "layer3.2.bn2", "linear"} <= set(names)
    shapes = dict((n, s) for n, _, s in layer_shapes(model, (3, 32, 32)))
    assert shapes["layer1"] == (16, 32, 32) and shapes["layer2"] == (32, 16, 16) and shapes["layer3"] == (64, 8, 8)
    assert shapes["linear"] == (10,)
    assert sum(p.numel() for p in model.parameters()) == 269_722  # the 0.27M of the reference checkpoints


def test_random_init_is_seeded():
    a = load_model(BuiltinModel(source="builtin", name="cifar_resnet20"))
    b = load_model(BuiltinModel(source="builtin", name="cifar_resnet20"))
    assert model_hash(BuiltinModel(source="builtin", name="cifar_resnet20"), a) == model_hash(
        BuiltinModel(source="builtin", name="cifar_resnet20"), b)


def test_torchvision_by_name_and_weights(tmp_path):
    spec = TorchvisionModel(source="torchvision", name="resnet18", num_classes=7)
    model = load_model(spec)
    assert model.fc.out_features == 7 and not model.training
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    loaded = load_model(TorchvisionModel(source="torchvision", name="resnet18", num_classes=7,
                                         weights=tmp_path / "r18.pt"))
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    assert spec.preprocess.output_size() == (224, 224)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix", "both", "model_key", "compiled"])
def test_checkpoint_variants(tmp_path, wrap):
    ref = CifarResNet(20)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(1.0)
    sd = ref.state_dict()
    if wrap in ("module_prefix", "both"):
        sd = {f"module.{k}": v for k, v in sd.items()}
    if wrap == "compiled":
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 3, "best_prec1": 91.0} if wrap in ("state_dict", "both") else sd
    if wrap == "model_key":
        obj = {"model": sd}
    torch.save(obj, tmp_path / "ckpt.th")
    model = CifarResNet(20)
    load_weights(model, tmp_path / "ckpt.th")
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_mismatch_is_a_clear_error(tmp_path):
    torch.save(CifarResNet(20).state_dict(), tmp_path / "r20.th")
    with pytest.raises(UserError, match=r"does not fit the model: missing keys: layer1\.3"):
        load_weights(CifarResNet(32), tmp_path / "r20.th")
    torch.save(CifarResNet(20, num_classes=100).state_dict(), tmp_path / "r20c100.th")
    with pytest.raises(UserError, match="size mismatch"):
        load_weights(CifarResNet(20), tmp_path / "r20c100.th")


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(_Evil.target),))


def test_malicious_checkpoint_runs_nothing(tmp_path):
    _Evil.target = str(tmp_path / "pwned")
    with open(tmp_path / "evil.th", "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_weights(CifarResNet(20), tmp_path / "evil.th")
    assert not (tmp_path / "pwned").exists()


def test_python_source(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(width, 2))\n"
    )
    spec = PythonModel.model_validate({"source": "python", "entrypoint": "mymodels:tiny", "kwargs": {"width": 6},
                                       "python_path": ["."], "preprocess": {"resize": 16, "crop": 16}},
                                      context={"base": tmp_path})
    model = load_model(spec)
    assert layer_names(model) == ["0", "1", "2", "3", "4"] and model[0].out_channels == 6
    bad = spec.model_copy(update={"entrypoint": "mymodels:nope"})
    with pytest.raises(UserError, match="has no callable 'nope'"):
        load_model(bad)


def test_torchscript_source(tmp_path):
    model = CifarResNet(20).eval()
    torch.jit.script(model).save(str(tmp_path / "m.pt"))
    loaded = load_model(TorchScriptModel(source="torchscript", path=tmp_path / "m.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert "layer1.0.conv1" in layer_names(loaded)


def test_capture_clones_and_removes_hooks():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(inplace=True)).eval()
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad(), capture(model, ["0"]) as acts:
        model(x)
    with torch.no_grad():
        pre_relu = model[0](x)
    assert torch.equal(acts["0"], pre_relu)  # not overwritten by the in-place ReLU
    assert (acts["0"] < 0).any()
    assert not model[0]._forward_hooks


@needs_shared
def test_shared_resnet20_loads():
    model = load_model(BuiltinModel(source="builtin", name="cifar_resnet20", weights=RESNET20))
    assert model.linear.weight.abs().sum() > 0
