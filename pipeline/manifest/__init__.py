"""The manifest: YAML in, validated pydantic models out, every error naming its field.

A manifest has six sections::

    name: cifar10
    output: ../runs/cifar10            # relative paths are relative to the manifest file
    dataset: {kind: image_folder, root: ../data/cifar10-test}
    model: {source: builtin, name: cifar_resnet20, weights: ../models/resnet20.th}
    analyses:
      - {type: features, layers: [layer1, layer2, layer3]}
      - {type: predictions}
    execution: {workers: 1, batch_size: 256}

- :mod:`.schema`: the pydantic model of a manifest and its JSON Schema (``convscope schema``);
- :mod:`.source`: the YAML, parsed once: data, the line of every field, repeated keys;
- :mod:`.overrides`: ``--set key=value`` on the command line;
- :mod:`.validate`: ``load_manifest``: types, unknown keys, names, files that must exist, with
  every problem naming its field path and line. ``pipeline.models.check_manifest`` also builds
  the model and checks every layer name against it.

Problems are collected, not stopped at: one run of ``convscope validate`` lists them all.
"""

from pipeline.manifest.overrides import (
    apply_overrides,
    parse_set_path,
)
from pipeline.manifest.schema import (
    ANALYSIS_PARAMS,
    DATASET_KINDS,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_SOURCES,
    RESERVED_NAMES,
    TOP_LEVEL,
    AnalysisEntry,
    AnyPath,
    BuiltinModel,
    Checkpoint,
    Count,
    CountOrAuto,
    CpuCount,
    DatasetSpec,
    Execution,
    ExistingDir,
    ExistingFile,
    ExistingPath,
    ImageFolderDataset,
    ListDataset,
    Manifest,
    ModelSpec,
    OutputLocation,
    ParquetDataset,
    Preprocess,
    PythonModel,
    Sample,
    ShapesDataset,
    Strict,
    TorchScriptModel,
    TorchvisionModel,
    WebDatasetDataset,
    glob_checkpoints,
    json_schema,
    json_schema_text,
)
from pipeline.manifest.source import (
    Loc,
    duplicate_keys,
    format_loc,
    line_of,
    parse_yaml,
    read_yaml,
)
from pipeline.manifest.validate import (
    ORDER,
    REQUIRED,
    TAGGED,
    load_manifest,
    validate_model,
    validate_raw,
)

__all__ = [
    "ANALYSIS_PARAMS",
    "AnalysisEntry",
    "AnyPath",
    "BuiltinModel",
    "Checkpoint",
    "Count",
    "CountOrAuto",
    "CpuCount",
    "DATASET_KINDS",
    "DatasetSpec",
    "Execution",
    "ExistingDir",
    "ExistingFile",
    "ExistingPath",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ListDataset",
    "Loc",
    "MODEL_SOURCES",
    "Manifest",
    "ModelSpec",
    "ORDER",
    "OutputLocation",
    "ParquetDataset",
    "Preprocess",
    "PythonModel",
    "REQUIRED",
    "RESERVED_NAMES",
    "Sample",
    "ShapesDataset",
    "Strict",
    "TAGGED",
    "TOP_LEVEL",
    "TorchScriptModel",
    "TorchvisionModel",
    "WebDatasetDataset",
    "apply_overrides",
    "duplicate_keys",
    "format_loc",
    "glob_checkpoints",
    "json_schema",
    "json_schema_text",
    "line_of",
    "load_manifest",
    "parse_set_path",
    "parse_yaml",
    "read_yaml",
    "validate_model",
    "validate_raw",
]
