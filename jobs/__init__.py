"""The analyses: pure tensor code, one module per analysis, registered by name."""

from jobs import features, predictions  # noqa: F401  (importing registers them)
from jobs.base import REGISTRY, Analysis, AnalysisParams, MapAnalysis, MapBatch, register

__all__ = ["REGISTRY", "Analysis", "AnalysisParams", "MapAnalysis", "MapBatch", "register"]
