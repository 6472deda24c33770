"""Benchmark: the neuron-level analyses (Zeiler & Fergus and around it), images/s, each against a
baseline measured in the same run.

On a seeded sample of the manifest's dataset (decoded once beforehand; decoding, Ray and writing
left out), the model of the manifest:

- neuron targets: the guided-backprop projection of one unit (``neuron_gradients``, forward
  stopped at the layer) against the class map (``input_gradients``);
- top_patches projections: rows/s of ``project_rows`` (the tasks after the merge);
- occlusion, strongest feature map (``feature=(layer, None)`` + its projection) against a fixed
  channel;
- correspondence: ``map_batch`` (three forwards per image) against one plain forward;
- adversarial: ``smallest_flips`` (FGSM over the default epsilons, then PGD by bisection), with
  the share flipped and the median step;
- GrabCut segmentation of saliency maps (``grabcut_mask``) against computing the maps;
- facets: the clustering that starts a class model's facets, for every class, from a pool of
  the sampled images.

(Correctness: tests/test_neuron_targets.py, test_top_patches.py, test_occlusion.py,
test_correspondence.py, test_adversarial.py, test_saliency_segmentation.py, test_facets.py.)

    python scripts/bench_neuron.py manifests/cifar10.yaml --n 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """The median wall time of ``fn`` over ``repeats`` runs (after one warm-up), seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest", type=Path, nargs="?", default=ROOT / "manifests" / "cifar10.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="manifest override key=value")
    p.add_argument("--n", type=int, default=256, help="images of the seeded sample")
    p.add_argument("--layer", default="layer3", help="the layer of the units")
    p.add_argument("--channel", type=int, default=7)
    p.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"], help="correspondence's layers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from jobs import MapBatch, ModelContext
    from jobs.attribution.backprop import input_gradients, neuron_gradients
    from jobs.attribution.occlusion import occlusion_sweep, strongest_projection
    from jobs.attribution.saliency_segmentation import grabcut_mask
    from jobs.core.base import sample_ids
    from jobs.core.pixels import normalize, pixels_to_inputs
    from jobs.dataset.adversarial import DEFAULT_EPSILONS, smallest_flips
    from jobs.dataset.correspondence import Correspondence
    from jobs.dataset.top_patches import project_rows
    from jobs.model.class_model import ClassModel
    from pipeline.datasets import list_dataset
    from pipeline.manifest import load_manifest
    from pipeline.models import load_model
    from scripts.bench_attribution import decode_sample

    torch.manual_seed(0)
    manifest = load_manifest(args.manifest, args.overrides)
    index = list_dataset(manifest.dataset)
    model = load_model(manifest.model).eval()
    pre = manifest.model.preprocess
    ids, pixels, labels, _ = decode_sample(manifest, index, sample_ids(index.table.column("image_id").to_pylist(),
                                                                       args.n, 0))
    n = len(ids)
    x = pixels_to_inputs(torch.from_numpy(np.ascontiguousarray(pixels)), pre.mean, pre.std)
    with torch.no_grad():
        logits = model(x)
    targets = logits.argmax(dim=1)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    chunk = 64
    rows: list[dict] = []

    def add(what: str, seconds: float, units: int, baseline: str | None = None, base_seconds: float | None = None,
            **extra: object) -> None:
        row = {"analysis": what, "per_s": round(units / seconds, 1)}
        if baseline is not None and base_seconds is not None:
            row["baseline"] = baseline
            row["baseline_per_s"] = round(units / base_seconds, 1)
            row["ratio"] = round(base_seconds / seconds, 3)
        rows.append({**row, **extra})

    def chunks(fn: Callable[[torch.Tensor, slice], object]) -> Callable[[], None]:
        def run() -> None:
            for s in range(0, n, chunk):
                fn(x[s:s + chunk], slice(s, s + chunk))
        return run

    # Neuron targets: a unit's projection against the class map, both guided backprop.
    unit = timed(chunks(lambda xs, sl: neuron_gradients(model, xs, args.layer, args.channel, "max", "guided")),
                 args.repeats)
    cls = timed(chunks(lambda xs, sl: input_gradients(model, xs, targets[sl], rule="guided")), args.repeats)
    add(f"neuron target ({args.layer}[{args.channel}], guided)", unit, n, "class target, guided", cls)

    # top_patches projections: k = 9 rows for 16 channels, as the tasks after the merge compute them.
    from jobs.core.hooks import forward_to

    with torch.no_grad():
        acts = forward_to(model, args.layer, x)
    k, channels = 9, list(range(min(16, acts.shape[1])))
    picked = []
    for c in channels:
        best = acts[:, c].flatten(1).amax(dim=1)
        for i in best.argsort(descending=True)[:k].tolist():
            flat = int(acts[i, c].flatten().argmax())
            picked.append((c, ids[i], flat // acts.shape[-1], flat % acts.shape[-1]))
    box = [0, 0, size[1], size[0]]
    item = (args.layer, [c for c, *_ in picked], [i for _, i, *_ in picked], [y for *_, y, _ in picked],
            [xx for *_, xx in picked], [box] * len(picked))
    by_id = dict(zip(ids, pixels))
    shared = (model, tuple(pre.mean), tuple(pre.std), ("deconvnet", "guided_backprop"),
              lambda wanted: {i: by_id[i] for i in wanted})
    projected = timed(lambda: project_rows(shared, item), args.repeats)
    add("top_patches projections (deconvnet + guided, rows)", projected, len(picked))

    # Occlusion: the strongest feature map (and its projection) against a fixed channel.
    few = x[:32]
    m = len(few)

    def strongest_map() -> None:
        sweep = occlusion_sweep(model, few, targets[:m], 8, 4, feature=(args.layer, None), chunk=256)
        strongest_projection(model, few, args.layer, sweep["feature_channel"], 64)
    fixed = timed(lambda: occlusion_sweep(model, few, targets[:m], 8, 4, feature=(args.layer, args.channel),
                                          chunk=256), args.repeats)
    add("occlusion, strongest feature map + projection", timed(strongest_map, args.repeats), m,
        "occlusion, a fixed channel", fixed)

    # Correspondence: three forwards per image (clean, part, random) against one.
    part = [size[1] // 4, size[0] // 4, size[1] // 2, size[0] // 2]
    corr = Correspondence(Correspondence.Params(layers=args.layers, sample=None, part=part))
    label_t = torch.from_numpy(np.asarray(labels, np.int64))

    def correspondence() -> None:
        for s in range(0, n, chunk):
            corr.map_batch(MapBatch(image_ids=ids[s:s + chunk], labels=label_t[s:s + chunk], images=x[s:s + chunk],
                                    logits=logits[s:s + chunk], activations={}, model=model))

    def forward() -> None:
        with torch.no_grad():
            for s in range(0, n, chunk):
                model(x[s:s + chunk])
    add(f"correspondence ({len(args.layers)} layers)", timed(correspondence, args.repeats), n, "one forward",
        timed(forward, args.repeats))

    # Adversarial: FGSM then PGD by bisection, on 64 images.
    p01 = torch.from_numpy(np.ascontiguousarray(pixels[:64])).permute(0, 3, 1, 2).float() / 255

    def norm(t: torch.Tensor) -> torch.Tensor:
        return normalize(t, pre.mean, pre.std)
    found: dict = {}

    def attack() -> None:
        found.update(smallest_flips(model, norm, p01, DEFAULT_EPSILONS, steps=10))
    seconds = timed(attack, max(1, args.repeats // 2))
    eps = found["epsilon"].numpy()
    add("adversarial (FGSM, then PGD, 10 steps)", seconds, len(p01), flipped=round(float(np.mean(~np.isnan(eps))), 3),
        median_epsilon_255=round(float(np.nanmedian(eps) * 255), 2),
        by_pgd=round(float(found["by_pgd"].float().mean()), 3))

    # GrabCut on saliency maps against computing them.
    m = min(64, n)
    maps = input_gradients(model, x[:m], targets[:m]).abs().amax(dim=1).numpy()
    grab = timed(lambda: [grabcut_mask(pixels[i], maps[i]) for i in range(m)], args.repeats)
    sal = timed(lambda: input_gradients(model, x[:m], targets[:m]), args.repeats)
    add("GrabCut segmentation (per saliency map)", grab, m, "the saliency maps themselves", sal)

    # Facets: cluster each class's top images of the sample (every class, k = 3).
    facets = ClassModel(ClassModel.Params.model_validate({"type": "class_model", "facets": {"k": 3, "top": 50}}))
    ctx = ModelContext(model=model, input_size=size, mean=tuple(pre.mean), std=tuple(pre.std),
                       pixels=dict(zip(ids, pixels)), labels=dict(zip(ids, labels.tolist())))
    units = facets.units(ctx)
    add("facet starts (k-means per class)", timed(lambda: facets.facet_starts(units, ctx, size), args.repeats),
        len(units), pool=n)

    threads = torch.get_num_threads()
    print(f"{n} images of {args.manifest.name} ({size[0]}x{size[1]}), model {manifest.model.name}, "
          f"{threads} CPU threads, median of {args.repeats}")
    for row in rows:
        line = f"  {row['analysis']:<52} {row['per_s']:>9,.1f} /s"
        if "ratio" in row:
            line += f"   vs {row['baseline']}: {row['baseline_per_s']:,.1f} /s (ratio {row['ratio']:.3f})"
        extra = {k: v for k, v in row.items() if k not in ("analysis", "per_s", "baseline", "baseline_per_s", "ratio")}
        if extra:
            line += "   " + ", ".join(f"{k} {v}" for k, v in extra.items())
        print(line)
    result = {"images": n, "threads": threads, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
