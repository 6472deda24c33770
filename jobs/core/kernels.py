"""Small tensor kernels several analyses share."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
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


def read_features(inputs: ReduceInputs, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's partials sorted by image id: ids (object), labels (int64, -1: none), features (N, D).

    Sorting makes every result independent of dataset order and batching. A layer with no
    partition (an empty dataset) gives empty arrays.
    """
    partition = f"layer={layer}"
    if partition not in inputs.partitions():
        return np.array([], dtype=object), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    t = inputs.read(partition, ["image_id", "label", "feature"])
    ids = np.array(t.column("image_id").to_pylist(), dtype=object)
    labels = t.column("label").fill_null(-1).to_numpy().astype(np.int64)
    features = matrix(t.column("feature"))
    order = np.argsort(ids, kind="stable")
    ids, labels, features = ids[order], labels[order], features[order]
    if len(ids) > 1 and (ids[1:] == ids[:-1]).any():
        twice = ids[1:][ids[1:] == ids[:-1]]
        raise ValueError(f"layer {layer!r}: image ids listed more than once, e.g. {twice[0]!r}")
    return ids, labels, features


def worth_logging(w: warnings.WarningMessage) -> bool:
    """A library warning about the data or the fit, not about imports or deprecations."""
    return not issubclass(w.category, (ImportWarning, DeprecationWarning, PendingDeprecationWarning, FutureWarning))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a batch (N, C, H, W) with standard deviation ``sigma`` pixels.

    The kernel spans about +-3 sigma (odd, at most the image size); borders reflect.
    ``sigma`` <= 0 returns ``x`` unchanged.

    >>> gaussian_blur(torch.ones(1, 3, 8, 8), 2.0).allclose(torch.ones(1, 3, 8, 8))
    True
    """
    from torchvision.transforms.v2.functional import gaussian_blur as tv_blur

    if sigma <= 0:
        return x
    h, w = x.shape[-2:]

    def size(limit: int) -> int:
        k = 2 * int(np.ceil(3 * sigma)) + 1
        return max(1, min(k, limit if limit % 2 else limit - 1))

    return tv_blur(x, kernel_size=[size(w), size(h)], sigma=[float(sigma), float(sigma)])


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize maps (N, h, w) -> (N, H, W) bilinearly (align_corners=False)."""
    if maps.dim() != 3:
        raise ValueError(f"upsample expects (N, h, w) maps, got shape {tuple(maps.shape)}")
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
