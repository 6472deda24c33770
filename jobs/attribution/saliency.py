"""``saliency``: the gradient of the class score with respect to the input pixels.

Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image
Classification Models and Saliency Maps" (ICLR-W 2014): ``M_ij = max_c |dS_t / dx_cij|``,
with ``S_t`` the pre-softmax score of the target class. With ``smoothgrad`` (Smilkov et al.,
"SmoothGrad: removing noise by adding noise", 2017) the map is averaged over ``samples``
noisy copies ``x + N(0, (sigma * (max(x) - min(x)))^2)``; each image's noise is seeded by
``seed`` and its id, so a map does not depend on the batch it was computed in.

Example manifest entry::

    - type: saliency
      signed: false          # true keeps the signed (3, H, W) gradient
      smoothgrad: {samples: 25, sigma: 0.15}
      # target: {neuron: {layer: layer3, channel: 7, at: max}}   # one unit instead of a class

With a neuron target the map is the gradient of that one activation (the channel's value at
``at``: ``max`` -- where it peaks in each image, ``center`` or ``[y, x]``); rows leave
``target``, ``rank`` and ``score`` empty and name the unit in ``neuron_layer``,
``neuron_channel``, ``neuron_y``, ``neuron_x`` and its value in ``neuron_value``; the
deletion / insertion scores (which follow a class) are NaN.

Table columns: see :mod:`jobs.attribution.base`; ``map`` is (1, H, W) (or (3, H, W) signed).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from jobs.attribution.base import (
    Attribution,
    AttributionAnalysis,
    Choice,
    Neuron,
    NeuronTargetParams,
    Target,
    in_chunks,
    neuron_target,
    own_forward_maps,
)
from jobs.core.base import MapBatch, register, unit_seed


class SmoothGrad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(default=25, ge=1)
    sigma: float = Field(default=0.15, gt=0, description="noise std as a fraction of the input's range")
    seed: int = 0


class SaliencyParams(NeuronTargetParams):
    signed: bool = False
    smoothgrad: SmoothGrad | None = None


def smoothgrad(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, seeds: list[int], samples: int,
               sigma: float, signed: bool, chunk: int, neuron: tuple[str, int, torch.Tensor] | None = None
               ) -> torch.Tensor:
    """Mean of the per-sample gradient maps over ``samples`` noisy copies of each image.

    Copies are drawn per image from ``torch.Generator().manual_seed(seeds[i])`` on the CPU and
    pushed through the model ``chunk`` at a time (images x samples never all at once). With
    ``neuron`` = (layer, channel, positions (N, 2)) each copy's map is that unit's gradient,
    at the image's own position, instead of the class score's.
    """
    from jobs.attribution.backprop import input_gradients, neuron_gradients, reduce_channels

    total = None
    # One stream of (image, sample) pairs; each image's noise comes from its own generator.
    noise_rng = [torch.Generator().manual_seed(s) for s in seeds]
    pairs = [(i, s) for i in range(len(x)) for s in range(samples)]
    span = (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1)).clamp(min=1e-12)
    for sl in in_chunks(len(pairs), chunk):
        idx = torch.tensor([pairs[j][0] for j in range(sl.start, sl.stop)])
        noise = torch.stack([torch.randn(x.shape[1:], generator=noise_rng[int(i)]) for i in idx]).to(x.device)
        noisy = x[idx.to(x.device)] + noise * (sigma * span[idx.to(x.device)]).view(-1, 1, 1, 1)
        if neuron is None:
            grads = input_gradients(model, noisy, targets[idx.to(x.device)])
        else:
            grads = neuron_gradients(model, noisy, neuron[0], neuron[1], at=neuron[2][idx])[0]
        maps = reduce_channels(grads, signed)
        if total is None:
            total = torch.zeros((len(x), *maps.shape[1:]), dtype=torch.float32, device=maps.device)
        total.index_add_(0, idx.to(maps.device), maps.float())
    if total is None:
        raise ValueError(f"smoothgrad needs at least one image and one sample, got {len(x)} and {samples}")
    return total / samples


@register
class Saliency(AttributionAnalysis):
    """Input-gradient saliency maps (optionally SmoothGrad), one per image and target."""

    Params = SaliencyParams
    params: SaliencyParams

    def attribute_own(self, batch: MapBatch, target: Target) -> tuple[Choice, Attribution] | None:
        from jobs.attribution.backprop import reduce_channels

        p = self.params
        if p.smoothgrad is not None:
            return None  # the noisy forwards cannot choose: the clean image's logits do
        choice, maps = own_forward_maps(self.name, batch, target, self.chunk(batch.images),
                                        lambda forward, rows, targets: reduce_channels(
                                            forward.gradients(rows, targets), p.signed))
        return choice, Attribution.pixels(maps, p.signed)

    def attribute(self, batch: MapBatch, x: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> Attribution:
        from jobs.attribution.backprop import input_gradients, reduce_channels

        p = self.params
        neuron = neuron_target(p)
        if neuron is not None:
            return neuron_attribution(batch, x, rows, neuron, None, p.signed, self.chunk(x), p.smoothgrad)
        if p.smoothgrad is None:
            maps = torch.cat([reduce_channels(input_gradients(batch.model, x[sl], targets[sl]), p.signed)
                              for sl in in_chunks(len(x), self.chunk(x))])
        else:
            sg = p.smoothgrad
            seeds = [unit_seed(sg.seed, batch.image_ids[int(r)]) for r in rows]
            maps = smoothgrad(batch.model, x, targets, seeds, sg.samples, sg.sigma, p.signed, self.chunk(x))
        return Attribution.pixels(maps, p.signed)


def neuron_attribution(batch: MapBatch, x: torch.Tensor, rows: torch.Tensor, neuron: Neuron, rule: str | None,
                       signed: bool, chunk: int, noise: SmoothGrad | None = None) -> Attribution:
    """Maps of one unit per image (:func:`jobs.attribution.backprop.neuron_gradients`), with the
    unit's position and value in ``extra``. With ``noise`` (SmoothGrad) the position is chosen
    on the clean image and kept for every noisy copy."""
    from jobs.attribution.backprop import neuron_gradients, reduce_channels

    maps, positions, values = [], [], []
    for sl in in_chunks(len(x), chunk):
        grads, pos, val = neuron_gradients(batch.model, x[sl], neuron.layer, neuron.channel, neuron.at, rule)
        maps.append(reduce_channels(grads, signed))
        positions.append(pos)
        values.append(val)
    pos = torch.cat(positions)
    if noise is not None:
        seeds = [unit_seed(noise.seed, batch.image_ids[int(r)]) for r in rows]
        dummy = torch.zeros(len(x), dtype=torch.long, device=x.device)
        result = smoothgrad(batch.model, x, dummy, seeds, noise.samples, noise.sigma, signed, chunk,
                            neuron=(neuron.layer, neuron.channel, pos))
    else:
        result = torch.cat(maps)
    attribution = Attribution.pixels(result, signed)
    attribution.extra.update(neuron_positions=pos, neuron_values=torch.cat(values))
    return attribution
