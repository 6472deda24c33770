"""Benchmark: the chunked ``occlusion_sweep`` against a plain one-forward-per-position loop,
and its incremental path (Nakandala et al., SIGMOD 2019) against the batched sweep.

All run in one process on the same images and model: the trained CIFAR ResNet-20 and the
first ``--images`` CIFAR-10 test images (sorted paths) when ``--shared-dir`` holds them,
else a random-weights ResNet-20 on random images (it says so); ``--model demo`` takes the
demo CNN and ``--model resnet50`` torchvision's ResNet-50 (random weights, BatchNorm
statistics from random images; nothing is downloaded) on random ``--size`` images. Inputs are
normalised with the ImageNet mean/std the checkpoint was trained with; targets are the
predicted classes. The loop and the batched sweep must agree, and so must
the incremental and the batched sweep; ``occlusion_loop`` is also the reference
``tests/test_occlusion.py`` checks the kernel against. The sweep and the incremental path
alternate ``--repeat`` times and the fastest run of each counts (the ratio is measured in
the same run, so a busy machine slows both).

    python -m scripts.bench_occlusion --shared-dir ../shared --images 50 --window 8 --stride 2
    python -m scripts.bench_occlusion --images 8 --window 8 --stride 4 --threads 2 --skip-loop
    python -m scripts.bench_occlusion --model demo --size 64 --images 8 --window 12 --stride 4 --threads 2 --skip-loop
    python -m scripts.bench_occlusion --model resnet50 --images 2 --window 32 --stride 16 --threads 2 --skip-loop
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.attribution import incremental  # noqa: E402
from jobs.attribution.incremental import IncrementalRunner, Plan, cached_plan  # noqa: E402
from jobs.attribution.occlusion import fill_source, occlusion_sweep  # noqa: E402
from jobs.core.kernels import gaussian_blur  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def occlusion_loop(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, window: int, stride: int,
                   fill: str, blur_sigma: float | None = None,
                   feature: tuple[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Reference occlusion maps (Zeiler & Fergus, ECCV 2014, Fig. 7): one forward per image and position.

    Same outputs as :func:`jobs.attribution.occlusion.occlusion_sweep`, written as plainly as possible:
    each occluded image is a copy of the image with ``img[:, y:y+window, x:x+window]``
    replaced and goes through the model alone (batch of 1).
    """
    model.eval()
    n, _, h, w = x.shape
    ys = list(range(0, h - window + 1, stride))
    xs = list(range(0, w - window + 1, stride))
    prob_map = torch.zeros(n, len(ys), len(xs))
    label_map = torch.zeros(n, len(ys), len(xs), dtype=torch.long)
    feature_map = torch.zeros(n, len(ys), len(xs))
    clean_prob = torch.zeros(n)
    clean_feature = torch.zeros(n)
    captured: list[torch.Tensor] = []
    handle = None
    if feature is not None:
        layer, channel = feature

        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured.append(out[0, channel].clone().sum())

        handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for i in range(n):
                img = x[i]
                if fill == "zero":
                    source = torch.zeros_like(img)
                elif fill == "mean":
                    source = img.mean(dim=(1, 2), keepdim=True).expand_as(img)
                else:
                    sigma = window / 2 if blur_sigma is None else blur_sigma
                    source = gaussian_blur(img[None], sigma)[0]
                probs = model(img[None]).float().softmax(dim=1)[0]
                clean_prob[i] = probs[targets[i]]
                if feature is not None:
                    clean_feature[i] = captured.pop()
                for a, y in enumerate(ys):
                    for b, x0 in enumerate(xs):
                        occluded = img.clone()
                        occluded[:, y:y + window, x0:x0 + window] = source[:, y:y + window, x0:x0 + window]
                        logits = model(occluded[None]).float()[0]
                        prob_map[i, a, b] = logits.softmax(dim=0)[targets[i]]
                        label_map[i, a, b] = int(logits.argmax())
                        if feature is not None:
                            feature_map[i, a, b] = captured.pop()
    finally:
        if handle is not None:
            handle.remove()
    out = {"prob_map": prob_map, "label_map": label_map, "clean_prob": clean_prob}
    if feature is not None:
        out["feature_map"] = feature_map
        out["clean_feature"] = clean_feature
    return out


