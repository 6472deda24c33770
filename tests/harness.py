"""Run an analysis in one process, without Ray or files: map over batches, then reduce.

The same contract the runner follows (one forward per batch, hooks on the analysis' layers,
partials gathered per partition, then ``reduce`` with a context), small enough for unit tests
to compare against brute force.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from jobs import LocalContext, ReduceOutput, TableInputs
from jobs.core.base import Analysis, MapAnalysis, Rows
from jobs.core.pixels import pixels_to_inputs

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) as the runner does with MEAN/STD."""
    return pixels_to_inputs(torch.from_numpy(np.ascontiguousarray(pixels)), MEAN, STD)


def map_batches(analysis: Analysis, model: torch.nn.Module, ids: Sequence[str], pixels: np.ndarray,
                labels: Sequence[int], batch_size: int, boxes: np.ndarray | None = None,
                fused: Sequence[MapAnalysis] = ()) -> list:
    """``analysis.map_batch`` on consecutive batches, as the map stage calls it (the batch's shared
    forward runs when an analysis first reads it); ``fused`` analyses map each batch first."""
    from pipeline.worker import shared_batch

    model.eval()
    layers = list(dict.fromkeys(layer for a in (*fused, analysis) for _, layer in a.layers()))
    out = []
    for start in range(0, len(ids), batch_size):
        sl = slice(start, start + batch_size)
        batch = shared_batch(model, normalise(pixels[sl]), layers, list(ids[sl]), np.asarray(labels[sl]),
                             pixels=np.ascontiguousarray(pixels[sl]), boxes=None if boxes is None else boxes[sl],
                             mean=tuple(MEAN), std=tuple(STD))
        for other in fused:
            other.map_batch(batch)
        out.append(analysis.map_batch(batch))
    return out


def map_table(analysis: Analysis, model: torch.nn.Module, ids: Sequence[str], pixels: np.ndarray,
              labels: Sequence[int] | None = None, batch_size: int = 4, boxes: np.ndarray | None = None,
              partition: str = "", fused: Sequence[MapAnalysis] = ()) -> tuple[pa.Table, dict]:
    """A per-image analysis over ``pixels`` in one process: its rows (a MapOutput's, as the runner
    writes them) and its rendered images by key."""
    from jobs import MapOutput

    labels = list(labels) if labels is not None else [-1] * len(ids)
    tables, images = [], {}
    for result in map_batches(analysis, model, ids, pixels, labels, batch_size, boxes, fused):
        assert isinstance(result, MapOutput)
        for key, image in result.images:
            assert key not in images, f"image key {key} rendered twice"
            images[key] = image
        if result.rows.get(partition):
            tables.append(as_table_columns(result.rows[partition]))
    return pa.concat_tables(tables), images


def as_table_columns(columns: dict) -> pa.Table:
    from pipeline.writers import to_arrow

    return pa.table({k: to_arrow(np.asarray(v)) for k, v in columns.items()})


def gather(parts: list[Rows]) -> TableInputs:
    """Concatenate per-batch partials into one table per partition (what the runner commits)."""
    from pipeline.writers import to_arrow

    tables: dict[str, list[pa.Table]] = {}
    for rows in parts:
        for partition, columns in rows.items():
            tables.setdefault(partition, []).append(
                pa.table({k: to_arrow(np.asarray(v)) for k, v in columns.items()}))
    return TableInputs({p: pa.concat_tables(ts) for p, ts in tables.items()})


def run_local(analysis: Analysis, model: torch.nn.Module, ids: Sequence[str], pixels: np.ndarray,
              labels: Sequence[int] | None = None, batch_size: int = 4, workers: int = 1,
              label_names: list[str] | None = None) -> ReduceOutput:
    """Map then reduce ``analysis`` over ``pixels`` (uint8 (N, H, W, 3)) named by ``ids``."""
    labels = list(labels) if labels is not None else [-1] * len(ids)
    inputs = gather(map_batches(analysis, model, ids, pixels, labels, batch_size))
    ctx = LocalContext(model=model.eval(), pixels={i: p for i, p in zip(ids, pixels)},
                       input_size=tuple(pixels.shape[1:3]), label_names=label_names, workers=workers,
                       mean=tuple(MEAN), std=tuple(STD))
    return analysis.reduce(inputs, ctx)


def as_table(output: ReduceOutput, partition: str = "") -> pa.Table:
    """A partition of the output as the runner would write it (before shard columns)."""
    from pipeline import reduce

    return reduce.as_table(output.tables[partition])


@dataclass
class TaskContext(LocalContext):
    """LocalContext whose parallel_map runs every task on pickled copies, as Ray does, and logs its size."""

    tasks: list[int] = field(default_factory=list)

    def parallel_map(self, fn, items, shared=None, gpu=False):
        self.tasks.append(len(items))
        fn, shared = pickle.loads(pickle.dumps((fn, shared)))
        return [pickle.loads(pickle.dumps(fn(shared, pickle.loads(pickle.dumps(item))))) for item in items]
