"""Validation: raw manifest data in, a :class:`Manifest` out, or every problem at once.

pydantic validates the whole manifest in one call (``Manifest.model_validate``); this module
turns its errors into messages that name the field path and the YAML line, say what is
allowed (``did you mean 'layers'?``, the list of analyses) and never mention pydantic's
internals (union tags in the path). Checks across entries (unique names, names of the
entries a reduce entry reads) run on every entry that validated, so one ``convscope
validate`` lists all problems.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from jobs import REGISTRY, AnalysisParams, TrainAnalysis
from pipeline.errors import ManifestError, suggest
from pipeline.manifest.overrides import apply_overrides
from pipeline.manifest.schema import (
    ANALYSIS_PARAMS,
    DATASET_KINDS,
    MODEL_SOURCES,
    RESERVED_NAMES,
    TOP_LEVEL,
    AnalysisEntry,
    DatasetSpec,
    Execution,
    Manifest,
    ModelSpec,
)
from pipeline.manifest.source import Loc, format_loc, line_of, read_yaml

# Sections chosen by a tag field: (tag, {tag value: model}).
TAGGED: dict[str, tuple[str, dict[str, type[BaseModel]]]] = {
    "dataset": ("kind", DATASET_KINDS), "model": ("source", MODEL_SOURCES)}
REQUIRED = ("name", "output", "dataset", "model", "analyses")
# The order problems are listed in: the sections a user fixes first come first.
ORDER = {"dataset": 0, "model": 1, "execution": 2, "analyses": 3, "name": 4, "output": 4}

_ENTRY: TypeAdapter[AnalysisParams] = TypeAdapter(AnalysisEntry)
_MODEL: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)
_DATASET: TypeAdapter[Any] = TypeAdapter(DatasetSpec)


def _where(lines: dict[Loc, int], loc: Loc) -> str:
    line = line_of(lines, loc)
    return f"{format_loc(loc)}{f' (line {line})' if line else ''}"


def _value_at(raw: Any, loc: Loc) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _untag(loc: Loc) -> tuple[Loc, type[BaseModel], Loc]:
    """pydantic's error path without union tags, the model it starts in, and the path inside it.

    ``('analyses', 0, 'features', 'pool')`` -> ``(('analyses', 0, 'pool'), FeaturesParams, ('pool',))``
    """
    if len(loc) >= 2 and loc[0] in TAGGED and loc[1] in TAGGED[str(loc[0])][1]:
        return (loc[0], *loc[2:]), TAGGED[str(loc[0])][1][str(loc[1])], loc[2:]
    if len(loc) >= 3 and loc[0] == "analyses" and isinstance(loc[1], int) and loc[2] in ANALYSIS_PARAMS:
        return (*loc[:2], *loc[3:]), ANALYSIS_PARAMS[str(loc[2])], loc[3:]
    if loc[:1] == ("execution",):
        return loc, Execution, loc[1:]
    return loc, Manifest, loc


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


def _tag_message(error: Mapping[str, Any], loc: Loc, raw: Any, lines: dict[Loc, int]) -> str | None:
    """The message for a section or entry whose tag (``kind``, ``source``, ``type``) is wrong."""
    kind = error["type"]
    if loc in {(s,) for s in TAGGED}:
        section = str(loc[0])
        tag, table = TAGGED[section]
        if kind == "model_attributes_type":
            return f"{section}: expected a mapping, got {type(_value_at(raw, loc)).__name__}"
        if kind == "union_tag_not_found":
            return f"{section}.{tag}: required field is missing. Valid: {', '.join(table)}"
        if kind == "union_tag_invalid":
            value = _value_at(raw, loc + (tag,))
            return f"{_where(lines, loc + (tag,))}: {suggest(str(value), table, section + ' ' + tag)}"
    if len(loc) == 2 and loc[0] == "analyses" and isinstance(loc[1], int):
        valid = ", ".join(sorted(REGISTRY))
        if kind == "model_attributes_type":
            return f"{_where(lines, loc)}: expected a mapping with a 'type'"
        if kind == "union_tag_not_found":
            return f"{_where(lines, loc + ('type',))}: required field is missing. Valid: {valid}"
        if kind == "union_tag_invalid":
            value = _value_at(raw, loc + ("type",))
            if value is None:
                return f"{_where(lines, loc + ('type',))}: needs a value. Valid: {valid}"
            return f"{_where(lines, loc + ('type',))}: {suggest(str(value), sorted(REGISTRY), 'analysis')}"
    if loc == ("analyses",):
        if kind == "list_type":
            return "analyses: expected a list of analysis entries"
        if kind == "too_short":
            return f"analyses: needs at least 1 item; valid analyses: {', '.join(sorted(REGISTRY))}"
    return None


def _message(error: Mapping[str, Any], raw: Any, lines: dict[Loc, int]) -> str:
    loc, cls, inner = _untag(tuple(error["loc"]))
    tagged = _tag_message(error, loc, raw, lines)
    if tagged is not None:
        return tagged
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        msg = suggest(str(loc[-1]), _fields_at(cls, inner[:-1]) or [], "field")
    elif error["type"] == "missing":
        msg = "required field is missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif error["type"] == "literal_error":
        expected = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(str(error.get("input")), expected, n=1)
        msg = f"{msg} (got {error.get('input')!r}" + (f"; did you mean {close[0]!r}?)" if close else ")")
    return f"{_where(lines, loc)}: {msg}"


def _entry_problems(entries: list[tuple[int, AnalysisParams]]) -> tuple[list[str], list[AnalysisParams]]:
    """Checks across the entries that validated: unique plain folder names, then the names of
    the entries each reduce entry reads. Returns the problems and the entries that passed."""
    problems: list[str] = []
    names: dict[str, int] = {}
    kept: list[AnalysisParams] = []
    for i, params in entries:
        at = format_loc(("analyses", i, "name"))
        name = params.entry_name
        if name in names:
            problems.append(f"{at}: name {name!r} is already used by analyses[{names[name]}]; "
                            "give each entry a unique name")
        elif not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
            problems.append(f"{at}: {name!r} must be a plain folder name (letters, digits, '_', '-', '.')")
        elif name in RESERVED_NAMES:
            problems.append(f"{at}: {name!r} is the name of a file of the run's output folder; "
                            f"reserved: {', '.join(sorted(RESERVED_NAMES))}")
        else:
            names[name] = i
            kept.append(params)
    for params in kept:
        try:
            analysis = REGISTRY[params.type](params)
            analysis.sources(kept)
            analysis.bind(kept)
        except ValueError as e:
            problems.append(f"{format_loc(('analyses', names[params.entry_name]))}: {e}")
    return problems, kept


def validate_raw(raw: Any, source: str, base: Path, lines: dict[Loc, int] | None = None) -> Manifest:
    """Validate a raw manifest dict; raise :class:`ManifestError` listing every problem."""
    lines = lines or {}
    if not isinstance(raw, dict):
        raise ManifestError(source, [f"(top level): expected a mapping of sections ({', '.join(TOP_LEVEL)})"])
    problems: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(f"{_where(lines, (key,))}: {suggest(str(key), TOP_LEVEL, 'section')}")
    problems += [f"{key}: required section is missing" for key in REQUIRED if key not in raw]
    data = {k: v for k, v in raw.items() if k in TOP_LEVEL}
    if "analyses" in data and data["analyses"] is None:  # `analyses:` with nothing under it
        data["analyses"] = []
    if "execution" in data and data["execution"] is None:  # `execution:` alone: the defaults
        del data["execution"]

    try:
        manifest = Manifest.model_validate(data, context={"base": base})
    except ValidationError as err:
        errors = [e for e in err.errors() if not (e["type"] == "missing" and len(e["loc"]) == 1)]
        found = sorted(errors, key=lambda e: ORDER.get(str(e["loc"][0]), 5) if e["loc"] else 5)
        problems += [_message(e, data, lines) for e in found]
        failed = {e["loc"][1] for e in errors if len(e["loc"]) >= 2 and e["loc"][0] == "analyses"}
        listed = data.get("analyses")
        entries: list[Any] = listed if isinstance(listed, list) else []
        valid = [(i, _ENTRY.validate_python(entry, context={"base": base}))
                 for i, entry in enumerate(entries) if i not in failed]
        problems += _entry_problems(valid)[0]
        raise ManifestError(source, problems) from None
    problems += _entry_problems(list(enumerate(manifest.analyses)))[0]
    problems += _test_datasets(manifest, data, lines, base)
    if getattr(manifest.model, "checkpoints", None):
        # A training entry writes one fine-tuned model; per checkpoint it would need a folder each.
        problems += [f"{format_loc(('analyses', i, 'type'))}: {p.type!r} trains one model and does not run "
                     "per checkpoint; run it in a manifest with model.weights (one checkpoint)"
                     for i, p in enumerate(manifest.analyses) if issubclass(REGISTRY[p.type], TrainAnalysis)]
    if problems:
        raise ManifestError(source, problems)
    manifest.analyses = [REGISTRY[p.type](p).bind(manifest.analyses) for p in manifest.analyses]
    return manifest


def _test_datasets(manifest: Manifest, data: dict, lines: dict[Loc, int], base: Path) -> list[str]:
    """An entry's ``test_dataset`` (probes) validated as a ``dataset`` section is, paths relative to
    the manifest; the entry keeps it resolved. Returns the problems, each naming its field."""
    problems: list[str] = []
    for i, params in enumerate(manifest.analyses):
        spec = getattr(params, "test_dataset", None)
        if spec is None:
            continue
        try:
            found = _DATASET.validate_python(spec, context={"base": base})
        except ValidationError as err:
            # Worded as the dataset section's problems are, then named where they are.
            at = ("analyses", i, "test_dataset")
            shifted = {("dataset", *loc[3:]): line for loc, line in lines.items() if loc[:3] == at}
            for e in err.errors():
                message = _message({**e, "loc": ("dataset", *e["loc"])}, {"dataset": spec}, shifted)
                problems.append(format_loc(at) + message[len("dataset"):] if message.startswith("dataset")
                                else f"{format_loc(at)}: {message}")
            continue
        manifest.analyses[i] = params.model_copy(update={"test_dataset": found.model_dump(mode="json")})
    return problems


def validate_model(raw: Any, source: str, base: Path) -> ModelSpec:
    """Validate a ``model`` section on its own (``convscope layers SOURCE:NAME``)."""
    try:
        return _MODEL.validate_python(raw, context={"base": base})
    except ValidationError as err:
        problems = [_message({**e, "loc": ("model", *e["loc"])}, {"model": raw}, {}) for e in err.errors()]
        raise ManifestError(source, problems) from None


def load_manifest(
    path: str | Path,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    address: str | None = None,
) -> Manifest:
    """Read, override and validate a manifest (schema and files; layers need
    :func:`pipeline.models.check_manifest`)."""
    from pipeline.store import is_uri

    path = Path(path)
    raw, lines = read_yaml(path)
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, dict) else {}, overrides)
    if output is not None and isinstance(raw, dict):
        raw["output"] = str(output) if is_uri(str(output)) else str(Path(output).absolute())
    if address is not None and isinstance(raw, dict):
        raw.setdefault("execution", {})
        if isinstance(raw["execution"], dict):
            raw["execution"]["address"] = address
    manifest = validate_raw(raw, str(path), path.parent.absolute(), lines)
    manifest.source = path.absolute()
    return manifest
