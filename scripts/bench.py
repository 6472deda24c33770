"""Throughput of convscope against a plain PyTorch loop and the peer libraries, in one run.

For each analysis, convscope runs a one-entry manifest end to end (files -> Ray Data decode
-> model actor -> Parquet; Ray is started once beforehand and its start-up is reported
apart) and each baseline runs in this process on the same image files, model, batch size,
device and precision (``scripts/bench_peers.py``). Every ratio is convscope's images/s over
the baseline's, printed beside an agreement check of the two results: a faster wrong answer
does not count.

Cases: ``cifar`` -- the trained ResNet-20 on the CIFAR-10 test images of ``../shared`` (CPU);
``resnet50`` -- torchvision ResNet-50 (seeded random weights) at 224x224 on generated JPEGs,
on the GPU in bfloat16 + channels_last when there is one (also against the model-only bound:
the same model in a tight loop on tensors already on the GPU).

    python scripts/bench.py                       # full: the cifar case, + resnet50 on a GPU
    python scripts/bench.py --quick               # a smoke test: a few images, agreement only
    python scripts/bench.py --case resnet50 --images 2000 --json bench.json
    python scripts/bench.py --case resnet50 --compile --gpu-decode   # with execution.compile, decode: gpu
    python scripts/bench.py --neighbours-only     # exact kNN vs faiss IndexFlat on generated vectors
    python scripts/bench.py --case cifar --only demo occlusion_incremental --images 512 --repeats 1

The cifar case also times incremental occlusion against the batched sweep (the demo CNN, the
ResNet-20, and a 224 px ResNet-50 outside ``--quick``) and, outside ``--quick``, the demo
manifest as a whole ``convscope run`` against its 90 s target.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import bench_peers as peers  # noqa: E402

SHARED = Path(os.environ.get("CONVSCOPE_SHARED", ROOT.parent / "shared"))
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class Case:
    """One model, one set of image files and one way of running them, for every row."""

    name: str
    paths: list[str]
    labels: list[int]
    model: dict
    execution: dict
    work: Path
    note: str = ""
    rows: list[dict] = field(default_factory=list)
    startup: float = 0.0

    @property
    def device(self) -> torch.device:
        return torch.device(self.execution["device"])

    def repeated(self, n: int) -> Case:
        """The case with its files listed over and over up to ``n`` (new ids: every entry is
        an image of its own to convscope), for runs longer than the dataset."""
        reps = -(-n // len(self.paths))
        return replace(self, paths=(self.paths * reps)[:n], labels=(self.labels * reps)[:n],
                       work=self.work / f"x{reps}")

    def loop(self, n: int, loader_workers: int) -> peers.Loop:
        from pipeline.manifest import MODEL_SOURCES

        spec = MODEL_SOURCES[self.model["source"]].model_validate(self.model)
        return peers.Loop(self.paths[:n], spec, self.execution["batch_size"], loader_workers, self.device,
                          self.execution.get("precision", "float32"), self.execution.get("channels_last", False))

    def manifest(self, entries: list[dict], n: int, output: Path) -> Path:
        """A manifest of ``entries`` over the first ``n`` images (a CSV list: both sides read
        exactly the same files in the same order)."""
        listing = self.work / f"images-{n}.csv"
        if not listing.exists():
            lines = ["path,label,image_id"] + [f"{p},{lab},{i:07d}" for i, (p, lab) in
                                               enumerate(zip(self.paths[:n], self.labels[:n]))]
            listing.write_text("\n".join(lines) + "\n")
        path = output.with_suffix(".yaml")
        path.write_text(yaml.safe_dump({
            "name": "bench", "output": str(output), "dataset": {"kind": "list", "path": str(listing)},
            "model": self.model, "analyses": entries, "execution": self.execution}, sort_keys=False))
        return path


def run_convscope(case: Case, entries: list[dict], n: int, tag: str) -> tuple[float, Path]:
    """Seconds for ``convscope run`` of ``entries`` on the first ``n`` images (Ray already up)."""
    from pipeline.execute import run_manifest
    from pipeline.manifest import load_manifest

    output = case.work / f"out-{tag}"
    shutil.rmtree(output, ignore_errors=True)
    manifest = load_manifest(case.manifest(entries, n, output))
    start = time.perf_counter()
    result = run_manifest(manifest, log=lambda message: None)
    seconds = time.perf_counter() - start
    failed = {k: v.get("error") for k, v in result.analyses.items() if v.get("status") == "failed"}
    if failed:
        raise RuntimeError(f"convscope run failed: {failed}")
    return seconds, output


def read_rows(output: Path, entry: str, columns: list[str] | None = None):
    import pandas as pd

    df = pd.read_parquet(output / entry, columns=columns)
    return df.sort_values("image_id", kind="stable") if "image_id" in df else df


def stack_maps(df, column: str = "map") -> np.ndarray:
    """(N, h, w) maps from the flattened column and the ``height``/``width`` columns."""
    h, w = int(df.height.iloc[0]), int(df.width.iloc[0])
    return np.stack(df[column].to_numpy()).reshape(len(df), -1, h, w).squeeze(1)


def add_row(case: Case, analysis: str, n: int, ours: float, baseline: str, theirs: float | None,
            agreement: str, target: str = "", agree_ok: bool = True, extra: dict | None = None,
            startup: str = "ours") -> None:
    """Record and print one row. ``startup``: which side pays convscope's per-run start-up
    (``ours``, ``both`` -- convscope against itself -- or ``none``: kernels on vectors)."""
    def rate(seconds: float) -> float:
        return round(n / seconds, 1 if n / seconds >= 10 else 3)  # a 224 px occlusion: < 1 image/s

    row = {"case": case.name, "analysis": analysis, "images": n, "convscope_s": round(ours, 6),
           "convscope_images_per_s": rate(ours), "baseline": baseline,
           # Microseconds: a 256-vector search by faiss takes well under a millisecond.
           "baseline_s": None if theirs is None else round(theirs, 6),
           "baseline_images_per_s": None if theirs is None else rate(theirs),
           "ratio": None if theirs is None else round(theirs / ours, 2), "target": target,
           "agreement": agreement, "agrees": bool(agree_ok), **(extra or {})}
    if (theirs is not None and startup != "none" and case.startup and ours > 2 * case.startup
            and "ratio_after_startup" not in row):
        # convscope's fixed cost per run (model actor start, Ray Data set-up), measured as a
        # one-batch run, taken out: the throughput once running.
        paid = case.startup if startup == "both" else 0.0
        row["ratio_after_startup"] = round((theirs - paid) / (ours - case.startup), 2)
    case.rows.append(row)
    ratio = "" if row["ratio"] is None else f"{row['ratio']:5.2f}x"
    if row.get("ratio_after_startup") is not None:
        agreement += f"  [{row['ratio_after_startup']:.2f}x after start-up]"
    def shown(rate: float) -> str:
        return format(rate, ",.0f" if rate >= 10 else ".2f")

    print(f"  {analysis:<16} {n:>6} {shown(row['convscope_images_per_s']):>9}  vs {baseline:<34} "
          f"{'' if theirs is None else shown(row['baseline_images_per_s']):>8}  {ratio:>6} "
          f"{target:<8} {'ok ' if agree_ok else 'NO '} {agreement}", flush=True)


def median_runs(repeats: int, *fns: Callable[[], tuple]) -> list[tuple[float, object]]:
    """Run the functions alternately ``repeats`` times; each one's median seconds and last result."""
    times: list[list[float]] = [[] for _ in fns]
    last: list[object] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            seconds, result = fn()
            times[i].append(seconds)
            last[i] = result
    return [(statistics.median(t), r) for t, r in zip(times, last)]


