"""Shared fixtures: one local Ray per test session, tiny generated datasets, manifests."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "datasets" / "cifar10-test"
RESNET20 = SHARED / "models" / "cifar10-resnet20.th"

needs_shared = pytest.mark.skipif(
    not (CIFAR.is_dir() and RESNET20.is_file()),
    reason="../shared (CIFAR-10 test images and the trained ResNet-20) is not beside the repository",
)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (runs reuse it)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def resnet20_weights(tmp_path_factory) -> Path:
    """A random-init CIFAR ResNet-20 whose BatchNorm statistics are calibrated on random images.

    Default BN statistics (mean 0, var 1) let activations grow to ~20 in deep layers, where
    float32 rounding alone exceeds 1e-5; calibrated, they are O(1) as in a trained model.
    """
    import torch

    from pipeline.zoo import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(20)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(64, 3, 32, 32))
    path = tmp_path_factory.mktemp("weights") / "resnet20-calibrated.th"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def demo_cnn_weights(tmp_path_factory) -> Path:
    """The demo CNN trained on 32x32 generated shapes (2,048 images, 6 epochs; ~96% held out,
    a few seconds): a small *trained* model, for tests of what an optimisation achieves."""
    from pipeline.demo import train_demo_model

    path = tmp_path_factory.mktemp("demo-cnn") / "demo_cnn32.pt"
    train_demo_model(path, n_train=2048, epochs=6, size=32, log=lambda message: None)
    return path


@pytest.fixture(scope="session")
def demo_cnn(demo_cnn_weights):
    """That trained demo CNN, loaded in eval mode (4 classes, 32x32 inputs, ImageNet normalisation)."""
    import torch

    from pipeline.zoo import DemoCNN

    model = DemoCNN(4)
    model.load_state_dict(torch.load(demo_cnn_weights, weights_only=True))
    return model.eval()


def make_images(root: Path, classes: int = 3, per_class: int = 6, size: int = 32, seed: int = 0,
                ext: str = "png") -> list[Path]:
    """An image folder of random-noise images with a bright square: root/<class>/<i>.<ext>."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            arr[c * 4:c * 4 + 8, i:i + 8] = 255
            p = root / f"class{c}" / f"{i:03d}.{ext}"
            Image.fromarray(arr).save(p)
            paths.append(p)
    return paths


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    make_images(root)
    return root


def smaller(path: Path, fields: dict[str, dict[str, object]]) -> list[str]:
    """``--set`` overrides for the manifest at ``path``: every analysis whose type is a key of
    ``fields`` gets those fields (``sample.n``: a dotted path, set only where the entry has
    ``sample``). Tests run the shipped manifests with smaller samples this way; the manifests
    stay what a user runs."""
    overrides = []
    for i, entry in enumerate(yaml.safe_load(path.read_text())["analyses"]):
        for key, value in fields.get(entry["type"], {}).items():
            if "." not in key or key.split(".")[0] in entry:
                overrides.append(f"analyses[{i}].{key}={json.dumps(value)}")
    return overrides


def write_manifest(path: Path, **sections) -> Path:
    """A manifest file with tiny defaults: a CIFAR ResNet-20 (``weights=``), features + predictions."""
    doc = {
        "name": "test",
        "output": str(path.parent / "out"),
        "dataset": sections.pop("dataset"),
        "model": sections.pop("model", None) or {"source": "builtin", "name": "cifar_resnet20",
                                                 "weights": str(sections.pop("weights"))},
        "analyses": sections.pop("analyses", [
            {"type": "features", "layers": ["layer1", "layer3"]},
            {"type": "predictions"},
        ]),
        "execution": sections.pop("execution", {"batch_size": 8, "decode_batch_size": 8}),
    }
    doc.update(sections)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
