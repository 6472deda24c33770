"""``guided_backprop``: the input gradient with every ReLU passing back only positive signals
where its input was positive.

Springenberg, Dosovitskiy, Brox & Riedmiller, "Striving for Simplicity: The All
Convolutional Net" (ICLR-W 2015): at each ReLU, ``R_in = (x > 0) * max(R_out, 0)``. ReLUs
called as ``F.relu``/``torch.relu`` inside ``forward`` are caught as well as ``nn.ReLU``
modules, and the model object is never changed (see :func:`jobs.attribution.backprop.relu_rule`).

Example manifest entry::

    - type: guided_backprop
      signed: false      # true keeps the (3, H, W) signed picture
      # target: {neuron: {layer: layer2, channel: 5}}   # project one unit (see saliency)

Table columns: see :mod:`jobs.attribution.base`; ``map`` is (1, H, W), ``max_c |R_c|``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from jobs.attribution.base import (
    Attribution,
    AttributionAnalysis,
    Choice,
    NeuronTargetParams,
    Target,
    in_chunks,
    neuron_target,
    own_forward_maps,
)
from jobs.core.base import MapBatch, register


class RuleParams(NeuronTargetParams):
    """Params of a :class:`RuleAttribution`."""

    signed: bool = False


class GuidedBackpropParams(RuleParams):
    pass


def rule_gradients(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, rule: str, signed: bool,
                   chunk: int) -> torch.Tensor:
    """Input gradients under a ReLU backward ``rule``, ``chunk`` images per pass, channels reduced."""
    from jobs.attribution.backprop import input_gradients, reduce_channels

    return torch.cat([reduce_channels(input_gradients(model, x[sl], targets[sl], rule=rule), signed)
                      for sl in in_chunks(len(x), chunk)])


class RuleAttribution(AttributionAnalysis):
    """Input gradients with every ReLU's backward replaced by ``rule``."""

    Params: ClassVar[type[RuleParams]]
    params: RuleParams
    rule: ClassVar[str]

    def attribute_own(self, batch: MapBatch, target: Target) -> tuple[Choice, Attribution] | None:
        from jobs.attribution.backprop import reduce_channels

        p = self.params
        # The rule changes only the ReLUs' backward: this forward's logits are the plain model's.
        choice, maps = own_forward_maps(self.name, batch, target, self.chunk(batch.images),
                                        lambda forward, rows, targets: reduce_channels(
                                            forward.gradients(rows, targets), p.signed), rule=self.rule)
        return choice, Attribution.pixels(maps, p.signed)

    def attribute(self, batch: MapBatch, x: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> Attribution:
        from jobs.attribution.saliency import neuron_attribution

        p = self.params
        neuron = neuron_target(p)
        if neuron is not None:
            return neuron_attribution(batch, x, rows, neuron, self.rule, p.signed, self.chunk(x))
        return Attribution.pixels(rule_gradients(batch.model, x, targets, self.rule, p.signed, self.chunk(x)), p.signed)


@register
class GuidedBackprop(RuleAttribution):
    """Guided backpropagation maps, one per image and target."""

    Params = GuidedBackpropParams
    params: GuidedBackpropParams
    rule = "guided"
