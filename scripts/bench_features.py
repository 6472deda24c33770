"""Benchmark: ``features`` + ``predictions`` end to end against a plain PyTorch loop.

Both sides run in one process on the same images, model, batch size and device: the
plain loop is a ``DataLoader`` with worker processes decoding the files, the model with
forward hooks, and the same pooling and top-5; convscope runs the manifest on Ray
(already started, so its start-up is reported apart) and writes its Parquet tables.
Runs alternate, and the medians are compared. The features of both must agree.

    python scripts/bench_features.py manifests/cifar10.yaml --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.datasets import list_dataset  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.models import capture, load_model  # noqa: E402


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb") as f:
            return torch.from_numpy(decode_image(f.read(), self.preprocess.resize, self.preprocess.crop))


def plain_loop(manifest, paths: list[str], layers: list[str], loader_workers: int) -> tuple[float, dict]:
    """The hand-written baseline: DataLoader -> model -> pooled features and top-5."""
    pre = manifest.model.preprocess
    model = load_model(manifest.model)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(_Files(paths, pre), batch_size=manifest.execution.batch_size,
                                         num_workers=loader_workers)
    out: dict[str, list] = {layer: [] for layer in layers}
    start = time.perf_counter()
    with torch.inference_mode(), capture(model, layers) as acts:
        for batch in loader:
            x = (batch.permute(0, 3, 1, 2).float() / 255 - mean) / std
            probs = torch.softmax(model(x), 1)
            probs.topk(5, dim=1)
            for layer in layers:
                out[layer].append(acts[layer].mean(dim=(2, 3)).numpy())
    seconds = time.perf_counter() - start
    return seconds, {layer: np.concatenate(v) for layer, v in out.items()}


def convscope_run(manifest_path: Path, output: Path, limit: int | None) -> tuple[float, float, dict]:
    """convscope end to end; returns (run seconds, map-stage seconds, features by layer)."""
    import pandas as pd

    from pipeline.execute import run_manifest

    overrides = [f"dataset.limit={limit}"] if limit else []
    manifest = load_manifest(manifest_path, overrides, output=output)
    manifest.analyses = [a for a in manifest.analyses if a.type in ("features", "predictions")]
    start = time.perf_counter()
    result = run_manifest(manifest, log=lambda m: None)
    seconds = time.perf_counter() - start
    stage = max(info.get("seconds", 0) for info in result.analyses.values())
    entry = next(a for a in manifest.analyses if a.type == "features")
    feats = {}
    for layer in entry.layers:
        df = pd.read_parquet(output / entry.entry_name / f"layer={layer}")
        feats[layer] = np.stack(df.vector.to_numpy())
    return seconds, stage, feats


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest", type=Path, nargs="?", default=ROOT / "manifests" / "cifar10.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, help="use the first N images only")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import ray

    manifest = load_manifest(args.manifest, [f"dataset.limit={args.limit}"] if args.limit else [])
    entry = next(a for a in manifest.analyses if a.type == "features")
    index = list_dataset(manifest.dataset)
    paths = index.table.column("source").to_pylist()
    n = len(paths)

    t = time.perf_counter()
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray_start = time.perf_counter() - t

    plain, ours, stage = [], [], []
    agree = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            s, ref = plain_loop(manifest, paths, entry.layers, args.loader_workers)
            plain.append(s)
            s, st, got = convscope_run(args.manifest, Path(tmp) / f"run{r}", args.limit)
            ours.append(s)
            stage.append(st)
            agree = max(float(np.abs(got[layer] - ref[layer]).max()) for layer in entry.layers)
    result = {
        "images": n,
        "batch_size": manifest.execution.batch_size,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "plain_loop_images_per_s": n / statistics.median(plain),
        "convscope_images_per_s": n / statistics.median(ours),
        "convscope_map_stage_images_per_s": n / statistics.median(stage),
        "ratio_end_to_end": statistics.median(plain) / statistics.median(ours),
        "ratio_map_stage": statistics.median(plain) / statistics.median(stage),
        "ray_start_seconds": ray_start,
        "max_abs_feature_diff": agree,
        "runs_seconds": {"plain": plain, "convscope": ours, "convscope_map_stage": stage},
    }
    print(f"{n} images, batch {result['batch_size']}, {result['device']}, median of {args.repeats}:")
    print(f"  plain PyTorch loop       {result['plain_loop_images_per_s']:8.0f} images/s")
    print(f"  convscope end to end     {result['convscope_images_per_s']:8.0f} images/s  "
          f"({result['ratio_end_to_end']:.2f}x the loop)")
    print(f"  convscope map stage      {result['convscope_map_stage_images_per_s']:8.0f} images/s  "
          f"({result['ratio_map_stage']:.2f}x the loop)")
    print(f"  Ray start-up (once)      {ray_start:8.1f} s")
    print(f"  features agree: max |diff| = {agree:.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if started:
        ray.shutdown()
    return result


if __name__ == "__main__":
    main()
