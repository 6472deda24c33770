"""Errors a user can act on. The command line prints them as one paragraph and exits with 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (manifest, files, command line): no traceback, exit code 2."""


class ManifestError(UserError):
    """One or more problems in a manifest, each naming its field path (and YAML line)."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {source}:"
        super().__init__("\n".join([head] + [f"  {p}" for p in problems]))


def suggest(name: str, choices: Iterable[str], what: str = "name") -> str:
    """``"unknown layer 'layr1'; did you mean 'layer1'? Valid: ..."`` -- the torchvision habit.

    >>> suggest("resnt18", ["resnet18", "vgg11"], "model")
    "unknown model 'resnt18'; did you mean 'resnet18'? Valid: resnet18, vgg11"
    """
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    shown = ", ".join(choices[:40]) + (f", ... ({len(choices)} in all)" if len(choices) > 40 else "")
    return f"unknown {what} {name!r}{hint} Valid: {shown}"
