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

``load_manifest`` checks the schema (types, unknown keys, names, files that must exist);
``pipeline.models.check_manifest`` also builds the model and checks every layer name against it.
Problems are collected, not stopped at: one run of ``convscope validate`` lists them all.
"""

from __future__ import annotations

import copy
import os
import typing
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
    PlainValidator,
    SerializeAsAny,
    Strict as PydanticStrict,
    ValidationError,
    ValidationInfo,
)

from jobs import REGISTRY, AnalysisParams
from pipeline.errors import ManifestError, suggest

Loc = tuple[Union[str, int], ...]


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
DatasetSpec = Annotated[Union[_DATASETS], Field(discriminator="kind")]
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


class TorchvisionModel(_Model):
    """A torchvision architecture by name; weights from a local file (random, seeded, without)."""

    source: Literal["torchvision"]
    name: str
    weights: ExistingFile | None = None

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


class BuiltinModel(_Model):
    """A convscope architecture: ``cifar_resnet20/32/44/56/110`` or ``demo_cnn``.

    ``demo_cnn`` trains itself once (seeded, about a minute on two cores) when its
    ``weights`` file does not exist yet, and caches the result there.
    """

    source: Literal["builtin"]
    name: str
    weights: AnyPath | None = None

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


class PythonModel(_Model):
    """``entrypoint: "package.module:callable"`` returning an ``nn.Module``. Runs your code, by design."""

    source: Literal["python"]
    entrypoint: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    python_path: list[AnyPath] = Field(default_factory=lambda: [Path(".")], validate_default=True,
                                       description="folders put on sys.path; default: the manifest's folder")
    weights: ExistingFile | None = None

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
ModelSpec = Annotated[Union[_MODELS], Field(discriminator="source")]
MODEL_SOURCES = _by_tag("source", _MODELS)


# ----------------------------------------------------------------------------- execution


# A whole number: `true` is not taken for 1, nor "8" for 8 (YAML gives integers as integers).
Count = Annotated[int, PydanticStrict()]


def _cpus(value: Any) -> float | str:
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f"expected a number of CPUs > 0 or 'auto', got {value!r}")


CpuCount = Annotated[float | str, PlainValidator(_cpus)]


def _decode_block(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"expected a whole number >= 1 or 'auto', got {value!r}")


# One plain check, so a wrong value gets one message rather than one per member of a union.
DecodeBlock = Annotated[int | str, PlainValidator(_decode_block)]


class Execution(Strict):
    """Where and how the work runs."""

    address: str | None = Field(default=None, description="Ray address; none starts an embedded local Ray")
    workers: Count = Field(default=1, ge=1, description="model actors (one per GPU on a GPU cluster)")
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
    threads_per_worker: Count | None = Field(default=None, ge=1, description="torch threads per CPU actor")
    decode_batch_size: DecodeBlock = Field(
        default="auto", description="images per decode task; auto: about 32 MiB of decoded pixels, "
                                    "64 to 1024 images (fewer, larger blocks cost Ray less per image)")
    rows_per_part: Count = Field(default=100_000, ge=1, description="rows per Parquet part file")
    max_error_fraction: float = Field(
        default=1.0, ge=0.0, le=1.0,
        description="fail the run (status 'failed', exit code 1) when more than this fraction of the images "
                    "could not be used (unreadable, undecodable); what was computed is still committed. "
                    "1.0 (the default) never fails on bad images; 0.0 fails on the first one")

    @model_validator(mode="after")
    def _pool(self) -> Execution:
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed workers ({self.workers})")
        return self


class Manifest(Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    output: OutputLocation
    dataset: DatasetSpec
    model: ModelSpec
    analyses: list[SerializeAsAny[AnalysisParams]] = Field(min_length=1)
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


# ----------------------------------------------------------------------------- YAML with line numbers


def _line_map(text: str) -> dict[Loc, int]:
    """Field path -> 1-based YAML line, from the composed node tree."""
    lines: dict[Loc, int] = {}

    def walk(node: yaml.Node, loc: Loc) -> None:
        lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = key.value
                lines[loc + (k,)] = key.start_mark.line + 1
                walk(value, loc + (k,))
                lines[loc + (k,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, loc + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def format_loc(loc: Loc) -> str:
    """``('analyses', 2, 'layers', 0)`` -> ``analyses[2].layers[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


# ----------------------------------------------------------------------------- --set overrides


_SET_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_set_path(key: str) -> Loc:
    """``analyses[0].layers`` or ``analyses.0.layers`` -> ``('analyses', 0, 'layers')``."""
    parts: list[str | int] = []
    for name, index in _SET_PART.findall(key):
        if index:
            parts.append(int(index))
        else:
            parts.append(int(name) if name.isdigit() else name)
    if not parts:
        raise ValueError(f"empty --set key in {key!r}")
    return tuple(parts)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set key=value`` overrides (value parsed as YAML) to a raw manifest dict."""
    raw = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            problems.append(f"--set {item!r}: expected key=value")
            continue
        try:
            loc = parse_set_path(key.strip())
            value = yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            problems.append(f"--set {item!r}: {e}")
            continue
        node: Any = raw
        for depth, part in enumerate(loc[:-1]):
            nxt = loc[depth + 1]
            if isinstance(node, dict):
                node = node.setdefault(part, [] if isinstance(nxt, int) else {})
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                problems.append(f"--set {item!r}: {format_loc(loc[: depth + 1])} does not exist")
                break
        else:
            last = loc[-1]
            if isinstance(node, dict):
                node[last] = value
            elif isinstance(node, list) and isinstance(last, int) and last <= len(node):
                node[last:last + 1] = [value]
            else:
                problems.append(f"--set {item!r}: cannot set {format_loc(loc)}")
    if problems:
        raise ManifestError("the command line", problems)
    return raw


# ----------------------------------------------------------------------------- validation


def _fields_at(cls: Any, loc: Loc) -> list[str] | None:
    """Allowed field names of the model found at ``loc`` inside ``cls`` (for 'did you mean')."""
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        found = None
        for arg in [ann, *typing.get_args(ann), *(a for t in typing.get_args(ann) for a in typing.get_args(t))]:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                found = arg
                break
        cls = found
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return [f for f in cls.model_fields if f != "source" or cls is not Manifest]
    return None


def _messages(err: ValidationError, prefix: Loc, cls: Any, lines: dict[Loc, int]) -> list[str]:
    out = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        where = format_loc(loc)
        line = _line_of(lines, loc)
        where += f" (line {line})" if line else ""
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(cls, tuple(e["loc"])[:-1]) or []
            msg = suggest(str(loc[-1]), allowed, "field")
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif e["type"] == "literal_error":
            expected = re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
            close = difflib.get_close_matches(str(e.get("input")), expected, n=1)
            msg = f"{msg} (got {e.get('input')!r}" + (f"; did you mean {close[0]!r}?)" if close else ")")
        out.append(f"{where}: {msg}")
    return out


def _validate_part(cls: Any, data: Any, prefix: Loc, lines, ctx, problems: list[str]):
    try:
        return cls.model_validate(data, context=ctx)
    except ValidationError as e:
        problems.extend(_messages(e, prefix, cls, lines))
        return None


def _tagged(section: str, tag: str, table: dict, data: Any, lines, ctx, problems: list[str]):
    """Validate a section whose class is chosen by one tag field (dataset.kind, model.source)."""
    if not isinstance(data, dict):
        problems.append(f"{section}: expected a mapping, got {type(data).__name__}")
        return None
    if tag not in data:
        problems.append(f"{section}.{tag}: required field is missing. Valid: {', '.join(table)}")
        return None
    value = data[tag]
    if not isinstance(value, str) or value not in table:
        where = f"{section}.{tag}"
        line = _line_of(lines, (section, tag))
        problems.append(f"{where}{f' (line {line})' if line else ''}: {suggest(str(value), table, section + ' ' + tag)}")
        return None
    return _validate_part(table[value], data, (section,), lines, ctx, problems)


def validate_raw(raw: Any, source: str, base: Path, lines: dict[Loc, int] | None = None) -> Manifest:
    """Validate a raw manifest dict; raise :class:`ManifestError` listing every problem."""
    lines = lines or {}
    ctx = {"base": base}
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ManifestError(source, [f"(top level): expected a mapping of sections ({', '.join(TOP_LEVEL)})"])
    for key in raw:
        if key not in TOP_LEVEL:
            line = _line_of(lines, (key,))
            problems.append(f"{key}{f' (line {line})' if line else ''}: {suggest(str(key), TOP_LEVEL, 'section')}")
    for key in ("name", "output", "dataset", "model", "analyses"):
        if key not in raw:
            problems.append(f"{key}: required section is missing")

    dataset = _tagged("dataset", "kind", DATASET_KINDS, raw["dataset"], lines, ctx, problems) if "dataset" in raw else None
    model = _tagged("model", "source", MODEL_SOURCES, raw["model"], lines, ctx, problems) if "model" in raw else None
    execution = _validate_part(Execution, raw.get("execution") or {}, ("execution",), lines, ctx, problems)

    analyses: list[AnalysisParams] = []
    entries = raw.get("analyses")
    if entries is None and "analyses" in raw:  # `analyses:` with nothing under it
        entries = []
    if entries is not None and not isinstance(entries, list):
        problems.append("analyses: expected a list of analysis entries")
        entries = []
    if entries is not None and not entries:
        problems.append(f"analyses: needs at least 1 item; valid analyses: {', '.join(sorted(REGISTRY))}")
    names: dict[str, int] = {}
    for i, entry in enumerate(entries or []):
        loc: Loc = ("analyses", i)
        line = _line_of(lines, loc)
        at = f"{format_loc(loc)}{f' (line {line})' if line else ''}"
        if not isinstance(entry, dict):
            problems.append(f"{at}: expected a mapping with a 'type'")
            continue
        kind = entry.get("type")
        if kind is None:
            tline = _line_of(lines, loc + ("type",)) if "type" in entry else line
            what = "needs a value" if "type" in entry else "required field is missing"
            problems.append(f"{format_loc(loc + ('type',))}{f' (line {tline})' if tline else ''}: {what}. "
                            f"Valid: {', '.join(sorted(REGISTRY))}")
            continue
        if not isinstance(kind, str) or kind not in REGISTRY:
            tline = _line_of(lines, loc + ("type",))
            problems.append(f"{format_loc(loc + ('type',))}{f' (line {tline})' if tline else ''}: "
                            f"{suggest(str(kind), sorted(REGISTRY), 'analysis')}")
            continue
        params = _validate_part(REGISTRY[kind].Params, entry, loc, lines, ctx, problems)
        if params is None:
            continue
        if params.entry_name in names:
            problems.append(f"{format_loc(loc + ('name',))}: name {params.entry_name!r} is already used by "
                            f"analyses[{names[params.entry_name]}]; give each entry a unique name")
            continue
        if not re.fullmatch(r"[\w.-]+", params.entry_name) or params.entry_name.startswith("."):
            problems.append(f"{format_loc(loc + ('name',))}: {params.entry_name!r} must be a plain folder name "
                            "(letters, digits, '_', '-', '.')")
            continue
        if params.entry_name in RESERVED_NAMES:
            problems.append(f"{format_loc(loc + ('name',))}: {params.entry_name!r} is the name of a file of the run's "
                            f"output folder; reserved: {', '.join(sorted(RESERVED_NAMES))}")
            continue
        names[params.entry_name] = i
        analyses.append(params)

    # Entries that reduce other entries' tables must name entries of this manifest.
    for params in analyses:
        try:
            REGISTRY[params.type](params).sources(analyses)
        except ValueError as e:
            problems.append(f"{format_loc(('analyses', names[params.entry_name]))}: {e}")

    rest = {k: raw[k] for k in ("name", "output") if k in raw}
    head = _validate_part(_Head, rest, (), lines, ctx, problems) if len(rest) == 2 else None
    if problems:
        raise ManifestError(source, problems)
    assert head is not None and dataset is not None and model is not None and execution is not None
    return Manifest.model_construct(
        name=head.name, output=head.output, dataset=dataset, model=model,
        analyses=analyses, execution=execution, source=None,
    )


def validate_model(raw: Any, source: str, base: Path) -> ModelSpec:
    """Validate a ``model`` section on its own (``convscope layers SOURCE:NAME``)."""
    problems: list[str] = []
    model = _tagged("model", "source", MODEL_SOURCES, raw, {}, {"base": base}, problems)
    if problems:
        raise ManifestError(source, problems)
    return model


class _Head(Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    output: OutputLocation


def read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Read a manifest file; YAML syntax errors name the line."""
    if not path.is_file():
        raise ManifestError(str(path), ["manifest file does not exist"])
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestError(str(path), [f"{where}: YAML syntax error: {problem}"]) from None
    duplicates = _duplicate_keys(text)
    if duplicates:
        raise ManifestError(str(path), duplicates)
    return raw, _line_map(text)


def _duplicate_keys(text: str) -> list[str]:
    """``line N: duplicate key 'name' (first at line M)`` for every key a mapping repeats
    (YAML loaders silently keep the last one)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    found: list[str] = []
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                k = key.value if isinstance(key, yaml.ScalarNode) else None
                line = key.start_mark.line + 1
                if k is not None and k in seen:
                    found.append(f"line {line}: duplicate key {k!r} (first at line {seen[k]})")
                elif k is not None:
                    seen[k] = line
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return sorted(found, key=lambda m: int(m.split()[1].rstrip(":")))


def load_manifest(
    path: str | Path,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    address: str | None = None,
) -> Manifest:
    """Read, override and validate a manifest (schema and files; layers need :func:`check_manifest`)."""
    path = Path(path)
    raw, lines = read_yaml(path)
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, dict) else {}, overrides)
    if output is not None and isinstance(raw, dict):
        from pipeline.store import is_uri

        raw["output"] = str(output) if is_uri(str(output)) else str(Path(output).absolute())
    if address is not None and isinstance(raw, dict):
        raw.setdefault("execution", {})
        if isinstance(raw["execution"], dict):
            raw["execution"]["address"] = address
    manifest = validate_raw(raw, str(path), path.parent.absolute(), lines)
    manifest.source = path.absolute()
    return manifest
