"""Pixels to model inputs: the one normalisation every part of convscope uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Images in [0, 1] (N, C, H, W) -> model inputs ``(x - mean) / std`` per channel.

    >>> normalize(torch.ones(1, 3, 1, 1), [0.5] * 3, [0.25] * 3).flatten().tolist()
    [2.0, 2.0, 2.0]
    """
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def pixels_to_inputs(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Decoded pixels (N, H, W, 3) uint8 -> model inputs (N, 3, H, W) float32, on their device."""
    return normalize(pixels.permute(0, 3, 1, 2).float().div_(255.0), mean, std)
