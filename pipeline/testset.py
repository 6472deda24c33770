"""An entry's second dataset: ``probes.test_dataset`` (train on the run's dataset, test on another).

The entry's per-image part runs once more, over the test dataset, as a map pass of its own into
partials of its own, ``.inputs/<entry>@test_dataset`` (per checkpoint of a series,
``.../checkpoint=<name>``), keyed by the test dataset's fingerprint, so a rerun reuses them and a
changed test dataset recomputes them. The reduction reads them beside the entry's own partials,
as the partitions ``test_dataset/<partition>`` (:class:`WithTestset`). Images of the test dataset
that cannot be used go to ``errors.parquet`` with the stage ``test_dataset:<stage>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from jobs import ReduceAnalysis, ReduceInputs
from jobs.dataset.probes import TEST_DATASET
from pipeline.checkpoints import entry_folder
from pipeline.datasets import DatasetIndex, list_dataset
from pipeline.errors import UserError
from pipeline.manifest import Manifest
from pipeline.manifest.schema import DatasetSpec
from pipeline.manifest.source import format_loc
from pipeline.store import Store
from pipeline.writers import INPUTS, read_success

FIELD = "test_dataset"
ERROR_STAGE = "test_dataset:"


def testset_spec(params: Any) -> DatasetSpec | None:
    """The entry's test dataset (validated, paths resolved), or None."""
    from pydantic import TypeAdapter

    spec = getattr(params, FIELD, None)
    return None if spec is None else TypeAdapter(DatasetSpec).validate_python(spec)


def testset_folder(entry: str, checkpoint: str | None) -> str:
    """The folder of an entry's test-dataset partials (under ``.inputs``): ``<entry>@test_dataset``."""
    return entry_folder(f"{entry}@{FIELD}", checkpoint)


def list_testsets(manifest: Manifest, index: DatasetIndex) -> dict[str, DatasetIndex]:
    """Every entry's test dataset listed, by entry, before any work starts. UserError, naming the
    field, when one cannot be listed, has no labelled image, or names its classes otherwise than
    the run's dataset (labels are class indices, so they must mean the same classes)."""
    found: dict[str, DatasetIndex] = {}
    for i, params in enumerate(manifest.analyses):
        spec = testset_spec(params)
        if spec is None:
            continue
        at = format_loc(("analyses", i, FIELD))
        try:
            test = list_dataset(spec)
        except UserError as e:
            raise UserError(f"{at}: {e}") from None
        labels = test.table.column("label")
        if not len(test) or labels.null_count == len(labels):
            raise UserError(f"{at}: {len(test):,} images, none of them labelled: nothing to test a probe on")
        if index.label_names and test.label_names and test.label_names != index.label_names:
            raise UserError(f"{at}: its classes ({', '.join(test.label_names)}) are not the dataset's "
                            f"({', '.join(index.label_names)}); a probe's labels are class indices, so both "
                            "must list the same classes")
        found[params.entry_name] = test
    return found


def with_dataset(manifest: Manifest, spec: DatasetSpec) -> Manifest:
    """The manifest with another dataset section: what the test pass runs on."""
    copy = manifest.model_copy(update={"dataset": spec})
    copy.source = manifest.source
    return copy


def run_testset_passes(manifest: Manifest, store: Store, tests: dict[str, DatasetIndex],
                       analyses: Sequence[ReduceAnalysis], keys: dict[str, dict], checkpoints: Sequence[str | None],
                       skip: set[str], run_map_stage: Callable[..., tuple[dict[str, dict], list[dict]]],
                       log: Any) -> tuple[dict[str, dict], list[dict]]:
    """The map pass over each test dataset for the ``analyses`` that have one and whose partials
    (by folder, every checkpoint's at once) are not already committed with their key (``skip``).
    Returns their stats by entry and the rows of test images that could not be used."""
    from pipeline.plan import Stage

    stats: dict[str, dict] = {}
    errors: list[dict] = []
    series = list(checkpoints) != [None]
    for analysis in analyses:
        entry = analysis.params.entry_name
        spec = testset_spec(analysis.params)
        if spec is None or entry not in tests:
            continue
        folders = {testset_folder(entry, c): (entry, c) for c in checkpoints if testset_folder(entry, c) not in skip}
        if not folders:
            continue
        index = tests[entry]
        log(f"{entry}: test dataset pass, {len(index):,} images ({spec.kind})")
        # Slots name the folders the pass writes (not the entry's own), with or without checkpoints.
        found, bad = run_map_stage(with_dataset(manifest, spec), store, index, Stage("map", [analysis]), keys,
                                   log, folders)
        stats[entry] = {"images": len(index), "seconds": round(sum(float(s.get("map_seconds") or 0.0)
                                                                   for s in found.values()), 3),
                        "errors": len(bad), "status": "complete"}
        failed = [s.get("error") for s in found.values() if s.get("status") == "failed"]
        if failed:
            stats[entry].update(status="failed", error=str(failed[0]))
        errors += [{**e, "stage": ERROR_STAGE + str(e["stage"])} for e in bad]
        if series:
            log(f"  {entry}: test partials of {', '.join(str(c) for _, c in folders.values())}")
    return stats, errors


def testset_ready(store: Store, entry: str, checkpoint: str | None, keys: dict[str, dict]) -> bool:
    """Whether the entry's test-dataset partials (of ``checkpoint``) are committed with their key."""
    folder = testset_folder(entry, checkpoint)
    return (read_success(store, f"{INPUTS}/{folder}") or {}).get("key") == keys[folder]["key"]


def drop_testset_partials(store: Store, entry: str, checkpoint: str | None) -> None:
    """Once the entry is committed: its test-dataset partials go (and their folder, when empty)."""
    store.delete(f"{INPUTS}/{testset_folder(entry, checkpoint)}")
    parent = f"{INPUTS}/{testset_folder(entry, None)}"
    if checkpoint is not None and store.is_dir(parent) and not store.list(parent, recursive=True):
        store.delete(parent)


class WithTestset:
    """:class:`jobs.ReduceInputs` of an entry's partials, plus its test dataset's as partitions
    ``test_dataset/<partition>``."""

    def __init__(self, own: ReduceInputs, test: ReduceInputs):
        self.own, self.test = own, test

    def _pick(self, partition: str) -> tuple[ReduceInputs, str]:
        if partition.startswith(TEST_DATASET):
            return self.test, partition[len(TEST_DATASET):]
        return self.own, partition

    def partitions(self) -> list[str]:
        return self.own.partitions() + [TEST_DATASET + p for p in self.test.partitions()]

    def read(self, partition: str = "", columns: Sequence[str] | None = None) -> pa.Table:
        inputs, name = self._pick(partition)
        return inputs.read(name, columns)

    def batches(self, partition: str = "", columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        inputs, name = self._pick(partition)
        return inputs.batches(name, columns)

    def rows(self, partition: str = "") -> int:
        inputs, name = self._pick(partition)
        return inputs.rows(name)

    def width(self, partition: str, column: str) -> int:
        inputs, name = self._pick(partition)
        return inputs.width(name, column)

    def split(self, partition: str, parts: int) -> list[ReduceInputs]:
        inputs, name = self._pick(partition)
        return inputs.split(name, parts)
