"""The analyses: pure tensor code, one module per analysis, registered by name."""

from jobs import (  # noqa: F401  (importing registers them)
    activation_stats,
    attribution_summary,
    cam,
    deconvnet,
    embedding,
    features,
    grad_cam,
    guided_backprop,
    guided_grad_cam,
    neighbours,
    occlusion,
    predictions,
    probes,
    saliency,
    top_patches,
)
from jobs.base import (
    REGISTRY,
    Analysis,
    AnalysisParams,
    LocalContext,
    MapAnalysis,
    MapBatch,
    MapOutput,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    TableInputs,
    register,
)

__all__ = ["REGISTRY", "Analysis", "AnalysisParams", "LocalContext", "MapAnalysis", "MapBatch", "MapOutput",
           "ReduceAnalysis",
           "ReduceContext", "ReduceInputs", "ReduceOutput", "TableInputs", "register"]
