"""Faithfulness scores for attribution maps: causal deletion/insertion and box-based pointing.

All functions take attribution maps ``maps`` of shape (N, H, W) at input resolution, where a
higher value means a more important pixel. Boxes are int (N, 4) rows ``[x0, y0, x1, y1]`` in
half-open pixel coordinates of the same H x W frame; a row of -1 means the image has no box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from jobs.core.kernels import gaussian_blur

DELETION, INSERTION = 0, 1


def _check_maps(x: torch.Tensor, maps: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    if tuple(maps.shape) != (n, h, w):
        raise ValueError(f"maps must be (N, H, W) = {(n, h, w)} to match x {tuple(x.shape)}, got {tuple(maps.shape)}")


def _pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(N, H*W) position of every pixel in its image's descending order; ties by pixel index."""
    n = maps.shape[0]
    flat = maps.reshape(n, -1).float()
    # NaN would sort unpredictably; it counts as the least important value.
    flat = torch.nan_to_num(flat, nan=float("-inf"))
    order = flat.sort(dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand(n, -1)
    return torch.empty_like(order).scatter_(1, order, positions)


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 16,
    chunk: int = 256,
    insertion_sigma: float | None = None,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves and their AUCs (Petsiuk et al., "RISE", BMVC 2018).

    Pixels are ranked by ``maps``, descending, ties by row-major pixel index (stable sort); NaN
    ranks last. At step ``s`` = 0..steps the first ``k_s = round(s * H*W / steps)`` pixels
    (Python's round, half to even) are changed, all channels together:

    - deletion: they are set to 0 in model-input space (the normalisation mean colour);
      ``d_s`` = softmax probability of the target, so ``d_0`` is the clean image.
    - insertion: starting from ``gaussian_blur(x, insertion_sigma)`` (default ``max(H, W) / 8``)
      they take their original values; ``i_0`` is fully blurred, ``i_steps`` the clean image.

    AUC is the trapezoid rule over the fraction changed in [0, 1]:
    ``(sum_s c_s - (c_0 + c_steps) / 2) / steps``. A faithful map has a low deletion AUC and a
    high insertion AUC.

    All N * (steps + 1) * 2 inputs go through ``model`` in forwards of at most ``chunk`` images,
    each chunk built on the fly, so memory stays bounded. Results do not depend on ``chunk``
    or on which images share the batch (``model`` must be in eval mode).

    Returns float32 CPU tensors ``deletion_auc`` (N,), ``insertion_auc`` (N,),
    ``deletion_curve`` (N, steps+1) and ``insertion_curve`` (N, steps+1).
    """
    _check_maps(x, maps)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    n, _, h, w = x.shape
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must be (N,) = ({n},), got shape {tuple(targets.shape)}")
    hw = h * w
    device = x.device
    sigma = max(h, w) / 8 if insertion_sigma is None else float(insertion_sigma)

    counts = torch.tensor([round(s * hw / steps) for s in range(steps + 1)], device=device)
    targets = targets.to(device=device, dtype=torch.long)
    curves = torch.empty(2, n, steps + 1, dtype=torch.float32)
    with torch.inference_mode():
        ranks = _pixel_ranks(maps.to(device))
        blurred = gaussian_blur(x, sigma)
        total = 2 * n * (steps + 1)
        for start in range(0, total, chunk):
            job = torch.arange(start, min(start + chunk, total), device=device)
            kind, rest = job // (n * (steps + 1)), job % (n * (steps + 1))
            image, step = rest // (steps + 1), rest % (steps + 1)
            # True where the pixel is among the first k_step of its image's order.
            changed = (ranks[image] < counts[step][:, None]).view(-1, 1, h, w)
            clean = x[image]
            deleted = torch.where(changed, torch.zeros((), dtype=x.dtype, device=device), clean)
            inserted = torch.where(changed, clean, blurred[image])
            inputs = torch.where((kind == DELETION).view(-1, 1, 1, 1), deleted, inserted)
            probs = model(inputs).float().softmax(dim=1)
            p = probs.gather(1, targets[image][:, None])[:, 0]
            curves[kind.cpu(), image.cpu(), step.cpu()] = p.cpu()

    auc = (curves.sum(dim=2) - (curves[..., 0] + curves[..., -1]) / 2) / steps
    return {
        "deletion_auc": auc[DELETION].contiguous(),
        "insertion_auc": auc[INSERTION].contiguous(),
        "deletion_curve": curves[DELETION].contiguous(),
        "insertion_curve": curves[INSERTION].contiguous(),
    }


# Neighbour offsets (dy, dx) and weights of the ROAD imputation: 1/6 for the four direct
# neighbours, 1/12 for the four diagonal ones (they sum to 1).
_ROAD_NEIGHBOURS = (
    ((-1, 0), 1 / 6),
    ((1, 0), 1 / 6),
    ((0, -1), 1 / 6),
    ((0, 1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((1, 1), 1 / 12),
)
MORF, LERF = 0, 1


def noisy_linear_imputation(
    x: torch.Tensor,
    removed: torch.Tensor,
    noise: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Noisy linear imputation of ROAD (Rong et al., "A Consistent and Efficient Evaluation
    Strategy for Attribution Methods", ICML 2022).

    Every removed pixel ``i`` becomes the weighted mean of its in-frame 8-neighbours ``j``,
    removed or kept, each channel on its own:

        v_i = sum_j w_ij v_j / sum_j w_ij,   w_ij = 1/6 (direct), 1/12 (diagonal),

    kept pixels holding their values. At a border the weights of the neighbours that exist are
    renormalised (the rule of quantus, taken from the authors' code). The sparse linear system,
    one unknown per removed pixel and one right-hand side per channel, is solved in float64
    with ``scipy.sparse.linalg.spsolve``. It has a unique solution whenever at least one pixel
    is kept. A linear ramp is reproduced exactly when no removed pixel lies on the border (there
    the one-sided mean is biased).

    Then ``noise * randn`` is added to the imputed pixels only: one ``torch.randn((C, K),
    generator=generator, dtype=torch.float64)`` draw, K = number of removed pixels, with
    entry ``[c, k]`` going to channel ``c`` of the k-th removed pixel in row-major order.
    Nothing is drawn when K = 0 or ``noise`` = 0; ``generator=None`` uses torch's global
    generator.

    ``x`` is one (C, H, W) image in model-input space, ``removed`` an (H, W) bool mask. Returns
    a new tensor with the dtype and device of ``x``; kept pixels are bit-identical.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be one (C, H, W) image, got shape {tuple(x.shape)}")
    c, h, w = x.shape
    if tuple(removed.shape) != (h, w):
        raise ValueError(f"removed must be (H, W) = {(h, w)} to match x {tuple(x.shape)}, got {tuple(removed.shape)}")
    if removed.dtype != torch.bool:
        raise ValueError(f"removed must be a bool mask, got dtype {removed.dtype}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise!r}")
    mask = removed.detach().cpu().numpy()
    ys, xs = np.nonzero(mask)  # row-major order
    k = len(ys)
    if k == 0:
        return x.clone()
    if k == h * w:
        raise ValueError(f"removed covers all {h * w} pixels: nothing is kept to impute from")

    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    image = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    unknown = np.full((h, w), -1, dtype=np.int64)
    unknown[ys, xs] = np.arange(k)
    # System: d_i v_i - sum_{removed j} w_ij v_j = sum_{kept j} w_ij x_j,  d_i = sum_j w_ij.
    diagonal = np.zeros(k)
    rhs = np.zeros((k, c))
    rows, cols, vals = [np.arange(k)], [np.arange(k)], []
    for (dy, dx), weight in _ROAD_NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = np.flatnonzero((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w))
        ny, nx = ny[inside], nx[inside]
        diagonal[inside] += weight
        var = unknown[ny, nx]
        free = var >= 0
        rows.append(inside[free])
        cols.append(var[free])
        vals.append(np.full(int(free.sum()), -weight))
        # Each removed pixel has at most one neighbour per offset: no repeated rows here.
        rhs[inside[~free]] += weight * image[:, ny[~free], nx[~free]].T
    system = coo_matrix(
        (np.concatenate([diagonal, *vals]), (np.concatenate(rows), np.concatenate(cols))), shape=(k, k)
    ).tocsc()
    solution = np.asarray(spsolve(system, rhs)).reshape(k, c)

    values = torch.from_numpy(solution.T.copy())  # (C, K)
    if noise > 0:
        values = values + noise * torch.randn((c, k), generator=generator, dtype=torch.float64)
    out = x.detach().clone()
    index = torch.from_numpy(ys * w + xs).to(x.device)
    out.view(c, h * w)[:, index] = values.to(device=x.device, dtype=x.dtype)
    return out


def road(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    percentages: Sequence[float],
    noise: float = 0.01,
    seeds: Sequence[int] | None = None,
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """ROAD: RemOve And Debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods", ICML 2022).

    Pixels are ranked by ``maps`` exactly as in :func:`deletion_insertion` (descending, stable,
    ties by row-major pixel index, NaN last). For a percentage ``p`` in (0, 100),
    ``k = round(p / 100 * H*W)`` pixels (Python's round, half to even) are removed, all
    channels together, and filled in by :func:`noisy_linear_imputation` with standard
    deviation ``noise`` (in model-input units):

    - MoRF (most relevant first): the first ``k`` pixels of the order;
    - LeRF (least relevant first): the last ``k`` (so NaN pixels go first).

    The curve value is the softmax probability of the target class on the imputed image:
    ``morf_curve[i, j]`` for ``percentages[j]``. The AUC is the plain mean of a curve over the
    given percentages, ``sum_j c_j / P`` (no trapezoid, no clean image). A faithful map has a
    low MoRF AUC and a high LeRF AUC.

    Noise of image ``i`` comes from its own ``torch.Generator().manual_seed(seeds[i])`` (every
    image uses seed 0 when ``seeds`` is None; pass distinct seeds, e.g. from the image ids, for
    independent noise). Each generator is consumed in a fixed order: MoRF for every percentage
    in the given order, then LeRF likewise, one ``(C, k)`` draw each (see
    :func:`noisy_linear_imputation`; none when ``noise`` is 0). So an image's
    results depend neither on ``chunk`` nor on which images share the batch.

    The N * P * 2 imputed inputs are built on the fly and go through ``model`` (which must be in
    eval mode) in forwards of at most ``chunk`` images, so memory stays bounded. Each
    imputation solves a sparse system on the CPU.

    Returns float32 CPU tensors ``morf_curve`` (N, P), ``lerf_curve`` (N, P), ``morf_auc`` (N,)
    and ``lerf_auc`` (N,).
    """
    _check_maps(x, maps)
    n, _, h, w = x.shape
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must be (N,) = ({n},), got shape {tuple(targets.shape)}")
    if isinstance(percentages, (str, bytes)) or not isinstance(percentages, Sequence) or len(percentages) == 0:
        raise ValueError(f"percentages must be a non-empty sequence of numbers in (0, 100), got {percentages!r}")
    pct = [float(p) for p in percentages]
    bad = [p for p in pct if not 0 < p < 100]
    if bad:
        raise ValueError(f"percentages must lie strictly between 0 and 100, got {bad}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise!r}")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"seeds must hold one seed per image ({n}), got {len(seeds)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    hw = h * w
    counts = [round(p / 100 * hw) for p in pct]
    full = [p for p, k in zip(pct, counts) if k >= hw]
    if full:
        raise ValueError(
            f"percentages {full} remove all {hw} pixels of a {h}x{w} image: nothing is kept to impute from"
        )
    steps = len(pct)
    device = x.device
    targets = targets.to(device=device, dtype=torch.long)
    generators = [torch.Generator().manual_seed(int(seeds[i]) if seeds is not None else 0) for i in range(n)]

    curves = torch.empty(2, n, steps, dtype=torch.float32)
    with torch.inference_mode():
        ranks = _pixel_ranks(maps.to(device)).view(n, h, w).cpu() if n else torch.empty(0, h, w, dtype=torch.long)
        total = 2 * n * steps
        # Jobs run image-major, then kind (MoRF before LeRF), then percentage: each image's
        # generator sees its draws in the documented order whatever the chunk boundaries.
        jobs = [(i, kind, s) for i in range(n) for kind in (MORF, LERF) for s in range(steps)]
        for start in range(0, total, chunk):
            part = jobs[start : start + chunk]
            inputs = []
            for i, kind, s in part:
                removed = ranks[i] < counts[s] if kind == MORF else ranks[i] >= hw - counts[s]
                inputs.append(noisy_linear_imputation(x[i], removed, noise, generators[i]))
            image = torch.tensor([i for i, _, _ in part], device=device)
            probs = model(torch.stack(inputs)).float().softmax(dim=1)
            p = probs.gather(1, targets[image][:, None])[:, 0].cpu()
            kinds = torch.tensor([kind for _, kind, _ in part])
            step = torch.tensor([s for _, _, s in part])
            curves[kinds, image.cpu(), step] = p

    auc = curves.mean(dim=2)
    return {
        "morf_curve": curves[MORF].contiguous(),
        "lerf_curve": curves[LERF].contiguous(),
        "morf_auc": auc[MORF].contiguous(),
        "lerf_auc": auc[LERF].contiguous(),
    }


def _box_masks(boxes: torch.Tensor, n: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) inside-the-box masks (half-open) and the (N,) rows that have a box."""
    if tuple(boxes.shape) != (n, 4):
        raise ValueError(f"boxes must be (N, 4) = ({n}, 4), got shape {tuple(boxes.shape)}")
    boxes = boxes.to(device=device, dtype=torch.long)
    has_box = ~(boxes == -1).all(dim=1)
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    ys = torch.arange(h, device=device)[None, :, None]
    xs = torch.arange(w, device=device)[None, None, :]
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    return inside, has_box


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Pointing-game hits (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016).

    A hit is the map's maximum lying inside the half-open box ``x0 <= x < x1, y0 <= y < y1``;
    with several maxima the first in row-major order counts, and NaN counts as the lowest value.
    Unlike the paper there is no tolerance margin around the box. Returns float32 (N,):
    1.0 for a hit, 0.0 for a miss, NaN where the image has no box (row of -1).
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    n, h, w = maps.shape
    inside, has_box = _box_masks(boxes, n, h, w, maps.device)
    if h * w == 0:
        raise ValueError(f"maps must have at least one pixel, got shape {tuple(maps.shape)}")
    flat = torch.nan_to_num(maps.reshape(n, -1).float(), nan=float("-inf"))
    # argmax returns the first maximal index.
    peak = flat.argmax(dim=1, keepdim=True)
    hit = inside.reshape(n, -1).gather(1, peak)[:, 0].float()
    return torch.where(has_box, hit, torch.full_like(hit, float("nan"))).cpu()


def box_energy(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game (Wang et al., "Score-CAM", CVPR-W 2020).

    ``sum_{p in box} max(m_p, 0) / sum_p max(m_p, 0)``: the share of the map's positive mass that
    falls inside the half-open box. Returns float32 (N,); NaN where the image has no box (row of
    -1), and 0 where the map has no positive mass at all.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    n, h, w = maps.shape
    inside, has_box = _box_masks(boxes, n, h, w, maps.device)
    positive = maps.float().clamp(min=0)
    total = positive.sum(dim=(1, 2))
    within = (positive * inside).sum(dim=(1, 2))
    # No positive mass: nothing points anywhere, so nothing points into the box.
    energy = torch.where(total > 0, within / total.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(total))
    return torch.where(has_box, energy, torch.full_like(energy, float("nan"))).cpu()
