"""execution.compile and execution.decode: gpu, checked on the CPU.

torch.compile runs with the ``eager`` backend here (dynamo traces the model, hooks included,
without generating code: seconds instead of a minute of C++ compiling on a small CPU), and the
device decoder runs with ``device="cpu"`` (torchvision's decode_jpeg works there too).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import execute
from pipeline.compiled import CompiledForward
from pipeline.decode import decode_batch, decode_image
from pipeline.device_decode import decode_on_device
from pipeline.errors import ManifestError
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest
from pipeline.models import capture
from pipeline.worker import ModelWorker

from .conftest import make_images, write_manifest

# PIL's and torchvision's antialiased bilinear resizes of uint8 images round differently: at most
# one level of 255 apart (decoding itself is the same libjpeg-turbo code, exact).
RESIZE_TOLERANCE = 1


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 5, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 2)).eval()


def eager(model: torch.nn.Module, x: torch.Tensor, layers: list[str]):
    with torch.inference_mode(), capture(model, layers) as acts:
        logits = model(x)
    return logits, acts


def test_compiled_forward_matches_eager_and_leaves_the_model_eager():
    model, layers, warnings = small_net(), ["0", "2"], []
    forward = CompiledForward(model, layers, warnings.append, backend="eager")
    for n in (4, 4, 3):  # a smaller last batch recompiles
        x = torch.randn(n, 3, 8, 8)
        with torch.inference_mode():
            logits, acts = forward(x)
        want_logits, want = eager(model, x, layers)
        assert torch.allclose(logits, want_logits, atol=1e-6)
        assert sorted(acts) == layers and all(torch.allclose(acts[k], want[k], atol=1e-6) for k in layers)
    # The tap records nothing in an eager forward, and gradients flow as without it.
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and not forward.store
    # A hook of someone else's is honoured: that forward runs eagerly.
    seen = []
    handle = model[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        forward(torch.randn(2, 3, 8, 8))
    handle.remove()
    assert seen == [torch.Size([2, 5, 4, 4])] and not warnings
    forward.close()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_compile_failure_falls_back_to_eager_with_one_warning():
    def broken(graph, inputs):
        raise RuntimeError("no C++ compiler\nmore detail")

    model, warnings = small_net(), []
    forward = CompiledForward(model, ["2"], warnings.append, backend=broken)
    for _ in range(2):
        x = torch.randn(2, 3, 8, 8)
        with torch.inference_mode():
            logits, acts = forward(x)
        want_logits, want = eager(model, x, ["2"])
        assert torch.equal(logits, want_logits) and torch.equal(acts["2"], want["2"])
    assert len(warnings) == 1 and "execution.compile" in warnings[0] and "no C++ compiler" in warnings[0]


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def smooth_image(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 3 % 256], -1)
    return np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resize, crop", [(None, None), (32, 28), (24, None), (32, 36), ([20, 30], None)])
def test_device_decode_matches_the_cpu_path(resize, crop):
    images = [jpeg(smooth_image(w, h, i)) for i, (w, h) in enumerate([(40, 30), (30, 50), (33, 47), (20, 20)])]
    images.append(jpeg(np.asarray(Image.fromarray(smooth_image(36, 28, 9)).convert("L"))))  # greyscale
    for data, got in zip(images, decode_on_device(images, resize, crop, "cpu")):
        want = decode_image(data, resize, crop)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and tuple(got.shape) == want.shape
        assert np.abs(got.numpy().astype(int) - want.astype(int)).max() <= RESIZE_TOLERANCE


def test_device_decode_of_a_corrupt_jpeg_gives_the_cpu_paths_error(tmp_path):
    good = jpeg(smooth_image(40, 30, 0))
    truncated = good[:len(good) // 2]
    got = decode_on_device([good, truncated], 32, 28, "cpu")
    assert isinstance(got[0], torch.Tensor)
    with pytest.raises(OSError) as cpu:
        decode_image(truncated, 32, 28)
    assert isinstance(got[1], OSError) and str(got[1]) == str(cpu.value)


def test_decode_tasks_pass_jpegs_through_and_decode_the_rest(tmp_path):
    """With device_jpeg, a JPEG's bytes go to the worker, a PNG is decoded as ever, and an image
    whose header cannot be read is an error row at once."""
    files = {"a.jpg": jpeg(smooth_image(40, 30, 0)), "b.png": None, "c.jpg": b"not an image"}
    buf = io.BytesIO()
    Image.fromarray(smooth_image(30, 40, 1)).save(buf, format="PNG")
    files["b.png"] = buf.getvalue()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    batch = {"image_id": np.array(list(files), dtype=object), "label": np.zeros(3, np.int64),
             "ref": np.array(["file"] * 3, dtype=object), "source": np.array([str(tmp_path / n) for n in files]),
             "offset": np.zeros(3, np.int64), "size": np.zeros(3, np.int64)}
    plain = decode_batch(batch, 32, 28)
    out = decode_batch(batch, 32, 28, device_jpeg=True)
    assert out["encoded"][0] == files["a.jpg"] and out["encoded"][1] == b"" and out["encoded"][2] == b""
    assert not out["pixels"][0].any() and np.array_equal(out["pixels"][1], plain["pixels"][1])
    assert list(out["error"] != "") == [False, False, True]
    assert out["error"][2].startswith("UnidentifiedImageError") and out["error_stage"][2] == plain["error_stage"][2]
    assert "encoded" not in plain


def test_gpu_decode_refused_on_a_cpu_device(tmp_path, image_folder, resnet20_weights):
    path = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                          dataset={"kind": "image_folder", "root": str(image_folder)},
                          execution={"device": "cpu", "decode": "gpu"})
    with pytest.raises(ManifestError, match=r"execution\.decode: 'gpu' .*execution\.device is 'cpu'"):
        load_manifest(path)


def jpeg_folder(root: Path) -> Path:
    """PNG images, half of them re-saved as JPEGs, one corrupt JPEG and one corrupt PNG."""
    for i, p in enumerate(make_images(root, classes=2, per_class=4, size=40)):
        if i % 2:
            Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=90)
            p.unlink()
    (root / "class0" / "bad.jpg").write_bytes(jpeg(smooth_image(40, 40, 3))[:300])
    (root / "class1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def read(out: Path, entry: str, layer: str | None = None) -> pd.DataFrame:
    folder = out / entry / (f"layer={layer}" if layer else "")
    return pd.read_parquet(folder).sort_values("image_id").reset_index(drop=True)


def test_gpu_decode_and_compile_end_to_end(ray_session, resnet20_weights, tmp_path, monkeypatch):
    """A run with decode: gpu (on the CPU, by the test switch) and compile: true gives the plain
    run's rows, within resize rounding, and the same bad-image rows."""
    root = jpeg_folder(tmp_path / "images")
    outputs = {}
    for name, options in {"plain": {}, "gpu": {"decode": "gpu", "compile": True}}.items():
        (tmp_path / name).mkdir()
        path = write_manifest(tmp_path / name / "m.yaml",
                              model={"source": "builtin", "name": "cifar_resnet20", "weights": str(resnet20_weights),
                                     "preprocess": {"resize": 36, "crop": 32}},
                              dataset={"kind": "image_folder", "root": str(root)},
                              execution={"batch_size": 4, "decode_batch_size": 4, "device": "auto", **options})
        monkeypatch.setattr(execute, "DEVICE_DECODE_ON_CPU", name == "gpu")
        monkeypatch.setattr(execute, "COMPILE_BACKEND", "eager")
        messages: list[str] = []
        result = run_manifest(load_manifest(path), log=messages.append)
        assert result.ok, messages
        assert not any("warning" in m for m in messages), messages
        outputs[name] = tmp_path / name / "out"
    errors = {n: pd.read_parquet(o / "errors.parquet").sort_values("image_id").reset_index(drop=True)
              for n, o in outputs.items()}
    assert list(errors["gpu"].image_id) == ["class0/bad.jpg", "class1/bad.png"]
    pd.testing.assert_frame_equal(errors["gpu"][["image_id", "stage"]], errors["plain"][["image_id", "stage"]])
    plain, gpu = (read(o, "features", "layer3") for o in outputs.values())
    assert list(plain.image_id) == list(gpu.image_id) and len(plain) == 8
    diff = np.abs(np.stack(plain.vector.to_numpy()) - np.stack(gpu.vector.to_numpy())).max()
    assert diff < 0.05  # one level of 255 here and there in the resized inputs
    png = [i for i, name in enumerate(plain.image_id) if name.endswith(".png")]
    assert np.allclose(np.stack(plain.vector[png].to_numpy()), np.stack(gpu.vector[png].to_numpy()), atol=1e-5)


