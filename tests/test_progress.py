"""Progress a person can read: done / total, rate and ETA, while nothing finishes too."""

from __future__ import annotations

import re
import time

from pipeline.progress import Progress, RunLog, duration


def test_durations():
    assert [duration(s) for s in (4.2, 75, 3725, -1)] == ["4s", "1m15s", "1h02m", "0s"]


def test_lines_come_every_interval_even_when_no_block_finishes(tmp_path):
    lines: list[str] = []
    progress = Progress(1000, "features", lines.append, done=200, every=0.05)
    progress.add(100)
    time.sleep(0.3)  # a long block: nothing added, lines still come
    progress.add(50)
    progress.close()
    assert len(lines) >= 4, lines
    first = lines[0]
    assert re.search(r"features: 300/1,000 images \(30%\), [\d,]+ images/s, ETA \w+, 200 from an earlier run", first)
    assert lines[-1].startswith("  features: 350/1,000 images (35%)") and "so far" not in lines[-1]
    # The resumed 200 count as done, not towards the rate: 150 in about 0.3 s.
    rate = int(re.search(r"([\d,]+) images/s", lines[-1]).group(1).replace(",", ""))
    assert 100 <= rate <= 1500


def test_run_log_writes_a_timestamped_file_and_echoes(tmp_path):
    echoed: list[str] = []
    log = RunLog(echoed.append, tmp_path / "run.log")
    log("map stage: features")
    log.file("  features: 10/10 images")
    log.close()
    text = (tmp_path / "run.log").read_text().splitlines()
    assert echoed == ["map stage: features"]
    assert len(text) == 2 and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d map stage: features", text[0])


CHILD = r"""
import os, sys, time
from pipeline.progress import RAY_WORKER_NOISE, StderrFilter
with StderrFilter(RAY_WORKER_NOISE):
    os.write(2, b"[2026-12-03 15:14:29,483 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker' "
                b"has constructor arguments in the object store and max_restarts > 0. If the arguments...\n")
    os.write(2, b"[2026-12-03 15:14:30,000 E 1 1] core_worker.cc:1: a real error\n")
    sys.stderr.write("bar 10%\r"); sys.stderr.flush()
    sys.stdin.readline()  # the parent has seen the bar before anything else is written
    os.write(2, b"[a line in")
    os.write(2, b" two writes]\n")
    # A worker's lines as Ray hands them on, the first in two writes: Ray Train's noise goes.
    os.write(2, b"\x1b[36m(PlacementGroupCleaner pid=7)\x1b[0m Failed to query Ray ")
    time.sleep(0.5)  # the filter reads the start of the line on its own
    os.write(2, b"Train Controller actor state. State API may be temporarily unavailable.\n")
    os.write(2, b"\x1b[36m(RayTrainWorker pid=8)\x1b[0m Reporting training result 2: TrainingReport(...)\n")
    os.write(2, b"\x1b[36m(RayTrainWorker pid=8)\x1b[0m ValueError: a worker's own error\n")
print("native code writes to descriptor 2 again", file=sys.stderr)
"""


def test_stderr_filter_drops_only_rays_noise_and_passes_the_rest_at_once():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=root, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stderr is not None and proc.stdin is not None
    seen = b""
    deadline = time.time() + 60
    while not seen.endswith(b"bar 10%\r"):  # the bar arrives without a newline after it
        assert time.time() < deadline and proc.poll() is None, seen
        seen += os.read(proc.stderr.fileno(), 1)
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    seen += proc.stderr.read()
    assert proc.wait(timeout=60) == 0, seen
    assert seen == (b"[2026-12-03 15:14:30,000 E 1 1] core_worker.cc:1: a real error\n"
                    b"bar 10%\r[a line in two writes]\n"
                    b"\x1b[36m(RayTrainWorker pid=8)\x1b[0m ValueError: a worker's own error\n"
                    b"native code writes to descriptor 2 again\n")


GONE = r"""
import os
from pipeline.progress import StderrFilter
with StderrFilter():
    for _ in range(64):  # far more than a pipe holds: the pump must keep draining it
        os.write(2, b"x" * 4095 + b"\n")
print("done", flush=True)
"""


def test_stderr_filter_keeps_draining_when_stderr_is_gone():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", GONE], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stderr is not None
    proc.stderr.close()  # nobody reads stderr any more
    out, _ = proc.communicate(timeout=60)
    assert out == b"done\n" and proc.returncode == 0
