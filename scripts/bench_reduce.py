"""Dataset-wide reductions at scale: peak driver and task memory, and wall time, on synthetic partials.

Each row's partials are written as an entry's committed partials (Parquet part files under
``.inputs/<entry>``, laid out as that analysis' ``map_batch`` writes them), so each reduction
reads them exactly as in a real run and goes through the runner's ``reduce_entry`` (memory
check, reduce, staged write, commit) on an embedded Ray. Each row runs in a process of its
own: ``peak_driver_rss_bytes`` is that process' peak resident set (VmHWM; object-store pages
it maps included), ``peak_task_rss_bytes`` the largest peak of any Ray worker process of that row's
Ray while it ran (sampled from /proc every 50 ms; other Ray instances on the machine are not
counted).

Rows (``--rows``, comma-separated):

* ``neighbours``: 1,000 queries (``--queries``) at both sizes (``--n`` x ``--d``, ``--wide-n`` x ``--wide-d``);
* ``neighbours_all``: every image a query, ``--all-n`` x ``--d``;
* ``embedding``: PCA of a sample of the default ``max_points`` (10,000) at both sizes;
* ``tsne``: t-SNE of every one of ``--tsne-n`` points (``max_points`` as large) x ``--d``;
* ``top_patches``: the merge of per-batch candidates (``k`` per channel of every batch of
  ``--batch`` images, ``--d`` or ``--wide-d`` channels, a part file per ``--block`` images) of
  ``--n`` or ``--wide-n`` images, with a small conv model for the receptive field;
* ``probes``: the logistic probe on 100 classes (``--classes``) at both sizes, solver ``--solvers``;
* ``probes_fit``: the probes' solvers alone (``--fit-solvers``) on ``--n`` x ``--d`` (no partials, no Ray).

Features are drawn as ``classes`` overlapping Gaussian clusters (float32, seeded). Rows
``before`` run the reduction as it was before blocks and the object store (the analysis module
from git commit ``BEFORE``, with today's runner), on the same partials in the same run: the
baseline of the ratios. Where the result is deterministic, the ``after`` row's committed table
is compared with ``before``'s (``same_as_before``). ``embedding`` at ``BEFORE`` had no
``max_points``: its ``before`` row maps every point (the same manifest entry as it ran then),
so the tables are not compared; ``tsne`` on several threads is not bit-reproducible, so its
tables are not compared either.

    python scripts/bench_reduce.py                                   # every row
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
ROWS = ("neighbours", "neighbours_all", "embedding", "tsne", "top_patches", "probes", "probes_fit")
# The layer (partition ``layer=<LAYER>``) of the per-layer analyses, and the module of the conv model.
LAYER = "x"
# The input size the model sees, and the stride of its one conv: feature maps of 8 x 8.
INPUT_SIZE, STRIDE = 32, 4


def features(n: int, d: int, classes: int, seed: int = 0, part: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of ``classes`` overlapping Gaussian clusters in ``d`` dimensions.

    ``part``: one part of a larger set, its points drawn apart from the other parts' (seeded by
    ``seed`` and ``part``) around the same cluster centres (seeded by ``seed``).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.12, size=(classes, d)).astype(np.float32)  # overlapping: ~70% accuracy
    if part is not None:
        rng = np.random.default_rng([seed, part])
    labels = rng.integers(0, classes, size=n)
    x = rng.standard_normal(size=(n, d), dtype=np.float32)
    x += centres[labels]
    return x, labels


def image_ids(start: int, stop: int) -> list[str]:
    return [f"img-{i:08d}" for i in range(start, stop)]


def write_partials(folder: Path, n: int, d: int, classes: int, column: str = "feature") -> None:
    """The partials of an entry whose ``map_batch`` returned ``image_id``, ``label``, ``column``
    (``pooled_features`` with ``column`` feature: embedding's and probes' partition of a layer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, n, PART_ROWS)):
        rows = min(PART_ROWS, n - start)
        x, labels = features(rows, d, classes, part=part)  # every part around the same centres
        table = pa.table({
            "image_id": pa.array(image_ids(start, start + rows)),
            "label": pa.array(labels.astype(np.int64)),
            column: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d).cast(pa.list_(pa.float32())),
        })
        # Row groups of a run's decode block or so: the workers write one part per block.
        pq.write_table(table, folder / f"part-{part:05d}-00000.parquet", row_group_size=1024)


