"""How much an attribution map moves under a small change of its input: max- and
average-sensitivity (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations",
NeurIPS 2019).

For image ``x`` with map ``Φ(x)`` and perturbations ``δ_s`` drawn uniformly from the L∞ ball of
radius ``r = radius * (max(x) - min(x))``::

    sens_s = ||Φ(x + δ_s) − Φ(x)||_F / ||Φ(x)||_F
    max_sensitivity = max_s sens_s        avg_sensitivity = mean_s sens_s

the norms and the signed, unnormalised maps of Quantus' ``MaxSensitivity`` and
``AvgSensitivity`` defaults (their Monte Carlo estimate of the supremum and the mean). The
target class stays the one of the clean image. A map of norm 0 has no relative change: NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# explain(inputs (K, C, H, W), targets (K,), index (K,)) -> maps (K, H, W); index[k] is the row
# of x that input k is a noisy copy of.
Explain = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def perturbations(x: torch.Tensor, seeds: Sequence[int], samples: int, radius: float) -> torch.Tensor:
    """(N, samples, C, H, W) noise: for image i, ``(torch.rand((samples, C, H, W), generator=g_i) * 2 - 1) * r_i``
    with ``g_i = torch.Generator().manual_seed(seeds[i])`` on the CPU and ``r_i`` its radius."""
    span = (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1)).float().cpu()
    noise = []
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        noise.append((torch.rand((samples, *x.shape[1:]), generator=g) * 2 - 1) * (radius * span[i]))
    return torch.stack(noise) if noise else torch.zeros((0, samples, *x.shape[1:]))


def sensitivity(explain: Explain, x: torch.Tensor, targets: torch.Tensor, heat: torch.Tensor, seeds: Sequence[int],
                samples: int, radius: float) -> dict[str, torch.Tensor]:
    """Max- and average-sensitivity of the maps ``heat`` (N, H, W) of ``x`` (N, C, H, W).

    The ``samples`` noisy copies of every image are explained in one call, image-major (image
    0's copies first); each image's noise comes from its own seed, so a result does not depend
    on which images share the call. Returns float32 CPU ``max_sensitivity`` and
    ``avg_sensitivity``, (N,) each.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n = len(x)
    if tuple(heat.shape[:1]) != (n,) or heat.dim() != 3:
        raise ValueError(f"heat must be (N, H, W) with N = {n}, got shape {tuple(heat.shape)}")
    if tuple(targets.shape) != (n,) or len(seeds) != n:
        raise ValueError(f"targets and seeds need one entry per image ({n}), got {tuple(targets.shape)} and "
                         f"{len(seeds)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    if n == 0:
        empty = torch.zeros(0)
        return {"max_sensitivity": empty, "avg_sensitivity": empty.clone()}
    noise = perturbations(x, seeds, samples, radius).to(device=x.device, dtype=x.dtype)
    noisy = (x[:, None] + noise).reshape(n * samples, *x.shape[1:])
    index = torch.arange(n).repeat_interleave(samples)
    maps = explain(noisy, targets.repeat_interleave(samples), index).detach().float().cpu()
    clean = heat.detach().float().cpu()
    change = (maps.reshape(n, samples, -1) - clean.reshape(n, 1, -1)).norm(dim=2)
    base = clean.reshape(n, -1).norm(dim=1, keepdim=True)
    sens = torch.where(base > 0, change / base.clamp(min=torch.finfo(torch.float32).tiny),
                       torch.full_like(change, float("nan")))
    return {"max_sensitivity": sens.amax(dim=1), "avg_sensitivity": sens.mean(dim=1)}
