"""Benchmark: images/s of every attribution entry of a manifest, against a plain forward pass.

Each attribution entry of the manifest runs as the map stage runs it (``map_batch`` on
batches of ``execution.batch_size`` -- maps, deletion/insertion scores, pointing game and
overlays included, and the batch's shared forward when the method reads it) on the images of
its sample, decoded once beforehand; the floor, timed in the same run on the same images, is
one inference forward per batch. Decoding, Ray and writing are left out: this is the compute
each method adds per image. (Correctness is tested in ``tests/test_attribution.py`` and the
kernels' own tests; this script only times.)

    python scripts/bench_attribution.py manifests/cifar10.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def decode_sample(manifest, index, ids: list[str]):
    """The images ``ids`` of the manifest's dataset as the map stage decodes them: (ids, pixels,
    labels, boxes), without the ones that fail to decode."""
    import numpy as np
    import pyarrow as pa

    from pipeline.decode import decode_batch
    from pipeline.execute import with_boxes

    table = with_boxes(index)
    rows = {i: n for n, i in enumerate(table.column("image_id").to_pylist())}
    sub = table.take(pa.array([rows[i] for i in ids], pa.int64()))
    batch = {c: np.asarray(sub.column(c).to_pylist(), dtype=object) for c in sub.column_names}
    pre = manifest.model.preprocess
    out = decode_batch(batch, pre.resize, pre.crop)
    ok = out["error"] == ""
    return ([i for i, good in zip(out["image_id"], ok) if good], out["pixels"][ok], out["label"][ok],
            out["box"][ok] if "box" in out else None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest", type=Path, nargs="?", default=ROOT / "manifests" / "cifar10.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="manifest override key=value")
    p.add_argument("--only", nargs="+", help="entry names to time (default: every attribution entry)")
    p.add_argument("--maps-only", action="store_true",
                   help="time the maps alone: no deletion / insertion scores, no overlays")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from jobs import REGISTRY
    from jobs.attribution.base import ATTRIBUTION
    from jobs.core.pixels import pixels_to_inputs
    from pipeline.datasets import list_dataset
    from pipeline.manifest import load_manifest
    from pipeline.models import load_model
    from pipeline.worker import shared_batch

    manifest = load_manifest(args.manifest, args.overrides)
    entries = [a for a in manifest.analyses if a.type in ATTRIBUTION and (not args.only or a.entry_name in args.only)]
    if not entries:
        raise SystemExit(f"{args.manifest}: no attribution entries to time")
    index = list_dataset(manifest.dataset)
    all_ids = index.table.column("image_id").to_pylist()
    model = load_model(manifest.model)
    pre = manifest.model.preprocess
    bs = manifest.execution.batch_size
    results: dict = {"manifest": str(args.manifest), "threads": torch.get_num_threads(), "batch_size": bs,
                     "maps_only": args.maps_only, "entries": {}}
    decoded: dict[tuple, tuple] = {}

    def batches(data):
        ids, pixels, labels, boxes = data
        for s in range(0, len(ids), bs):
            px = pixels[s:s + bs]
            x = pixels_to_inputs(torch.from_numpy(np.array(px)), pre.mean, pre.std)
            yield ids[s:s + bs], px, torch.from_numpy(labels[s:s + bs].astype(np.int64)), x, \
                None if boxes is None else boxes[s:s + bs]

    def forward_floor(data) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for _, _, _, x, _ in batches(data):
                model(x)
        return time.perf_counter() - start

    for params in entries:
        if args.maps_only:
            params = params.model_copy(update={"metrics": False, "render": False})
        analysis = REGISTRY[params.type](params)
        chosen = analysis.select(all_ids) or all_ids
        key = tuple(chosen)
        if key not in decoded:
            decoded[key] = decode_sample(manifest, index, list(chosen))
        data = decoded[key]
        forward_floor(data)  # warm-up: first-touch allocations, lazy imports
        floor = forward_floor(data)
        layers = [layer for _, layer in analysis.layers()]

        def run_batch(ids, px, labels, x, boxes, layers=layers, analysis=analysis):
            # As the map stage builds it: the shared forward runs only if the method reads it.
            batch = shared_batch(model, x, layers, list(ids), labels.numpy(), pixels=np.asarray(px), boxes=boxes)
            return analysis.map_batch(batch)

        # Warm-up on a few images: lazy imports and first-touch allocations are not the method's.
        first = next(batches(data))
        run_batch(*(part[:4] if part is not None else None for part in first))
        start = time.perf_counter()
        maps = 0
        for ids, px, labels, x, boxes in batches(data):
            out = run_batch(ids, px, labels, x, boxes)
            maps += len(next(iter(out.rows[""].values()), []))
        seconds = time.perf_counter() - start
        n = len(data[0])
        results["entries"][params.entry_name] = {
            "images": n, "maps": maps, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
            "forward_images_per_s": round(n / floor, 1), "cost_vs_forward": round(seconds / floor, 1),
        }
        r = results["entries"][params.entry_name]
        print(f"{params.entry_name:>18}: {n} images in {seconds:7.2f} s = {r['images_per_s']:8.1f} images/s "
              f"(a plain forward: {r['forward_images_per_s']:,.0f} images/s; {r['cost_vs_forward']}x its time)",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