def write_candidates(folder: Path, n: int, channels: int, k: int, batch: int, block: int, side: int,
                     seed: int = 0) -> int:
    """The partials of ``top_patches`` (score max) over ``n`` images: per batch of ``batch`` images,
    each channel's ``min(k, batch)`` best images with their position in a ``side`` x ``side`` map
    (``channel``, ``activation``, ``image_id``, ``y``, ``x``), a part file per ``block`` images.
    Returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    ids = pa.array(image_ids(0, n))
    written = 0
    for part, start in enumerate(range(0, n, block)):
        rng = np.random.default_rng([seed, part])
        chunks: dict[str, list[np.ndarray]] = {c: [] for c in ("channel", "activation", "image", "y", "x")}
        for first in range(start, min(n, start + block), batch):
            size = min(batch, n - first)
            per = min(k, size)
            # Each channel's candidates: distinct images of the batch, strongest first (as _candidates gives them).
            image = np.argsort(rng.random((channels, size)), axis=1)[:, :per]
            value = -np.sort(-rng.standard_normal((channels, per)).astype(np.float32), axis=1)
            chunks["channel"].append(np.repeat(np.arange(channels, dtype=np.int32), per))
            chunks["activation"].append(value.reshape(-1))
            chunks["image"].append(first + image.reshape(-1))
            chunks["y"].append(rng.integers(0, side, channels * per, dtype=np.int32))
            chunks["x"].append(rng.integers(0, side, channels * per, dtype=np.int32))
        cols = {c: np.concatenate(v) for c, v in chunks.items()}
        table = pa.table({
            "channel": pa.array(cols["channel"], pa.int32()),
            "activation": pa.array(cols["activation"], pa.float32()),
            "image_id": ids.take(pa.array(cols["image"])),
            "y": pa.array(cols["y"], pa.int32()),
            "x": pa.array(cols["x"], pa.int32()),
        })
        pq.write_table(table, folder / f"part-{part:09d}-00000.parquet")  # a part per block, as a run writes
        written += table.num_rows
    return written


def peak_rss() -> int:
    """This process' peak resident set in bytes: VmHWM, its own memory's high-water mark.

    Not ``ru_maxrss``: a child's carries its parent's peak over the exec (Linux records the
    forked memory's high-water mark), so every row would report at least the peak of the
    process that wrote the partials.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _parent(pid: str) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[1]


class TaskPeaks(threading.Thread):
    """The largest peak RSS (VmHWM) of any Ray worker process of this process' Ray seen while running.

    Workers are descendants of this process (the driver starts the raylet, the raylet its
    workers); the workers of other Ray instances on the machine are left out.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()
        self._ours: dict[str, bool] = {}

    def _descends(self, pid: str) -> bool:
        if pid not in self._ours:
            me, chain, at = str(os.getpid()), [], pid
            while at not in ("0", "1", me) and at not in self._ours:
                chain.append(at)
                at = _parent(at)
            found = at == me or self._ours.get(at, False)
            for p in chain:
                self._ours[p] = found
        return self._ours[pid]

    def run(self) -> None:
        while not self.done.wait(0.05):
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"default_worker.py" not in cmd and not cmd.startswith(b"ray::"):
                        continue
                    if not self._descends(pid):
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
                except (OSError, ValueError, IndexError):
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


def conv_model() -> Any:
    """The smallest model with a conv layer named ``LAYER``: 8 x 8 maps of a 32 x 32 input."""
    from collections import OrderedDict

    import torch

    return torch.nn.Sequential(OrderedDict([(LAYER, torch.nn.Conv2d(3, 4, kernel_size=STRIDE, stride=STRIDE))])).eval()


def figures(stats: dict) -> dict:
    """The row's own figures from the reduction's run.json stats (per layer values of ``LAYER``)."""
    keep = {k: v for k, v in stats.items() if k in ("queries", "database", "recall_at_k", "rows", "points")}
    for key in ("test_accuracy", "solver"):
        if isinstance(stats.get(key), dict) and LAYER in stats[key]:
            keep[key] = stats[key][LAYER]
    layer = (stats.get("layers") or {}).get(LAYER) or {}
    keep.update({k: layer[k] for k in ("pca_solver", "threads") if k in layer})
    return keep


def run_one(spec: dict) -> dict:
    """Reduce one entry (in this process) through the runner's ``reduce_entry``."""
    import ray
    import torch

    from pipeline.reduce import RunContext, reduce_entry
    from pipeline.store import Store

    if not ray.is_initialized():  # --in-process rows share this process' Ray
        ray.init(num_cpus=spec["cpus"], include_dashboard=False, log_to_driver=False)
    analysis = make_analysis(spec["analysis"], spec["variant"], spec["params"])
    store = Store.open(spec["folder"])
    ctx = RunContext.__new__(RunContext)  # no dataset: nothing here renders images
    ctx.device, ctx.label_names, ctx.workers = torch.device("cpu"), None, spec["workers"]
    ctx.input_size = (INPUT_SIZE, INPUT_SIZE)
    ctx.model = conv_model()  # top_patches measures its receptive field (the others never look)
    ctx._log = lambda message: None
    ctx.remote_args = store.remote_args()  # its parallel_map tasks, as a run's
    execution = types.SimpleNamespace(rows_per_part=100_000, driver_memory=None)
    manifest = types.SimpleNamespace(analyses=[analysis.params], execution=execution)
    peaks = TaskPeaks()
    peaks.start()
    start = time.time()
    stats = reduce_entry(manifest, store, analysis, ctx, {"key": spec["variant"]})  # type: ignore[arg-type]
    seconds = time.time() - start
    peaks.done.set()
    peaks.join()
    rss = peak_rss()
    return {"analysis": spec["analysis"], "variant": spec["variant"], "n": spec["n"], "d": spec["d"],
            "queries": spec.get("queries"), **spec.get("fields", {}), "peak_driver_rss_bytes": rss,
            "peak_task_rss_bytes": peaks.peak, "seconds": round(seconds, 2), **figures(stats)}


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
    rss = peak_rss()
    return {"analysis": "probes_fit", "variant": solver, "n": n, "d": d, "classes": classes, "queries": None,
            "peak_driver_rss_bytes": rss, "peak_task_rss_bytes": 0, "seconds": round(seconds, 2),
            "test_accuracy": round(accuracy, 4)}


def child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:  # a row that fails (the baseline out of memory, say) is a row too
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"analysis": spec.get("analysis", "probes_fit"), "variant": spec.get("variant", spec.get("probes")),
                "n": spec["n"], "d": spec["d"], "queries": spec.get("queries"), **spec.get("fields", {}),
                "peak_driver_rss_bytes": 0, "peak_task_rss_bytes": 0, "seconds": 0.0,
                "failed": f"exit {out.returncode}: {last[:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan(args: argparse.Namespace, scratch: Path) -> list[dict]:
    """The rows to run: (analysis, variant, sizes, params), partials written as needed."""
    specs: list[dict] = []
    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(unknown)}; expected some of {', '.join(ROWS)}")
    variants = args.variants.split(",")
    cpus, workers = os.cpu_count() or 1, max(1, (os.cpu_count() or 1))
    wide = args.wide_rows.split(",")

    def sizes_of(row: str) -> list[tuple[int, int]]:
        """``--n`` x ``--d``, and ``--wide-n`` x ``--wide-d`` for the rows of ``--wide-rows``."""
        return [(n, d) for n, d in [(args.n, args.d)] + ([(args.wide_n, args.wide_d)] if row in wide else [])
                if n > 0]

    def link(kind: str, n: int, d: int, entry: str, partition: str = "") -> tuple[str, dict]:
        """A fresh run folder for one row (a commit removes its partials), linked to one written copy:
        ``.inputs/<entry>[/<partition>]/part-*.parquet``, and the entry's ``_SUCCESS``."""
        source = scratch / f"{kind}-{n}x{d}"
        info: dict = {}
        if not (source / "_SUCCESS").exists():
            if kind == "features":
                write_partials(source, n, d, args.classes)
            else:
                rows = write_candidates(source, n, d, args.k, args.batch, args.block, INPUT_SIZE // STRIDE)
                (source / "candidates").write_text(str(rows))
            (source / "_SUCCESS").write_text("{}")
        if kind == "candidates":
            info["candidates"] = int((source / "candidates").read_text())
        folder = scratch / f"row-{len(specs)}"
        inputs = folder / ".inputs" / entry
        (inputs / partition).mkdir(parents=True)
        for f in source.glob("part-*.parquet"):
            os.link(f, inputs / partition / f.name)
        os.link(source / "_SUCCESS", inputs / "_SUCCESS")
        return str(folder), info

    def add(analysis: str, n: int, d: int, params: dict, kind: str = "features", partition: str = "",
            queries: int | None = None, fields: dict | None = None, compare: bool = True,
            after: dict | None = None) -> None:
        """One row per variant; ``after``: parameters only today's module has (added to its row)."""
        for variant in variants:
            folder, info = link(kind, n, d, analysis, partition)
            own = params if variant == "before" else {**params, **(after or {})}
            specs.append({"analysis": analysis, "variant": variant, "n": n, "d": d, "queries": queries,
                          "folder": folder, "cpus": cpus, "workers": workers, "params": own,
                          "fields": {**(fields or {}), **info}, "compare": compare})

    layer = f"layer={LAYER}"
    if "neighbours" in wanted:
        for n, d in sizes_of("neighbours"):
            add("neighbours", n, d, {"spaces": ["feature"], "layer": LAYER, "k": 5, "render": False,
                                     "queries": {"sample": args.queries, "seed": 0}}, queries=args.queries)
    if "neighbours_all" in wanted:
        add("neighbours", args.all_n, args.d, {"spaces": ["feature"], "layer": LAYER, "k": 5, "render": False,
                                               "queries": "all"}, queries=args.all_n)
    if "embedding" in wanted:
        for n, d in sizes_of("embedding"):
            # BEFORE has no max_points: it maps every point, a table of other rows.
            add("embedding", n, d, {"layers": [LAYER], "methods": ["pca"], "render": False}, partition=layer,
                fields={"method": "pca"}, compare=False)
    if "tsne" in wanted:
        # Every point (max_points as large as the data), which BEFORE maps too; threads vary the last digits.
        n = args.tsne_n
        add("embedding", n, args.d, {"layers": [LAYER], "methods": ["tsne"], "render": False}, partition=layer,
            fields={"method": "tsne"}, compare=False, after={"max_points": n})
    if "top_patches" in wanted:
        for n, d in sizes_of("top_patches"):
            add("top_patches", n, d, {"layers": [LAYER], "k": args.k, "render": False}, kind="candidates",
                partition=layer, fields={"k": args.k, "batch": args.batch})
    if "probes" in wanted:
        for n, d in sizes_of("probes"):
            for solver in args.solvers.split(","):
                add("probes", n, d, {"layers": [LAYER], "solver": solver}, partition=layer,
                    fields={"classes": args.classes, "requested_solver": solver})
    if "probes_fit" in wanted:
        for solver in args.fit_solvers.split(","):
            specs.append({"probes": solver, "n": args.n, "d": args.d, "classes": args.classes})
    return specs


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def note(r: dict) -> str:
    """What the table says of a row besides its figures."""
    if "failed" in r:
        return f"failed ({r['failed']})"
    said = []
    if "same_as_before" in r:
        said.append("table equal to before's" if r["same_as_before"] else "TABLE DIFFERS from before's")
    if r.get("points") is not None:
        said.append(f"{r['points']:,} points mapped")
    if r.get("candidates") is not None:
        said.append(f"{r['candidates']:,} candidates, k {r['k']}")
    if r.get("test_accuracy") is not None:
        said.append(f"accuracy {r['test_accuracy']:.4f}" + (f", {r['solver']}" if r.get("solver") else ""))
    if r.get("threads") is not None:
        said.append(f"{r['threads']} thread(s)")
    return "; ".join(said)


def table(rows: list[dict]) -> str:
    lines = ["| analysis | variant | n x d | queries | seconds | peak driver RSS | peak task RSS | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['analysis']} ({r['method']})" if r.get("method") else r["analysis"]
        lines.append(f"| {name} | {r['variant']} | {r['n']:,} x {r['d']:,} | "
                     f"{'' if r.get('queries') is None else format(r['queries'], ',')} | {r['seconds']:.1f} s | "
                     f"{gib(r['peak_driver_rss_bytes'])} | {gib(r['peak_task_rss_bytes'])} | {note(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict] | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(r for r in ROWS if r != "probes_fit"),
                   help=f"comma-separated, some of {', '.join(ROWS)}")
    p.add_argument("--variants", default="before,after", help="before (commit BEFORE), after")
    p.add_argument("--n", type=int, default=1_280_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--wide-n", type=int, default=100_000, help="the second size (0: none)")
    p.add_argument("--wide-d", type=int, default=2048)
    p.add_argument("--wide-rows", default="neighbours,embedding,top_patches,probes",
                   help="the rows that run at the second size too")
    p.add_argument("--all-n", type=int, default=50_000, help="database (and queries) of neighbours_all")
    p.add_argument("--tsne-n", type=int, default=100_000, help="points of the tsne row (x --d)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=9, help="top_patches: entries per channel")
    p.add_argument("--batch", type=int, default=64, help="top_patches: images per map batch (k candidates each)")
    p.add_argument("--block", type=int, default=1024, help="top_patches: images per part file (a decode block)")
    p.add_argument("--solvers", default="auto", help="probes: the solver parameter (auto, sklearn, torch)")
    p.add_argument("--fit-solvers", default="sklearn,torch", help="probes_fit: sklearn, torch")
    p.add_argument("--scratch", type=Path, help="where the partials go (default: a temporary folder)")
    p.add_argument("--json", type=Path)
    p.add_argument("--in-process", action="store_true",
                   help="run the rows in this process, one after another (tests: quick, but the peaks are then "
                        "this process' and its Ray's over all rows, not each row's)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this row here and print JSON
    args = p.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        if "probes" in spec:
            print(json.dumps(probes_one(spec["n"], spec["d"], spec["classes"], spec["probes"])))
        else:
            print(json.dumps(run_one(spec)))
        return None
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        rows: list[dict] = []
        before: dict[tuple, Any] = {}
        for spec in plan(args, Path(scratch)):
            if not args.in_process:
                row = child(spec)
            elif "probes" in spec:
                row = probes_one(spec["n"], spec["d"], spec["classes"], spec["probes"])
            else:
                row = run_one(spec)
            if "folder" in spec and "failed" not in row and spec["compare"]:
                # The committed table, against the baseline's on the same partials.
                import pyarrow.parquet as pq

                got = pq.read_table(Path(spec["folder"]) / spec["analysis"])
                same = (spec["analysis"], spec["n"], spec["d"], spec["queries"], json.dumps(spec["fields"]))
                if spec["variant"] == "before":
                    before[same] = got
                elif same in before:
                    row["same_as_before"] = bool(got.equals(before[same]))
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
