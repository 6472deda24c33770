"""The manifest's schema: one pydantic model, :class:`Manifest`, from the YAML's six sections down
to each analysis entry, whose ``analyses`` are a union of the registered analyses' ``Params``
discriminated by ``type`` (as ``dataset`` is by ``kind`` and ``model`` by ``source``).

``convscope schema`` prints :func:`json_schema`, for editors' YAML language servers.
"""

from __future__ import annotations

import glob
import json
import os
import re
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import (
    Strict as PydanticStrict,
)

from jobs import REGISTRY, AnalysisParams
from pipeline.errors import suggest

# ----------------------------------------------------------------------------- paths


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the manifest's folder (``context['base']``)."""
    value = value.expanduser()
    base = (info.context or {}).get("base")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return Path(os.path.abspath(value))


def _must_exist(value: Path) -> Path:
    if not value.exists():
        raise ValueError(f"path does not exist: {value}")
    return value


def _must_be_dir(value: Path) -> Path:
    if not value.is_dir():
        raise ValueError(f"not a folder (missing or a file): {value}")
    return value


def _must_be_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"file does not exist: {value}")
    return value


def _output(value: Any, info: ValidationInfo) -> Path | str:
    """A local folder (relative to the manifest) or a URI (``s3://bucket/prefix``), kept as written."""
    from pipeline.store import SCHEME, known_scheme

    if isinstance(value, Path):
        return _resolve(value, info)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a folder or a URI such as s3://bucket/prefix, got {value!r}")
    match = SCHEME.match(value)
    if match is None:
        return _resolve(Path(value), info)
    scheme = match.group(1).lower()
    if scheme == "file":
        return Path(os.path.abspath(value[len("file://"):]))
    if not known_scheme(scheme):
        raise ValueError(f"no filesystem serves {scheme}:// URIs (pyarrow: s3, gs, hdfs, abfs; fsspec: the "
                         "protocols of its installed implementations); give a local folder or such a URI")
    return value.rstrip("/")


AnyPath = Annotated[Path, AfterValidator(_resolve)]
# ``output``: a local folder or a URI of a filesystem the cluster shares.
OutputLocation = Annotated[Path | str, PlainValidator(_output)]
ExistingPath = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_exist)]
ExistingDir = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_be_dir)]
ExistingFile = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_be_file)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- dataset


IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"]


class Sample(Strict):
    """A seeded random subset of ``n`` images (drawn before ``limit`` applies)."""

    n: int = Field(ge=1)
    seed: int = 0


class _Dataset(Strict):
    limit: int | None = Field(default=None, ge=1, description="keep the first N images (after sample)")
    sample: Sample | None = None


class ImageFolderDataset(_Dataset):
    """``root/<class>/<image>``: labels are indices of the sorted class folder names."""

    kind: Literal["image_folder"]
    root: ExistingDir
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS))


class ParquetDataset(_Dataset):
    """Parquet file(s) with encoded images in ``image_column`` or file paths in ``path_column``."""

    kind: Literal["parquet"]
    path: ExistingPath
    image_column: str | None = None
    path_column: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    root: AnyPath | None = Field(default=None, description="base folder of relative paths in path_column")

    @model_validator(mode="after")
    def _one_source(self) -> ParquetDataset:
        if self.image_column and self.path_column:
            raise ValueError("give image_column or path_column, not both")
        if not self.image_column and not self.path_column:
            self.image_column = "image"
        return self


class WebDatasetDataset(_Dataset):
    """WebDataset tar shards: members ``<key>.<ext>`` grouped by key; ``<key>.cls`` is the label."""

    kind: Literal["webdataset"]
    path: ExistingPath = Field(description="a .tar shard or a folder of them")
    label_extension: str = "cls"


class ListDataset(_Dataset):
    """A text file of image paths (one per line) or a CSV with ``path`` and optional ``label``, ``image_id``."""

    kind: Literal["list"]
    path: ExistingFile
    root: AnyPath | None = Field(default=None, description="base of relative paths; default: the list's folder")


class ShapesDataset(_Dataset):
    """The generated demo dataset (made once under ``root``, seeded); see ``pipeline.demo``."""

    kind: Literal["shapes"]
    root: AnyPath
    n: int = Field(default=1000, ge=1)
    size: int = Field(default=64, ge=16)
    seed: int = 0


