"""How alike two attribution maps are: the similarity measures of the sanity checks.

Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018) compare a map with the map
of the same image under a randomised model by the Spearman rank correlation (of the signed
maps and of their absolute values), SSIM and the correlation of HOG features. All take pairs
of (M, H, W) maps, row by row, and return float64 (M,).

* ``spearman``: Spearman's rho of the flattened signed maps, the Pearson correlation of their
  pixel ranks, ties taking the average rank (``scipy.stats.spearmanr``):
  ``rho = sum_k (r_k - mean r)(s_k - mean s) / sqrt(sum_k (r_k - mean r)^2 sum_k (s_k - mean s)^2)``.
* ``spearman_abs``: the same of the absolute values ``|a|``, ``|b|``.
* ``ssim``: structural similarity (``skimage.metrics.structural_similarity``) of the
  normalised maps ``n(a) = |a| / max |a|`` and ``n(b)`` (Adebayo's normalisation, Quantus'
  ``abs`` and ``normalise_by_max``; an all-zero map stays zero), with ``data_range`` the pair's
  joint range ``max(n(a), n(b)) - min(n(a), n(b))`` as Quantus' ``ssim`` sets it, and a square
  window of ``min(7, H, W)`` px, one less when that is even (skimage needs an odd window that
  fits the map; 7 is its default).
* ``hog``: Pearson correlation of the HOG descriptors (``skimage.feature.hog``: 9 unsigned
  orientations, square cells of ``c = max(2, min(H, W) // 8)`` px, blocks of 2 x 2 cells with
  L2-Hys normalisation, flattened) of ``n(a)`` and ``n(b)``. The cells grow with the map: 2 px
  up to 23 px sides (4 x 4 cells on an 8 x 8 map), then about 8 cells a side (28 px cells on
  a 224 x 224 map); skimage leaves out the pixels past the last whole cell. Maps of 3 x 3 to
  5 x 5 have one cell per block.

Two maps that are identical as compared (the signed maps for ``spearman``, ``|a|`` for
``spearman_abs``, ``n(a)`` for ``ssim`` and ``hog``) score exactly 1, constant ones included.
Otherwise a correlation with a constant (the ranks of a constant map, the HOG descriptor of a
flat map, which is all zeros) is undefined: NaN. A NaN in a map makes its scores NaN.
``ssim`` and ``hog`` need maps of at least 3 x 3.

Quantus 0.6 (``MPRT`` and ``RandomLogit`` with ``abs=True``, ``normalise=True``) differs in two
ways that are not copied here: ``normalise_by_max`` runs on the whole batch at once, so every
map is divided by the largest value of the batch (a score would depend on which images share
it), and its ``ssim`` receives the maps flattened to (B, H*W), so it computes a 1-D SSIM along
the rows. Here each map has its own maximum and SSIM is 2-D, as in Adebayo et al.; on one
pair of normalised 2-D maps the value is Quantus' ``ssim`` (tested).

>>> a = np.arange(16.0).reshape(1, 4, 4)
>>> similarity(a, -a, ["spearman", "spearman_abs"])["spearman"].tolist()
[-1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

METRICS = ("spearman", "spearman_abs", "ssim", "hog")
SSIM_WINDOW = 7  # skimage's default window, shrunk (odd) to fit smaller maps
HOG_ORIENTATIONS = 9
HOG_CELLS_PER_SIDE = 8  # cells of max(2, min(H, W) // 8) px
HOG_BLOCK = 2  # cells per block side


def _array(maps: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    a = maps.detach().cpu().double().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float64)
    if a.ndim != 3:
        raise ValueError(f"{name} must be (M, H, W) maps, got shape {a.shape}")
    return a


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of (M, K) ``a`` with the same row of ``b``; NaN where
    either row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def normalised(maps: np.ndarray) -> np.ndarray:
    """``|a| / max |a|`` per map of (M, H, W) ``maps``; an all-zero map stays zero, a map with a
    NaN becomes all NaN."""
    a = np.abs(maps)
    top = a.max(axis=(1, 2), initial=0.0, keepdims=True)
    out = np.where(np.isnan(top), np.nan, np.zeros_like(a))
    return np.divide(a, top, out=out, where=top > 0)


def ssim_window(h: int, w: int) -> int:
    """The largest odd window <= min(7, h, w)."""
    side = min(SSIM_WINDOW, h, w)
    return side if side % 2 else side - 1


def hog_features(image: np.ndarray) -> np.ndarray:
    """The flattened HOG descriptor of one (H, W) map with the parameters of the module doc."""
    from skimage.feature import hog

    cell = max(2, min(image.shape) // HOG_CELLS_PER_SIDE)
    # A map of fewer than two cells a side (only 3 x 3 .. 5 x 5 maps) has one-cell blocks.
    block = HOG_BLOCK if min(image.shape) >= HOG_BLOCK * cell else 1
    return np.asarray(hog(image, orientations=HOG_ORIENTATIONS, pixels_per_cell=(cell, cell),
                          cells_per_block=(block, block), block_norm="L2-Hys", feature_vector=True))


def similarity(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, metrics: Sequence[str]
               ) -> dict[str, np.ndarray]:
    """The similarity of each pair of maps ``a[i]``, ``b[i]`` ((M, H, W) each) by each of
    ``metrics`` (names from ``METRICS``, see the module doc): float64 (M,) per metric."""
    from scipy.stats import rankdata

    if isinstance(metrics, str):
        raise ValueError(f"metrics must be a sequence of names, got the string {metrics!r}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown similarity {', '.join(map(repr, unknown))}; choose from {', '.join(METRICS)}")
    x, y = _array(a, "a"), _array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have one shape, got {x.shape} and {y.shape}")
    m, h, w = x.shape
    spatial = [metric for metric in metrics if metric in ("ssim", "hog")]
    if spatial and m and min(h, w) < 3:
        raise ValueError(f"{' and '.join(spatial)} need maps of at least 3 x 3, got {h} x {w}")

    out: dict[str, np.ndarray] = {}
    nx = ny = None
    for metric in metrics:
        if metric in ("spearman", "spearman_abs"):
            fx, fy = x.reshape(m, h * w), y.reshape(m, h * w)
            if metric == "spearman_abs":
                fx, fy = np.abs(fx), np.abs(fy)
            value = _row_pearson(rankdata(fx, axis=1), rankdata(fy, axis=1)) if m else np.zeros(0)
            same = (fx == fy).all(axis=1)
        else:
            if nx is None or ny is None:
                nx, ny = normalised(x), normalised(y)
            value = np.empty(m)
            for i in range(m):
                if metric == "ssim":
                    value[i] = _ssim(nx[i], ny[i])
                else:
                    value[i] = _row_pearson(hog_features(nx[i])[None], hog_features(ny[i])[None])[0]
            same = (nx == ny).reshape(m, h * w).all(axis=1)
        out[metric] = np.where(same, 1.0, value).astype(np.float64)
    return out


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if not hi > lo:  # a NaN map (equal constant maps never get here: they are identical)
        return float("nan")
    return float(structural_similarity(a, b, win_size=ssim_window(*a.shape), data_range=float(hi - lo)))
