"""``top_patches``: for every channel, the dataset positions that excite it most, with their crops.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014), Fig. 2:
the k strongest activations of each channel over the whole dataset, each shown as the patch
of the input image that the unit sees (its receptive field).

Example manifest entry::

    - type: top_patches
      layers: [layer1, layer3]
      k: 9
      score: max         # max: an image's best position only | all: every position competes
      select: top        # bottom: the k least activating (images by their maximum, or positions)
      per_class: false   # true: the k per channel within each class (a ``label`` column)
      channels: "0:16"   # or [0, 5, 7]; default: every channel
      render: true
      cell: 64           # grid cells are enlarged by whole pixels to at least 64 px
      project: [deconvnet]   # and guided_backprop: each entry projected back to the pixels

Table ``top_patches/part-*.parquet``, one row per (layer, channel, rank): ``layer``,
``channel``, ``rank`` (1 = strongest), ``image_id``, ``activation``, ``y``, ``x`` (the
position in the feature map), ``box`` ([x0, y0, x1, y1], half-open input pixels of that
position's receptive field, clipped to the image), and with ``render``: ``key`` (the crop)
and ``grid_key`` (the channel's k crops in one grid). With ``project`` (Zeiler & Fergus Fig. 2:
"the top 9 activations ... projected down to pixel space"): per method a column
``projection_<method>`` (float32, signed, (3, box height, box width) flattened): the input
gradient of that one activation under the method's ReLU rule
(:func:`jobs.attribution.backprop.neuron_gradients`), cropped to the row's ``box``; computed
after the merge, in batches of rows on the workers (``parallel_map`` tasks, a GPU each when
the run has them), decoding only the top-k images; drawn as a grid per channel beside the
patches' (``<method>_grid_key``). Images: each crop at native resolution,
and per channel a grid whose cells have the layer's largest box size (its full field, or the
image where the field is larger); a crop cut by the border sits where the field lies, the
cut part grey. Stats: ``receptive_field`` {layer: [max box height, max box width]}.

Every result follows one total order -- activation descending, then image_id, y, x
ascending -- so it does not depend on batching, image order or the device.

The merge is spread over the workers: each layer's partials are split into up to twice as
many pieces as workers, each piece is cut to its k best per channel in a task, and the driver
merges those few rows (the same rows, in the same order, as one sequential merge).
``memory_plan`` bounds what the driver holds: every piece's k best per channel, their merge and
the table (pieces counted for up to PLAN_WORKERS workers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from pydantic import Field, field_validator

from jobs.core.base import (
    FLOATS,
    IMAGE_ID,
    AnalysisParams,
    DistinctLayers,
    Images,
    MapBatch,
    MemoryPlan,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rendered,
    Rows,
    by_layer,
    register,
    safe_key,
)
from jobs.core.hooks import eval_mode, forward_to
from jobs.core.kernels import topk_first
from jobs.core.render import EMPTY, enlarge, grid, signed_pixels

_SPAN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

# Probe images per forward when measuring receptive fields.
PROBE_CHUNK = 64
# Unique images fetched at once while rendering.
FETCH_CHUNK = 256

# Estimates for memory_plan, per row (measured). A candidate in a pandas frame on the driver:
# channel, activation, y, x and its image id (Arrow strings of ~40 characters).
CANDIDATE_BYTES = 104
# A row of the result: the frame with layer and rank, its box, the Arrow table, the keys and
# what rendering lists per row.
ROW_BYTES = 512
# Candidates' frames a merge holds per row it sorts: the concatenation and the sorted copy.
MERGE_COPIES = 2
# Workers memory_plan allows for: a partition is split into up to twice as many pieces.
PLAN_WORKERS = 32
# Rows of partials one record batch holds at most (ReduceInputs' batch_rows).
BATCH_ROWS = 65536


class TopPatchesParams(AnalysisParams):
    layers: DistinctLayers
    k: int = Field(default=9, ge=1, description="entries per channel")
    score: Literal["max", "all"] = "max"
    select: Literal["top", "bottom"] = Field(default="top", description="the most or the least activating")
    per_class: bool = Field(default=False, description="k entries per channel and label (unlabelled images left out)")
    channels: list[int] | str | None = Field(
        default=None, description="channel indices, a 'start:stop' range, or None for all")
    render: bool = True
    cell: int = Field(default=64, ge=1, description="min side in px of each grid cell")
    project: list[Literal["deconvnet", "guided_backprop"]] = Field(
        default_factory=list, description="project each entry back to the pixels by these rules")

    @field_validator("project")
    @classmethod
    def _distinct(cls, methods: list[str]) -> list[str]:
        return list(dict.fromkeys(methods))

    @field_validator("channels")
    @classmethod
    def _check_channels(cls, channels: list[int] | str | None) -> list[int] | str | None:
        if isinstance(channels, str):
            m = _SPAN.match(channels)
            if not m or int(m.group(1)) >= int(m.group(2)):
                raise ValueError(f"channels: expected 'start:stop' with non-negative integers and start < stop "
                                 f"(e.g. '0:16'), got {channels!r}")
        elif channels is not None:
            if not channels:
                raise ValueError("channels: the list is empty; leave channels out to take every channel")
            bad = [c for c in channels if c < 0]
            if bad:
                raise ValueError(f"channels: indices must be non-negative, got {bad}")
            if len(set(channels)) != len(channels):
                raise ValueError("channels: indices must be unique")
        return channels

    def channel_indices(self, layer: str, count: int) -> list[int]:
        """The chosen channels of ``layer`` (which has ``count``), ascending; ValueError if out of range."""
        if self.channels is None:
            return list(range(count))
        if isinstance(self.channels, str):
            span = _SPAN.match(self.channels)
            if span is None:  # the validator admits only 'start:stop' strings
                raise ValueError(f"channels: expected 'start:stop', got {self.channels!r}")
            start, stop = (int(g) for g in span.groups())
            if stop > count:
                raise ValueError(f"channels {self.channels!r}: layer {layer!r} has {count} channels "
                                 f"(0..{count - 1}), so channel {stop - 1} does not exist")
            return list(range(start, stop))
        for c in self.channels:
            if c >= count:
                raise ValueError(f"channels: layer {layer!r} has {count} channels (0..{count - 1}), "
                                 f"so channel {c} does not exist")
        return sorted(self.channels)


def receptive_field(model: torch.nn.Module, layer: str, input_size: tuple[int, int],
                    device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Input pixels each feature-map row and column of ``layer`` depends on, measured exactly.

    Returns ``rows`` (Ho, 2) and ``cols`` (Wo, 2): half-open [start, stop) ranges of input
    rows/columns, clipped to the image. Measured by NaN propagation, so stride, padding,
    dilation, pooling and residual paths of this very model are all accounted for: probe
    ``i < H`` is an image of zeros whose row ``i`` is NaN, probe ``H + j`` has column ``j``
    NaN; output row ``r`` covers the probe rows that put a NaN anywhere in it. NaN survives
    convolutions (even zero weights), ReLU, eval-mode BatchNorm, sums and max-pooling; an op
    that replaces NaN (``torch.where(x > 0, x, 0)``, ``nan_to_num``) hides the pixels behind
    it. A row no probe reaches gets the whole image; global ops make every position see the
    whole image, which is what they do.

    NNPACK (CPU) and cuDNN (GPU) are switched off for the probes: their Winograd and FFT
    convolutions mix the inputs of a whole tile and spread NaN beyond the true field (NNPACK,
    which torch picks on the CPU for batches of 16 and more, does). The direct and im2col
    kernels left are exact. The switches are process-wide while the probes run.

    >>> rows, cols = receptive_field(torch.nn.Conv2d(3, 1, 3, padding=1), "", (4, 4))
    >>> rows.tolist()
    [[0, 2], [0, 3], [1, 4], [2, 4]]
    """
    h, w = input_size
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    hit_rows: np.ndarray | None = None  # (H, Ho): probe row i reaches output row r
    hit_cols: np.ndarray | None = None  # (W, Wo)

    cudnn = torch.backends.cudnn.enabled
    try:
        torch.backends.cudnn.enabled = False
        with torch.no_grad(), torch.backends.nnpack.flags(enabled=False), eval_mode(model):
            for start in range(0, h + w, PROBE_CHUNK):
                probes = range(start, min(h + w, start + PROBE_CHUNK))
                x = torch.zeros((len(probes), 3, h, w), dtype=dtype, device=device)
                for n, i in enumerate(probes):
                    if i < h:
                        x[n, :, i, :] = float("nan")
                    else:
                        x[n, :, :, i - h] = float("nan")
                acts = forward_to(model, layer, x)  # stops once the layer has run
                nan = torch.isnan(acts)
                if nan.dim() == 2:  # a linear layer: one position
                    nan = nan[:, :, None, None]
                if nan.dim() != 4:
                    raise ValueError(f"layer {layer!r} gives shape {tuple(nan.shape[1:])}; "
                                     "top_patches needs (C, H, W) or (C,) outputs")
                by_row = nan.any(dim=3).any(dim=1).cpu().numpy()  # (probes, Ho)
                by_col = nan.any(dim=2).any(dim=1).cpu().numpy()  # (probes, Wo)
                if hit_rows is None or hit_cols is None:
                    hit_rows = np.zeros((h, by_row.shape[1]), bool)
                    hit_cols = np.zeros((w, by_col.shape[1]), bool)
                for n, i in enumerate(probes):
                    if i < h:
                        hit_rows[i] = by_row[n]
                    else:
                        hit_cols[i - h] = by_col[n]
    finally:
        torch.backends.cudnn.enabled = cudnn
    if hit_rows is None or hit_cols is None:  # no probe ran
        raise ValueError(f"receptive_field needs a non-empty input size, got {tuple(input_size)}")
    return _ranges(hit_rows, h), _ranges(hit_cols, w)