def _by_tag(tag: str, classes: tuple[type[BaseModel], ...]) -> dict[str, type[BaseModel]]:
    """``{"image_folder": ImageFolderDataset, ...}`` from each class' ``Literal`` tag field."""
    return {typing.get_args(c.model_fields[tag].annotation)[0]: c for c in classes}


_DATASETS = (ImageFolderDataset, ParquetDataset, WebDatasetDataset, ListDataset, ShapesDataset)
DatasetSpec = Annotated[
    Union[ImageFolderDataset, ParquetDataset, WebDatasetDataset, ListDataset, ShapesDataset],
    Field(discriminator="kind")]
DATASET_KINDS = _by_tag("kind", _DATASETS)


# ----------------------------------------------------------------------------- model

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class Preprocess(Strict):
    """PIL image -> model input: resize, center crop, to [0, 1], normalise by mean/std.

    ``resize``: an int scales the shorter side to it; ``[h, w]`` resizes exactly.
    ``crop``: center crop to ``crop`` x ``crop`` (or ``[h, w]``). After both, every image
    of a run must have the same size; one that does not is recorded as an error.
    """

    resize: int | list[int] | None = None
    crop: int | list[int] | None = None
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN), min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD), min_length=3, max_length=3)

    @model_validator(mode="after")
    def _sizes(self) -> Preprocess:
        for field in ("resize", "crop"):
            v = getattr(self, field)
            vals = [v] if isinstance(v, int) else (v or [])
            if isinstance(v, list) and len(v) != 2:
                raise ValueError(f"{field} must be an int or [height, width], got {v}")
            if any(x < 1 for x in vals):
                raise ValueError(f"{field} must be positive, got {v}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self

    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every preprocessed image, when the settings fix it."""
        from pipeline.decode import output_size

        return output_size(self.resize, self.crop)


def _with_defaults(pre: Preprocess | None, resize: int, crop: int) -> Preprocess:
    """The source's default sizes where the manifest gives none (mean/std keep their own defaults)."""
    if pre is None:
        return Preprocess(resize=resize, crop=crop)
    if pre.output_size() is None:
        return pre.model_copy(update={"resize": pre.resize or resize, "crop": crop})
    return pre


class _Model(Strict):
    num_classes: int | None = Field(default=None, ge=1)
    preprocess: Preprocess | None = None


# A checkpoint's name is a Hive partition value (``checkpoint=<name>``): it starts with a letter,
# so no reader takes it for a number.
CHECKPOINT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# The demo CNN trains itself: a missing checkpoint of it is made by training, saved after the
# epoch its file name ends with (``demo_cnn_epoch02.pt``).
DEMO_EPOCH = re.compile(r"_epoch(\d+)$")


def _checkpoint_name(name: str) -> str:
    if not CHECKPOINT_NAME.match(name):
        raise ValueError(f"checkpoint name {name!r} must start with a letter and hold only letters, digits, "
                         "'_' and '-' (it names the folder checkpoint=<name>)")
    return name


class Checkpoint(Strict):
    """One state of the model's weights (an epoch of its training): a name and a weights file."""

    name: str
    weights: AnyPath

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return _checkpoint_name(name)


def _missing_allowed(model_name: Any, path: Path) -> bool:
    """A demo CNN checkpoint that training makes when it is missing (``..._epochNN.pt``)."""
    return model_name == "demo_cnn" and DEMO_EPOCH.search(path.stem) is not None


def glob_checkpoints(pattern: str, base: Any) -> list[Checkpoint]:
    """The files ``pattern`` matches (relative to ``base``), sorted, named by their stems."""
    pattern = os.path.expanduser(pattern)
    if base is not None and not os.path.isabs(pattern):
        pattern = os.path.join(str(base), pattern)
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise ValueError(f"matches no file: {pattern}")
    found = [Checkpoint(name=_checkpoint_name(Path(f).stem), weights=Path(os.path.abspath(f))) for f in files]
    seen: dict[str, Path] = {}
    for c in found:
        if c.name in seen:
            raise ValueError(f"two files have the stem {c.name!r}: {seen[c.name]} and {c.weights}")
        seen[c.name] = c.weights
    return found


class _Checkpointed(_Model):
    """Models with weights: one ``weights`` file, or a series of ``checkpoints`` of the same
    architecture (or ``weights_glob``, named by the files' stems), every analysis run per checkpoint.

    Subclasses declare ``weights``, ``checkpoints`` and ``weights_glob`` in that order, so each
    check sees the fields before it.
    """

    if TYPE_CHECKING:  # declared by each subclass, after its weights
        checkpoints: list[Checkpoint] | None
        weights_glob: str | None

    @field_validator("checkpoints", check_fields=False)
    @classmethod
    def _checkpoints(cls, checkpoints: list[Checkpoint] | None, info: ValidationInfo) -> list[Checkpoint] | None:
        if checkpoints is None:
            return None
        if info.data.get("weights") is not None:
            raise ValueError("give weights or checkpoints, not both")
        seen: dict[str, int] = {}
        for i, c in enumerate(checkpoints):
            if c.name in seen:
                raise ValueError(f"[{i}].name: {c.name!r} is already the name of checkpoints[{seen[c.name]}]; "
                                 "give each checkpoint a unique name")
            seen[c.name] = i
            if not c.weights.is_file() and not _missing_allowed(info.data.get("name"), c.weights):
                raise ValueError(f"[{i}].weights: file does not exist: {c.weights}")
        return checkpoints

    @field_validator("weights_glob", check_fields=False)
    @classmethod
    def _glob(cls, pattern: str | None, info: ValidationInfo) -> str | None:
        if pattern is None:
            return None
        if info.data.get("weights") is not None:
            raise ValueError("give weights or weights_glob, not both")
        if info.data.get("checkpoints") is not None:
            raise ValueError("give checkpoints or weights_glob, not both")
        glob_checkpoints(pattern, (info.context or {}).get("base"))
        return pattern

    @model_validator(mode="after")
    def _expand(self, info: ValidationInfo) -> _Checkpointed:
        pattern = self.weights_glob
        if pattern is not None:
            # The resolved manifest lists the checkpoints the pattern found.
            self.checkpoints = glob_checkpoints(pattern, (info.context or {}).get("base"))
            self.weights_glob = None
        return self


CHECKPOINTS_HELP = ("a series of weights files of this architecture: [{name, weights}, ...]; every analysis "
                    "runs per checkpoint")
GLOB_HELP = "checkpoints from the files this pattern matches (relative to the manifest), named by their stems, sorted"


class TorchvisionModel(_Checkpointed):
    """A torchvision architecture by name; weights from a local file (random, seeded, without)."""

    source: Literal["torchvision"]
    name: str
    weights: ExistingFile | None = None
    checkpoints: list[Checkpoint] | None = Field(default=None, min_length=1, description=CHECKPOINTS_HELP)
    weights_glob: str | None = Field(default=None, description=GLOB_HELP)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if name not in names:
            raise ValueError(suggest(name, sorted(names), "torchvision model"))
        return name

    @model_validator(mode="after")
    def _defaults(self) -> TorchvisionModel:
        self.preprocess = _with_defaults(self.preprocess, resize=256, crop=224)
        return self


def _builtin_names() -> list[str]:
    from pipeline.zoo import BUILTINS

    return sorted(BUILTINS)


class BuiltinModel(_Checkpointed):
    """A convscope architecture: ``cifar_resnet20/32/44/56/110`` or ``demo_cnn``.

    ``demo_cnn`` trains itself once (seeded, about a minute on two cores) when its
    ``weights`` file does not exist yet, and caches the result there.
    """

    source: Literal["builtin"]
    name: str
    weights: AnyPath | None = None
    checkpoints: list[Checkpoint] | None = Field(default=None, min_length=1, description=CHECKPOINTS_HELP)
    weights_glob: str | None = Field(default=None, description=GLOB_HELP)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in _builtin_names():
            raise ValueError(suggest(name, _builtin_names(), "builtin model"))
        return name

    @field_validator("weights")
    @classmethod
    def _exists(cls, weights: Path | None, info: ValidationInfo) -> Path | None:
        if weights is not None and info.data.get("name") != "demo_cnn" and not weights.is_file():
            raise ValueError(f"weights file does not exist: {weights}")
        return weights

    @model_validator(mode="after")
    def _defaults(self) -> BuiltinModel:
        side = 64 if self.name == "demo_cnn" else 32
        self.preprocess = _with_defaults(self.preprocess, resize=side, crop=side)
        return self


class PythonModel(_Checkpointed):
    """``entrypoint: "package.module:callable"`` returning an ``nn.Module``. Runs your code, by design."""

    source: Literal["python"]
    entrypoint: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    python_path: list[AnyPath] = Field(default_factory=lambda: [Path(".")], validate_default=True,
                                       description="folders put on sys.path; default: the manifest's folder")
    weights: ExistingFile | None = None
    checkpoints: list[Checkpoint] | None = Field(default=None, min_length=1, description=CHECKPOINTS_HELP)
    weights_glob: str | None = Field(default=None, description=GLOB_HELP)

    @model_validator(mode="after")
    def _defaults(self) -> PythonModel:
        self.preprocess = _with_defaults(self.preprocess, resize=256, crop=224)
        return self


class TorchScriptModel(_Model):
    """A TorchScript file (``torch.jit.save``)."""

    source: Literal["torchscript"]
    path: ExistingFile

    @model_validator(mode="after")
    def _defaults(self) -> TorchScriptModel:
        self.preprocess = _with_defaults(self.preprocess, resize=256, crop=224)
        return self


_MODELS = (TorchvisionModel, BuiltinModel, PythonModel, TorchScriptModel)
ModelSpec = Annotated[Union[TorchvisionModel, BuiltinModel, PythonModel, TorchScriptModel],
                     Field(discriminator="source")]
MODEL_SOURCES = _by_tag("source", _MODELS)


# ----------------------------------------------------------------------------- execution


# A whole number: `true` is not taken for 1, nor "8" for 8 (YAML gives integers as integers).
Count = Annotated[int, PydanticStrict()]


def _cpus(value: Any) -> float | str:
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f"expected a number of CPUs > 0 or 'auto', got {value!r}")


