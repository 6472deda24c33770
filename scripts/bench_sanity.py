"""Benchmark: the sanity checks of a manifest, per method and test, with the randomisation table.

The manifest's ``sanity_checks`` entry runs as the map stage runs it (``map_batch`` on batches
of ``execution.batch_size``) on the images of its sample, decoded once beforehand, one
(method, test) at a time so that each gets its own images/s; then ``reduce`` adds the means
with their bootstrap intervals. Printed: images/s per method and test, and the cascading
randomisation table (mean ``spearman_abs`` [95% interval] per method and blocks randomised).
Decoding, Ray and writing are left out. (Correctness: ``tests/test_sanity_checks.py``.)

    python scripts/bench_sanity.py manifests/cifar10.yaml --set 'analyses[16].sample.n=100'
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
    p.add_argument("--n", type=int, help="images of the sample (default: the entry's sample.n)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import torch

    from jobs import LocalContext, MapBatch, TableInputs
    from jobs.attribution.sanity_checks import SanityChecks
    from jobs.core.pixels import pixels_to_inputs
    from pipeline.datasets import list_dataset
    from pipeline.manifest import load_manifest
    from pipeline.models import load_model
    from pipeline.writers import to_arrow
    from scripts.bench_attribution import decode_sample

    manifest = load_manifest(args.manifest, args.overrides)
    entry = next((a for a in manifest.analyses if a.type == "sanity_checks"), None)
    if entry is None:
        raise SystemExit(f"{args.manifest}: no sanity_checks entry")
    if args.n:
        entry = entry.model_copy(update={"sample": entry.sample.model_copy(update={"n": args.n})})
    index = list_dataset(manifest.dataset)
    model = load_model(manifest.model).eval()
    pre = manifest.model.preprocess
    bs = manifest.execution.batch_size
    ids, pixels, labels, _ = decode_sample(manifest, index, SanityChecks(entry).select(
        index.table.column("image_id").to_pylist()))
    n = len(ids)
    with torch.inference_mode():
        logits = torch.cat([model(pixels_to_inputs(torch.from_numpy(np.array(pixels[s:s + bs])), pre.mean, pre.std))
                            for s in range(0, n, bs)])

    def run(analysis: SanityChecks) -> list[pa.Table]:
        out = []
        for s in range(0, n, bs):
            x = pixels_to_inputs(torch.from_numpy(np.array(pixels[s:s + bs])), pre.mean, pre.std)
            batch = MapBatch(image_ids=list(ids[s:s + bs]), labels=torch.from_numpy(labels[s:s + bs].astype(np.int64)),
                             images=x, logits=logits[s:s + bs], activations={}, model=model)
            rows = analysis.map_batch(batch)[""]
            out.append(pa.table({k: to_arrow(np.asarray(v)) for k, v in rows.items()}))
        return out

    tests = {"mprt": ["mprt_cascading", "mprt_independent"], "random_logit": ["random_logit"],
             "sensitivity": ["max_sensitivity", "avg_sensitivity"], "road": ["road"]}
    tests = {k: [t for t in v if t in entry.tests] for k, v in tests.items()}
    results: dict = {"manifest": str(args.manifest), "images": n, "threads": torch.get_num_threads(),
                     "batch_size": bs, "images_per_s": {}}
    parts: list[pa.Table] = []
    for method in entry.method_entries:
        name = method.get("name") or method["type"]
        for test, chosen in tests.items():
            if not chosen:
                continue
            analysis = SanityChecks(entry.model_copy(update={"method_entries": [method], "tests": chosen}))
            start = time.perf_counter()
            parts += run(analysis)
            seconds = time.perf_counter() - start
            results["images_per_s"].setdefault(name, {})[test] = round(n / seconds, 2)
            print(f"{name:>16} {test:>12}: {n} images in {seconds:7.2f} s = {n / seconds:7.2f} images/s", flush=True)
    analysis = SanityChecks(entry)
    out = analysis.reduce(TableInputs({"": pa.concat_tables(parts, promote_options="permissive")}),
                          LocalContext(model=model, pixels={}, input_size=tuple(pixels.shape[1:3])))
    df = out.tables[""].to_pandas() if isinstance(out.tables[""], pa.Table) else pd.DataFrame(out.tables[""])
    agg = df[df.image_id.isna()]
    cascade = agg[(agg.test == "mprt_cascading") & (agg.metric == "spearman_abs")]
    if len(cascade):
        cascade = cascade.assign(cell=[f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in
                                       zip(cascade.value, cascade.lo, cascade.hi)],
                                 block=[f"{int(s)} {b or 'none'}" for s, b in zip(cascade.step, cascade.step_name)])
        table = cascade.pivot(index="method", columns="block", values="cell")
        table = table[sorted(table.columns, key=lambda c: int(c.split()[0]))]
        print("\ncascading randomisation, mean spearman_abs [95% bootstrap interval] by blocks randomised:")
        print(table.to_string())
        results["mprt_cascading_spearman_abs"] = table.to_dict()
    for test, metric in (("random_logit", "ssim"), ("sensitivity", "max_sensitivity"), ("road", "morf_auc"),
                         ("road", "lerf_auc")):
        rows = agg[(agg.test == test) & (agg.metric == metric)]
        if len(rows):
            print(f"\n{test} {metric}: " + ", ".join(f"{r.method} {r.value:.3f} [{r.lo:.3f}, {r.hi:.3f}]"
                                                   for r in rows.itertuples()))
            results[f"{test}_{metric}"] = {r.method: [round(r.value, 4), round(r.lo, 4), round(r.hi, 4)]
                                           for r in rows.itertuples()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
