"""The analyses: pure tensor code, one module per analysis, grouped by family, registered by name.

- :mod:`jobs.core`: the analysis interface and registry, hooks, tensor kernels, pictures;
- :mod:`jobs.attribution`: maps per image (saliency ... occlusion) and their scores;
- :mod:`jobs.dataset`: features, predictions and the dataset-wide reductions;
- :mod:`jobs.model`: pictures of the model itself (filters, ascent, inversion, dreams), fine-tuning.

An analysis is registered under its module's name, which is also its manifest ``type``.
"""

from jobs import attribution, dataset, model  # noqa: F401  (importing registers the analyses)
from jobs.core.base import (
    REGISTRY,
    Analysis,
    AnalysisParams,
    LocalContext,
    MapAnalysis,
    MapBatch,
    MapOutput,
    MemoryPlan,
    ModelAnalysis,
    ModelContext,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rendered,
    TableInputs,
    TrainAnalysis,
    TrainData,
    TrainOutput,
    register,
)

__all__ = ["REGISTRY", "Analysis", "AnalysisParams", "LocalContext", "MapAnalysis", "MapBatch", "MapOutput",
           "MemoryPlan", "ModelAnalysis", "ModelContext", "ReduceAnalysis",
           "ReduceContext", "ReduceInputs", "ReduceOutput", "Rendered", "TableInputs", "TrainAnalysis",
           "TrainData", "TrainOutput", "register"]