CpuCount = Annotated[float | str, PlainValidator(_cpus)]


def _count_or_auto(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"expected a whole number >= 1 or 'auto', got {value!r}")


# One plain check, so a wrong value gets one message rather than one per member of a union.
CountOrAuto = Annotated[int | str, PlainValidator(_count_or_auto)]


class Execution(Strict):
    """Where and how the work runs."""

    address: str | None = Field(default=None, description="Ray address; none starts an embedded local Ray")
    workers: CountOrAuto = Field(
        default=1, description="model actors (one per GPU on a GPU cluster); auto: one per GPU of the cluster, "
                               "or on CPUs one per four CPUs and at least two (while one actor runs Python, "
                               "the other computes), chosen once Ray has started and logged")
    min_workers: Count | None = Field(
        default=None, ge=1, description="smallest model actor pool: Ray Data grows it up to `workers` while "
                                        "blocks are queued and shrinks it when idle (default: workers, a fixed pool)")
    cpus_per_worker: CpuCount = Field(
        default="auto", description="CPUs of each model actor: its batches' rendering (PNG), Parquet writing, "
                                    "and torch threads on CPU; auto: up to 4 beside each GPU (half the node's CPUs "
                                    "per GPU), or what decoding leaves on a CPU-only run")
    batch_size: Count = Field(default=64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    channels_last: bool = Field(default=False, description="NHWC model and inputs (faster convolutions on "
                                                           "GPU and CPU; equal up to float rounding)")
    compile: bool = Field(
        default=False,
        description="torch.compile the shared inference forward (logits and the hooked layers' outputs) of "
                    "every model; attribution passes, gradients and analyses that hook the model themselves "
                    "run the same model eagerly. Hooks for the shared forward's layers are installed once, "
                    "before compiling, because a compiled forward does not see hooks added later. Equal up to "
                    "float rounding; the first batches pay for compiling; a model that does not compile "
                    "(no C++ compiler, an unsupported op) runs eagerly, with a warning in the log")
    decode: Literal["cpu", "gpu"] = Field(
        default="cpu",
        description="where JPEGs are decoded and resized: cpu (PIL, in the decode tasks) or gpu (nvJPEG on the "
                    "model actor's GPU; resize and crop on the GPU, which may differ from PIL by interpolation "
                    "rounding, a few levels of 255); other formats and JPEGs that fail on the GPU are decoded "
                    "on the CPU. Needs a GPU: with device auto and none, decoding stays on the CPU")
    threads_per_worker: Count | None = Field(default=None, ge=1, description="torch threads per CPU actor")
    decode_batch_size: CountOrAuto = Field(
        default="auto", description="images per decode task; auto: about 32 MiB of decoded pixels, "
                                    "64 to 1024 images (fewer, larger blocks cost Ray less per image)")
    rows_per_part: Count = Field(default=100_000, ge=1, description="rows per Parquet part file")
    driver_memory: ByteSize | None = Field(
        default=None, description="memory a dataset-wide reduction may plan to hold on the driver, in bytes or "
                                  "with a unit ('8GiB', '512MB'); each reduction checks its plan against it before "
                                  "it starts and fails with what to change when it is over; default: half of the "
                                  "machine's memory")
    max_error_fraction: float = Field(
        default=1.0, ge=0.0, le=1.0,
        description="fail the run (status 'failed', exit code 1) when more than this fraction of the images "
                    "could not be used (unreadable, undecodable); what was computed is still committed. "
                    "1.0 (the default) never fails on bad images; 0.0 fails on the first one")

    @model_validator(mode="after")
    def _pool(self) -> Execution:
        if self.min_workers is not None and isinstance(self.workers, int) and self.min_workers > self.workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed workers ({self.workers})")
        if self.decode == "gpu" and self.device == "cpu":
            raise ValueError("execution.decode: 'gpu' decodes on the model's GPU, but execution.device is 'cpu'; "
                             "set decode: cpu, or device: cuda (or auto)")
        return self

    @property
    def worker_count(self) -> int:
        """``workers`` as a number (``auto`` is replaced by one when Ray has started)."""
        if not isinstance(self.workers, int):
            raise ValueError("execution.workers: 'auto' has no number before Ray has started")
        return self.workers


# ----------------------------------------------------------------------------- analyses


# Every registered analysis' entry, told apart by its ``type`` (the analysis' module name).
ANALYSIS_PARAMS: dict[str, type[AnalysisParams]] = {name: REGISTRY[name].Params for name in sorted(REGISTRY)}
if TYPE_CHECKING:  # built from the registry at import time, which a type checker cannot follow
    AnalysisEntry = AnalysisParams
else:
    AnalysisEntry = Annotated[Union[tuple(ANALYSIS_PARAMS.values())], Field(discriminator="type")]


class Manifest(Strict):
    """A whole manifest: what to read, which model, which analyses, how to run them."""

    name: str = Field(pattern=r"^[\w.-]+$", description="the run's name")
    output: OutputLocation = Field(description="the run's folder: a local path (relative to the manifest) "
                                               "or a URI such as s3://bucket/prefix")
    dataset: DatasetSpec
    model: ModelSpec
    analyses: list[AnalysisEntry] = Field(min_length=1)
    execution: Execution = Field(default_factory=Execution)
    source: Path | None = Field(default=None, exclude=True)

    def entry(self, name: str) -> AnalysisParams:
        return next(a for a in self.analyses if a.entry_name == name)

    def resolved_yaml(self) -> str:
        """The manifest with every default filled in, as written to ``manifest.resolved.yaml``."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Names in a run's output folder that an analysis entry (its own folder) must not take.
RESERVED_NAMES = frozenset({"run.json", "run.log", "errors.parquet", "images.parquet", "manifest.resolved.yaml",
                            "report"})

TOP_LEVEL = list(Manifest.model_fields)
TOP_LEVEL.remove("source")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a manifest (what a user writes: the ``source`` it was read from left out).

    >>> schema = json_schema()
    >>> sorted(schema["properties"]) == sorted(TOP_LEVEL)
    True
    >>> "features" in schema["properties"]["analyses"]["items"]["discriminator"]["mapping"]
    True
    """
    schema = Manifest.model_json_schema(mode="validation")
    schema["properties"].pop("source", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "convscope manifest"
    return schema


def json_schema_text() -> str:
    """:func:`json_schema` as indented JSON."""
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"

