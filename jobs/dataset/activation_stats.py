"""``activation_stats``: per channel mean, std, min, max and fraction of zeros over a dataset.

Dead units (Zeiler & Fergus 2014 saw them in their first layers) show up as channels whose
activation is never positive: after a ReLU they contribute nothing for any image. Every
position of every image counts as one observation.

Example manifest entry::

    - type: activation_stats
      layers: [layer1, layer2, layer3]

Table ``activation_stats/part-*.parquet``: ``layer``, ``channel``, ``count``, ``mean``,
``std`` (population), ``min``, ``max``, ``zero_fraction``, ``dead`` (``max <= 0``).

Each batch is reduced on its worker to per-channel moments (count, mean, sum of squared
deviations M2, min, max, zeros); the moments are merged exactly by Chan et al.'s pairwise
formula (1979), streaming, so memory is O(channels) whatever the dataset size and the
result does not depend on batch size or worker count (up to float64 rounding). The merge is
spread over the workers: each piece of a layer's partials is merged in a task, and the driver
merges the per-piece moments by the same formula.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from jobs.core.base import (
    AnalysisParams,
    MapBatch,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rows,
    by_layer,
    register,
)


class ActivationStatsParams(AnalysisParams):
    layers: list[str] = Field(min_length=1)


# The partials of one batch (per layer): per channel, the moments ``Moments.add`` merges.
MOMENTS = pa.schema([("channel", pa.int32()), ("count", pa.int64()), ("mean", pa.float64()), ("m2", pa.float64()),
                     ("min", pa.float64()), ("max", pa.float64()), ("zeros", pa.int64())])


def batch_moments(activation: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-channel moments of one batch (N, C, ...) -> arrays of length C (float64 sums).

    >>> m = batch_moments(torch.tensor([[[0.0, 2.0]], [[4.0, 0.0]]]))  # N=2, C=1, 2 positions
    >>> m["count"].tolist(), m["mean"].tolist(), m["m2"].tolist(), m["zeros"].tolist()
    ([4], [1.5], [11.0], [2])
    """
    a = activation.detach()
    a = a.reshape(a.shape[0], a.shape[1], -1).float()  # (N, C, positions)
    dims = (0, 2)
    count = a.shape[0] * a.shape[2]
    # Sums accumulate in float64 without a float64 copy of the batch; deviations from the
    # batch mean are small, so squaring them in float32 loses nothing that matters.
    mean = a.sum(dim=dims, dtype=torch.float64) / count
    m2 = (a - mean.float()[None, :, None]).square_().sum(dim=dims, dtype=torch.float64)
    return {
        "channel": np.arange(a.shape[1], dtype=np.int32),
        "count": np.full(a.shape[1], count, dtype=np.int64),
        "mean": mean.cpu().numpy(),
        "m2": m2.cpu().numpy(),
        "min": a.amin(dim=dims).double().cpu().numpy(),
        "max": a.amax(dim=dims).double().cpu().numpy(),
        "zeros": (a == 0).sum(dim=dims).cpu().numpy().astype(np.int64),
    }


