"""Small tensor kernels several analyses share."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from jobs.core.base import FLOATS, IMAGE_ID, LABEL, MapBatch, ReduceInputs, Rows, by_layer


def pool(activation: torch.Tensor, how: str, grid: int = 2) -> torch.Tensor:
    """Pool a batch of activations (N, C, H, W) -- or any (N, ...) -- to vectors (N, D).

    ``avg``/``max`` reduce every spatial position of a channel (D = C); ``grid`` averages
    over a ``grid`` x ``grid`` partition of the map (D = C * grid^2, channel-major); ``none``
    flattens. Outputs without spatial dimensions (a linear layer's (N, C)) are flattened
    whatever ``how`` is.

    >>> pool(torch.arange(8.).reshape(1, 2, 2, 2), "avg")
    tensor([[1.5000, 5.5000]])
    """
    if activation.dim() <= 2 or how == "none":
        return activation.flatten(1)
    spatial = activation.flatten(2)  # (N, C, positions)
    if how == "avg":
        return spatial.mean(dim=2)
    if how == "max":
        return spatial.amax(dim=2)
    if how == "grid":
        if activation.dim() != 4:
            raise ValueError(f"pool 'grid' needs (N, C, H, W) activations, got shape {tuple(activation.shape)}")
        return F.adaptive_avg_pool2d(activation, grid).flatten(1)
    raise ValueError(f"unknown pool {how!r}; expected one of avg, max, none, grid")


def topk_first(values: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Column indices of the ``k`` best entries of each row; ties go to the lower index.

    ``torch.topk`` leaves the order of equal values unspecified (and it differs between CPU
    and GPU); results that must not depend on batching need a total order. O(n) per row:
    one ``topk`` finds the k-th value, then everything strictly better is kept plus the
    first equal ones by index. NaN counts as the worst value. Rows come back best first
    (equal values by index).

    >>> topk_first(torch.tensor([[1., 3., 3., 0., 3.]]), 2)
    tensor([[1, 2]])
    """
    if values.dim() != 2:
        raise ValueError(f"topk_first expects (rows, n) values, got shape {tuple(values.shape)}")
    rows, n = values.shape
    k = min(k, n)
    if k == 0 or rows == 0:
        return torch.zeros((rows, k), dtype=torch.long, device=values.device)
    worst = float("-inf") if largest else float("inf")
    v = torch.nan_to_num(values, nan=worst, posinf=float("inf"), neginf=float("-inf"))
    kth = v.topk(k, dim=1, largest=largest).values[:, -1:]
    better = v > kth if largest else v < kth
    equal = v == kth
    need = k - better.sum(dim=1, keepdim=True)
    keep = better | (equal & (equal.cumsum(dim=1) <= need))
    cols = keep.nonzero()[:, 1].view(rows, k)  # row-major: each row's kept columns in index order
    # Best first; a stable sort keeps equal values in index order.
    order = v.gather(1, cols).sort(dim=1, descending=largest, stable=True).indices
    return cols.gather(1, order)


def matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<float> column as a float32 (N, D) array, chunk by chunk (no 2^31-value limit)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts, width = [], None
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        # A copy: torch wants writeable memory, and Arrow's zero-copy views are read-only.
        values = np.array(chunk.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        if values.size % len(chunk):
            raise ValueError("feature vectors of different lengths in one layer")
        part = values.reshape(len(chunk), -1)
        if width is not None and part.shape[1] != width:
            raise ValueError(f"feature vectors of different lengths in one layer: {width} and {part.shape[1]}")
        width = part.shape[1]
        parts.append(part)
    if not parts:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def pooled_features_schema(layers: Sequence[str]) -> dict[str, pa.Schema]:
    """The partials :func:`pooled_features` returns, by partition."""
    return by_layer(layers, pa.schema([IMAGE_ID, LABEL, ("feature", FLOATS)]))


def pooled_features(batch: MapBatch, layers: list[str], how: str, grid: int = 2) -> Rows:
    """Partials of one batch: per layer, ``image_id``, ``label`` and the pooled ``feature`` vectors.

    What :func:`read_features` reads back, one partition ``layer=<layer>`` per layer.
    """
    ids = np.array(batch.image_ids, dtype=object)
    labels = batch.labels.cpu().numpy().astype(np.int64)
    return {
        f"layer={layer}": {
            "image_id": ids,
            "label": labels,
            "feature": pool(batch.activations[layer], how, grid).float().cpu().numpy(),
        }
        for layer in layers
    }


def sample_positions(ids: pa.ChunkedArray, max_points: int | None, seed: int, layer: str = "") -> np.ndarray:
    """Dataset positions of the rows to map, in image-id order: all rows, or a seeded sample of ``max_points``.

    The sample is the one :func:`jobs.core.base.sample_ids` draws from the sorted ids with the
    same size and seed. ValueError when an id is listed twice.
    """
    order = pc.sort_indices(ids).to_numpy()
    if len(order) > 1:
        # Arrow sorts strings by their UTF-8 bytes, which is code point order: Python's.
        ranked = ids.take(pa.array(order))
        same = pc.equal(ranked.slice(1), ranked.slice(0, len(order) - 1))
        if pc.any(same).as_py():
            first = pc.index(same, True).as_py()
            raise ValueError(f"layer {layer!r}: image ids listed more than once, e.g. {ranked[first].as_py()!r}")
    if max_points is None or len(order) <= max_points:
        return order
    picked = np.random.default_rng(seed).choice(len(order), size=max_points, replace=False)
    return order[np.sort(picked)]


def read_sample(inputs: ReduceInputs, layer: str, max_points: int | None,
                seed: int, partition: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A layer's mapped rows in image-id order: ids (object), labels (int64, -1: none), float32 features (n, D),
    and how many rows the layer has.

    Reads the ids, then streams the features a block at a time, copying only the kept rows
    into one preallocated array: memory is the kept rows plus one block, whatever the total.
    A layer with no partition (an empty dataset) gives empty arrays. ``partition``: where the
    layer's rows are, when not ``layer=<layer>``.
    """
    partition = partition or f"layer={layer}"
    if partition not in inputs.partitions():
        return np.array([], dtype=object), np.zeros(0, np.int64), np.zeros((0, 0), np.float32), 0
    total = inputs.rows(partition)
    id_chunks = [b.column(0) for b in inputs.batches(partition, ["image_id"])]
    ids = pa.chunked_array(id_chunks, type=id_chunks[0].type if id_chunks else pa.string())
    kept = sample_positions(ids, max_points, seed, layer)
    n, d = len(kept), inputs.width(partition, "feature")
    kept_ids = np.array(ids.take(pa.array(kept)).to_pylist(), dtype=object)
    del ids
    labels = np.full(n, -1, np.int64)
    features = np.empty((n, d), np.float32)
    # Blocks come in dataset order: find each block's kept rows by their sorted positions.
    by_position = np.argsort(kept, kind="stable")
    positions = kept[by_position]
    start = 0
    for batch in inputs.batches(partition, ["label", "feature"]):
        end = start + batch.num_rows
        lo, hi = np.searchsorted(positions, [start, end])
        if hi > lo:
            into = by_position[lo:hi]
            label, vectors = batch.column("label"), batch.column("feature")
            if hi - lo < batch.num_rows:  # a sample: only its rows (else every row, no copy)
                rows = pa.array(positions[lo:hi] - start)
                label, vectors = label.take(rows), vectors.take(rows)
            labels[into] = pc.fill_null(label, -1).to_numpy(zero_copy_only=False)
            lengths = pc.min_max(pc.list_value_length(vectors)).as_py()
            if lengths["min"] != d or lengths["max"] != d:
                raise ValueError(f"layer {layer!r}: feature vectors of different lengths in one layer: "
                                 f"{d} and {lengths['max'] if lengths['max'] != d else lengths['min']}")
            features[into] = np.asarray(vectors.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, d)
        start = end
    if start != total:
        raise ValueError(f"layer {layer!r}: the partials gave {start} rows, not the {total} they hold")
    # The reader's buffers go back to the system (Arrow's pool keeps them otherwise), so the
    # copies the caller makes next (a solver's, PCA's) do not come on top of them.
    pa.default_memory_pool().release_unused()
    return kept_ids, labels, features, total


def read_features(inputs: ReduceInputs, layer: str, partition: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's partials sorted by image id: ids (object), labels (int64, -1: none), features (N, D) float32.

    Streamed by :func:`read_sample` (every row): the driver holds the float32 array plus one
    record batch. Sorting makes every result independent of dataset order and batching. A
    layer with no partition (an empty dataset) gives empty arrays.
    """
    ids, labels, features, _ = read_sample(inputs, layer, None, 0, partition)
    return ids, labels, features


def worth_logging(w: warnings.WarningMessage) -> bool:
    """A library warning about the data or the fit, not about imports or deprecations."""
    return not issubclass(w.category, (ImportWarning, DeprecationWarning, PendingDeprecationWarning, FutureWarning))


@contextmanager
def logged_warnings(log: Callable[[str], None] | None, prefix: str = "") -> Iterator[None]:
    """Record the warnings the block raises and, after it, log each distinct one worth logging
    (:func:`worth_logging`) once, as ``prefix + "Category: message"``.

    >>> with logged_warnings(print, "fit: "):
    ...     warnings.warn("not converged", UserWarning)
    ...     warnings.warn("not converged", UserWarning)
    fit: UserWarning: not converged
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for message in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught if worth_logging(w)):
        if log is not None:
            log(f"{prefix}{message}")


# Model inputs per forward when an entry leaves ``chunk`` unset: on a GPU, many (it is fed
# better); on a CPU, the caches set the pace, not the memory: the demo CNN's deletion curves
# run 1.2x faster 64 images at a time than 256 on two idle cores, 2.7x when they are shared.
GPU_CHUNK = 256
CPU_CHUNK = 64
# ... fewer for large inputs: a CPU chunk holds at most this many input values (at least 8 images).
CPU_CHUNK_VALUES = 2**20


def chunk_size(chunk: int | None, x: torch.Tensor) -> int:
    """Model inputs per forward for inputs like ``x`` (N, C, H, W): ``chunk`` when set, else
    ``GPU_CHUNK`` on a GPU and on a CPU ``CPU_CHUNK``, fewer for large images.

    >>> chunk_size(None, torch.zeros(1, 3, 64, 64)), chunk_size(None, torch.zeros(1, 3, 224, 224))
    (64, 8)
    """
    if chunk is not None:
        return chunk
    if x.device.type != "cpu":
        return GPU_CHUNK
    per_image = max(1, x[0].numel()) if len(x) else 1
    return max(8, min(CPU_CHUNK, CPU_CHUNK_VALUES // per_image))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a batch (N, C, H, W) with standard deviation ``sigma`` pixels.

    The kernel spans about +-3 sigma (odd, at most the image size); borders reflect.
    ``sigma`` <= 0 returns ``x`` unchanged. The same as torchvision's ``gaussian_blur`` up to
    float rounding, but as two 1-D passes over the once-padded image: 2k rather than k^2
    multiplications a pixel (sigma 8 on 64 px images, a 49 px kernel: 2x faster on two CPU cores).

    >>> gaussian_blur(torch.ones(1, 3, 8, 8), 2.0).allclose(torch.ones(1, 3, 8, 8))
    True
    """
    if sigma <= 0:
        return x
    n, c, h, w = x.shape

    def kernel(limit: int) -> torch.Tensor:
        k = max(1, min(2 * int(np.ceil(3 * sigma)) + 1, limit if limit % 2 else limit - 1))
        t = torch.linspace(-(k // 2), k // 2, steps=k, dtype=torch.float32, device=x.device)
        pdf = torch.exp(-0.5 * (t / float(sigma)) ** 2)
        return (pdf / pdf.sum()).to(x.dtype)

    kx, ky = kernel(w), kernel(h)
    padded = F.pad(x.reshape(n * c, 1, h, w), [len(kx) // 2, len(kx) // 2, len(ky) // 2, len(ky) // 2],
                   mode="reflect")
    rows = F.conv2d(padded, kx.view(1, 1, 1, -1))
    return F.conv2d(rows, ky.view(1, 1, -1, 1)).reshape(n, c, h, w)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize maps (N, h, w) -> (N, H, W) bilinearly (align_corners=False)."""
    if maps.dim() != 3:
        raise ValueError(f"upsample expects (N, h, w) maps, got shape {tuple(maps.shape)}")
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def bootstrap_interval(values: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
                       ) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (Efron 1979), NaNs dropped.

    The ``resamples`` resamples of the n values come from one draw,
    ``np.random.default_rng(seed).integers(0, n, size=(resamples, n))`` (made in blocks of
    rows when it would be large: the same numbers, as the generator fills rows in order); the
    interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (``np.quantile``,
    linear) of their means, as Python floats: (nan, nan) without values, (v, v) for one value v.

    >>> bootstrap_interval(np.array([1.0, 1.0, np.nan]))
    (1.0, 1.0)
    >>> lo, hi = bootstrap_interval(np.arange(100.0), seed=0)
    >>> bool(lo < 49.5 < hi)
    True
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level} and {resamples}")
    rng = np.random.default_rng(seed)
    rows = max(1, (1 << 22) // n)  # about 32 MiB of int64 indices at a time
    means = np.concatenate([v[rng.integers(0, n, size=(min(rows, resamples - s), n))].mean(axis=1)
                            for s in range(0, resamples, rows)])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