# ----------------------------------------------------------------------------- rows


def bench_features(case: Case, n: int, layers: list[str], repeats: int, loader_workers: int,
                   label: str = "features", startup: bool = True) -> dict:
    """features end to end vs the plain loop; start-up measured as a one-batch run."""
    loop = case.loop(n, loader_workers)
    entry = [{"type": "features", "layers": layers, "pool": "avg"}]

    def ours():
        seconds, out = run_convscope(case, entry, n, "features")
        df = {layer: read_rows(out, f"features/layer={layer}") for layer in layers}
        return seconds, {layer: np.stack(d.vector.to_numpy()) for layer, d in df.items()}

    bs = case.execution["batch_size"]
    if startup:
        run_convscope(case, entry, min(bs, n), "warm-up")  # first-run imports in this process are not a run's
        case.startup = statistics.median(run_convscope(case, entry, min(bs, n), "startup")[0] for _ in range(repeats))
    startup = case.startup
    (t_ours, got), (t_plain, ref) = median_runs(repeats, ours, lambda: peers.features_loop(loop, layers))
    diff = max(float(np.abs(got[layer] - ref[layer]).max()) for layer in layers)
    tol = 1e-4 if case.execution.get("precision", "float32") == "float32" else 5e-2
    extra = {"startup_s": round(startup, 2)}
    if n >= 4 * bs:
        extra["ratio_after_startup"] = round(t_plain / (t_ours - startup), 2) if t_ours > startup else None
    add_row(case, label, n, t_ours, "plain PyTorch loop", t_plain, f"max |diff| {diff:.1e}", ">=0.9x",
            diff <= tol * max(1.0, float(np.abs(ref[layers[-1]]).max())), extra)
    after = ("" if extra.get("ratio_after_startup") is None
             else f"; after it, {extra['ratio_after_startup']:.2f}x the loop")
    print(f"    start-up of a map stage (a one-batch run, {min(bs, n)} images): {startup:.2f} s{after}", flush=True)
    return {"seconds": t_ours, "features": got}


