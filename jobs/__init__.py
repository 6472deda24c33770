"""The analyses: pure tensor code, one module per analysis, registered by name."""

from jobs import (  # noqa: F401  (importing registers them)
    activation_stats,
    embedding,
    features,
    neighbours,
    predictions,
    probes,
    top_patches,
)
from jobs.base import (
    REGISTRY,
    Analysis,
    AnalysisParams,
    LocalContext,
    MapAnalysis,
    MapBatch,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    TableInputs,
    register,
)

__all__ = ["REGISTRY", "Analysis", "AnalysisParams", "LocalContext", "MapAnalysis", "MapBatch", "ReduceAnalysis",
           "ReduceContext", "ReduceInputs", "ReduceOutput", "TableInputs", "register"]
