"""Progress a person can read: done / total, rate and ETA of each stage, while it runs.

On a terminal a progress bar (tqdm) redraws itself; in the run's log (``run.log``, and on
stderr when it is not a terminal) a line is written every ``every`` seconds, also while no
block finishes, so a long block never looks like a hang.
"""

from __future__ import annotations

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
