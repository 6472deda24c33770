"""Benchmark: model-level entries with their units batched, against one unit at a time.

For every model-level entry of a manifest (or ``--only`` some), on the manifest's model and
the entry's chosen images (decoded once beforehand), time ``run`` as the runner calls it --
units in groups of ``units_per_task``, each group one batch -- and the baseline in the same
run: every unit alone, a batch of one. Ray, decoding and writing are left out; this is the
compute. Both runs must give every unit a row; the script prints how far their objective
values differ (float rounding grows along an optimisation; see the README).

    python scripts/bench_model.py manifests/cifar10.yaml --only class_model inversion
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest", type=Path, nargs="?", default=ROOT / "manifests" / "cifar10.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="manifest override key=value")
    p.add_argument("--only", nargs="+", help="entry names to time (default: every model-level entry)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import numpy as np
    import pyarrow as pa
    import torch

    from jobs import REGISTRY, ModelContext
    from pipeline.datasets import list_dataset
    from pipeline.manifest import load_manifest
    from pipeline.model_stage import group_size, groups, run_units
    from pipeline.models import load_model
    from pipeline.reduce import RunContext

    # Everything runs in this one process: no actor pool to size (workers: auto needs Ray).
    manifest = load_manifest(args.manifest, [*(args.overrides or []), "execution.workers=1"])
    entries = [a for a in manifest.analyses
               if REGISTRY[a.type].stage == "model" and (not args.only or a.entry_name in args.only)]
    if not entries:
        raise SystemExit(f"{args.manifest}: no model-level entries to time")
    index = list_dataset(manifest.dataset)
    ids = index.table.column("image_id").to_pylist()
    labels = dict(zip(ids, index.table.column("label").to_pylist()))
    model = load_model(manifest.model).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    decoder = RunContext(manifest, index, lambda message: None)
    pre = manifest.model.preprocess
    results: dict = {"manifest": str(args.manifest), "threads": torch.get_num_threads(), "entries": {}}

    def values(tables: dict[str, pa.Table]) -> np.ndarray:
        table = tables[""]
        for column in ("final_value", "pixel_error", "distance", "max", "l2"):
            if column in table.column_names:
                return table.column(column).to_numpy().astype(np.float64)
        return np.zeros(table.num_rows)

    for params in entries:
        analysis = REGISTRY[params.type](params)
        chosen = analysis.select(ids) or []
        pixels = decoder.images(chosen) if chosen else {}
        ctx = ModelContext(model=model, input_size=tuple(pre.output_size()), mean=pre.mean, std=pre.std,
                           pixels=pixels, labels={i: labels[i] if labels[i] is not None else -1 for i in pixels},
                           label_names=index.label_names)
        units = analysis.units(ctx)
        if len(units) < 2:
            print(f"{params.entry_name:>20}: {len(units)} unit(s), nothing to batch", flush=True)
            continue
        run_units(analysis, units[:1], ctx)  # warm-up: lazy imports, first-touch allocations
        start = time.perf_counter()
        batched = [run_units(analysis, g, ctx).tables for g in groups(units, group_size(analysis), 1)]
        batched_s = time.perf_counter() - start
        start = time.perf_counter()
        alone = [run_units(analysis, [u], ctx).tables for u in units]
        alone_s = time.perf_counter() - start
        a = np.concatenate([values(t) for t in batched])
        b = np.concatenate([values(t) for t in alone])
        if len(a) != len(b):
            raise SystemExit(f"{params.entry_name}: {len(a)} rows batched but {len(b)} one unit at a time")
        r = results["entries"][params.entry_name] = {
            "units": len(units), "group": group_size(analysis), "batched_s": round(batched_s, 2),
            "one_at_a_time_s": round(alone_s, 2), "speedup": round(alone_s / batched_s, 2),
            # Largest difference, relative to the largest value of the column.
            "max_relative_difference": float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12)),
        }
        print(f"{params.entry_name:>20}: {len(units)} units, batched {batched_s:6.2f} s, one at a time "
              f"{alone_s:6.2f} s: {r['speedup']}x (values differ by up to {r['max_relative_difference']:.1e} "
              "of the largest)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
