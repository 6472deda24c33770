"""How alike two attribution maps are: the similarity measures of the sanity checks.

Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018) compare a map with the map
of the same image under a randomised model by the Spearman rank correlation (of the signed
maps and of their absolute values), SSIM and the correlation of HOG features. All take pairs
of (M, H, W) maps, row by row, and return float64 (M,).

* ``spearman`` / ``spearman_abs``: Pearson correlation of the average ranks of the pixels
  (``scipy.stats.spearmanr``), signed maps / absolute values.
* ``ssim``: structural similarity (``skimage.metrics.structural_similarity``) of the absolute
  maps each divided by its maximum (Adebayo's normalisation; Quantus' defaults ``abs`` and
  ``normalise_by_max``), with ``data_range`` the pair's joint range, as Quantus' ``ssim``;
  the window is 7 px, or the largest odd size that fits a smaller map.
* ``hog``: Pearson correlation of the HOG descriptors (``skimage.feature.hog``, 9
  orientations, cells of ``max(2, min(H, W) // 4)`` px, blocks of 2 x 2 cells) of the same
  normalised absolute maps.

Two identical maps score exactly 1 on every measure (a constant map included); a correlation
with a constant map that is not identical is undefined: NaN.

>>> a = np.arange(16.0).reshape(1, 4, 4)
>>> similarity(a, -a, ["spearman", "spearman_abs"])["spearman"].tolist()
[-1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

METRICS = ("spearman", "spearman_abs", "ssim", "hog")


def _array(maps: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    a = maps.detach().cpu().double().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float64)
    if a.ndim != 3:
        raise ValueError(f"{name} must be (M, H, W) maps, got shape {a.shape}")
    return a


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def _normalised(a: np.ndarray) -> np.ndarray:
    """Absolute values over each map's maximum; an all-zero map stays zero."""
    a = np.abs(a)
    top = a.reshape(len(a), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(a, top, out=np.zeros_like(a), where=top > 0)


def _hog(image: np.ndarray) -> np.ndarray:
    from skimage.feature import hog

    cell = max(2, min(image.shape) // 4)
    blocks = 2 if min(image.shape) >= 2 * cell else 1
    return hog(image, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(blocks, blocks),
               feature_vector=True)


def similarity(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, metrics: Sequence[str]
               ) -> dict[str, np.ndarray]:
    """The similarity of each pair of maps ``a[i]``, ``b[i]`` by each of ``metrics``."""
    from scipy.stats import rankdata

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown similarity {', '.join(map(repr, unknown))}; choose from {', '.join(METRICS)}")
    x, y = _array(a, "a"), _array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have one shape, got {x.shape} and {y.shape}")
    m = len(x)
    flat_x, flat_y = x.reshape(m, -1), y.reshape(m, -1)
    same = (flat_x == flat_y).all(axis=1)
    out: dict[str, np.ndarray] = {}
    for metric in metrics:
        if metric in ("spearman", "spearman_abs"):
            fx, fy = (np.abs(flat_x), np.abs(flat_y)) if metric == "spearman_abs" else (flat_x, flat_y)
            value = _row_pearson(rankdata(fx, axis=1), rankdata(fy, axis=1)) if m else np.zeros(0)
        else:
            from skimage.metrics import structural_similarity

            nx, ny = _normalised(x), _normalised(y)
            value = np.empty(m)
            for i in range(m):
                if metric == "ssim":
                    side = min(7, *x.shape[1:])
                    win = side if side % 2 else side - 1
                    lo, hi = min(nx[i].min(), ny[i].min()), max(nx[i].max(), ny[i].max())
                    value[i] = structural_similarity(nx[i], ny[i], win_size=max(win, 1), data_range=float(hi - lo)) \
                        if hi > lo else np.nan
                else:
                    value[i] = _row_pearson(_hog(nx[i])[None], _hog(ny[i])[None])[0]
        # Identical maps are as alike as maps can be, constant ones included.
        out[metric] = np.where(same, 1.0, value).astype(np.float64)
    return out