def test_worker_decodes_on_the_device_and_compiles(resnet20_weights, tmp_path):
    """The model actor's side without Ray: a block with encoded JPEGs gives the pixels and error
    rows the CPU path gives."""
    from pipeline.manifest import load_manifest as load
    from pipeline.store import Store
    from pipeline.worker import entries_json

    root = jpeg_folder(tmp_path / "images")
    path = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                          dataset={"kind": "image_folder", "root": str(root)},
                          analyses=[{"type": "predictions"}])
    manifest = load(path)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    batch = {"image_id": np.array([p.name for p in paths], dtype=object), "label": np.zeros(len(paths), np.int64),
             "ref": np.array(["file"] * len(paths), dtype=object), "source": np.array([str(p) for p in paths]),
             "offset": np.zeros(len(paths), np.int64), "size": np.zeros(len(paths), np.int64),
             "row": np.arange(len(paths))}
    pre = manifest.model.preprocess
    assert pre is not None
    plain = decode_batch(batch, pre.resize, pre.crop)
    deferred = decode_batch(batch, pre.resize, pre.crop, device_jpeg=True)
    execution = {**manifest.execution.model_dump(mode="json"), "device": "cpu", "decode": "gpu", "compile": True,
                 "cpus_per_worker": 1, "compile_backend": "eager"}
    worker = ModelWorker(manifest.model.model_dump(mode="json"), entries_json(manifest.analyses), execution,
                         Store.open(tmp_path / "staging"), {"predictions": "predictions"}, block_rows=len(paths))
    decoded, on_device = worker._decode_on_device(deferred)
    assert np.abs(decoded["pixels"].astype(int) - plain["pixels"].astype(int)).max() <= RESIZE_TOLERANCE
    # Messages name the same errors (PIL's name a buffer's address, which differs from call to call).
    assert [e.split(" <")[0] for e in decoded["error"]] == [e.split(" <")[0] for e in plain["error"]]
    assert sum(plain["error"] != "") == 2 and list(decoded["error_stage"]) == list(plain["error_stage"])
    assert torch.equal(on_device, torch.from_numpy(decoded["pixels"]))
    assert worker.compiled and not worker.notices