def _ranges(hits: np.ndarray, extent: int) -> np.ndarray:
    """(extent, n) probe-by-output hits -> (n, 2) [first probe, last probe + 1); unreached: whole image."""
    out = np.tile(np.array([0, extent], np.int64), (hits.shape[1], 1))
    for r in range(hits.shape[1]):
        idx = np.flatnonzero(hits[:, r])
        if len(idx):
            out[r] = idx[0], idx[-1] + 1
    return out


def _candidates(activation: torch.Tensor, k: int, score: str, bottom: bool = False) -> tuple[torch.Tensor, ...]:
    """Top-k per channel of one batch whose images are already in image_id order.

    ``activation`` is (N, c, H, W). Flattening (image, y, x) row-major makes the column index
    follow the total order's tie-breaks, which ``topk_first`` resolves to the lower index.
    Returns (c, k') activations, image indices, ys and xs, with k' = min(k, candidates).
    ``bottom``: the k *least* activating -- images by their maximum (``max``) or positions
    (``all``), ascending; the activations come back negated (the merge key: descending on
    the negation is ascending on the value), NaN still last.
    """
    n, c, hgt, wid = activation.shape
    flat = activation.reshape(n, c, hgt * wid)
    # NaN ranks last, as in topk_first; the value stored is still the real one.
    ranked = torch.where(torch.isnan(flat), torch.full_like(flat, float("-inf")), flat)
    if score == "max":
        best = ranked.amax(dim=2)  # (N, c)
        index = torch.arange(hgt * wid, device=flat.device)
        # The first row-major position reaching the image's max, whatever the backend's argmax does.
        pos = torch.where(ranked == best[..., None], index, hgt * wid).amin(dim=2)
        value = flat.gather(2, pos[..., None]).squeeze(2)
        if bottom:
            value = -value
            best = torch.where(best == float("-inf"), best, -best)  # an all-NaN image stays last
        sel = topk_first(best.T, k)  # (c, k') image indices
        image = sel
        pos = pos.T.gather(1, sel)
        value = value.T.gather(1, sel)
    else:
        everything = flat.permute(1, 0, 2).reshape(c, n * hgt * wid)
        if bottom:
            everything = -everything  # NaN stays NaN, last in topk_first
        sel = topk_first(everything, k)
        image, pos = sel // (hgt * wid), sel % (hgt * wid)
        value = everything.gather(1, sel)
    return value, image, pos // wid, pos % wid


