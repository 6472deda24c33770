"""A driver SIGKILLed inside a pass: what the rerun computes again, and how long it takes.

The CIFAR-10 manifest's dataset pass (features of 3 layers, predictions, top_patches) on the
10,000 test images of ``../shared`` (generated images and random weights without them): an
uninterrupted run first; then a run whose driver (and its whole process session, Ray
included) is SIGKILLed once ``--at`` of the blocks are in the ledger, and the rerun that
finishes it. For each kill point: blocks in the ledger at the kill, blocks the rerun
computed (from its run.json), the rerun's seconds against the uninterrupted run's, and
whether the tables are equal to the uninterrupted run's.

    python scripts/bench_resume.py                 # kills at 50% and 90%
    python scripts/bench_resume.py --at 0.3 --images 4000 --json resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_driver import dataset, session_pids  # noqa: E402

ANALYSES = [{"type": "features", "layers": ["layer1", "layer2", "layer3"]}, {"type": "predictions"},
            {"type": "top_patches", "layers": ["layer3"], "k": 9}]
TABLES = ["features/layer=layer1", "features/layer=layer2", "features/layer=layer3", "predictions", "top_patches"]


def run(manifest: Path, output: Path, kill_at: float | None = None, blocks: int = 0) -> dict:
    """``convscope run`` in its own process session; SIGKILLed when ``kill_at`` of ``blocks``
    are in the features ledger."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--output", str(output)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ledger = output / ".staging" / "features" / "_ledger"
    if kill_at is None:
        proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"convscope run exited {proc.returncode}")
        return {"seconds": round(time.time() - start, 2), **json.loads((output / "run.json").read_text())}
    while proc.poll() is None and (not ledger.is_dir() or len(list(ledger.iterdir())) < kill_at * blocks):
        time.sleep(0.01)
    for pid in [proc.pid, *session_pids(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    while session_pids(proc.pid):
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    recorded = len(list(ledger.glob("block-*.json"))) if ledger.is_dir() else 0
    return {"seconds": round(time.time() - start, 2), "recorded": recorded}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--at", type=float, nargs="+", default=[0.5, 0.9], help="kill points, shares of the blocks")
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="convscope-bench-resume-"))
    try:
        data, model = dataset(work, args.images)
        manifest = work / "m.yaml"
        manifest.write_text(yaml.safe_dump({
            "name": "resume", "output": str(work / "out"), "dataset": {**data, "limit": args.images}, "model": model,
            "analyses": ANALYSES, "execution": {"batch_size": 256, "device": "cpu"}}))
        full = run(manifest, work / "full")
        blocks = full["analyses"]["features"]["blocks"]
        map_seconds = full["analyses"]["features"]["seconds"]
        print(f"uninterrupted: {full['seconds']:.1f} s ({map_seconds:.1f} s in the pass, {blocks} blocks)")
        rows = []
        for at in args.at:
            out = work / f"killed-{at}"
            killed = run(manifest, out, kill_at=at, blocks=blocks)
            rerun = run(manifest, out)
            info = rerun["analyses"]["features"]
            equal = all(pd.read_parquet(out / t).equals(pd.read_parquet(work / "full" / t)) for t in TABLES)
            rows.append({"kill_at": at, "blocks": blocks, "in_ledger_at_kill": killed["recorded"],
                         "recomputed": blocks - info["blocks_resumed"], "killed_after_s": killed["seconds"],
                         "rerun_s": rerun["seconds"], "rerun_pass_s": info["seconds"],
                         "uninterrupted_s": full["seconds"], "uninterrupted_pass_s": map_seconds,
                         "tables_equal": equal})
        print("| killed at | blocks in the ledger | blocks the rerun computed | rerun (pass) | uninterrupted (pass) "
              "| tables equal |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kill_at']:.0%} ({r['killed_after_s']:.1f} s) | {r['in_ledger_at_kill']} of {r['blocks']} | "
                  f"{r['recomputed']} | {r['rerun_s']:.1f} s ({r['rerun_pass_s']:.1f} s) | "
                  f"{r['uninterrupted_s']:.1f} s ({r['uninterrupted_pass_s']:.1f} s) | {r['tables_equal']} |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