def _calibrated(build: Callable[[], nn.Module], images: int, size: int) -> nn.Module:
    """``build()`` with random weights (seed 0) and BatchNorm statistics calibrated on ``images``
    random images of ``size`` px (with the default statistics activations grow block after block)."""
    torch.manual_seed(0)
    model = build()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def _random_resnet() -> nn.Module:
    """A random-weights CIFAR ResNet-20, calibrated on random images."""
    from pipeline.zoo import CifarResNet

    return _calibrated(lambda: CifarResNet(20), 32, 32)


def _random_demo(size: int) -> nn.Module:
    """A random-weights demo CNN, calibrated on random images."""
    from pipeline.zoo import DemoCNN

    return _calibrated(DemoCNN, 16, size)


def _random_resnet50(size: int) -> nn.Module:
    """torchvision's ResNet-50, random weights, calibrated on random images."""
    from torchvision.models import resnet50

    return _calibrated(lambda: resnet50(weights=None), 8, size)


def load_inputs(shared: Path, images: int, force_random: bool) -> tuple[nn.Module, torch.Tensor, str]:
    """The model, normalised images (N, 3, 32, 32) and a line saying which ones."""
    weights = shared / "models" / "cifar10-resnet20.th"
    folder = shared / "datasets" / "cifar10-test"
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    if not force_random and weights.is_file() and folder.is_dir():
        from pipeline.decode import decode_image
        from pipeline.models import load_weights
        from pipeline.zoo import CifarResNet

        model = CifarResNet(20)
        load_weights(model, weights)
        paths = sorted(p for p in folder.glob("*/*") if p.is_file())[:images]
        arr = torch.stack([torch.from_numpy(decode_image(p.read_bytes()).copy()) for p in paths])
        raw = arr.permute(0, 3, 1, 2).float() / 255
        source = f"trained ResNet-20 ({weights}), first {len(paths)} images of {folder}"
    else:
        model = _random_resnet()
        raw = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        why = "--random" if force_random else f"no {weights} / {folder}"
        source = f"random-weights ResNet-20 on random images ({why})"
    return model.eval(), (raw - mean) / std, source


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared-dir", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--fill", choices=["zero", "mean", "blur"], default="zero")
    p.add_argument("--random", action="store_true", help="random-weights model on random images")
    p.add_argument("--model", choices=["resnet20", "demo", "resnet50"], default="resnet20")
    p.add_argument("--size", type=int, default=None,
                   help="image side for --model demo (default 64) / resnet50 (default 224)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs of the sweep and the incremental path")
    p.add_argument("--skip-loop", action="store_true", help="no plain loop (slow on big grids)")
    p.add_argument("--force-incremental", action="store_true",
                   help="run incrementally even when the regions save little work (incremental.WORTH_IT)")
    args = p.parse_args(argv)
    if args.force_incremental:
        incremental.WORTH_IT = 1.0
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.model in ("demo", "resnet50"):
        args.size = args.size or (64 if args.model == "demo" else 224)
        model = _random_demo(args.size) if args.model == "demo" else _random_resnet50(args.size)
        name = "demo CNN" if args.model == "demo" else "torchvision ResNet-50"
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        raw = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        x, source = (raw - mean) / std, f"random-weights {name} on random {args.size}x{args.size} images"
    else:
        model, x, source = load_inputs(args.shared_dir, args.images, args.random)
    with torch.inference_mode():
        targets = model(x).argmax(dim=1)  # also the warm-up forward
    n, _, h, w = x.shape

    ref, loop_s = None, math.nan
    if not args.skip_loop:
        start = time.perf_counter()
        ref = occlusion_loop(model, x, targets, args.window, args.stride, args.fill)
        loop_s = time.perf_counter() - start
    # Traces the model and builds the region tables once, as the first batch of a job would.
    occlusion_sweep(model, x[:1], targets[:1], args.window, args.stride, args.fill, chunk=args.chunk)
    sweep_s = inc_s = math.inf
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        got = occlusion_sweep(model, x, targets, args.window, args.stride, args.fill, chunk=args.chunk,
                              incremental=False)
        sweep_s = min(sweep_s, time.perf_counter() - start)
        start = time.perf_counter()
        inc = occlusion_sweep(model, x, targets, args.window, args.stride, args.fill, chunk=args.chunk)
        inc_s = min(inc_s, time.perf_counter() - start)
    if ref is None:
        ref = got
    plan = cached_plan(model, tuple(x.shape[1:]))
    work = None
    if isinstance(plan, Plan):
        work = IncrementalRunner(plan, x[:1], fill_source(x[:1], args.fill, args.window), args.window, args.stride,
                                 None, args.chunk).geo.work
    ran = isinstance(plan, Plan) and work is not None and work <= incremental.WORTH_IT

    ny, nx = got["prob_map"].shape[1:]
    result = {
        "source": source,
        "images": n,
        "positions_per_image": ny * nx,
        "grid": [ny, nx],
        "window": args.window, "stride": args.stride, "fill": args.fill, "chunk": args.chunk,
        "torch_threads": torch.get_num_threads(),
        "loop_seconds": loop_s,
        "sweep_seconds": sweep_s,
        "loop_images_per_s": n / loop_s,
        "sweep_images_per_s": n / sweep_s,
        "ratio": loop_s / sweep_s,
        "max_abs_prob_diff": float((got["prob_map"] - ref["prob_map"]).abs().max()),
        "label_agreement": float((got["label_map"] == ref["label_map"]).float().mean()),
        "incremental": ran,
        "incremental_work_share": work,
        "incremental_why_not": None if ran else (plan if not isinstance(plan, Plan) else
                                                 f"work share {work:.2f} > WORTH_IT {incremental.WORTH_IT}"),
        "incremental_seconds": inc_s,
        "incremental_images_per_s": n / inc_s,
        "incremental_vs_sweep": sweep_s / inc_s,
        "incremental_max_abs_prob_diff": float((inc["prob_map"] - got["prob_map"]).abs().max()),
        "incremental_label_agreement": float((inc["label_map"] == got["label_map"]).float().mean()),
    }
    print(source)
    print(f"{n} images {h}x{w}, window {args.window}, stride {args.stride}, fill {args.fill}: "
          f"{ny}x{nx} = {ny * nx} positions per image, {n * ny * nx} occluded forwards in all; "
          f"{result['torch_threads']} torch threads")
    if not args.skip_loop:
        print(f"  plain loop (batch 1)    {loop_s:8.2f} s  {result['loop_images_per_s']:8.2f} images/s")
    print(f"  occlusion_sweep ({args.chunk:>4})  {sweep_s:8.2f} s  {result['sweep_images_per_s']:8.2f} images/s"
          + ("" if args.skip_loop else f"  ({result['ratio']:.1f}x the loop)"))
    if not args.skip_loop:
        print(f"  agree: max |prob diff| = {result['max_abs_prob_diff']:.2e}, "
              f"labels equal at {100 * result['label_agreement']:.2f}% of positions")
    what = "incremental" if ran else "incremental (ran the sweep)"
    if result["incremental_why_not"]:
        print(f"  incremental path not taken: {result['incremental_why_not']}")
    elif work is not None:
        print(f"  incremental: {100 * work:.0f}% of the sweep's convolution work")
    print(f"  {what:23s} {inc_s:8.2f} s  {result['incremental_images_per_s']:8.2f} images/s  "
          f"({result['incremental_vs_sweep']:.2f}x the batched sweep)")
    print(f"  incremental vs sweep: max |prob diff| = {result['incremental_max_abs_prob_diff']:.2e}, "
          f"labels equal at {100 * result['incremental_label_agreement']:.2f}% of positions")
    return result


if __name__ == "__main__":
    main()