def _merge(kept: pd.DataFrame | None, part: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k best rows per channel of ``kept`` and ``part`` under the total order."""
    df = part if kept is None else pd.concat([kept, part], ignore_index=True)
    act = df["activation"].to_numpy(np.float32)
    # Descending activation as an ascending key; NaN ranks last, tied with -inf, as on the map side.
    df = df.assign(_order=-np.where(np.isnan(act), np.float32(-np.inf), act))
    df = df.sort_values(["channel", "_order", "image_id", "y", "x"], kind="stable")
    return df.groupby("channel", sort=False).head(k).drop(columns="_order").reset_index(drop=True)


def _merge_piece(shared: tuple[list[str], int], item: tuple[str, ReduceInputs]) -> pd.DataFrame | None:
    """The k best rows per channel of one piece of a partition's partials (a task of the merge)."""
    columns, k = shared
    partition, piece = item
    kept = None
    for rb in piece.batches(partition, columns):
        kept = _merge(kept, rb.to_pandas(), k)
    return kept


def _merge_partitions(inputs: ReduceInputs, partitions: Sequence[str], columns: list[str], k: int,
                      ctx: ReduceContext) -> dict[str, pd.DataFrame | None]:
    """The k best rows per channel of each partition: per-piece merges as tasks, then a small merge here.

    ``_merge`` is a stable sort on the total order, so among rows it calls equal the earlier
    partial row wins. Pieces hold the rows in order and the final merge sees them in piece
    order, so it keeps exactly the rows, in exactly the order, that one sequential merge does.
    """
    parts = max(1, 2 * ctx.workers)
    items = [(partition, piece) for partition in partitions for piece in inputs.split(partition, parts)]
    shared = (columns, k)
    # One piece in all: no task is worth its start-up.
    found = ctx.parallel_map(_merge_piece, items, shared) if len(items) > 1 else \
        [_merge_piece(shared, item) for item in items]
    merged: dict[str, pd.DataFrame | None] = {}
    for partition in partitions:
        kept = [f for (owner, _), f in zip(items, found) if owner == partition and f is not None and not f.empty]
        merged[partition] = _merge(None, pd.concat(kept, ignore_index=True), k) if kept else None
    return merged


def partial_channels(inputs: ReduceInputs, partition: str, k: int) -> int:
    """How many channels a layer's partials hold, from their first rows: a ``map_batch`` writes
    every channel once, ascending, at most ``k`` rows each, before the next batch starts over."""
    seen: list[np.ndarray] = []
    for rb in inputs.batches(partition, ["channel"]):
        seen.append(rb.column(0).to_numpy(zero_copy_only=False))
        values = np.concatenate(seen)
        seen = [values]
        # Where the next batch starts: a channel lower than the one before, or one more than k rows long.
        ends = np.flatnonzero(values[1:] < values[:-1]) + 1
        change = np.flatnonzero(values[1:] != values[:-1]) + 1
        runs = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([runs, [len(values)]]))
        long = runs[lengths > k] + k
        end = min([*ends[:1], *long[:1]], default=None)
        if end is not None:
            return len(np.unique(values[:end]))
    return len(np.unique(seen[0])) if seen else 0


