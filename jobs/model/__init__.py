"""Analyses of the model itself: pictures of its filters and units, gradient ascent, inversion, dreams."""

from jobs.model import (  # noqa: F401  (importing registers them)
    activation_maps,
    class_model,
    deepdream,
    filters,
    invariance,
    inversion,
    neuron_ascent,
)
