"""The demo: a generated image dataset with object boxes, and a small CNN trained on it.

Each image shows one object -- a circle, cross, square or triangle, in a random colour,
size and position -- on a noisy background with distracting strokes. The class depends
only on the object, and its bounding box is recorded, so saliency, CAM and occlusion
maps can be scored against ground truth. Everything is seeded: the same arguments make
the same pixels on every machine.

The dataset (``kind: shapes``) is written once under its root as an image folder plus
``boxes.parquet``; the demo CNN (``builtin: demo_cnn``) trains once on a separate,
differently seeded set and caches its weights.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

CLASSES = ["circle", "cross", "square", "triangle"]  # sorted: image_folder label order
TRAIN_SEED = 10_007  # far from the dataset seeds users pick, so train and test differ
GENERATOR_VERSION = 1


def render(index: int, seed: int, size: int = 64) -> tuple[np.ndarray, int, list[int]]:
    """Image ``index`` of the dataset with ``seed``: (uint8 (size, size, 3), label, box).

    ``box`` is ``[x0, y0, x1, y1]`` in pixels, end-exclusive.
    """
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    label = int(rng.integers(len(CLASSES)))
    # Background: a smooth colour ramp plus noise.
    c0, c1 = rng.uniform(40, 200, size=(2, 3))
    ramp = np.linspace(0, 1, size)[:, None, None]
    bg = c0 * (1 - ramp) + c1 * ramp
    bg = np.broadcast_to(bg, (size, size, 3)) + rng.normal(0, 18, size=(size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # Distractors: thin strokes and dots that no class depends on.
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.integers(0, size, 2)
        dx, dy = rng.integers(-size // 4, size // 4, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line([int(x), int(y), int(x + dx), int(y + dy)], fill=colour, width=1)
    # The object.
    s = int(rng.integers(size * 7 // 32, size * 13 // 32))
    x0 = int(rng.integers(1, size - s - 1))
    y0 = int(rng.integers(1, size - s - 1))
    x1, y1 = x0 + s, y0 + s
    hue = rng.integers(0, 3)
    rgb = [int(v) for v in rng.integers(0, 90, 3)]
    rgb[hue] = int(rng.integers(200, 256))
    fill = tuple(rgb)
    name = CLASSES[label]
    if name == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif name == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif name == "triangle":
        draw.polygon([(x0 + s / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    else:  # cross
        t = max(2, s // 4)
        cx, cy = x0 + s // 2, y0 + s // 2
        draw.rectangle([x0, cy - t // 2, x1 - 1, cy - t // 2 + t - 1], fill=fill)
        draw.rectangle([cx - t // 2, y0, cx - t // 2 + t - 1, y1 - 1], fill=fill)
    return np.asarray(img), label, [x0, y0, x1, y1]


def ensure_shapes(root: Path, n: int = 1000, size: int = 64, seed: int = 0) -> Path:
    """Write the dataset under ``root`` unless it is already there with these settings.

    Layout: ``root/<class>/<nnnnn>.png`` and ``root/boxes.parquet`` (image_id, box).
    Written into a temporary folder and renamed, so a half-written dataset is never used.
    """
    root = Path(root)
    settings = {"n": n, "size": size, "seed": seed, "version": GENERATOR_VERSION}
    marker = root / "_SUCCESS"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == settings:
                return root
        except ValueError:
            pass
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in CLASSES:
        (tmp / c).mkdir(parents=True)
    ids, boxes = [], []
    for i in range(n):
        arr, label, box = render(i, seed, size)
        image_id = f"{CLASSES[label]}/{i:05d}.png"
        Image.fromarray(arr).save(tmp / image_id)
        ids.append(image_id)
        boxes.append(box)
    pq.write_table(pa.table({"image_id": ids, "box": pa.array(boxes, pa.list_(pa.int32()))}), tmp / "boxes.parquet")
    (tmp / "_SUCCESS").write_text(json.dumps(settings))
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root


def _tensors(n: int, seed: int, size: int):
    import torch

    from pipeline.manifest import IMAGENET_MEAN, IMAGENET_STD

    imgs, labels = zip(*[render(i, seed, size)[:2] for i in range(n)])
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(labels)


def _save(model, path: Path) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


# The states the demo CNN's training keeps beside its weights: manifests/demo-checkpoints.yaml's series.
DEMO_EPOCHS = (1, 2, 8)


def checkpoint_path(path: Path, epoch: int) -> Path:
    """Where the state after ``epoch`` goes beside the demo CNN's weights: ``demo_cnn_epoch02.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_epoch{epoch:02d}{path.suffix}")


def train_demo_model(
    path: Path | None, n_train: int = 4000, epochs: int = 8, size: int = 64, seed: int = 0, log=print,
    checkpoints: dict[int, Path] | None = None,
) -> float:
    """Train the demo CNN on generated shapes and save its state dict to ``path`` (when given), and
    the state after each epoch of ``checkpoints`` ({epoch: file}) to its file: a checkpoint series.

    Seeded; the training images come from ``TRAIN_SEED``, never from the dataset the demo
    analyses; saving checkpoints changes nothing in the training. Returns the accuracy on 1,000
    held-out generated images.
    """
    import torch

    from pipeline.zoo import DemoCNN

    start = time.time()
    saved = f"cached at {path}" if path is not None else "saving only the chosen epochs"
    log(f"training the demo CNN once ({n_train} generated images, {epochs} epochs); {saved}")
    torch.manual_seed(seed)
    x, y = _tensors(n_train, TRAIN_SEED, size)
    xv, yv = _tensors(1000, TRAIN_SEED + 1, size)
    model = DemoCNN(len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((n_train + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train, 64):
            idx = order[i:i + 64]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        log(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, held-out accuracy {acc:.3f}")
        if checkpoints and epoch + 1 in checkpoints:
            _save(model, checkpoints[epoch + 1])
    if path is not None:
        _save(model, path)
    log(f"demo CNN trained in {time.time() - start:.0f}s, held-out accuracy {acc:.3f}")
    return acc


def ensure_demo_checkpoints(paths: list[Path], log=print, epochs: int = 8) -> None:
    """Make the demo CNN checkpoints among ``paths`` that are missing, in one training: each file
    named ``..._epochNN.pt`` holds the state after epoch NN (the training runs to at least ``epochs``,
    so every checkpoint is a state of the same training whatever files are asked for)."""
    from pipeline.manifest.schema import DEMO_EPOCH

    missing = {}
    for path in paths:
        match = DEMO_EPOCH.search(Path(path).stem)
        if not Path(path).is_file() and match is not None:
            missing[int(match.group(1))] = Path(path)
    if missing:
        log(f"training the demo CNN for its checkpoints after epochs {', '.join(map(str, sorted(missing)))}")
        train_demo_model(None, epochs=max(epochs, *missing), log=log, checkpoints=missing)


if __name__ == "__main__":  # python -m pipeline.demo OUT.pt [1,2,8] : retrain by hand (with checkpoints)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_cnn.pt")
    epochs = [int(e) for e in sys.argv[2].split(",")] if len(sys.argv) > 2 else []
    train_demo_model(out, checkpoints={e: checkpoint_path(out, e) for e in epochs})