def timed_process(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``command`` from the repository root (this checkout importable); its wall seconds
    and the finished process."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    return time.perf_counter() - start, done


def bench_process(case: Case, n: int, layers: list[str], repeats: int, loader_workers: int) -> None:
    """features as whole processes: ``convscope run`` (Python, imports, an embedded Ray of its
    own, the run) against a script doing the plain loop (Python, imports, the loop)."""
    entry = [{"type": "features", "layers": layers, "pool": "avg"}]
    case.work.mkdir(parents=True, exist_ok=True)
    output = case.work / "out-process"
    manifest = case.manifest(entry, n, output)

    def timed(command: list[str]) -> float:
        seconds, done = timed_process(command)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return seconds

    def ours():
        shutil.rmtree(output, ignore_errors=True)
        seconds = timed([sys.executable, "-m", "pipeline.cli", "run", str(manifest)])
        return seconds, np.stack(read_rows(output, f"features/layer={layers[-1]}").vector.to_numpy())

    def plain():
        out = case.work / "plain-process.npz"
        seconds = timed([sys.executable, "-m", "scripts.bench_peers", "features", str(manifest), str(out),
                         "--layers", *layers, "--loader-workers", str(loader_workers)])
        return seconds, np.load(out)[layers[-1]]

    (t_ours, got), (t_plain, ref) = median_runs(repeats, ours, plain)
    diff = float(np.abs(got - ref).max())
    tol = 1e-4 if case.execution.get("precision", "float32") == "float32" else 5e-2
    add_row(case, "features process", n, t_ours, "plain loop script, whole process", t_plain,
            f"max |diff| {diff:.1e}", ">=0.9x", diff <= tol * max(1.0, float(np.abs(ref).max())), startup="none")


def bench_fast_path(case: Case, n: int, layers: list[str], repeats: int, loader_workers: int,
                    reference: dict[str, np.ndarray]) -> None:
    """features with the fast-path options, convscope and the plain loop both using them."""
    for options in ({"channels_last": True}, {"channels_last": True, "precision": "bfloat16"}):
        fast = replace(case, execution={**case.execution, **options}, rows=[])
        loop = fast.loop(n, loader_workers)
        entry = [{"type": "features", "layers": layers, "pool": "avg"}]

        def ours(fast=fast, entry=entry):
            seconds, out = run_convscope(fast, entry, n, "fast")
            return seconds, {layer: np.stack(read_rows(out, f"features/layer={layer}").vector.to_numpy())
                             for layer in layers}

        (t_ours, got), (t_plain, ref) = median_runs(repeats, ours, lambda loop=loop: peers.features_loop(loop, layers))
        err = max(float(np.abs(got[layer] - reference[layer]).max() / np.abs(reference[layer]).max())
                  for layer in layers)
        label = "+".join({"channels_last": "NHWC", "bfloat16": "bf16"}[k if v is True else v]
                         for k, v in options.items())
        tol = 1e-4 if "precision" not in options else 0.1
        add_row(case, f"features {label}", n, t_ours, f"plain loop, {label}", t_plain,
                f"vs float32 NCHW: max rel. diff {err:.1e}", "", err <= tol)
        case.rows[-1]["options"] = options


def bench_stats(case: Case, n: int, layers: list[str], features_s: float, repeats: int, loader_workers: int) -> None:
    """activation_stats and top_patches end to end vs features alone on the same layers, and
    vs a plain loop computing channel means and top-k maxima."""
    loop = case.loop(n, loader_workers)
    k = 9

    def stats():
        seconds, out = run_convscope(case, [{"type": "activation_stats", "layers": layers}], n, "stats")
        return seconds, read_rows(out, "activation_stats")

    def patches():
        seconds, out = run_convscope(case, [{"type": "top_patches", "layers": layers, "k": k, "render": False}],
                                     n, "patches")
        return seconds, read_rows(out, "top_patches")

    (t_stats, st), (t_patch, tp), (t_plain, ref) = median_runs(
        repeats, stats, patches, lambda: peers.stats_loop(loop, layers, k))
    worst_mean, worst_top = 0.0, 0.0  # relative to each layer's largest value
    for layer in layers:
        s = st[st.layer == layer].sort_values("channel")
        scale = max(1e-12, float(np.abs(ref[layer]["top"]).max()))
        worst_mean = max(worst_mean, float(np.abs(s["mean"].to_numpy() - ref[layer]["mean"]).max()) / scale)
        p = tp[tp.layer == layer].sort_values(["channel", "rank"])
        values = p.groupby("channel")["activation"].apply(lambda v: np.sort(v.to_numpy())[::-1]).to_dict()
        for c, v in values.items():
            worst_top = max(worst_top, float(np.abs(v - ref[layer]["top"][c][:len(v)]).max()) / scale)
    tol = 1e-5 if case.execution.get("precision", "float32") == "float32" else 5e-2
    add_row(case, "activation_stats", n, t_stats, "convscope features alone", features_s,
            f"channel means vs loop: max rel. diff {worst_mean:.1e}", ">=0.8x", worst_mean <= tol, startup="both")
    add_row(case, "activation_stats", n, t_stats, "plain PyTorch loop", t_plain, "(as above)", "", worst_mean <= tol)
    add_row(case, "top_patches", n, t_patch, "convscope features alone", features_s,
            f"top-{k} values vs loop: max rel. diff {worst_top:.1e}", ">=0.8x", worst_top <= tol, startup="both")
    add_row(case, "top_patches", n, t_patch, "plain PyTorch loop", t_plain, "(as above)", "", worst_top <= tol)


@dataclass
class Attr:
    """One attribution row: the convscope entry, how to read its maps, and the peers."""

    entry: dict
    # (name, method, options): batch_size, target, relu_modules, upsampled (compare at the
    # peer's input resolution), noise_floor (SmoothGrad), best_of (captum Occlusion)
    peers: list[tuple[str, peers.Method | None, dict]]
    read: Callable[[object, tuple[int, int]], np.ndarray]
    min_corr: float = 0.99
    target: str = ">=1x"


def _maps(df, size):
    return stack_maps(df)


def _occlusion(window: int, stride: int):
    def read(df, size):
        from jobs.attribution.occlusion import pixel_drop

        prob = torch.from_numpy(stack_maps(df, "prob_map"))
        if prob.dim() == 2:
            prob = prob[None]
        drop = torch.tensor(df.score.to_numpy(), dtype=torch.float32).view(-1, 1, 1) - prob
        return pixel_drop(drop, size, window, stride).numpy()
    return read


def attribution_rows(case: Case, quick: bool) -> dict[str, tuple[Attr, int]]:
    layer = "layer3" if case.name == "cifar" else "layer4"
    window, stride = (8, 4) if case.name == "cifar" else (32, 16)
    sg = {"samples": 4 if quick else 25, "sigma": 0.15}
    base = {"metrics": False, "render": False}

    def n(full, small):
        return small if quick else full

    occ_best = {"best_of": [1, 2, 4, 16]}
    # captum's ReLU rules hook nn.ReLU modules only: it gets the model with its F.relu as modules.
    relu = {"relu_modules": True}
    rows = {
        "saliency": (Attr({"type": "saliency", **base}, [("captum Saliency", peers.captum_saliency, {})], _maps),
                     n(5000, 32)),
        "smoothgrad": (Attr({"type": "saliency", "name": "smoothgrad", "smoothgrad": sg, **base},
                            [("captum NoiseTunnel(Saliency)", peers.captum_smoothgrad(sg["samples"], sg["sigma"]),
                              {"noise_floor": True})], _maps, target="(none)"), n(1000, 16)),
        "guided_backprop": (Attr({"type": "guided_backprop", **base},
                                 [("captum GuidedBackprop", peers.captum_guided_backprop, relu)], _maps),
                            n(5000, 32)),
        "deconvnet": (Attr({"type": "deconvnet", **base},
                           [("captum Deconvolution", peers.captum_deconvolution, relu)], _maps, target="(none)"),
                      n(5000, 32)),
        "grad_cam": (Attr({"type": "grad_cam", "layer": layer, **base},
                          [("captum LayerGradCam", peers.captum_grad_cam(layer), {}),
                           ("pytorch-grad-cam GradCAM", peers.pytorch_grad_cam(layer), {"upsampled": True})],
                          _maps), n(10000, 32)),
        "guided_grad_cam": (Attr({"type": "guided_grad_cam", "layer": layer, **base},
                                 [("captum GuidedGradCam", peers.captum_guided_grad_cam(layer), relu)], _maps,
                                 target="(none)"), n(5000, 32)),
        "occlusion": (Attr({"type": "occlusion", "window": window, "stride": stride, **base},
                           [("captum Occlusion, default", peers.captum_occlusion(window, stride, 1),
                             {"target": ">=5x"}),
                            ("captum Occlusion, best per_eval", None, occ_best),
                            ("captum Occlusion, one image a call", peers.captum_occlusion(window, stride, 1),
                             {"batch_size": 1, "target": "(notebook)"})],
                           _occlusion(window, stride), target=">=1.2x"), n(500, 8)),
    }
    return rows


def bench_attribution(case: Case, name: str, spec: Attr, n: int, loader_workers: int) -> None:
    loop = case.loop(n, loader_workers)
    t_ours, out = run_convscope(case, [spec.entry], n, name)
    df = read_rows(out, spec.entry.get("name", spec.entry["type"]))
    crop = case.model["preprocess"]["crop"]  # every case fixes a square crop
    size = (crop, crop)
    ours = spec.read(df, size)
    for peer, method, opts in spec.peers:
        if not peers.installed("captum" if peer.startswith("captum") else "pytorch_grad_cam"):
            print(f"  {name:<16} {peer}: not installed (pip install -e .[bench]); skipped", flush=True)
            continue
        label = peer
        if "best_of" in opts:
            method, per_eval = best_occlusion(loop, spec, opts["best_of"])
            label = f"{peer} ({per_eval})"
        if opts.get("relu_modules"):
            label = f"{peer} (ReLUs as modules)"
        theirs_s, theirs = peers.attribution_loop(loop, method, opts.get("batch_size"), opts.get("relu_modules", False))
        if opts.get("upsampled"):
            mine = peers.resize_maps(ours, theirs.shape[1:])
        else:
            mine = ours
        corr = peers.correlations(mine, theirs)
        agree = f"map correlation median {np.median(corr):.3f}, min {corr.min():.3f}"
        ok = float(np.median(corr)) >= spec.min_corr
        if opts.get("noise_floor"):
            # Two SmoothGrads with different noise never agree exactly: the bar is how well the
            # peer agrees with itself under another seed.
            again = peers.attribution_loop(loop, method, opts.get("batch_size"), seed=1)[1]
            floor = float(np.median(peers.correlations(theirs, again)))
            agree += f" (captum vs itself, another seed: {floor:.3f})"
            ok = float(np.median(corr)) >= floor - 0.05
        add_row(case, name, n, t_ours, label, theirs_s, agree, opts.get("target", spec.target), ok)


def best_occlusion(loop: peers.Loop, spec: Attr, options: list[int]):
    """captum's fastest ``perturbations_per_eval`` of ``options``, timed on one full batch of
    the loop (its own batch size: the inputs per forward are batch x per_eval)."""
    window, stride = spec.entry["window"], spec.entry["stride"]
    probe = peers.Loop(loop.paths[:min(len(loop.paths), loop.batch_size)], loop.model_spec, loop.batch_size,
                       loop.loader_workers, loop.device, loop.precision, loop.channels_last)
    times = {}
    for per_eval in options:
        times[per_eval] = peers.attribution_loop(probe, peers.captum_occlusion(window, stride, per_eval))[0]
    best = min(times, key=times.get)
    return peers.captum_occlusion(window, stride, best), f"per_eval={best}"


def bench_neighbours(case: Case, vectors: np.ndarray, k: int, metric: str, repeats: int, label: str = "") -> None:
    """Exact kNN of every vector among all (itself excluded): convscope's kernel vs faiss IndexFlat."""
    from jobs.dataset.neighbours import knn

    def ours():
        x = torch.from_numpy(np.ascontiguousarray(vectors, np.float32))
        start = time.perf_counter()
        _, idx = knn(x, x, k, metric, exclude=torch.arange(len(x)))
        return time.perf_counter() - start, idx.numpy()

    if not peers.installed("faiss"):
        print("  neighbours: faiss not installed (pip install -e .[bench]); skipped", flush=True)
        return
    # One untimed call of each on a slice first: imports, thread pools and first allocations are not timed.
    warm = torch.from_numpy(np.ascontiguousarray(vectors[:4096], np.float32))
    knn(warm, warm, k, metric, exclude=torch.arange(len(warm)))
    peers.faiss_knn(warm.numpy(), k, metric)
    (t_ours, got), (t_faiss, ref) = median_runs(repeats, ours, lambda: peers.faiss_knn(vectors, k, metric))
    same_lists = float(np.mean([list(a) == list(b) for a, b in zip(got, ref)]))
    same_sets = float(np.mean([set(a) == set(b) for a, b in zip(got, ref)]))
    shape = f"{len(vectors)}x{vectors.shape[1]}"
    what = f"{label + ' ' if label else ''}{shape} {metric}: "
    add_row(case, "neighbours", len(vectors), t_ours, "faiss IndexFlat", t_faiss,
            f"{what}equal ids: {same_lists:.1%} (as sets {same_sets:.1%})", ">=1x", same_sets >= 0.99,
            extra={"vectors": shape, "data": label or "features", "metric": metric}, startup="none")


def synthetic_vectors(n: int, d: int, kind: str, seed: int = 0) -> np.ndarray:
    """float32 vectors: standard normal (``random``), or around n / 100 centres (``clustered``)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=(n, d)).astype(np.float32)
    centres = rng.normal(size=(max(1, n // 100), d)) * 4
    return (centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, d))).astype(np.float32)


def bench_neighbour_sizes(case: Case, quick: bool, repeats: int) -> None:
    """Exact kNN (k = 8) on 10k x 64 and (not with --quick: minutes on a few cores) 100k x 256 vectors,
    random and clustered, cosine and l2."""
    sizes = [(10_000, 64)] if quick else [(10_000, 64), (100_000, 256)]
    for n, d in sizes:
        for kind in ("random", "clustered"):
            vectors = synthetic_vectors(n, d, kind)
            for metric in ("cosine", "l2"):
                bench_neighbours(case, vectors, 8, metric, repeats, kind)


def bench_demo(case: Case, manifest: Path = ROOT / "manifests" / "demo.yaml", target_s: float = 90.0) -> dict:
    """The demo as a user meets it: ``convscope run`` of ``manifest`` as a whole process into a
    new folder, timed against ``target_s``; it agrees when every entry completes and stderr has
    no error-level line (a healthy run's log is quiet). A first run trains and caches the demo
    CNN when it is not cached yet (untimed, as the README's timing assumes)."""
    def run(output: Path) -> tuple[float, subprocess.CompletedProcess]:
        shutil.rmtree(output, ignore_errors=True)
        return timed_process([sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--output", str(output)])

    model = yaml.safe_load(manifest.read_text())["model"]
    weights = (manifest.parent / model["weights"]).resolve() if model.get("weights") else None
    if weights is not None and not weights.is_file():
        run(case.work / "demo-first")  # trains and caches the CNN
    seconds, done = run(case.work / "demo")
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line or line.startswith("ERROR")]
    info = json.loads((case.work / "demo" / "run.json").read_text()) if done.returncode == 0 else {}
    incomplete = sorted(name for name, a in info.get("analyses", {}).items() if a.get("status") != "complete")
    ok = done.returncode == 0 and not incomplete and not errors
    agreement = (f"exit {done.returncode}" if done.returncode else
                 f"{len(info['analyses'])} entries complete" if not incomplete else f"incomplete: {incomplete}")
    agreement += f"; {len(errors)} error-level log lines" + (f" (first: {errors[0][:120]})" if errors else "")
    # Images: the dataset's; the "baseline" is the target, so the ratio is >= 1 when it is met.
    n = int(info.get("dataset", {}).get("images", 0)) or 1
    add_row(case, "demo", n, seconds, f"target: {target_s:.0f} s", target_s, agreement, f"<={target_s:.0f}s", ok,
            extra={"manifest": str(manifest)}, startup="none")
    return {"seconds": seconds, "errors": errors, "incomplete": incomplete, "returncode": done.returncode}


def bench_incremental(case: Case, quick: bool) -> None:
    """Exact incremental occlusion (Krypton, Nakandala et al., SIGMOD 2019) against the batched
    sweep: the same kernel, ``occlusion_sweep``, with and without ``incremental``, in this
    process (``scripts/bench_occlusion.py``): the goal's two models, and the demo CNN, where
    the changed regions stay small. A model whose regions save too little runs the sweep."""
    from scripts import bench_occlusion

    runs = [("demo CNN", 64, ["--model", "demo", "--size", "64", "--images", "2" if quick else "8",
                              "--window", "12", "--stride", "4"]),
            ("ResNet-20", 32, ["--images", "2" if quick else "50", "--window", "8", "--stride", "4",
                               "--shared-dir", str(SHARED)])]  # random weights and images without ../shared
    if not quick:  # two 224 px images: about a minute on two CPU cores
        runs.append(("ResNet-50", 224, ["--model", "resnet50", "--size", "224", "--images", "2", "--window", "32",
                                        "--stride", "16", "--chunk", "8", "--repeat", "2"]))
    for name, size, argv in runs:
        with contextlib.redirect_stdout(io.StringIO()):  # its own report: the row says it here
            r = bench_occlusion.main([*argv, "--skip-loop"])
        how = (f"{100 * r['incremental_work_share']:.0f}% of the convolution work" if r["incremental"]
               else f"ran the sweep: {r['incremental_why_not']}")
        diff = r["incremental_max_abs_prob_diff"]
        add_row(case, "occlusion incr.", r["images"], r["incremental_seconds"],
                f"batched sweep ({name}, {size} px, window {r['window']} stride {r['stride']})", r["sweep_seconds"],
                f"max |prob diff| {diff:.1e}; {how}", ">=2x", diff <= 1e-5,
                extra={"model": name, "incremental": r["incremental"], "work_share": r["incremental_work_share"],
                       "chunk": r["chunk"]}, startup="none")


def bench_embedding(case: Case, vectors: np.ndarray) -> None:
    """t-SNE: openTSNE as convscope runs it vs scikit-learn TSNE, on the same PCA-50 inputs."""
    from jobs.dataset.embedding import principal_components, tsne

    scores, _ = principal_components(vectors, min(50, vectors.shape[1]))
    perplexity = min(30.0, (len(vectors) - 1) / 3)
    start = time.perf_counter()
    ours = tsne(scores, scores[:, :2], perplexity)
    t_ours = time.perf_counter() - start
    t_sk, theirs = peers.sklearn_tsne(scores, perplexity)
    a, b = peers.neighbour_preservation(scores, ours), peers.neighbour_preservation(scores, theirs)
    add_row(case, "embedding tsne", len(vectors), t_ours, "scikit-learn TSNE", t_sk,
            f"10-NN kept: openTSNE {a:.2f}, sklearn {b:.2f}", "(none)", a >= b - 0.05, startup="none")


def bench_gpu_bound(case: Case, n_batches: int = 30) -> None:
    """Model-only bound: the model alone in a tight loop on batches already on the GPU."""
    loop = case.loop(1, 0)
    model = loop.load_model()
    h = w = case.model["preprocess"]["crop"]
    x = torch.randn(case.execution["batch_size"], 3, h, w, device=loop.device)
    if loop.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), loop.autocast():
        for _ in range(5):
            model(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n_batches):
            model(x)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rate = n_batches * len(x) / seconds
    features = next(r for r in case.rows if r["analysis"] == "features")
    share = features["convscope_images_per_s"] / rate
    row = {"case": case.name, "analysis": "model-only bound", "images_per_s": round(rate, 1),
           "features_share_of_bound": round(share, 3), "gpu": torch.cuda.get_device_name(), "target": ">=0.4"}
    case.rows.append(row)
    print(f"  model alone on {row['gpu']}: {rate:,.0f} images/s; features end to end reaches {share:.0%} of it "
          f"(target >= 40%)", flush=True)


# ----------------------------------------------------------------------------- cases


def cifar_case(work: Path, quick: bool) -> Case:
    """The trained ResNet-20 on the CIFAR-10 test images (or a random-weights one on generated
    images when ../shared is not there: agreement still means something, speed less)."""
    root = SHARED / "datasets" / "cifar10-test"
    weights = SHARED / "models" / "cifar10-resnet20.th"
    pre = {"resize": 32, "crop": 32, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    model = {"source": "builtin", "name": "cifar_resnet20", "preprocess": pre}
    if root.is_dir() and weights.is_file():
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        files = sorted((str(f), i) for i, c in enumerate(classes) for f in (root / c).iterdir())
        # A seeded shuffle, so every prefix mixes the classes (the folder is sorted by class).
        order = np.random.default_rng(0).permutation(len(files))
        files = [files[i] for i in order]
        model["weights"] = str(weights)
        note = f"trained ResNet-20, CIFAR-10 test images from {root}"
    else:
        files = generated_images(work / "images-32", 512, 32, "png")
        note = "../shared not found: a random-weights ResNet-20 on generated images"
    execution = {"workers": 1, "batch_size": 256, "device": "cpu", "precision": "float32"}
    return Case("cifar", [f for f, _ in files], [lab for _, lab in files], model, execution, work, note)


def resnet50_case(work: Path, n: int, compile: bool = False, gpu_decode: bool = False) -> Case:
    """``compile``/``gpu_decode``: execution.compile and execution.decode: gpu for convscope's runs
    (the baselines are unchanged); decoding on the GPU needs one, so without it the flag is noted
    and left off."""
    gpu = torch.cuda.is_available()
    files = generated_images(work / "images-224", n, 224, "jpg")
    pre = {"resize": 224, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    model = {"source": "torchvision", "name": "resnet50", "preprocess": pre}
    execution = {"workers": 1, "batch_size": 256 if gpu else 32, "device": "cuda" if gpu else "cpu",
                 "precision": "bfloat16" if gpu else "float32", "channels_last": gpu,
                 "compile": compile, "decode": "gpu" if gpu_decode and gpu else "cpu"}
    device = torch.cuda.get_device_name() if gpu else "CPU"
    options = [o for o, on in (("torch.compile", compile), ("GPU JPEG decode", gpu_decode and gpu)) if on]
    skipped = "; --gpu-decode left off: no GPU" if gpu_decode and not gpu else ""
    return Case("resnet50", [f for f, _ in files], [lab for _, lab in files], model, execution, work,
                f"torchvision ResNet-50 (seeded random weights), {n} generated 224x224 JPEGs, {device}"
                + (f", convscope with {' + '.join(options)}" if options else "") + skipped)


def generated_images(folder: Path, n: int, size: int, ext: str) -> list[tuple[str, int]]:
    """``n`` seeded images of smooth colour blobs, written once (two classes, alternating)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        path = folder / f"{i:06d}.{ext}"
        if not path.exists():
            c = rng.random((3, 3))
            img = np.stack([np.sin(6 * (c[0, j] * xx + c[1, j] * yy) + 6 * c[2, j]) for j in range(3)], -1)
            img = (img * 0.4 + 0.5 + rng.normal(0, 0.05, img.shape)).clip(0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(path, quality=90)
        out.append((str(path), i % 2))
    return out


# ----------------------------------------------------------------------------- main


def run_case(case: Case, args) -> None:
    quick = args.quick
    n_all = min(len(case.paths), args.images or (256 if quick else len(case.paths)))
    repeats = args.repeats or (1 if quick else 3)
    print(f"\n== {case.name}: {case.note}", flush=True)
    print(f"   batch {case.execution['batch_size']}, {case.execution['device']}, "
          f"{case.execution.get('precision', 'float32')}, torch threads {torch.get_num_threads()}", flush=True)
    print(f"  {'analysis':<16} {'images':>6} {'images/s':>9}  vs {'baseline':<34} {'images/s':>8}  "
          f"{'ratio':>6} {'target':<8} agreement", flush=True)
    layers = ["layer1", "layer2", "layer3"] if case.name == "cifar" else ["layer2", "layer3", "layer4"]
    only = set(args.only or [])

    def wanted(name: str) -> bool:
        return not only or name in only

    feats = bench_features(case, n_all, layers, repeats, args.loader_workers)
    if not quick and wanted("scale"):
        # The start-up is paid once per run: the ratio as the work grows (the files listed 3x).
        big = case.repeated(3 * n_all)
        big.work.mkdir(parents=True, exist_ok=True)
        bench_features(big, 3 * n_all, layers, repeats, args.loader_workers, "features x3", startup=False)
    if not quick and wanted("process"):
        # Whole process to whole process, start-up included, as a user meets it.
        bench_process(case.repeated(3 * n_all), 3 * n_all, layers, repeats, args.loader_workers)
    if wanted("fast_path") and case.device.type == "cpu":
        bench_fast_path(case, n_all, layers, repeats, args.loader_workers, feats["features"])
    if case.device.type == "cuda":
        bench_gpu_bound(case)
    if wanted("activation_stats") or wanted("top_patches"):
        bench_stats(case, n_all, layers, feats["seconds"], repeats, args.loader_workers)
    if case.name == "cifar" or case.device.type == "cuda":
        for name, (spec, n) in attribution_rows(case, quick).items():
            if wanted(name):
                bench_attribution(case, name, spec, min(n, len(case.paths)), args.loader_workers)
    if not quick and case.name == "cifar" and wanted("demo"):
        bench_demo(case)
    if case.device.type == "cpu" and wanted("occlusion_incremental"):
        bench_incremental(case, quick)
    vectors = feats["features"][layers[-1]]
    if wanted("neighbours"):
        bench_neighbours(case, vectors, 8, "cosine", repeats)
        bench_neighbour_sizes(case, quick, repeats)
    if wanted("embedding"):
        bench_embedding(case, vectors[: 200 if quick else 5000])


def neighbours_only(args) -> dict:
    """The kNN rows alone, on generated vectors: no images, model or Ray."""
    case = Case("vectors", [], [], {}, {"device": "cpu", "batch_size": 0}, Path("."),
                note="exact kNN on generated vectors, k = 8, every vector against all")
    print(f"\n== {case.name}: {case.note}; torch threads {torch.get_num_threads()}", flush=True)
    bench_neighbour_sizes(case, args.quick, args.repeats or (1 if args.quick else 3))
    result = {"cpus": os.cpu_count(), "torch": torch.__version__, "rows": case.rows,
              "disagreements": [r["agreement"] for r in case.rows if not r.get("agrees", True)]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=["cifar", "resnet50", "all"], default="all",
                   help="all: cifar, and resnet50 when there is a GPU")
    p.add_argument("--quick", action="store_true", help="a few images per row: a smoke test of the agreement checks")
    p.add_argument("--images", type=int, help="images for the dataset passes (default: all; 256 with --quick)")
    p.add_argument("--only", nargs="+", help="rows to run besides features (e.g. occlusion grad_cam)")
    p.add_argument("--repeats", type=int, help="runs of each timed pass, the median kept (default 3; 1 with --quick)")
    p.add_argument("--loader-workers", type=int, default=os.cpu_count() or 1,
                   help="DataLoader worker processes of the plain loops")
    p.add_argument("--work", type=Path, help="where inputs and outputs go (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write every row here")
    p.add_argument("--compile", action="store_true",
                   help="resnet50: convscope runs with execution.compile (torch.compile of the shared forward)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="resnet50: convscope runs with execution.decode: gpu (JPEGs decoded on the GPU; needs one)")
    p.add_argument("--neighbours-only", action="store_true",
                   help="only the exact kNN rows on generated vectors (no Ray, no images)")
    args = p.parse_args(argv)
    if args.neighbours_only:
        return neighbours_only(args)

    import ray

    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray_start = time.perf_counter() - start
    print(f"Ray start-up (once, not counted): {ray_start:.1f} s; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs", flush=True)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.case in ("cifar", "all"):
            cases.append(cifar_case(work / "cifar", args.quick))
        if args.case == "resnet50" or (args.case == "all" and torch.cuda.is_available()):
            cases.append(resnet50_case(work / "resnet50", args.images or (64 if args.quick else 5000),
                                       compile=args.compile, gpu_decode=args.gpu_decode))
        for case in cases:
            case.work.mkdir(parents=True, exist_ok=True)
            run_case(case, args)
    rows = [r for c in cases for r in c.rows]
    result = {"ray_start_s": round(ray_start, 2), "cpus": os.cpu_count(), "torch": torch.__version__,
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "notes": {c.name: c.note for c in cases}, "rows": rows,
              "disagreements": [f"{r['case']}/{r['analysis']} vs {r.get('baseline')}" for r in rows
                                if not r.get("agrees", True)]}
    if result["disagreements"]:
        print("\nresults that do not agree: " + "; ".join(result["disagreements"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
