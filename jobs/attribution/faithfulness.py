"""Faithfulness scores for attribution maps: causal deletion/insertion and box-based pointing.

All functions take attribution maps ``maps`` of shape (N, H, W) at input resolution, where a
higher value means a more important pixel. Boxes are int (N, 4) rows ``[x0, y0, x1, y1]`` in
half-open pixel coordinates of the same H x W frame; a row of -1 means the image has no box.
"""

from __future__ import annotations

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
