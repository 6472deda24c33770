"""What the driver costs per image, for this tree against an earlier commit, in one run.

Each side is installed into a temporary folder of its own (``pip install --no-deps
--target``) and run as ``python -m pipeline.cli run`` with only that folder on
``PYTHONPATH``; the same interpreter and dependencies serve both. For every case and side
the run is made at two dataset sizes, and the driver's CPU time (user + system, all its
threads, read from ``/proc``) is taken over the map stage only: from its "map stage" log
line to the next stage's line (or to the end of the process). The cost per image is the
difference over the difference in images, so start-up and per-stage fixed costs cancel;
the ceiling is one second of one driver core over that cost.

Cases (the ResNet-20 and CIFAR-10 test images of ``../shared``; random weights and generated
images without them):

    a   features of 3 layers
    b   a + predictions + top_patches
    c   saliency + grad_cam of every image, overlays rendered

    python scripts/bench_driver.py                       # this tree against the commit before its result path
    python scripts/bench_driver.py --baseline HEAD~3 --cases a --sizes 1000 4000 --json driver.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CONVSCOPE_SHARED", ROOT.parent / "shared"))
TICK = os.sysconf("SC_CLK_TCK")

CASES = {
    "a": [{"type": "features", "layers": ["layer1", "layer2", "layer3"]}],
    "b": [{"type": "features", "layers": ["layer1", "layer2", "layer3"]}, {"type": "predictions"},
          {"type": "top_patches", "layers": ["layer3"], "k": 9}],
    "c": [{"type": "saliency", "steps": 4}, {"type": "grad_cam", "layer": "layer3", "steps": 4}],
}
DEFAULT_SIZES = {"a": (2000, 10000), "b": (2000, 10000), "c": (500, 2500)}
STAGE = re.compile(r"^(map|reduce|model) stage: ")


# ----------------------------------------------------------------------------- the two sides


def baseline_commit() -> str:
    """The parent of the commit that introduced the workers' result path (``pipeline/store.py``)."""
    added = subprocess.run(["git", "log", "--format=%H", "--diff-filter=A", "-1", "--", "pipeline/store.py"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    if not added:
        raise SystemExit("pipeline/store.py is not committed yet: name the baseline with --baseline REV")
    return f"{added}^"


def install(source: Path, target: Path) -> Path:
    """``pip install --no-deps --target`` of the tree at ``source``: its packages only."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--target", str(target), str(source)], check=True)
    return target


def checkout(rev: str, dest: Path) -> Path:
    """The files of commit ``rev`` (git archive, no working tree of ours touched)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


# ----------------------------------------------------------------------------- measuring a run


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, every thread of the process


def peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


class Sampler:
    """CPU seconds and peak RSS of every process of a process session, sampled until stopped."""

    def __init__(self, sid: int, every: float = 0.1):
        self.sid, self.every = sid, every
        self.cpu: dict[int, float] = {}
        self.rss: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        for pid in session_pids(self.sid):
            cpu, rss = cpu_seconds(pid), peak_rss(pid)
            if cpu is not None:
                self.cpu[pid] = max(cpu, self.cpu.get(pid, 0.0))
            if rss is not None:
                self.rss[pid] = max(rss, self.rss.get(pid, 0))

    def total(self) -> float:
        self.sample()
        return sum(self.cpu.values())

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(site: Path, manifest: Path, output: Path, images: int) -> dict:
    """One run of ``manifest`` on its first ``images`` images with the code installed at ``site``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(site)
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--output", str(output),
           "--set", f"dataset.limit={images}"]
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=site, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sampler = Sampler(proc.pid)
    marks: dict[str, tuple[float, float, float]] = {}  # map start / end: (time, driver cpu, session cpu)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        match = STAGE.match(line)
        if match and "start" not in marks and match.group(1) == "map":
            marks["start"] = (time.time(), cpu_seconds(proc.pid) or 0.0, sampler.total())
        elif match and "start" in marks and "end" not in marks:
            marks["end"] = (time.time(), cpu_seconds(proc.pid) or 0.0, sampler.total())
    driver_peak = peak_rss(proc.pid) or 0
    final_cpu = cpu_seconds(proc.pid) or 0.0
    final_total = sampler.total()
    proc.wait()
    sampler.stop()
    if proc.returncode != 0 or "start" not in marks:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{''.join(lines[-30:])}")
    end = marks.get("end", (time.time(), final_cpu, final_total))
    others = [rss for pid, rss in sampler.rss.items() if pid != proc.pid]
    try:  # leave nothing of the run's Ray behind
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return {
        "images": images, "wall_s": round(time.time() - start, 2),
        "map_wall_s": round(end[0] - marks["start"][0], 3),
        "map_driver_cpu_s": round(end[1] - marks["start"][1], 3),
        "map_all_cpu_s": round(end[2] - marks["start"][2], 3),
        "peak_driver_rss_bytes": driver_peak, "peak_task_rss_bytes": max(others, default=0),
    }


# ----------------------------------------------------------------------------- the cases


def dataset(work: Path, n: int) -> tuple[dict, dict]:
    """The dataset and model sections: ../shared's CIFAR-10 and ResNet-20, else generated stand-ins."""
    cifar, weights = SHARED / "datasets" / "cifar10-test", SHARED / "models" / "cifar10-resnet20.th"
    model = {"source": "builtin", "name": "cifar_resnet20",
             "preprocess": {"resize": 32, "crop": 32, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}}
    if cifar.is_dir() and weights.is_file():
        return {"kind": "image_folder", "root": str(cifar)}, {**model, "weights": str(weights)}
    import numpy as np
    from PIL import Image

    root = work / "images"
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return {"kind": "image_folder", "root": str(root)}, model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", help="the commit to compare against (default: the one before the result path)")
    p.add_argument("--cases", default="a,b,c", help="comma-separated: a, b, c")
    p.add_argument("--sizes", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                   help="dataset sizes of each case's two runs (default per case)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", type=Path, help="write every run and every row here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="convscope-bench-driver-"))
    try:
        rev = args.baseline or baseline_commit()
        sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        print(f"installing the baseline ({rev} = {sha}) and this tree into {work}", file=sys.stderr)
        sides = {f"before ({sha})": install(checkout(rev, work / "before-src"), work / "before"),
                 "after (this tree)": install(ROOT, work / "after")}
        cases = args.cases.split(",")
        largest = max((args.sizes or DEFAULT_SIZES[c])[1] for c in cases)
        data, model = dataset(work, largest)
        runs, rows = [], []
        for case in cases:
            sizes = tuple(args.sizes or DEFAULT_SIZES[case])
            manifest = work / f"{case}.yaml"
            manifest.write_text(yaml.safe_dump({
                "name": f"driver-{case}", "output": str(work / "out"), "dataset": data, "model": model,
                "analyses": CASES[case], "execution": {"batch_size": args.batch_size, "device": "cpu"}}))
            measured = {}
            for side, site in sides.items():
                for n in sizes:
                    print(f"case {case}, {side}, {n:,} images ...", file=sys.stderr)
                    result = measure(site, manifest, work / "out", n)
                    runs.append({"case": case, "side": side, **result})
                    measured[(side, n)] = result
            for side in sides:
                small, large = measured[(side, sizes[0])], measured[(side, sizes[1])]
                per_image = (large["map_driver_cpu_s"] - small["map_driver_cpu_s"]) / (sizes[1] - sizes[0])
                rows.append({
                    "case": case, "side": side, "images": sizes[1],
                    "driver_us_per_image": round(per_image * 1e6, 1),
                    "ceiling_images_per_s": round(1 / per_image) if per_image > 0 else None,
                    "driver_share": round(large["map_driver_cpu_s"] / max(large["map_all_cpu_s"], 1e-9), 3),
                    "map_wall_s": large["map_wall_s"],
                    "peak_driver_rss_mb": round(large["peak_driver_rss_bytes"] / 2**20),
                    "peak_task_rss_mb": round(large["peak_task_rss_bytes"] / 2**20),
                })
        print()
        print("| case | code | driver CPU per image | single-driver ceiling | driver share of all CPU | "
              "map stage wall | peak RSS driver / largest task |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            ceiling = f"{row['ceiling_images_per_s']:,} images/s" if row["ceiling_images_per_s"] else "unbounded"
            print(f"| {row['case']} | {row['side']} | {row['driver_us_per_image']:.1f} µs | {ceiling} | "
                  f"{row['driver_share']:.1%} | {row['map_wall_s']:.1f} s | "
                  f"{row['peak_driver_rss_mb']} / {row['peak_task_rss_mb']} MB |")
        for case in cases:
            before, after = [r for r in rows if r["case"] == case]
            if after["driver_us_per_image"] > 0:
                print(f"case {case}: {before['driver_us_per_image'] / after['driver_us_per_image']:.1f}x less "
                      "driver CPU per image")
        if args.json:
            args.json.write_text(json.dumps({"baseline": sha, "runs": runs, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
