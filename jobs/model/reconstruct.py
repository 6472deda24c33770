"""Images from features: representation inversion and DeepDream.

- Mahendran & Vedaldi, "Understanding Deep Image Representations by Inverting Them" (CVPR 2015):
  find an image whose features at a layer match given ones, regularised by total variation
  (:func:`invert`, :func:`total_variation`).
- Mordvintsev, Olah & Tyka, "Inceptionism: Going Deeper into Neural Networks" (Google Research
  blog, 2015), the DeepDream algorithm: amplify whatever a layer responds to by gradient ascent
  on the image, with jitter and octaves (:func:`dream`).

Conventions: images are (n, 3, H, W) floats in [0, 1]; ``normalize`` maps such images to model
inputs and ``features`` maps model inputs to a layer's activations (n, ...). The rows of a batch
are independent: every loss is a sum over rows of per-row terms, every normalisation is per row
and the random jitter comes from one generator seeded by ``seed`` and is the same for all rows,
so a row's result does not depend on which other rows share its batch (up to float rounding).
Rounding does differ between batch sizes (convolutions pick other algorithms), and a long
optimisation through ReLUs and max pooling can amplify it where a unit sits at its kink: at an
early layer rows then still agree to ~1e-4, after a few max pools two runs of one row may end in
visibly different (equally good) reconstructions.

Gradients come from ``torch.autograd.grad`` with respect to the image only, so the model's
parameters and their ``.grad`` are never touched; everything runs with grad enabled even when
the caller is in ``no_grad`` or ``inference_mode``. Nothing here does file I/O or uses Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Fn = Callable[[Tensor], Tensor]

_EPS = 1e-12


def total_variation(x: Tensor, beta: float = 2.0) -> Tensor:
    """(n,) TV_beta per image (Mahendran & Vedaldi 2015): sum over pixels and channels of
    ((x[:, :, i, j+1] - x[:, :, i, j])**2 + (x[:, :, i+1, j] - x[:, :, i, j])**2) ** (beta / 2),
    over the (H-1) x (W-1) pixels where both differences exist."""
    if x.dim() != 4:
        raise ValueError(f"total_variation expects (n, C, H, W) images, got shape {tuple(x.shape)}")
    dx = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
    dy = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
    sq = dx * dx + dy * dy
    if beta == 2.0:
        per_pixel = sq
    else:
        # d/ds s^(beta/2) is infinite at s = 0 for beta < 2; powering a safe 1 there and masking
        # keeps the value exact and makes the gradient 0 (a subgradient) at flat pixels.
        flat = sq == 0
        per_pixel = torch.where(flat, 0.0, torch.where(flat, 1.0, sq) ** (beta / 2))
    return per_pixel.flatten(1).sum(1)


@dataclass
class InversionResult:
    """What :func:`invert` returns (all cpu float32, detached)."""

    images: Tensor  # (n, 3, H, W) in [0, 1]
    feature_error: Tensor  # (n,) relative ||phi(x) - phi0|| / ||phi0|| at the result
    pixel_error: Tensor  # (n,) RMSE in [0, 1] units against ``reference``, NaN without one
    history: Tensor  # (n, k) relative feature error every max(1, steps // 50) steps


def _relative_sq_error(phi: Tensor, target: Tensor, target_sq: Tensor) -> Tensor:
    """(n,) ||phi - phi0||^2 / ||phi0||^2 per row."""
    return (phi - target).flatten(1).pow(2).sum(1) / target_sq


def _roll(x: Tensor, shift: tuple[int, int]) -> Tensor:
    """``x`` rolled by (dy, dx) pixels (circular), a no-op for (0, 0)."""
    return torch.roll(x, shifts=shift, dims=(2, 3)) if shift != (0, 0) else x


def _shift(generator: torch.Generator, jitter: int) -> tuple[int, int]:
    """A random (dy, dx) in [-jitter, jitter]^2, the same for every row of the batch."""
    if jitter <= 0:
        return (0, 0)
    dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
    return (int(dy), int(dx))


def invert(features: Fn, target: Tensor, normalize: Fn, size: tuple[int, int], steps: int = 300,
           lr: float = 0.05, tv_weight: float = 0.5, tv_beta: float = 2.0,
           seeds: Sequence[int] | None = None, reference: Tensor | None = None, jitter: int = 0,
           seed: int = 0) -> InversionResult:
    """Reconstruct images from their features (Mahendran & Vedaldi, CVPR 2015, "Understanding Deep
    Image Representations by Inverting Them"): from noise, minimise per image
    ||phi(x) - phi0||^2 / ||phi0||^2 + tv_weight * TV_beta(x) / (H*W)   (x in [0,1], clamped).

    ``target`` is ``features(normalize(original))`` (n, ...). Row i starts from 0.5 plus Gaussian
    noise (std 0.05) drawn from a generator seeded ``seeds[i]`` (default ``range(n)``), so a row's
    start does not depend on its batch. The pixels themselves are optimised by Adam and clamped
    to [0, 1] after every step (projected gradient; a sigmoid parametrisation would slow down
    pixels near 0 and 1, which real images have plenty of); the learning rate decays from ``lr``
    to 0 on a cosine schedule so the last steps settle instead of jittering by ~``lr``.
    ``jitter`` > 0 rolls the image by a random shift of up to that many pixels at each step
    (Mahendran & Vedaldi 2016), the same shift for all rows.

    TV normalisation: TV_beta / (H*W) is the mean per-pixel TV, so ``tv_weight`` does not depend
    on the image size; the feature term is relative (1 at phi = 0), so it does not depend on the
    layer's scale. The default 0.5 (beta = 2) keeps early-layer reconstructions of 32x32 images
    sharp while suppressing the high-frequency noise that late layers leave unconstrained; tuned
    on the 32x32 demo CNN and rendered shapes, where relu1 comes back with an RMSE of ~0.02
    (0.1: ~0.005 but noisier at relu2..4; 2: smoother late layers but ~0.04 at relu1).

    ``history[:, 0]`` is the error at the starting noise; ``feature_error`` is measured at the
    result without jitter.
    """
    n = target.shape[0]
    h, w = size
    seeds = list(range(n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} target rows")
    if reference is not None and tuple(reference.shape) != (n, 3, h, w):
        raise ValueError(f"reference has shape {tuple(reference.shape)}, expected {(n, 3, h, w)}")
    device = target.device
    every = max(1, steps // 50)
    with torch.inference_mode(False), torch.enable_grad():
        # Clones: an inference-mode tensor cannot take part in autograd.
        phi0 = target.detach().clone().float()
        phi0_sq = phi0.flatten(1).pow(2).sum(1).clamp_min(_EPS)
        noise = torch.stack([torch.randn((3, h, w), generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]) if n else torch.zeros((0, 3, h, w))
        x = (0.5 + 0.05 * noise).clamp(0, 1).to(device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        generator = torch.Generator().manual_seed(seed)
        history: list[Tensor] = []
        for t in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
            shift = _shift(generator, jitter)
            err = _relative_sq_error(features(normalize(_roll(x, shift))), phi0, phi0_sq)
            loss = err + tv_weight * total_variation(x, tv_beta) / (h * w)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            if t % every == 0:
                if shift == (0, 0):
                    history.append(err.detach().sqrt())
                else:  # the error of the image itself, not of its jittered copy
                    with torch.no_grad():
                        history.append(_relative_sq_error(features(normalize(x)), phi0, phi0_sq).sqrt())
            x.grad = grad
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
        result = x.detach()
        with torch.no_grad():
            final = _relative_sq_error(features(normalize(result)), phi0, phi0_sq).sqrt()
            if reference is not None:
                ref = reference.detach().clone().to(device=device, dtype=result.dtype)
                pixel = (result - ref).flatten(1).pow(2).mean(1).sqrt()
            else:
                pixel = torch.full((n,), float("nan"))
    hist = torch.stack(history, 1) if history else torch.zeros((n, 0))
    return InversionResult(images=result.float().cpu(), feature_error=final.float().cpu(),
                           pixel_error=pixel.float().cpu(), history=hist.float().cpu())


@dataclass
class DreamResult:
    """What :func:`dream` returns (cpu float32)."""

    images: Tensor  # (n, 3, H, W) in [0, 1], final
    start: Tensor  # (n,) objective mean(f^2) of features(normalize(original)) per row
    final: Tensor  # (n,) same objective at the result


def _objective(features: Fn, normalize: Fn, x: Tensor) -> Tensor:
    """(n,) mean over each row's activations of f^2 (comparable across layers of any size)."""
    return features(normalize(x)).flatten(1).pow(2).mean(1)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (n, C, h, w) to ``size``, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def octave_sizes(size: tuple[int, int], octaves: int, octave_scale: float,
                  min_size: int) -> list[tuple[int, int]]:
    """Sizes ``size / octave_scale**k`` for k < ``octaves``, smallest first, none below ``min_size``.

    The full size is always kept (even below ``min_size``): the result must have the input's size.
    """
    h, w = size
    sizes = [(h, w)]
    for k in range(1, octaves):
        s = (round(h / octave_scale**k), round(w / octave_scale**k))
        if min(s) < min_size:
            break
        sizes.append(s)
    return sizes[::-1]


def dream(features: Fn, images: Tensor, normalize: Fn, octaves: int = 3, octave_scale: float = 1.4,
          steps: int = 10, lr: float = 0.01, jitter: int = 2, seed: int = 0, min_size: int = 8) -> DreamResult:
    """DeepDream (Mordvintsev, Olah & Tyka 2015, "Inceptionism"): amplify a layer's activations by
    gradient ascent on objective = mean(f(x)^2) per image, with normalised gradient steps
    x += lr * g / mean(|g|) (per image), random jitter (roll), and octaves: process the image at
    sizes size / octave_scale**k (smallest first, none below min_size), carrying the added detail up
    to the next octave (the classic detail-upsampling loop). Output has the input's size.

    Each octave's base is the original resized (antialiased) to that size; the detail (result
    minus base) of the previous octave is upsampled bilinearly and added to it. After each step
    the image is clamped to [0, 1]. The jitter shift (at most ``jitter`` pixels each way) is
    drawn from one generator seeded ``seed``, the same for all rows.
    """
    if images.dim() != 4:
        raise ValueError(f"dream expects (n, 3, H, W) images, got shape {tuple(images.shape)}")
    if octave_scale <= 1:
        raise ValueError(f"octave_scale must be > 1, got {octave_scale}")
    size = (images.shape[2], images.shape[3])
    with torch.inference_mode(False), torch.enable_grad():
        original = images.detach().clone().float()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            start = _objective(features, normalize, original)
        detail = None
        for octave_size in octave_sizes(size, octaves, octave_scale, min_size):
            base = _resize(original, octave_size)
            x = base if detail is None else (base + _resize(detail, octave_size)).clamp(0, 1)
            for _ in range(steps):
                x = x.detach().requires_grad_(True)
                shift = _shift(generator, jitter)
                # The roll is inside the graph, so the gradient arrives already un-rolled.
                (g,) = torch.autograd.grad(_objective(features, normalize, _roll(x, shift)).sum(), x)
                scale = g.abs().flatten(1).mean(1).clamp_min(_EPS).view(-1, 1, 1, 1)
                x = (x.detach() + lr * g / scale).clamp(0, 1)
            detail = x.detach() - base
        result = x.detach()
        with torch.no_grad():
            final = _objective(features, normalize, result)
    return DreamResult(images=result.float().cpu(), start=start.float().cpu(), final=final.float().cpu())
