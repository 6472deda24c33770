"""``deconvnet``: the input "gradient" with every ReLU applied to the backward signal instead.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014): at each
ReLU, ``R_in = max(R_out, 0)``, whatever the forward input was. Functional ReLUs are caught
as well as modules (see :func:`jobs.attribution.backprop.relu_rule`).

Example manifest entry::

    - type: deconvnet
      signed: false

Table columns: see :mod:`jobs.attribution.base`; ``map`` is (1, H, W), ``max_c |R_c|``.
"""

from __future__ import annotations

from jobs.attribution.guided_backprop import RuleAttribution, RuleParams
from jobs.core.base import register


class DeconvnetParams(RuleParams):
    pass


@register
class Deconvnet(RuleAttribution):
    """Deconvnet maps, one per image and target."""

    Params = DeconvnetParams
    params: DeconvnetParams
    rule = "deconvnet"
