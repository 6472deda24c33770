"""The manifest's YAML: read once into data, the line of every field path, and repeated keys.

>>> raw, lines, repeated = parse_yaml("name: x\\nanalyses:\\n  - type: features\\n    type: predictions\\n")
>>> raw["analyses"][0]["type"], lines[("analyses", 0, "type")], repeated
('predictions', 4, ["line 4: duplicate key 'type' (first at line 3)"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml

from pipeline.errors import ManifestError

# A field path inside the manifest: ``("analyses", 2, "layers", 0)``.
Loc = tuple[Union[str, int], ...]


def format_loc(loc: Loc) -> str:
    """``('analyses', 2, 'layers', 0)`` -> ``analyses[2].layers[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    """The YAML line of ``loc``, or of the nearest field above it that the file has."""
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


def _walk(root: yaml.Node) -> tuple[dict[Loc, int], list[tuple[int, str]]]:
    """Field path -> 1-based line, and (line, message) for every key a mapping repeats."""
    lines: dict[Loc, int] = {}
    repeated: list[tuple[int, str]] = []

    def walk(node: yaml.Node, loc: Loc) -> None:
        lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                k = key.value if isinstance(key, yaml.ScalarNode) else None
                line = key.start_mark.line + 1
                if k is not None and k in seen:
                    repeated.append((line, f"line {line}: duplicate key {k!r} (first at line {seen[k]})"))
                elif k is not None:
                    seen[k] = line
                walk(value, loc + (key.value,))
                lines[loc + (key.value,)] = line  # the key's line, not its value's
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, loc + (i,))

    walk(root, ())
    return lines, repeated


def parse_yaml(text: str) -> tuple[Any, dict[Loc, int], list[str]]:
    """The data of a YAML document, the line of each field path, and its repeated keys (which
    YAML loaders silently resolve to the last value), from one parse.

    Raises ``yaml.YAMLError`` on a syntax error.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        raw = loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()
    if root is None:
        return raw, {}, []
    lines, repeated = _walk(root)
    return raw, lines, [message for _, message in sorted(repeated, key=lambda r: r[0])]


def read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Read a manifest file; YAML syntax errors and repeated keys name the line."""
    if not path.is_file():
        raise ManifestError(str(path), ["manifest file does not exist"])
    text = path.read_text(encoding="utf-8")
    try:
        raw, lines, repeated = parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestError(str(path), [f"{where}: YAML syntax error: {problem}"]) from None
    if repeated:
        raise ManifestError(str(path), repeated)
    return raw, lines


def duplicate_keys(text: str) -> list[str]:
    """``line N: duplicate key 'name' (first at line M)`` for every key a mapping of ``text`` repeats."""
    try:
        return parse_yaml(text)[2]
    except yaml.YAMLError:
        return []
