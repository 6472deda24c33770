"""Dataset-wide reductions at scale: peak driver and task memory, and wall time, on synthetic features.

Features are drawn as ``classes`` overlapping Gaussian clusters (float32, seeded) and written
as an entry's committed partials (Parquet part files of 100,000 rows under
``.inputs/<entry>``), so each reduction reads them exactly as in a real run and goes through
the runner's ``reduce_entry`` (memory check, reduce, staged write, commit) on an embedded
Ray. Each row runs in a process of its own: ``peak_driver_rss_bytes`` is that process' peak
resident set (object-store pages it maps included), ``peak_task_rss_bytes`` the largest peak
of any Ray worker process while it ran (sampled from /proc every 50 ms).

Rows ``before`` run the reduction as it was before blocks and the object store (the module
from git commit ``BEFORE``), on the same partials in the same run: the baseline of the ratios.

    python scripts/bench_reduce.py                                   # the table of the README
    python scripts/bench_reduce.py --rows neighbours --n 100000      # one analysis, smaller
    python scripts/bench_reduce.py --json reduce.json

``--json PATH`` writes one object per row: ``analysis``, ``variant``, ``n``, ``d``, ``queries``,
``peak_driver_rss_bytes``, ``peak_task_rss_bytes``, ``seconds`` and the row's own figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The last commit whose reductions read whole columns on the driver.
BEFORE = "5355752"
PART_ROWS = 100_000


def features(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of ``classes`` overlapping Gaussian clusters in ``d`` dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.12, size=(classes, d)).astype(np.float32)  # overlapping: ~70% accuracy
    labels = rng.integers(0, classes, size=n)
    x = rng.standard_normal(size=(n, d), dtype=np.float32)
    x += centres[labels]
    return x, labels


def write_partials(folder: Path, n: int, d: int, classes: int, column: str = "feature") -> None:
    """The partials of an entry whose ``map_batch`` returned ``image_id``, ``label``, ``column``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, n, PART_ROWS)):
        rows = min(PART_ROWS, n - start)
        x, labels = features(rows, d, classes, seed=part)
        table = pa.table({
            "image_id": pa.array([f"img-{i:08d}" for i in range(start, start + rows)]),
            "label": pa.array(labels.astype(np.int64)),
            column: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d).cast(pa.list_(pa.float32())),
        })
        # Row groups of a run's decode block or so: the workers write one part per block.
        pq.write_table(table, folder / f"part-{part:05d}-00000.parquet", row_group_size=1024)
    (folder / "_SUCCESS").write_text("{}")


