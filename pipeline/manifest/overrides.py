"""``--set key=value`` overrides of a manifest's fields on the command line.

>>> apply_overrides({"execution": {"workers": 1}}, ["execution.workers=4", "name=demo"])
{'execution': {'workers': 4}, 'name': 'demo'}
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from pipeline.errors import ManifestError
from pipeline.manifest.source import Loc, format_loc

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
