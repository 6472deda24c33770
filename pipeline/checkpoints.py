"""A checkpoint series: one architecture, several weights files, every analysis run per checkpoint.

With ``model.checkpoints`` (or ``model.weights_glob``), each manifest entry is computed once per
checkpoint into a Hive partition of its folder, ``<entry>/checkpoint=<name>/``, which the runner
treats as an entry of its own (key, ledger, staging, commit), so a killed run resumes per
checkpoint. The entry's own ``_SUCCESS`` is written once every checkpoint's folder is committed.
Without checkpoints an entry's folder is the entry itself and nothing here changes the output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.manifest import Manifest, ModelSpec
from pipeline.store import Store
from pipeline.writers import INPUTS, STAGING, SUCCESS

PARTITION = "checkpoint"


def checkpoint_names(spec: ModelSpec) -> list[str | None]:
    """The checkpoints' names in manifest order, or ``[None]`` for a model of one weights file."""
    checkpoints = getattr(spec, "checkpoints", None)
    return [c.name for c in checkpoints] if checkpoints else [None]


def model_specs(spec: ModelSpec) -> dict[str | None, ModelSpec]:
    """{checkpoint: a spec of one weights file}; ``{None: spec}`` without checkpoints."""
    checkpoints = getattr(spec, "checkpoints", None)
    if not checkpoints:
        return {None: spec}
    return {c.name: spec.model_copy(update={"weights": c.weights, "checkpoints": None, "weights_glob": None})
            for c in checkpoints}


def with_model(manifest: Manifest, spec: ModelSpec) -> Manifest:
    """The manifest with another model spec (one checkpoint's): what a stage run per checkpoint reads."""
    if spec is manifest.model:
        return manifest
    copy = manifest.model_copy(update={"model": spec})
    copy.source = manifest.source
    return copy


def entry_folder(entry: str, checkpoint: str | None) -> str:
    """Where an entry's table of one checkpoint goes: ``<entry>/checkpoint=<name>`` (the entry itself
    without checkpoints)."""
    return entry if checkpoint is None else f"{entry}/{PARTITION}={checkpoint}"


def combined_key(keys: Sequence[dict], checkpoints: Sequence[str]) -> str:
    """The key of a whole entry: its checkpoints' keys, in order."""
    inputs = {name: key["key"] for name, key in zip(checkpoints, keys)}
    return "sha256:" + hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


def prune(store: Store, entry: str, checkpoints: Sequence[str]) -> None:
    """Before an entry of a checkpoint series is computed: its ``_SUCCESS`` goes, then everything in its
    folders (final, staging, partials) that is not a folder of one of ``checkpoints`` (the table of a run
    without checkpoints, a checkpoint no longer listed)."""
    store.delete(f"{entry}/{SUCCESS}")
    keep = {f"{PARTITION}={name}" for name in checkpoints}
    for base in ("", STAGING, INPUTS, f"{INPUTS}/{STAGING}"):
        folder = f"{base}/{entry}" if base else entry
        for item in store.list(folder):
            if Path(item.path).name not in keep:
                store.delete(f"{folder}/{Path(item.path).name}")


def seal(store: Store, entry: str, checkpoints: Sequence[str], keys: Sequence[dict]) -> bool:
    """Write the entry's ``_SUCCESS`` when every checkpoint's folder is committed with its key; return
    whether it was written."""
    found = [store.read_json(f"{entry_folder(entry, name)}/{SUCCESS}") for name in checkpoints]
    if not all(isinstance(f, dict) and f.get("key") == k["key"] for f, k in zip(found, keys)):
        return False
    marker = {"key": combined_key(keys, checkpoints), "type": keys[0]["type"], "dataset": keys[0]["dataset"],
              "rows": sum(int(f.get("rows") or 0) for f in found),
              "checkpoints": {name: k["key"] for name, k in zip(checkpoints, keys)}}
    store.write_text(f"{entry}/{SUCCESS}", json.dumps(marker, indent=1, sort_keys=True))
    return True


def remove_empty(store: Store, entries: Sequence[str]) -> None:
    """Drop the entries' staging and partials folders once their checkpoints' folders have left them."""
    for entry in entries:
        for base in (STAGING, INPUTS, f"{INPUTS}/{STAGING}"):
            folder = f"{base}/{entry}"
            if store.is_dir(folder) and not store.list(folder, recursive=True):
                store.delete(folder)


def merge_stats(stats: dict[str | None, dict], log: Callable[[str], None] | None = None) -> dict:
    """run.json's record of an entry of a checkpoint series: its status (failed if any checkpoint
    failed; skipped if all were), rows and seconds summed, and each checkpoint's own record under
    ``checkpoints``."""
    records = {str(name): info for name, info in stats.items()}
    statuses = [info.get("status") for info in records.values()]
    if "failed" in statuses:
        status = "failed"
    elif statuses and all(s == "skipped" for s in statuses):
        status = "skipped"
    elif "not run" in statuses:
        status = "not run"
    else:
        status = "complete"
    merged: dict = {"status": status}
    rows = [info.get("rows") for info in records.values()]
    if rows and all(isinstance(r, int) for r in rows):
        merged["rows"] = sum(rows)
    merged["seconds"] = round(sum(float(info.get("seconds") or 0.0) for info in records.values()), 3)
    failed = [(name, info) for name, info in records.items() if info.get("status") == "failed"]
    if failed:
        merged["error"] = f"checkpoint {failed[0][0]}: {failed[0][1].get('error')}"
    merged["checkpoints"] = records
    return merged
