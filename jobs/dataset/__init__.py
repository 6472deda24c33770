"""Analyses over the dataset's images and their features: per-image tables and dataset-wide reductions."""

from jobs.dataset import (  # noqa: F401  (importing registers them)
    activation_stats,
    embedding,
    features,
    neighbours,
    predictions,
    probes,
    top_patches,
)
