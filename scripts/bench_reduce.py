"""Dataset-wide reductions at scale: the probes solvers on synthetic features.

Features are drawn as ``classes`` Gaussian clusters in ``d`` dimensions (float32, seeded), split
as ``probes`` splits them; each solver fits the same split in a process of its own (so peak
RSS is its own), timed from fit to score. scikit-learn's lbfgs is the reference; ``torch`` is
convscope's minibatch Adam + L-BFGS polish. Both report test accuracy, so agreement shows
beside the times.

    python scripts/bench_reduce.py                                  # 100k x 256, 100 classes: both solvers
    python scripts/bench_reduce.py --n 1280000 --solvers torch      # ImageNet-train-sized, torch only
    python scripts/bench_reduce.py --json reduce.json

``--json PATH`` writes one object per row: ``analysis``, ``solver``, ``n``, ``d``, ``classes``,
``peak_task_rss_bytes`` (the fitting process), ``seconds``, ``test_accuracy``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def features(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of ``classes`` overlapping Gaussian clusters in ``d`` dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.12, size=(classes, d)).astype(np.float32)  # overlapping: ~70% accuracy
    labels = rng.integers(0, classes, size=n)
    x = rng.standard_normal(size=(n, d), dtype=np.float32)
    x += centres[labels]
    return x, labels


def fit_one(solver: str, n: int, d: int, classes: int) -> dict:
    """Fit one solver (in this process) and report its time, accuracy and peak RSS."""
    from jobs.dataset.probes import TorchLogistic, make_classifier, split

    x, labels = features(n, d, classes)
    train, test = split(labels, 0.25, 0)
    start = time.time()
    if solver == "torch":
        model = TorchLogistic(C=1.0, seed=0).fit(x[train], labels[train])
    else:
        model = make_classifier("logistic", 1.0, 1000, 0, True).fit(x[train], labels[train])
    seconds = time.time() - start
    accuracy = float(model.score(x[test], labels[test]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"analysis": "probes", "solver": solver, "n": n, "d": d, "classes": classes,
            "peak_task_rss_bytes": rss, "seconds": round(seconds, 2), "test_accuracy": round(accuracy, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--solvers", default="sklearn,torch")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: fit this solver here and print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(fit_one(args.one, args.n, args.d, args.classes)))
        return
    rows = []
    for solver in args.solvers.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", solver, "--n", str(args.n), "--d", str(args.d),
                              "--classes", str(args.classes)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| solver | n x d, classes | seconds | test accuracy | peak RSS |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['solver']} | {r['n']:,} x {r['d']:,}, {r['classes']} | {r['seconds']:.1f} s | "
              f"{r['test_accuracy']:.4f} | {r['peak_task_rss_bytes'] / 2**20:,.0f} MB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
