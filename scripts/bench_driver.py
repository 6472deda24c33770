"""What the driver costs per image, for this tree against an earlier commit, in one run.

Each side is installed into a temporary folder of its own (``pip install --no-deps
--target``) and run as ``python -m pipeline.cli run`` with only that folder on
``PYTHONPATH``; the same interpreter and dependencies serve both. For every case and side
the run is made at two dataset sizes, and the driver's CPU time (user + system, all its
threads, read from ``/proc``) is taken over the map stage only: from its "map stage" log
line to the next stage's line (or to the end of the process). Each case runs three times per side:
a small and a large dataset, and the large one again with the model slowed down (same
images, same results, more seconds). That splits the driver's map-stage CPU into a cost per
second of the pass (Ray Data's scheduling loop, whatever the rate), a cost per image, and
fixed costs that cancel (medians of ``--repeat`` runs each); the ceiling is the rate at which
the two would take one whole driver core, ``(1 - per second) / per image``.

Cases, on the CIFAR-10 test images of ``../shared`` (listed over and over; generated images
without them) and a cheap three-stage CNN with ResNet-50's widths (64, 512, 2,048 channels;
1,000 classes), so that the pipeline runs as fast as this machine decodes while each image's
results weigh what they would on ImageNet, and the driver's cost per image shows as it
would beside fast GPUs:

    a   features of 3 layers
    b   a + predictions + top_patches
    c   saliency + grad_cam of every image, overlays rendered (faithfulness curves off)

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
import statistics
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
    # Faithfulness curves off: they cost many forwards per map and would hide the driver.
    "c": [{"type": "saliency", "metrics": False}, {"type": "grad_cam", "layer": "layer3", "metrics": False}],
}
DEFAULT_SIZES = {"a": (10_000, 40_000), "b": (10_000, 40_000), "c": (2000, 8000)}
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
    """Processes of the process session ``sid`` (what a subprocess started with
    ``start_new_session=True`` and everything it spawned, Ray's raylet and gcs included),
    this process left out."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
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


def measure(site: Path, manifest: Path, output: Path, images: int, delay: float = 0.0) -> dict:
    """One run of ``manifest`` on its first ``images`` images with the code installed at
    ``site``, the model sleeping ``delay`` seconds per image and forward."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(site)
    env["CONVSCOPE_BENCH_DELAY"] = str(delay)
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
    sampler.sample()
    final_cpu = cpu_seconds(proc.pid) or 0.0
    final_total = sampler.total()
    proc.wait()
    sampler.stop()
    if proc.returncode != 0 or "start" not in marks:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{''.join(lines[-30:])}")
    end = marks.get("end", (time.time(), final_cpu, final_total))
    driver_peak = sampler.rss.get(proc.pid, 0)
    others = [rss for pid, rss in sampler.rss.items() if pid != proc.pid]
    try:  # leave nothing of the run's Ray behind
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return {
        "images": images, "delay_s": delay, "wall_s": round(time.time() - start, 2),
        "map_wall_s": round(end[0] - marks["start"][0], 3),
        "map_driver_cpu_s": round(end[1] - marks["start"][1], 3),
        "map_all_cpu_s": round(end[2] - marks["start"][2], 3),
        "peak_driver_rss_bytes": driver_peak, "peak_task_rss_bytes": max(others, default=0),
    }


# ----------------------------------------------------------------------------- the cases


TINY_CNN = """
import os
import time
from collections import OrderedDict

import torch
import torch.nn as nn

# Seconds of sleep per input image and forward: a slower pipeline with the same images and
# the same results, which tells the driver's cost per second from its cost per image.
DELAY = float(os.environ.get("CONVSCOPE_BENCH_DELAY", "0"))


class Tiny(nn.Sequential):
    def forward(self, x):
        if DELAY and x.shape[0] > 1:
            time.sleep(DELAY * x.shape[0])
        return super().forward(x)


def build():
    # Cheap stages with ResNet-50's widths (a 2,624-float feature vector per image over the
    # three layers): the model costs little, so the pipeline runs as fast as this machine
    # decodes, and each image's results weigh what they would on ImageNet.
    torch.manual_seed(0)
    return Tiny(OrderedDict(
        layer1=nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.ReLU()),
        layer2=nn.Sequential(nn.Conv2d(64, 512, 1, stride=2), nn.ReLU()),
        layer3=nn.Sequential(nn.Conv2d(512, 2048, 1, stride=2), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(2048, 1000)))
"""


def dataset(work: Path, n: int) -> tuple[dict, dict]:
    """The dataset and model sections: ``n`` CIFAR-10 test images of ../shared (listed over and
    over, under ids of their own) or generated 32x32 images, and a tiny CNN."""
    import csv

    cifar = SHARED / "datasets" / "cifar10-test"
    if cifar.is_dir():
        files = sorted(cifar.rglob("*.png")) + sorted(cifar.rglob("*.jpg"))
    else:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        (work / "images").mkdir(parents=True, exist_ok=True)
        files = []
        for i in range(min(n, 10_000)):
            files.append(work / "images" / f"{i:05d}.png")
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    listing = work / "images.csv"
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "image_id"])
        for i in range(n):
            path = files[i % len(files)]
            writer.writerow([str(path), i % 10, f"{i // len(files)}/{i % len(files):05d}-{path.name}"])
    (work / "tiny_cnn.py").write_text(TINY_CNN)
    model = {"source": "python", "entrypoint": "tiny_cnn:build", "python_path": [str(work)],
             "preprocess": {"resize": 32, "crop": 32}}
    return {"kind": "list", "path": str(listing)}, model


def split_costs(small: dict, large: dict, slow: dict, more_images: int) -> dict:
    """The driver's map-stage CPU as ``per_s * seconds + per_image * images + fixed``, from a
    small and a large run and the large one slowed down (same images, more seconds)."""
    per_s = (slow["map_driver_cpu_s"] - large["map_driver_cpu_s"]) / max(slow["map_wall_s"] - large["map_wall_s"], 1e-9)
    grew = large["map_driver_cpu_s"] - small["map_driver_cpu_s"]
    per_image = (grew - per_s * (large["map_wall_s"] - small["map_wall_s"])) / more_images
    return {
        "driver_us_per_image": round(per_image * 1e6, 1),
        "driver_ms_per_s": round(per_s * 1e3, 1),
        # Where one core of driver is used up: per-second costs plus per-image costs at that rate.
        "ceiling_images_per_s": round((1 - per_s) / per_image) if per_image > 0 and per_s < 1 else None,
        "marginal_us_per_image": round(grew / more_images * 1e6, 1),
        "driver_share": round(large["map_driver_cpu_s"] / max(large["map_all_cpu_s"], 1e-9), 3),
        "map_wall_s": large["map_wall_s"],
        "peak_driver_rss_mb": round(large["peak_driver_rss_bytes"] / 2**20),
        "peak_task_rss_mb": round(large["peak_task_rss_bytes"] / 2**20),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", help="the commit to compare against (default: the one before the result path)")
    p.add_argument("--cases", default="a,b,c", help="comma-separated: a, b, c")
    p.add_argument("--sizes", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                   help="dataset sizes of each case's two runs (default per case)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3, help="runs of each configuration (medians are used)")
    p.add_argument("--delay", type=float, default=5e-4,
                   help="seconds the model sleeps per image and forward in each case's slowed-down run")
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
            measured: dict[tuple, list[dict]] = {}
            for rep in range(args.repeat):  # the sides alternate, so a slow spell hits both
                for side, site in sides.items():
                    for n, delay in ((sizes[0], 0.0), (sizes[1], 0.0), (sizes[1], args.delay)):
                        print(f"case {case}, {side}, {n:,} images, delay {delay * 1e3:g} ms, run {rep + 1} ...",
                              file=sys.stderr)
                        result = measure(site, manifest, work / "out", n, delay)
                        runs.append({"case": case, "side": side, "run": rep, **result})
                        measured.setdefault((side, n, delay), []).append(result)
            medians = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in measured.items()}
            for side in sides:
                small, large = medians[(side, sizes[0], 0.0)], medians[(side, sizes[1], 0.0)]
                slow = medians[(side, sizes[1], args.delay)]
                rows.append({"case": case, "side": side, "images": sizes[1],
                             **split_costs(small, large, slow, sizes[1] - sizes[0])})
        print()
        print("| case | code | driver CPU per image | per second of the pass | single-driver ceiling | "
              "per image at this machine's rate | driver share of all CPU | map stage | peak RSS driver / task |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ceiling = f"{r['ceiling_images_per_s']:,} images/s" if r["ceiling_images_per_s"] else "beyond the noise"
            print(f"| {r['case']} | {r['side']} | {r['driver_us_per_image']:.1f} µs | {r['driver_ms_per_s']:.0f} ms | "
                  f"{ceiling} | {r['marginal_us_per_image']:.1f} µs | {r['driver_share']:.1%} | "
                  f"{r['map_wall_s']:.1f} s | {r['peak_driver_rss_mb']} / {r['peak_task_rss_mb']} MB |")
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