class Moments:
    """Running per-channel moments; ``add`` merges a batch of (channel, moments) rows."""

    def __init__(self):
        self.n = self.mean = self.m2 = self.min = self.max = self.zeros = None

    def _grow(self, channels: int) -> None:
        if self.n is not None and len(self.n) >= channels:
            return
        old = 0 if self.n is None else len(self.n)
        pad = channels - old

        def extend(a, fill, dtype):
            fresh = np.full(pad, fill, dtype=dtype)
            return fresh if a is None else np.concatenate([a, fresh])

        self.n = extend(self.n, 0, np.int64)
        self.mean = extend(self.mean, 0.0, np.float64)
        self.m2 = extend(self.m2, 0.0, np.float64)
        self.min = extend(self.min, np.inf, np.float64)
        self.max = extend(self.max, -np.inf, np.float64)
        self.zeros = extend(self.zeros, 0, np.int64)

    def add(self, channel: np.ndarray, count: np.ndarray, mean: np.ndarray, m2: np.ndarray,
            mn: np.ndarray, mx: np.ndarray, zeros: np.ndarray) -> None:
        if not len(channel):
            return
        channels = int(channel.max()) + 1
        # Combine the rows of this record batch per channel first (vectorised), ...
        nb = np.bincount(channel, weights=count, minlength=channels)
        safe = np.where(nb > 0, nb, 1)
        mb = np.bincount(channel, weights=count * mean, minlength=channels) / safe
        m2b = np.bincount(channel, weights=m2 + count * (mean - mb[channel]) ** 2, minlength=channels)
        # ... then merge with what came before.
        self._fold(nb, mb, m2b)
        np.minimum.at(self.min, channel, mn)
        np.maximum.at(self.max, channel, mx)
        np.add.at(self.zeros, channel, zeros)

    def merge(self, other: Moments) -> None:
        """Merge the moments of other rows (a piece of the partials), channel by channel."""
        if other.n is None:
            return
        channels = len(other.n)
        self._fold(other.n.astype(np.float64), other.mean, other.m2)
        np.minimum(self.min[:channels], other.min, out=self.min[:channels])
        np.maximum(self.max[:channels], other.max, out=self.max[:channels])
        self.zeros[:channels] += other.zeros

    def _fold(self, nb: np.ndarray, mb: np.ndarray, m2b: np.ndarray) -> None:
        """Chan et al.'s pairwise merge of per-channel (count, mean, M2) into the running moments."""
        channels = len(nb)
        self._grow(channels)
        n0 = self.n[:channels].astype(np.float64)
        n = n0 + nb
        delta = mb - self.mean[:channels]
        ratio = np.divide(nb, n, out=np.zeros_like(n), where=n > 0)
        self.mean[:channels] += delta * ratio
        self.m2[:channels] += m2b + delta ** 2 * n0 * ratio
        self.n[:channels] = n.astype(np.int64)


def _piece_moments(shared: None, item: tuple[str, ReduceInputs]) -> Moments:
    """The moments of one piece of a partition's partials (a task of the merge)."""
    partition, piece = item
    m = Moments()
    for rb in piece.batches(partition):
        c = {name: rb.column(name).to_numpy() for name in rb.schema.names}
        m.add(c["channel"].astype(np.int64), c["count"], c["mean"], c["m2"], c["min"], c["max"], c["zeros"])
    return m


def _merge_moments(inputs: ReduceInputs, partitions: list[str], ctx: ReduceContext) -> dict[str, Moments]:
    """Each partition's merged moments: per-piece merges as tasks, then a merge of those few here."""
    parts = max(1, 2 * ctx.workers)
    items = [(partition, piece) for partition in partitions for piece in inputs.split(partition, parts)]
    # One piece in all: no task is worth its start-up.
    found = ctx.parallel_map(_piece_moments, items) if len(items) > 1 else [_piece_moments(None, i) for i in items]
    merged = {partition: Moments() for partition in partitions}
    for (partition, _), m in zip(items, found):
        merged[partition].merge(m)
    return merged


@register
class ActivationStats(ReduceAnalysis):
    """Per-channel activation statistics over the whole dataset, dead units flagged."""

    Params = ActivationStatsParams
    params: ActivationStatsParams

    def schema(self) -> dict[str, pa.Schema]:
        return by_layer(self.params.layers, MOMENTS)

    def map_batch(self, batch: MapBatch) -> Rows:
        return {f"layer={layer}": batch_moments(batch.activations[layer]) for layer in self.params.layers}

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        tables = []
        dead = {}
        # Once per partition: layers may be listed twice here, and each piece must be merged once.
        merged = _merge_moments(inputs, list(dict.fromkeys(f"layer={layer}" for layer in self.params.layers)), ctx)
        for layer in self.params.layers:
            m = merged[f"layer={layer}"]
            if m.n is None:
                raise ValueError(f"activation_stats: no activations were recorded for layer {layer!r}")
            n = np.maximum(m.n, 1)
            tables.append(pa.table({
                "layer": pa.array([layer] * len(m.n), pa.string()),
                "channel": pa.array(np.arange(len(m.n), dtype=np.int32)),
                "count": pa.array(m.n),
                "mean": pa.array(m.mean),
                "std": pa.array(np.sqrt(m.m2 / n)),
                "min": pa.array(m.min),
                "max": pa.array(m.max),
                "zero_fraction": pa.array(m.zeros / n),
                "dead": pa.array(m.max <= 0),
            }))
            dead[layer] = int((m.max <= 0).sum())
        return ReduceOutput(tables={"": pa.concat_tables(tables)}, stats={"dead_channels": dead})
