"""Progress a person can read: done / total, rate and ETA of each stage, while it runs.

On a terminal a progress bar (tqdm) redraws itself; in the run's log (``run.log``, and on
stderr when it is not a terminal) a line is written every ``every`` seconds, also while no
block finishes, so a long block never looks like a hang.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

Log = Callable[[str], None]


def duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m'``; ``75`` -> ``'1m15s'``; ``4.2`` -> ``'4s'``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class RunLog:
    """The run's messages: to ``echo`` (stderr by default) and, timestamped, to a log file."""

    def __init__(self, echo: Log | None = None, path: Path | None = None, bar: bool = False):
        self.echo, self.path, self.bar = echo, path, bar
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def file(self, message: str) -> None:
        """Only into the log file (what a progress bar already shows on the terminal)."""
        if self._file is not None:
            with self._lock:
                self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
                self._file.flush()

    def __call__(self, message: str) -> None:
        self.file(message)
        if self.echo is not None:
            self.echo(message)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Progress:
    """Count what a stage has done; report it every ``every`` seconds until :meth:`close`.

    ``done`` is what an earlier run already did (resumed): it counts towards done / total
    but not towards the rate.
    """

    def __init__(self, total: int, what: str, log: Log, unit: str = "images", done: int = 0,
                 every: float = 10.0, bar: bool = False):
        self.total, self.what, self.log, self.unit, self.every = total, what, log, unit, every
        self.done = self.resumed = done
        self.start = time.time()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=what, unit=unit[:-1] if unit.endswith("s") else unit,
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5, smoothing=0.1)
        self._thread = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._thread.start()

    def line(self) -> str:
        with self._lock:
            done = self.done
        elapsed = max(time.time() - self.start, 1e-9)
        rate = (done - self.resumed) / elapsed
        share = f" ({done / self.total:.0%})" if self.total else ""
        eta = f", ETA {duration((self.total - done) / rate)}" if rate > 0 and done < self.total else ""
        resumed = f", {self.resumed:,} from an earlier run" if self.resumed else ""
        return (f"  {self.what}: {done:,}/{self.total:,} {self.unit}{share}, {rate:,.0f} {self.unit}/s"
                f"{eta}{resumed}, {duration(elapsed)} so far")

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self.log(self.line())
            if self._bar is not None:
                self._bar.refresh()

    def close(self) -> None:
        """Stop reporting, with a last line."""
        self._stop.set()
        self._thread.join()
        if self._bar is not None:
            self._bar.close()
        self.log(self.line().replace(" so far", ""))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Ray 2.60 logs this at error level whenever Ray Data starts an actor pool, although every
# actor is started the same way (https://github.com/ray-project/ray/issues/57733): a healthy
# run would always show an error a user cannot act on.
RAY_FALSE_ALARMS = (re.compile(rb"has constructor arguments in the object store and max_restarts > 0"),)
# What an embedded Ray's workers print that a user can do nothing about: the same false alarm
# (Ray Train's controller starts an actor so), Ray Train's placement-group cleaner polling the
# state API (which a Ray without its dashboard does not serve) every second of a fit, and Ray
# Train's line per report (the train stage logs each epoch itself).
RAY_WORKER_NOISE = (*RAY_FALSE_ALARMS, re.compile(rb"Failed to query Ray Train Controller actor state"),
                    re.compile(rb"Reporting training result \d+: TrainingReport"))


class StderrFilter:
    """Leaves out of this process' stderr (file descriptor 2, so also what native code writes)
    every line matching one of ``patterns``; everything else passes through at once.

    Text that is not yet a whole line passes at once too (a progress bar redraws with ``\\r``),
    except the start of a line of Ray's native log (``[`` first) or of a worker's line that Ray
    hands on (a coloured ``(name pid=...)`` first), held until its newline.

        with StderrFilter(RAY_FALSE_ALARMS):
            ...  # start Ray Data actors
    """

    def __init__(self, patterns: tuple[re.Pattern[bytes], ...] = RAY_FALSE_ALARMS):
        self.patterns = patterns
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StderrFilter:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            read, write = os.pipe()
            os.dup2(write, 2)
            os.close(write)
        except OSError:  # no stderr to filter (a closed descriptor): leave it be
            return self
        self._saved = saved
        self._thread = threading.Thread(target=self._pump, args=(read, saved), daemon=True,
                                        name="convscope-stderr")
        self._thread.start()
        return self

    def _pump(self, read: int, out: int) -> None:
        held = b""
        while chunk := os.read(read, 65536):
            lines = (held + chunk).split(b"\n")
            held = lines.pop()
            keep = [line + b"\n" for line in lines if not any(p.search(line) for p in self.patterns)]
            if held and not held.startswith((b"[", b"\x1b[")):
                keep.append(held)
                held = b""
            if keep:
                _write(out, b"".join(keep))
        if held:
            _write(out, held)
        os.close(read)

    def __exit__(self, *exc: object) -> None:
        if self._saved is None or self._thread is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # the pipe's last writer closes: the pump reads to its end
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # else a child process still holds the pipe; keep its target open
            os.close(self._saved)
        self._saved = self._thread = None


def _write(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``; a closed stderr (its reader gone) drops it rather than stop
    the pump, whose writers would then block on a full pipe."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass
