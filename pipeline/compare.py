"""``convscope compare RUN_A RUN_B``: what changed between two runs, as Parquet tables and a page.

Reads two run folders (local paths or URIs) through their output contract only: ``run.json``
and the committed entries (``<entry>/_SUCCESS``). A checkpoint of a series is named
``RUN@CHECKPOINT`` and read as a run of that checkpoint alone (``<entry>/checkpoint=<name>``),
so two checkpoints of one series, or a checkpoint and another run, compare alike. Entries are
matched by name; those both runs committed with the same type are compared with the pure
functions of :mod:`jobs.compare`:

============  =====================================================================
predictions   ``accuracy/`` (one row per entry), ``per_class/``, ``flips/``
top_patches   ``channels/``: overlap of each channel's top-k image sets
attribution   ``attribution/``: correlation of the two maps of each image and target
probes        ``probes/``: test accuracy per layer, full-data fits and few-shot means
============  =====================================================================

Entries only one run committed, or committed with different types, are rows of
``unmatched/``. The output folder (default ``RUN_B/compare-<name of RUN_A>``) holds one
folder per table (``<table>/part-0.parquet``), ``summary.json`` and ``index.html`` (with
the report's ``assets/``). It is built in a hidden staging folder beside it, renamed into
place, and ``_SUCCESS`` is written last: a folder without ``_SUCCESS`` is incomplete.

``--fail-on accuracy_drop=X,flips=Y`` turns the comparison into a check: exit code 1 when,
for any predictions entry, accuracy A - B exceeds X or the fraction of common labelled images
whose top-1 class flipped exceeds Y (the output is written all the same).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from jobs import REGISTRY
from jobs import compare as kernels
from pipeline.checkpoints import entry_folder
from pipeline.errors import UserError
from pipeline.report.charts import bar_chart
from pipeline.report.html import render, table_html
from pipeline.report.site import ASSETS
from pipeline.store import Store, is_uri
from pipeline.writers import SUCCESS, partition_values, read_run_info, table_parts

KIND = "convscope-compare"  # summary.json's "kind": marks a folder compare may replace
TABLES = ("accuracy", "per_class", "flips", "channels", "attribution", "probes", "unmatched")
FAIL_ON = {
    "accuracy_drop": "overall top-1 accuracy of A minus that of B (on common labelled images) exceeds it",
    "flips": "the fraction of common labelled images whose top-1 class flipped exceeds it",
}
PREDICTION_COLUMNS = ["image_id", "label", "pred", "prob"]
CHANNEL_COLUMNS = ["layer", "channel", "label", "image_id"]
PROBE_COLUMNS = ["layer", "classifier", "train_accuracy", "test_accuracy", "n_train", "n_test", "shots", "repeat",
                 "baseline"]
MAP_READ_COLUMNS = ["label", *kernels.MAP_KEYS, *kernels.MAP_COLUMNS, *kernels.SHAPE_COLUMNS]


def allowed_fail_on() -> str:
    """The ``--fail-on`` keys and what each checks, for help and error messages."""
    return "; ".join(f"{k}=X fails when {v}" for k, v in FAIL_ON.items())


def parse_fail_on(texts: Sequence[str]) -> dict[str, float]:
    """``["accuracy_drop=0.01,flips=0.05"]`` -> ``{"accuracy_drop": 0.01, "flips": 0.05}``.

    >>> parse_fail_on(["accuracy_drop=0.01,flips=0.05"])
    {'accuracy_drop': 0.01, 'flips': 0.05}
    >>> parse_fail_on(["flip=1"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.errors.UserError: --fail-on: unknown key 'flip'. Allowed keys: accuracy_drop, flips (...)
    """
    out: dict[str, float] = {}
    keys = ", ".join(FAIL_ON)
    for text in texts:
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = (s.strip() for s in item.partition("="))
            if key not in FAIL_ON:
                raise UserError(f"--fail-on: unknown key {key!r}. Allowed keys: {keys} ({allowed_fail_on()})")
            try:
                number = float(value) if sep else math.nan
            except ValueError:
                number = math.nan
            if not math.isfinite(number) or not -1 <= number <= 1 or (key == "flips" and number < 0):
                raise UserError(f"--fail-on: {item!r} needs a number{' from 0' if key == 'flips' else ' from -1'} "
                                f"to 1, as in {key}=0.05. Allowed keys: {keys} ({allowed_fail_on()})")
            out[key] = number
    return out


# ----------------------------------------------------------------------------- reading runs


def split_checkpoint(text: str | Path) -> tuple[str, str | None]:
    """``RUN@CHECKPOINT`` -> (RUN, CHECKPOINT); a run without ``@``, or a folder whose own name has
    one, is (RUN, None).

    >>> split_checkpoint("runs/demo-checkpoints@epoch01")
    ('runs/demo-checkpoints', 'epoch01')
    >>> split_checkpoint("runs/nightly")
    ('runs/nightly', None)
    """
    text = str(text)
    location, sep, checkpoint = text.rpartition("@")
    if not sep or not location or not checkpoint or "/" in checkpoint:
        return text, None
    if Store.open(text).is_dir(""):  # a folder named with an @
        return text, None
    return location, checkpoint


class RunFolder:
    """A run's output folder: ``run.json`` and its committed entries' tables; of a checkpoint
    series, one checkpoint's (``RUN@CHECKPOINT``), read as a run of that checkpoint alone."""

    def __init__(self, location: str | Path, which: str, checkpoint: str | None = None):
        self.which = which
        self.store = Store.open(location)
        self.where = self.store.display()
        if not self.store.is_dir(""):
            raise UserError(f"run {which}: {self.where}: no such run folder")
        self.info = read_run_info(self.store, f"run {which}: ")
        series = [str(c.get("name")) for c in (self.info.get("model") or {}).get("checkpoints") or []]
        if series and checkpoint is None:
            raise UserError(f"run {which}: {self.where}: a checkpoint series ({', '.join(series)}); compare one "
                            f"checkpoint of it, as {self.where.rstrip('/')}@{series[0]}")
        if checkpoint is not None and not series:
            raise UserError(f"run {which}: {self.where}: not a checkpoint series, so @{checkpoint} names nothing; "
                            "give the run folder alone")
        if checkpoint is not None and checkpoint not in series:
            raise UserError(f"run {which}: {self.where}: no checkpoint {checkpoint!r}; the series has "
                            f"{', '.join(series)}")
        self.checkpoint = checkpoint
        self.name = self.where.rstrip("/").rsplit("/", 1)[-1] + (f"@{checkpoint}" if checkpoint else "")
        analyses = self.info.get("analyses") or {}
        self.types: dict[str, str] = {name: str(a.get("type")) for name, a in analyses.items()}
        self.committed = {name for name in analyses if self.store.is_file(f"{self.folder(name)}/{SUCCESS}")}
        if not self.committed:
            raise UserError(f"run {which}: {self.where}: no committed analysis (no <entry>/{SUCCESS}); "
                            "the run has not finished any entry")

    @classmethod
    def open(cls, spec: str | Path, which: str) -> RunFolder:
        """The run a command-line argument names: ``RUN`` or ``RUN@CHECKPOINT``."""
        location, checkpoint = split_checkpoint(spec)
        return cls(location, which, checkpoint)

    def folder(self, entry: str) -> str:
        """Where the entry's table is: ``<entry>``, or ``<entry>/checkpoint=<name>`` of a series."""
        return entry_folder(entry, self.checkpoint)

    @property
    def label_names(self) -> list[str] | None:
        """The run's class names (run.json's dataset), if it recorded them."""
        return (self.info.get("dataset") or {}).get("label_names")

    def parts(self, entry: str) -> list[str]:
        """The Parquet parts of the entry's own table; sidecars (``probes/_heads``) are not its rows."""
        return table_parts(self.store, self.folder(entry))

    def read_part(self, entry: str, part: str, wanted: Sequence[str]) -> pd.DataFrame:
        """One Parquet part, the ``wanted`` columns it has, Hive partition values as columns."""
        with self.store.open_input(part) as f:
            names = pq.read_schema(f).names
        columns = [c for c in wanted if c in names]
        df = self.store.read_table(part, columns=columns).to_pandas()
        for key, value in partition_values(part[len(self.folder(entry)) + 1:]).items():
            if key in wanted:
                df[key] = value
        return df

    def table(self, entry: str, wanted: Sequence[str]) -> pd.DataFrame:
        """The entry's table, the ``wanted`` columns it has (Hive partition values included)."""
        frames = [self.read_part(entry, part, wanted) for part in self.parts(entry)]
        frames = [f for f in frames if len(f.columns)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(wanted))


def family(kind: str) -> str:
    """The family of a registered analysis type (``attribution``, ...); empty for an unknown type."""
    cls = REGISTRY.get(kind)
    return cls.family if cls is not None else ""


# ----------------------------------------------------------------------------- comparing


@dataclass
class Comparison:
    """The tables of a comparison (DataFrames in :data:`jobs.compare.SCHEMAS` columns) and notes."""

    tables: dict[str, list[pd.DataFrame]] = field(default_factory=lambda: {t: [] for t in TABLES})
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, table: str, df: pd.DataFrame) -> None:
        self.tables[table].append(df)

    def frame(self, table: str) -> pd.DataFrame:
        frames = [f for f in self.tables[table] if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else kernels.empty(table)


def compare_entries(a: RunFolder, b: RunFolder, log: Callable[[str], None]) -> Comparison:
    """Every entry of the two runs, compared where both committed it with the same type."""
    out = Comparison()
    names = list(dict.fromkeys([*a.types, *b.types]))
    for name in names:
        ta, tb = a.types.get(name), b.types.get(name)
        ca, cb = name in a.committed, name in b.committed
        reason = None
        if ta is None or tb is None:
            reason = f"only in run {'A' if tb is None else 'B'}"
        elif ta != tb:
            reason = f"type {ta} in run A, {tb} in run B"
        elif not (ca and cb):
            reason = "not committed in run " + ("A and B" if not (ca or cb) else "A" if not ca else "B")
        if reason is not None:
            out.add("unmatched", pd.DataFrame([{"entry": name, "type_a": ta, "type_b": tb, "reason": reason}]))
            out.entries[name] = {"type_a": ta, "type_b": tb, "compared": False, "reason": reason}
            continue
        kind = str(ta)
        log(f"  {name} ({kind})")
        tables = compare_entry(a, b, name, kind, out)
        out.entries[name] = {"type": kind, "compared": bool(tables), "tables": tables,
                             **({} if tables else {"reason": f"no comparison for type {kind}"})}
    return out


def compare_entry(a: RunFolder, b: RunFolder, name: str, kind: str, out: Comparison) -> list[str]:
    """Compare one entry both runs committed; returns the tables it added rows to."""
    if kind == "predictions":
        pa_, pb = a.table(name, PREDICTION_COLUMNS + ["checkpoint"]), b.table(name, PREDICTION_COLUMNS + ["checkpoint"])
        if "checkpoint" in pa_.columns or "checkpoint" in pb.columns:
            raise UserError(f"{name}: predictions of several checkpoints; compare one checkpoint of each "
                            "(RUN@CHECKPOINT)")
        try:
            matched = kernels.match_predictions(pa_, pb)
        except ValueError as e:
            raise UserError(f"{name}: {e}") from None
        if a.label_names and b.label_names and a.label_names != b.label_names:
            out.notes.append(f"{name}: the runs name their classes differently; per_class uses run A's names")
        mismatches = int(matched["label_mismatch"].sum())
        if mismatches:
            out.notes.append(f"{name}: {mismatches} common image(s) labelled differently by the two runs "
                             "count as unlabelled")
        out.add("accuracy", kernels.accuracy_change(matched, name))
        out.add("per_class", kernels.per_class_change(matched, name, a.label_names or b.label_names))
        out.add("flips", kernels.flipped(matched, name))
        return ["accuracy", "per_class", "flips"]
    if kind == "top_patches":
        out.add("channels", kernels.topk_overlap(a.table(name, CHANNEL_COLUMNS), b.table(name, CHANNEL_COLUMNS), name))
        return ["channels"]
    if kind == "probes":
        out.add("probes", kernels.probe_change(a.table(name, PROBE_COLUMNS), b.table(name, PROBE_COLUMNS), name))
        return ["probes"]
    if family(kind) == "attribution":
        rows = map_correlations(a, b, name)
        if rows is None:
            return []
        out.add("attribution", rows)
        return ["attribution"]
    return []


def map_correlations(a: RunFolder, b: RunFolder, entry: str) -> pd.DataFrame | None:
    """:func:`jobs.compare.map_correlations` a part of run A at a time, with the rows of run B
    it pairs with, so no run's maps are ever all in memory at once. None when the entry's table
    holds no maps (attribution_summary, sanity_checks, ...)."""
    parts_a, parts_b = a.parts(entry), b.parts(entry)
    if not parts_a or not parts_b:
        return kernels.empty("attribution")
    with a.store.open_input(parts_a[0]) as f:
        names = pq.read_schema(f).names
    if kernels.map_column(names) is None or "image_id" not in names:
        return None
    key_columns = [c for c in kernels.MAP_KEYS if c != "image_id"] + ["image_id"]
    # Where each of B's maps is: its part and row.
    located = []
    for i, part in enumerate(parts_b):
        keys = kernels.map_keys(b.read_part(entry, part, key_columns))
        located.append(keys.assign(_part=i, _row=range(len(keys))))
    where_b = pd.concat(located, ignore_index=True).drop_duplicates(kernels.MAP_KEYS, keep="first")
    needs: list[set[int]] = []
    for part in parts_a:
        keys = kernels.map_keys(a.read_part(entry, part, key_columns))
        needs.append(set(keys.merge(where_b, on=kernels.MAP_KEYS)["_part"]))
    last_use = {j: i for i, parts in enumerate(needs) for j in parts}
    cache: dict[int, pd.DataFrame] = {}
    results = []
    for i, part in enumerate(parts_a):
        rows_a = a.read_part(entry, part, MAP_READ_COLUMNS)
        for j in sorted(needs[i]):
            if j not in cache:
                cache[j] = b.read_part(entry, parts_b[j], MAP_READ_COLUMNS)
        rows_b = pd.concat([cache[j] for j in sorted(needs[i])], ignore_index=True) if needs[i] else rows_a.iloc[:0]
        results.append(kernels.map_correlations(rows_a, rows_b, entry))
        for j in [j for j in cache if last_use.get(j, -1) <= i]:
            del cache[j]
    frames = [r for r in results if len(r)]
    if not frames:
        return kernels.empty("attribution")
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["image_id", "method", "target", "neuron_layer", "neuron_channel"], kind="stable",
                          na_position="last").reset_index(drop=True)


def check_thresholds(accuracy: pd.DataFrame, fail_on: dict[str, float]) -> list[str]:
    """The thresholds passed, one message each; a threshold with nothing to check is a UserError."""
    failures = []
    labelled = accuracy[accuracy["labelled"].fillna(0).astype(int) > 0] if len(accuracy) else accuracy
    for key, limit in fail_on.items():
        if not len(accuracy):
            raise UserError(f"--fail-on {key}={limit:g}: nothing to check: the runs share no committed "
                            "predictions entry")
        if not len(labelled):
            raise UserError(f"--fail-on {key}={limit:g}: nothing to check: the predictions entries the runs "
                            "share have no labelled image in common")
        for row in labelled.itertuples(index=False):
            if key == "accuracy_drop":
                drop = float(row.accuracy_a) - float(row.accuracy_b)
                if drop > limit:
                    failures.append(f"{row.entry}: accuracy dropped by {drop:.4f} ({row.accuracy_a:.4f} -> "
                                    f"{row.accuracy_b:.4f} on {row.labelled} images), over accuracy_drop={limit:g}")
            elif key == "flips" and float(row.flip_fraction) > limit:
                failures.append(f"{row.entry}: {row.flipped} of {row.labelled} labelled images flipped "
                                f"({row.flip_fraction:.4f}), over flips={limit:g}")
    return failures


# ----------------------------------------------------------------------------- writing


@dataclass
class CompareResult:
    """Where a comparison was written, its summary.json, and each threshold it exceeded (``failures``)."""

    output: Path
    summary: dict[str, Any]
    failures: list[str]


def default_output(a: RunFolder, b: RunFolder) -> Path:
    """``RUN_B/compare-<name of RUN_A's folder>`` (``[@CHECKPOINT]``, then ``-to-<B's checkpoint>``
    when B is a checkpoint of a series); run B must be a local folder."""
    if not b.store.local:
        raise UserError(f"run B is {b.where}: compare writes a local folder; name it with --output")
    return Path(b.store.path(f"compare-{a.name}" + (f"-to-{b.checkpoint}" if b.checkpoint else "")))


def compare_runs(run_a: str | Path, run_b: str | Path, output: str | Path | None = None,
                 fail_on: Sequence[str] = (), log: Callable[[str], None] = lambda message: None) -> CompareResult:
    """Compare two runs, write the output folder atomically, and return it with the thresholds
    passed (``failures``; empty when none is). Bad input is a :class:`UserError`."""
    thresholds = parse_fail_on(fail_on)
    a, b = RunFolder.open(run_a, "A"), RunFolder.open(run_b, "B")
    if output is not None and is_uri(output):
        raise UserError(f"--output {output}: compare writes a local folder")
    final = Path(output).absolute() if output is not None else default_output(a, b)
    check_replaceable(final)
    log(f"comparing {a.where} (A) with {b.where} (B)")
    comparison = compare_entries(a, b, log)
    tables = {name: comparison.frame(name) for name in TABLES}
    failures = check_thresholds(tables["accuracy"], thresholds)
    summary = summarise(a, b, comparison, tables, thresholds, failures)
    write_output(final, tables, summary, a, b)
    return CompareResult(output=final, summary=summary, failures=failures)


def check_replaceable(final: Path) -> None:
    """An existing output folder is replaced only when it is an earlier comparison's."""
    if not final.exists():
        return
    if not final.is_dir():
        raise UserError(f"output {final}: exists and is not a folder")
    if any(final.iterdir()):
        try:
            kind = json.loads((final / "summary.json").read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != KIND:
            raise UserError(f"output {final}: exists and is not the output of `convscope compare`; "
                            "refusing to replace it (name another with --output)")


def summarise(a: RunFolder, b: RunFolder, comparison: Comparison, tables: dict[str, pd.DataFrame],
              thresholds: dict[str, float], failures: list[str]) -> dict[str, Any]:
    """summary.json: both runs, what was compared per entry, the accuracy rows, the thresholds."""
    def run_facts(run: RunFolder) -> dict[str, Any]:
        ds, model = run.info.get("dataset") or {}, run.info.get("model") or {}
        return {"path": run.where, "checkpoint": run.checkpoint, "name": run.info.get("name"),
                "status": run.info.get("status"),
                "finished": run.info.get("finished"), "model": model, "fingerprint": ds.get("fingerprint"),
                "images": ds.get("images")}

    fa, fb = run_facts(a), run_facts(b)
    notes = list(comparison.notes)
    if fa["fingerprint"] != fb["fingerprint"]:
        notes.append("the runs' datasets differ (fingerprints); only images both have are compared")
    accuracy = [{k: kernels.plain(v) for k, v in row.items()} for row in tables["accuracy"].to_dict("records")]
    return {
        "kind": KIND,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "a": fa, "b": fb,
        "same_dataset": fa["fingerprint"] == fb["fingerprint"],
        "same_model": (fa["model"] or {}).get("hash") == (fb["model"] or {}).get("hash"),
        "entries": comparison.entries,
        "accuracy": accuracy,
        "rows": {name: len(df) for name, df in tables.items()},
        "fail_on": thresholds,
        "failures": failures,
        "notes": notes,
    }


def write_output(final: Path, tables: dict[str, pd.DataFrame], summary: dict[str, Any], a: RunFolder,
                 b: RunFolder) -> None:
    """Build the output in a hidden staging folder, rename it into place, write ``_SUCCESS`` last."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}-staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        store = Store.open(staging)
        for name, df in tables.items():
            store.write_table(f"{name}/part-0.parquet", kernels.to_table(name, df))
        store.write_json("summary.json", summary)
        (staging / "assets").mkdir(parents=True)
        for asset in ("report.css", "report.js"):
            shutil.copyfile(ASSETS / asset, staging / "assets" / asset)
        store.write_text("index.html", report_page(tables, summary, a, b))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}-old-{os.getpid()}")
    if final.exists():
        (final / SUCCESS).unlink(missing_ok=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    Store.open(final).write_text(SUCCESS, json.dumps({"kind": KIND, "created": summary["created"]}) + "\n")


# ----------------------------------------------------------------------------- the page


def report_page(tables: dict[str, pd.DataFrame], summary: dict[str, Any], a: RunFolder, b: RunFolder) -> str:
    """index.html of the comparison, with the report's templates and CSS."""
    accuracy, per_class = tables["accuracy"], tables["per_class"]
    charts = []
    for entry, rows in per_class.groupby("entry", sort=False):
        names = [str(n) for n in rows["label_name"]]
        charts.append((str(entry), bar_chart(list(zip(names, rows["accuracy_b"])), f"{entry}: accuracy per class",
                                             series=[("A", list(rows["accuracy_a"])),
                                                     ("B", list(rows["accuracy_b"]))])))
    channels = tables["channels"]
    channel_summary = (channels.groupby(["entry", "layer"], sort=False)
                       .agg(channels=("channel", "size"), mean_overlap=("overlap", "mean"),
                            min_overlap=("overlap", "min")).reset_index() if len(channels) else channels)
    attribution = tables["attribution"]
    attribution_summary = (attribution.groupby(["entry", "method"], sort=False, dropna=False)
                           .agg(maps=("image_id", "size"), mean_correlation=("correlation", "mean"),
                                median_correlation=("correlation", "median")).reset_index()
                           if len(attribution) else attribution)
    body = render(
        "compare.html", a=summary["a"], b=summary["b"], same_dataset=summary["same_dataset"],
        same_model=summary["same_model"], notes=summary["notes"], failures=summary["failures"],
        fail_on=summary["fail_on"],
        accuracy=table_html(accuracy) if len(accuracy) else None, charts=charts,
        per_class=table_html(per_class) if len(per_class) else None,
        flips=table_html(tables["flips"], limit=200) if len(tables["flips"]) else None,
        channels=table_html(channel_summary) if len(channel_summary) else None,
        channel_rows=table_html(channels, limit=200) if len(channels) else None,
        attribution=table_html(attribution_summary) if len(attribution_summary) else None,
        probes=table_html(tables["probes"]) if len(tables["probes"]) else None,
        unmatched=table_html(tables["unmatched"]) if len(tables["unmatched"]) else None,
    )
    title = f"{a.name} → {b.name}"
    return str(render("page.html", title="Comparison", run_name=title, nav=[],
                      current="", body=body, built=summary["created"], folder=f"{a.where} and {b.where}"))