class TaskPeaks(threading.Thread):
    """The largest peak RSS (VmHWM) of any Ray worker process seen while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"default_worker.py" not in cmd and not cmd.startswith(b"ray::"):
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
                except OSError:
                    continue


def before_module(name: str) -> types.ModuleType:
    """The analysis module as it was at ``BEFORE``, loaded beside today's (unregistered)."""
    from ray import cloudpickle

    family = "dataset"
    source = subprocess.run(["git", "show", f"{BEFORE}:jobs/{family}/{name}.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"before_{name}")
    sys.modules[module.__name__] = module
    exec(compile(source.replace("\n@register\n", "\n"), f"before/{name}.py", "exec"), module.__dict__)
    cloudpickle.register_pickle_by_value(module)  # its task functions go to the workers by value
    return module


def make_analysis(name: str, variant: str, params: dict[str, Any]) -> Any:
    if variant == "before":
        module = before_module(name)
        cls = next(v for v in vars(module).values() if isinstance(v, type) and getattr(v, "Params", None)
                   and v.__module__ == module.__name__)
        analysis = cls(cls.Params(type=name, **params))
        analysis.name = name
        return analysis
    from jobs import REGISTRY

    return REGISTRY[name](REGISTRY[name].Params(**params))


def run_one(spec: dict) -> dict:
    """Reduce one entry (in this process) through the runner's ``reduce_entry``."""
    import ray
    import torch

    from pipeline.reduce import RunContext, reduce_entry
    from pipeline.store import Store

    ray.init(num_cpus=spec["cpus"], include_dashboard=False, log_to_driver=False)
    analysis = make_analysis(spec["analysis"], spec["variant"], spec["params"])
    store = Store.open(spec["folder"])
    ctx = RunContext.__new__(RunContext)  # no dataset: nothing here renders images
    ctx.device, ctx.input_size, ctx.label_names, ctx.workers = torch.device("cpu"), (32, 32), None, spec["workers"]
    ctx._log = lambda message: None
    execution = types.SimpleNamespace(rows_per_part=100_000, driver_memory=None)
    manifest = types.SimpleNamespace(analyses=[analysis.params], execution=execution)
    peaks = TaskPeaks()
    peaks.start()
    start = time.time()
    stats = reduce_entry(manifest, store, analysis, ctx, {"key": spec["variant"]})  # type: ignore[arg-type]
    seconds = time.time() - start
    peaks.done.set()
    peaks.join()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    keep = {k: v for k, v in stats.items() if k in ("queries", "database", "recall_at_k", "rows")}
    return {"analysis": spec["analysis"], "variant": spec["variant"], "n": spec["n"], "d": spec["d"],
            "queries": spec.get("queries"), "peak_driver_rss_bytes": rss, "peak_task_rss_bytes": peaks.peak,
            "seconds": round(seconds, 2), **keep}


def probes_one(n: int, d: int, classes: int, solver: str) -> dict:
    """Fit one probes solver (in this process) and report its time, accuracy and peak RSS."""
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
    return {"analysis": "probes", "variant": solver, "n": n, "d": d, "classes": classes, "queries": None,
            "peak_driver_rss_bytes": rss, "peak_task_rss_bytes": 0, "seconds": round(seconds, 2),
            "test_accuracy": round(accuracy, 4)}


def child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:  # a row that fails (the baseline out of memory, say) is a row too
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"analysis": spec.get("analysis", "probes"), "variant": spec.get("variant", spec.get("probes")),
                "n": spec["n"], "d": spec["d"], "queries": spec.get("queries"), "peak_driver_rss_bytes": 0,
                "peak_task_rss_bytes": 0, "seconds": 0.0, "failed": f"exit {out.returncode}: {last[:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan(args: argparse.Namespace, scratch: Path) -> list[dict]:
    """The rows to run: (analysis, variant, sizes, params), partials written as needed."""
    specs: list[dict] = []
    wanted = args.rows.split(",")
    cpus, workers = os.cpu_count() or 1, max(1, (os.cpu_count() or 1))
    sizes = [(n, d) for n, d in [(args.n, args.d), (args.wide_n, args.wide_d)] if n > 0]

    def partials(n: int, d: int) -> str:
        """A fresh run folder for one row (a commit removes its partials), linked to one written copy."""
        source = scratch / f"features-{n}x{d}"
        if not (source / "_SUCCESS").exists():
            write_partials(source, n, d, args.classes)
        folder = scratch / f"row-{len(specs)}"
        (folder / ".inputs" / "neighbours").mkdir(parents=True)
        for f in source.iterdir():
            os.link(f, folder / ".inputs" / "neighbours" / f.name)
        return str(folder)

    for n, d in sizes:
        if "neighbours" in wanted:
            for variant in args.variants.split(","):
                specs.append({"analysis": "neighbours", "variant": variant, "n": n, "d": d, "queries": args.queries,
                              "folder": partials(n, d), "cpus": cpus, "workers": workers,
                              "params": {"spaces": ["feature"], "layer": "x", "k": 5, "render": False,
                                         "queries": {"sample": args.queries, "seed": 0}}})
    if "neighbours_all" in wanted:
        n, d = args.all_n, args.d
        for variant in args.variants.split(","):
            specs.append({"analysis": "neighbours", "variant": variant, "n": n, "d": d, "queries": n,
                          "folder": partials(n, d), "cpus": cpus, "workers": workers,
                          "params": {"spaces": ["feature"], "layer": "x", "k": 5, "render": False,
                                     "queries": "all"}})
    if "probes" in wanted:
        for solver in args.solvers.split(","):
            specs.append({"probes": solver, "n": args.n, "d": args.d, "classes": args.classes})
    return specs


def table(rows: list[dict]) -> str:
    lines = ["| analysis | variant | n x d | queries | seconds | peak driver RSS | peak task RSS | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = f"accuracy {r['test_accuracy']:.4f}" if "test_accuracy" in r else ""
        if "failed" in r:
            note = f"failed ({r['failed']})"
        if "same_as_before" in r:
            note = "table equal to before's" if r["same_as_before"] else "TABLE DIFFERS from before's"
        lines.append(f"| {r['analysis']} | {r['variant']} | {r['n']:,} x {r['d']:,} | "
                     f"{r['queries'] if r['queries'] is not None else ''} | {r['seconds']:.1f} s | "
                     f"{r['peak_driver_rss_bytes'] / 2**30:.2f} GiB | {r['peak_task_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{note} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="neighbours,neighbours_all,probes",
                   help="comma-separated: neighbours (1,000 queries at both sizes), neighbours_all, probes")
    p.add_argument("--variants", default="before,after", help="neighbours: before (commit BEFORE), after")
    p.add_argument("--n", type=int, default=1_280_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--wide-n", type=int, default=100_000, help="the second size of neighbours (0: none)")
    p.add_argument("--wide-d", type=int, default=2048)
    p.add_argument("--all-n", type=int, default=50_000, help="database (and queries) of neighbours_all")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--solvers", default="torch", help="probes: sklearn, torch")
    p.add_argument("--scratch", type=Path, help="where the partials go (default: a temporary folder)")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this row here and print JSON
    args = p.parse_args()
    if args.one:
        spec = json.loads(args.one)
        if "probes" in spec:
            print(json.dumps(probes_one(spec["n"], spec["d"], spec["classes"], spec["probes"])))
        else:
            print(json.dumps(run_one(spec)))
        return
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        rows: list[dict] = []
        before: dict[tuple, Any] = {}
        for spec in plan(args, Path(scratch)):
            row = child(spec)
            if "folder" in spec and "failed" not in row:
                # The committed table, against the baseline's on the same partials.
                import pyarrow.parquet as pq

                got = pq.read_table(Path(spec["folder"]) / spec["analysis"])
                same = (spec["analysis"], spec["n"], spec["d"], spec["queries"])
                if spec["variant"] == "before":
                    before[same] = got
                elif same in before and before[same] is not None:
                    row["same_as_before"] = bool(got.equals(before[same]))
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
