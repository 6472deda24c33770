"""How much an attribution map moves under a small change of its input: max- and
average-sensitivity (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations",
NeurIPS 2019).

For image ``x`` with map ``Φ(x)`` and perturbations ``δ_s`` drawn uniformly from the L∞ ball of
radius ``r = radius * (max(x) - min(x))``::

    sens_s = ||Φ(x + δ_s) − Φ(x)||_F / ||Φ(x)||_F,   s = 0 .. samples-1
    max_sensitivity = max_s sens_s        avg_sensitivity = mean_s sens_s

the Monte Carlo estimates of the supremum and the mean, with the norms and the signed,
unnormalised maps of the defaults of Quantus' ``MaxSensitivity`` and ``AvgSensitivity``
(``fro_norm`` numerator and denominator, ``abs=False``, ``normalise=False``). The target class
stays the one of the clean image, whatever the noisy copy is predicted as. A map of norm 0 has
no relative change: its scores are NaN (Quantus divides by zero and keeps the inf).

The noise is ``(torch.rand((samples, C, H, W), generator=g) * 2 - 1) * r`` in float32 with
``g = torch.Generator().manual_seed(seed)`` of the image on the CPU, sample 0 first, so it
does not depend on the device or on the other images. Quantus' default noise differs: a
fresh ``np.random.uniform(-0.2, 0.2)`` per sample, a fixed bound whatever the value range;
fed the same noise (``perturb_func``) its two metrics give these scores, as do its defaults
for every sample being kept (``return_nan_when_prediction_changes=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# explain(inputs (K, C, H, W), targets (K,), index (K,)) -> maps (K, H, W); index[k] is the row
# of x that input k is a noisy copy of (a method that seeds by image can look its id up).
Explain = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _radii(x: torch.Tensor, radius: float) -> torch.Tensor:
    """``radius * (max(x_i) - min(x_i))`` per image, float32 CPU (N,)."""
    flat = x.detach().flatten(1)
    return radius * (flat.amax(dim=1) - flat.amin(dim=1)).float().cpu()


def perturbations(x: torch.Tensor, seeds: Sequence[int], samples: int, radius: float) -> torch.Tensor:
    """All the noise :func:`sensitivity` adds to ``x`` (N, C, H, W), as float32 CPU
    (N, samples, C, H, W): row i is ``(torch.rand((samples, C, H, W), generator=g_i) * 2 - 1) * r_i``
    with ``g_i = torch.Generator().manual_seed(seeds[i])`` on the CPU, sample 0 first, and
    ``r_i = radius * (max(x_i) - min(x_i))``: uniform on the L∞ ball of radius ``r_i``."""
    shape = (samples, *x.shape[1:])
    noise = [(torch.rand(shape, generator=torch.Generator().manual_seed(int(seed))) * 2 - 1) * r
             for seed, r in zip(seeds, _radii(x, radius))]
    return torch.stack(noise) if noise else torch.zeros((0, *shape))


def sensitivity(explain: Explain, x: torch.Tensor, targets: torch.Tensor, heat: torch.Tensor, seeds: Sequence[int],
                samples: int, radius: float) -> dict[str, torch.Tensor]:
    """Max- and average-sensitivity of the maps ``heat`` (N, H, W) of ``x`` (N, C, H, W) for
    ``targets`` (N,), ``samples`` noisy copies per image within ``radius`` times the image's
    value range (see the module doc).

    The N * samples noisy copies (noise of :func:`perturbations`, image i's from its own
    generator seeded by ``seeds[i]``) are explained in one call, image-major (image 0's samples
    first): ``explain(x[index] + δ, targets[index], index)`` with ``index = repeat_interleave(
    arange(N), samples)``; ``explain`` may chunk inside. A result does not depend on which
    images share the call. Returns float32 CPU ``max_sensitivity`` and ``avg_sensitivity``,
    (N,) each.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    if tuple(heat.shape) != (n, h, w):
        raise ValueError(f"heat must be (N, H, W) = {(n, h, w)} to match x {tuple(x.shape)}, got {tuple(heat.shape)}")
    if tuple(targets.shape) != (n,) or len(seeds) != n:
        raise ValueError(f"targets and seeds need one entry per image ({n}), got {tuple(targets.shape)} and "
                         f"{len(seeds)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    if n == 0:
        return {"max_sensitivity": torch.zeros(0), "avg_sensitivity": torch.zeros(0)}

    noise = perturbations(x, seeds, samples, radius).to(device=x.device, dtype=x.dtype)
    noisy = (x.detach()[:, None] + noise).reshape(n * samples, *x.shape[1:])
    index = torch.arange(n, device=x.device).repeat_interleave(samples)
    maps = explain(noisy, targets.to(x.device)[index], index)
    if tuple(maps.shape) != (n * samples, h, w):
        raise ValueError(f"explain must return (K, H, W) = {(n * samples, h, w)} maps, got {tuple(maps.shape)}")
    clean = heat.detach().float().cpu().reshape(n, 1, h * w)
    change = (maps.detach().float().cpu().reshape(n, samples, h * w) - clean).norm(dim=2)
    base = clean.norm(dim=2)
    sens = torch.where(base > 0, change / base.clamp(min=torch.finfo(torch.float32).tiny),
                       torch.full_like(change, float("nan")))
    return {"max_sensitivity": sens.amax(dim=1), "avg_sensitivity": sens.mean(dim=1)}