def _offsets(lo: np.ndarray, hi: np.ndarray, full: int) -> np.ndarray:
    """Where a clipped range sits inside the full field: a range cut at the start sits at its end."""
    length = hi - lo
    return np.where((length < full) & (lo == 0), full - length, 0)


def _tile(crop: np.ndarray, cell: tuple[int, int], dy: int, dx: int) -> np.ndarray:
    """A crop placed at (dy, dx) in a grey cell of the field's full size."""
    tile = np.empty((*cell, 3), np.uint8)
    tile[:] = EMPTY
    tile[dy:dy + crop.shape[0], dx:dx + crop.shape[1]] = crop
    return tile


@register
class TopPatches(ReduceAnalysis):
    """The k strongest positions of every channel over the dataset, with receptive-field crops."""

    Params = TopPatchesParams
    params: TopPatchesParams

    def __init__(self, params: TopPatchesParams):
        super().__init__(params)
        self._fields: dict[tuple[int, str, tuple[int, int]], tuple[np.ndarray, np.ndarray]] = {}

    def receptive_field(self, model: torch.nn.Module, layer: str, input_size: tuple[int, int],
                        device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:func:`receptive_field`, measured once per model, layer and input size."""
        h, w = input_size
        key = (id(model), layer, (h, w))
        if key not in self._fields:
            self._fields[key] = receptive_field(model, layer, (h, w), device)
        return self._fields[key]

    def schema(self) -> dict[str, pa.Schema]:
        # Per class, the partials' channel is the key label * CLASS_STRIDE + channel (see map_batch).
        channel = pa.int64() if self.params.per_class else pa.int32()
        return by_layer(self.params.layers, pa.schema([
            ("channel", channel), ("activation", pa.float32()), IMAGE_ID, ("y", pa.int32()), ("x", pa.int32())]))

    def map_batch(self, batch: MapBatch) -> Rows:
        p = self.params
        ids = list(batch.image_ids)
        order = sorted(range(len(ids)), key=ids.__getitem__)
        sorted_ids = np.empty(len(ids), dtype=object)
        sorted_ids[:] = [ids[i] for i in order]
        rows: Rows = {}
        for layer in p.layers:
            a = batch.activations[layer]
            if a.dim() == 2:
                a = a[:, :, None, None]
            if a.dim() != 4:
                raise ValueError(f"layer {layer!r} gives shape {tuple(a.shape[1:])}; "
                                 "top_patches needs (C, H, W) or (C,) outputs")
            channels = p.channel_indices(layer, a.shape[1])
            a = a.index_select(0, torch.tensor(order, dtype=torch.long, device=a.device))
            if len(channels) != a.shape[1]:
                a = a.index_select(1, torch.tensor(channels, dtype=torch.long, device=a.device))
            if not p.per_class:
                rows[f"layer={layer}"] = self._rows(a, np.asarray(channels, np.int32), sorted_ids)
                continue
            # Per class: each label's images alone, the channel keyed by label (ascending keys, as
            # the merge and partial_channels expect of a batch).
            labels = batch.labels.cpu().numpy()[order]
            parts = []
            for label in sorted(set(labels[labels >= 0].tolist())):
                mine = np.flatnonzero(labels == label)
                keys = label * CLASS_STRIDE + np.asarray(channels, np.int64)
                parts.append(self._rows(a[torch.as_tensor(mine, device=a.device)], keys, sorted_ids[mine]))
            if parts:  # a batch of unlabelled images only has no candidates
                rows[f"layer={layer}"] = {c: np.concatenate([part[c] for part in parts]) for c in parts[0]}
        return rows

    def _rows(self, a: torch.Tensor, channels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The partial rows of one group of images (in image_id order) for ``channels`` (their keys)."""
        p = self.params
        value, image, y, x = (t.cpu().numpy() for t in _candidates(a.float(), p.k, p.score, p.select == "bottom"))
        per = value.shape[1]
        return {
            "channel": np.repeat(channels, per),
            "activation": value.reshape(-1).astype(np.float32),
            "image_id": ids[image.reshape(-1)],
            "y": y.reshape(-1).astype(np.int32),
            "x": x.reshape(-1).astype(np.int32),
        }

    def memory_plan(self, inputs: ReduceInputs) -> MemoryPlan | None:
        """The driver's peak: every piece's k best per channel at once, their largest merge, the
        merged rows and the table.

        Per layer ``l`` with ``R`` rows of partials, ``C`` channels and ``P`` pieces (for up to
        PLAN_WORKERS workers): ``pieces_l = min(R, P C k)`` candidate rows and ``kept_l = min(R, C k)``
        result rows. Bytes: ``CANDIDATE_BYTES (sum pieces_l + sum kept_l + MERGE_COPIES max merge_l
        + batch) + ROW_BYTES sum kept_l``, where ``merge_l`` is ``pieces_l``; for a single piece,
        merged here, ``batch`` is a record batch (at most BATCH_ROWS rows) and ``merge`` that batch
        plus ``C k``. The pixels rendering fetches (a few hundred images at a time) are not counted.
        """
        p = self.params
        present = set(inputs.partitions())
        found = []
        for layer in p.layers:
            partition = f"layer={layer}"
            if partition not in present:
                continue
            rows = inputs.rows(partition)
            if p.per_class:  # every (label, channel) key the partials hold
                channels = len(pc.unique(inputs.read(partition, ["channel"]).column(0)))
            elif p.channels is None:
                channels = partial_channels(inputs, partition, p.k)
            elif isinstance(p.channels, str):
                span = _SPAN.match(p.channels)  # the validator admits only 'start:stop'
                channels = int(span.group(2)) - int(span.group(1)) if span else 0
            else:
                channels = len(p.channels)
            pieces = len(inputs.split(partition, 2 * PLAN_WORKERS))
            found.append((layer, rows, channels, pieces))
        if not found:
            return None
        candidates = [min(rows, pieces * channels * p.k) for _, rows, channels, pieces in found]
        kept = [min(rows, channels * p.k) for _, rows, channels, _ in found]
        merge, batch = max(candidates), 0
        if len(found) == 1 and found[0][3] == 1:  # one piece in all: merged here, a record batch at a time
            batch = min(found[0][1], BATCH_ROWS)
            merge = min(found[0][1], batch + kept[0])
        size = CANDIDATE_BYTES * (sum(candidates) + sum(kept) + MERGE_COPIES * merge + batch) + ROW_BYTES * sum(kept)
        widest = max(found, key=lambda f: f[2])
        what = (f"{sum(kept):,} result rows ({len(found)} layer(s), up to {widest[2]:,} channels x k={p.k}) and "
                f"{sum(candidates):,} candidates from the merge's pieces")
        fix = "Choose fewer channels (e.g. channels: '0:64'), a smaller k, or fewer layers per entry"
        return MemoryPlan(bytes=int(size), what=what, fix=fix)

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        p = self.params
        present = set(inputs.partitions())
        columns = ["channel", "activation", "image_id", "y", "x"]
        frames, fields, stats = [], {}, {}
        for layer in p.layers:  # first: a layer of the wrong kind fails before any merging
            rows, cols = self.receptive_field(ctx.model, layer, ctx.input_size, ctx.device)
            fields[layer] = rows, cols
            stats[layer] = [int((rows[:, 1] - rows[:, 0]).max()), int((cols[:, 1] - cols[:, 0]).max())]
        merged = _merge_partitions(inputs, [f"layer={layer}" for layer in p.layers if f"layer={layer}" in present],
                                   columns, p.k, ctx)
        for layer, (rows, cols) in fields.items():
            kept = merged.get(f"layer={layer}")
            if kept is None or kept.empty:
                continue
            if kept["y"].max() >= len(rows) or kept["x"].max() >= len(cols):
                raise ValueError(f"layer {layer!r}: positions up to ({kept['y'].max()}, {kept['x'].max()}) "
                                 f"in a {len(rows)}x{len(cols)} feature map; was the model input size "
                                 f"{tuple(ctx.input_size)}?")
            kept = kept.assign(layer=layer, rank=kept.groupby("channel", sort=False).cumcount() + 1)
            if p.per_class:  # the key back into its label and channel
                keys = kept["channel"].to_numpy(np.int64)
                kept = kept.assign(label=keys // CLASS_STRIDE, channel=keys % CLASS_STRIDE)
            if p.select == "bottom":  # the partials hold the negated activations (see _candidates)
                kept = kept.assign(activation=-kept["activation"])
            frames.append(kept)

        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            {c: [] for c in ["layer", "rank", *columns, *(["label"] if p.per_class else [])]})
        y, x = df["y"].to_numpy(np.int64), df["x"].to_numpy(np.int64)
        box = np.zeros((len(df), 4), np.int32)
        for layer, (rows, cols) in fields.items():
            at = (df["layer"] == layer).to_numpy()
            box[at] = np.stack([cols[x[at], 0], rows[y[at], 0], cols[x[at], 1], rows[y[at], 1]], axis=1)
        table = {
            "layer": pa.array(df["layer"].tolist(), pa.string()),
            "channel": pa.array(df["channel"].to_numpy(np.int32)),
            **({"label": pa.array(df["label"].to_numpy(np.int64))} if p.per_class else {}),
            "rank": pa.array(df["rank"].to_numpy(np.int32)),
            "image_id": pa.array(df["image_id"].tolist(), pa.string()),
            "activation": pa.array(df["activation"].to_numpy(np.float32)),
            "y": pa.array(y.astype(np.int32)),
            "x": pa.array(x.astype(np.int32)),
            "box": pa.array(box.tolist(), pa.list_(pa.int32())),
        }
        projections = project_entries(df, box, p.project, ctx) if p.project and len(df) else {}
        for method, values in projections.items():
            table[f"projection_{method}"] = pa.array(values, FLOATS)
        images: Rendered | tuple = ()
        if p.render:
            base = self._bases(df)
            table["key"] = pa.array([f"{b}-r{r:02d}" for b, r in zip(base, df["rank"].to_numpy())], pa.string())
            table["grid_key"] = pa.array([f"{b}-grid" for b in base], pa.string())
            for method in projections:
                table[f"{method}_grid_key"] = pa.array([f"{b}-{method}-grid" for b in base], pa.string())
            images = self._render(df, box, stats, ctx, projections)
        return ReduceOutput(tables={"": pa.table(table)}, images=images, stats={"receptive_field": stats})

    def _render(self, df: pd.DataFrame, box: np.ndarray, sizes: dict[str, list[int]],
                ctx: ReduceContext, projections: dict[str, list[np.ndarray]] | None = None) -> Rendered:
        """Each entry's crop, then its channel's grid (and its projections' grids): items of whole
        channels, about FETCH_CHUNK images each, naming the ids and boxes they show (and carrying
        the projections, float16)."""
        projections = projections or {}
        p = self.params
        ids = df["image_id"].to_numpy(object)
        ranks = df["rank"].to_numpy()
        # Row spans of each (layer, channel), in table order.
        bases = self._bases(df)
        layer_channel = list(zip(df["layer"], bases))
        starts = [i for i in range(len(df)) if i == 0 or layer_channel[i] != layer_channel[i - 1]]
        items: list[list[Span]] = []
        group: list[Span] = []
        size = 0
        for a, b in zip(starts, starts[1:] + [len(df)]):
            layer, base = layer_channel[a]
            shown = {m: [v[i].astype(np.float16) for i in range(a, b)] for m, v in projections.items()}
            group.append((str(layer), base, ids[a:b].tolist(), ranks[a:b].tolist(), box[a:b].tolist(), shown))
            size += b - a
            if size >= FETCH_CHUNK:
                items.append(group)
                group, size = [], 0
        if group:
            items.append(group)
        return Rendered(draw_patches, items, (sizes, p.k, p.cell), ctx.images)

    def _bases(self, df: pd.DataFrame) -> list[str]:
        """Each row's picture key stem: layer and channel (and label, per class)."""
        layers, channels = df["layer"].tolist(), df["channel"].to_numpy()
        if self.params.per_class:
            return [f"{safe_key(layer)}-l{int(label)}-c{c:04d}"
                    for layer, label, c in zip(layers, df["label"].to_numpy(), channels)]
        return [f"{safe_key(layer)}-c{c:04d}" for layer, c in zip(layers, channels)]


# One channel's rows to draw: (layer, the key stem of its pictures, image ids, ranks, boxes
# [x0, y0, x1, y1], {method: each row's projection, flattened (3, box h, box w)}).
Span = tuple[str, str, list[str], list[int], list[list[int]], dict[str, list[np.ndarray]]]


def draw_patches(shared: tuple[dict[str, list[int]], int, int], item: list[Span], images: Images
                 ) -> Iterator[tuple[str, Image.Image]]:
    """The crops and grid of each channel of one item; ``shared`` is (each layer's largest
    box, k, grid cell)."""
    sizes, k, cell_size = shared
    wanted = list(dict.fromkeys(i for span in item for i in span[2]))
    pixels: dict[str, np.ndarray] = {}
    for s in range(0, len(wanted), FETCH_CHUNK):
        pixels.update(images(wanted[s:s + FETCH_CHUNK]))
    for layer, base, span_ids, span_ranks, boxes, projected in item:
        full = (sizes[layer][0], sizes[layer][1])  # the layer's largest box: an unclipped field
        x0, y0, x1, y1 = np.asarray(boxes, np.int64).reshape(-1, 4).T
        dy, dx = _offsets(y0, y1, full[0]), _offsets(x0, x1, full[1])
        tiles = []
        for j, (image_id, rank) in enumerate(zip(span_ids, span_ranks)):
            crop = np.asarray(pixels[image_id], np.uint8)[y0[j]:y1[j], x0[j]:x1[j]]
            yield f"{base}-r{rank:02d}", Image.fromarray(np.ascontiguousarray(crop))
            tiles.append(enlarge(_tile(crop, full, int(dy[j]), int(dx[j])), cell_size))
        cell = tiles[0].shape[:2]
        cells: list[np.ndarray | None] = list(tiles)
        cells += [None] * (k - len(tiles))  # fewer entries than k: empty cells
        yield f"{base}-grid", grid(cells, cols=math.ceil(math.sqrt(k)), cell=cell)
        for method, values in projected.items():
            shown: list[np.ndarray | None] = []
            for j, flat in enumerate(values):
                h, w = int(y1[j] - y0[j]), int(x1[j] - x0[j])
                picture = signed_pixels(np.asarray(flat, np.float32).reshape(3, h, w))
                shown.append(enlarge(_tile(picture, full, int(dy[j]), int(dx[j])), cell_size))
            shown += [None] * (k - len(values))
            yield f"{base}-{method}-grid", grid(shown, cols=math.ceil(math.sqrt(k)), cell=cell)


# Per class, a partial's channel is label * CLASS_STRIDE + channel: one merge key, ordered by label.
CLASS_STRIDE = 1 << 20

# Rows of top-k entries one projection task computes (a forward and backward of this many inputs).
PROJECT_ROWS = 64
RULES = {"deconvnet": "deconvnet", "guided_backprop": "guided"}


def project_entries(df: pd.DataFrame, box: np.ndarray, methods: Sequence[str], ctx: ReduceContext
                    ) -> dict[str, list[np.ndarray]]:
    """Each row's single activation projected to the input by each method, cropped to its box:
    {method: [float32 (3 * box h * box w,) per row]}, in row order. Rows go to ``parallel_map``
    tasks PROJECT_ROWS at a time, one layer per task; each decodes only its own images."""
    import copy

    model = ctx.put(copy.deepcopy(ctx.model).cpu().eval())
    shared = (model, tuple(ctx.mean), tuple(ctx.std), tuple(methods), ctx.image_reader)
    items, where = [], []
    layers = df["layer"].to_numpy(object)
    for layer in dict.fromkeys(layers):
        rows = np.flatnonzero(layers == layer)
        for s in range(0, len(rows), PROJECT_ROWS):
            part = rows[s:s + PROJECT_ROWS]
            items.append((str(layer), df["channel"].to_numpy(np.int64)[part].tolist(),
                          df["image_id"].to_numpy(object)[part].tolist(), df["y"].to_numpy(np.int64)[part].tolist(),
                          df["x"].to_numpy(np.int64)[part].tolist(), box[part].tolist()))
            where.append(part)
    out: dict[str, list[np.ndarray]] = {m: [np.zeros(0, np.float32)] * len(df) for m in methods}
    for part, result in zip(where, ctx.parallel_map(project_rows, items, shared, gpu=True)):
        for method, values in result.items():
            for row, value in zip(part, values):
                out[method][row] = value
    return out


def project_rows(shared: tuple, item: tuple) -> dict[str, list[np.ndarray]]:
    """One task of :func:`project_entries`: rows of one layer, each projected by each method."""
    from jobs.attribution.backprop import neuron_gradients
    from jobs.core.pixels import pixels_to_inputs

    model, mean, std, methods, images = shared
    layer, channels, ids, ys, xs, boxes = item
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    pixels = images(list(dict.fromkeys(ids)))
    batch = torch.from_numpy(np.stack([pixels[i] for i in ids])).to(device)
    x = pixels_to_inputs(batch, mean, std)
    at = torch.tensor(list(zip(ys, xs)), dtype=torch.long)
    out: dict[str, list[np.ndarray]] = {}
    for method in methods:
        grads = neuron_gradients(model, x, layer, torch.tensor(channels), at, RULES[method])[0].cpu()
        out[method] = [grads[j, :, y0:y1, x0:x1].numpy().astype(np.float32).ravel()
                       for j, (x0, y0, x1, y1) in enumerate(boxes)]
    return out
