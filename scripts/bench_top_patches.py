"""Benchmark: ``top_patches`` against ``features`` alone on the same layers, in one run.

Both are run by convscope on the same manifest's dataset, model and execution settings,
alternating, each into a fresh output; the medians are compared. ``features`` is the
floor: one forward per batch with hooks on the layers, pooled vectors written per image.
``top_patches`` adds the per-batch top-k selection on the workers, the streaming merge,
the receptive fields, and (unless ``--no-render``) the crops and grids. (Exactness against brute force is
tested in ``tests/test_top_patches.py``; this script only times.)

    python scripts/bench_top_patches.py manifests/cifar10.yaml --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.manifest import load_manifest  # noqa: E402


def _run(manifest_path: Path, output: Path, entry: dict, overrides: list[str]) -> tuple[float, dict]:
    from jobs import REGISTRY
    from pipeline.execute import run_manifest

    manifest = load_manifest(manifest_path, overrides, output=output)
    manifest.analyses = [REGISTRY[entry["type"]].Params.model_validate(entry)]
    start = time.perf_counter()
    result = run_manifest(manifest, log=lambda m: None)
    seconds = time.perf_counter() - start
    info = result.analyses[manifest.analyses[0].entry_name]
    if info["status"] != "complete":
        raise RuntimeError(f"{entry['type']} failed: {info.get('error')}")
    return seconds, info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest", type=Path, nargs="?", default=ROOT / "manifests" / "cifar10.yaml")
    p.add_argument("--layers", nargs="+", default=None, help="default: the manifest's top_patches layers")
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, help="use the first N images only")
    p.add_argument("--no-render", action="store_true", help="time top_patches without crops and grids")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import ray

    overrides = [f"dataset.limit={args.limit}"] if args.limit else []
    manifest = load_manifest(args.manifest, overrides)
    layers = args.layers or next((a.layers for a in manifest.analyses if a.type == "top_patches"), None)
    if not layers:
        p.error("no --layers given and the manifest has no top_patches entry")
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)

    features = {"type": "features", "layers": layers, "pool": "avg"}
    top = {"type": "top_patches", "layers": layers, "k": args.k, "render": not args.no_render}
    runs: dict[str, list[float]] = {"features": [], "top_patches": []}
    reduce_s: list[float] = []
    images = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            s, info = _run(args.manifest, Path(tmp) / f"f{r}", features, overrides)
            runs["features"].append(s)
            images = info["rows"] // len(layers)
            s, info = _run(args.manifest, Path(tmp) / f"t{r}", top, overrides)
            runs["top_patches"].append(s)
            reduce_s.append(info["reduce_seconds"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "images": images, "layers": layers, "k": args.k, "render": not args.no_render,
        "features_images_per_s": images / med["features"],
        "top_patches_images_per_s": images / med["top_patches"],
        "ratio": med["features"] / med["top_patches"],
        "top_patches_reduce_seconds": statistics.median(reduce_s),
        "runs_seconds": runs,
    }
    print(f"{images} images, layers {', '.join(layers)}, k={args.k}, median of {args.repeats} runs each:")
    print(f"  features alone   {result['features_images_per_s']:8.0f} images/s")
    print(f"  top_patches      {result['top_patches_images_per_s']:8.0f} images/s  "
          f"({result['ratio']:.2f}x the features throughput; reduce + render "
          f"{result['top_patches_reduce_seconds']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if started:
        ray.shutdown()
    return result


if __name__ == "__main__":
    main()
