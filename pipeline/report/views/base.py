"""The registry of pages: each analysis' page, registered by the analysis' name (or, for a page a whole family
shares, by the family's name), like the analyses themselves.

An analysis with no view here gets its page from the blocks it declares (``view`` in its
module, :mod:`jobs.core.views`), else a plain table of its rows. So a new analysis needs no
change to the report; one whose page needs more registers a function here, in its family's
module::

    @view("top_patches")
    def top_patches(page: Page) -> Markup: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from markupsafe import Markup

from pipeline.report.run import Run


@dataclass
class Page:
    """What a view draws from: the run, its entry, and where sub-pages and data files go."""

    run: Run
    entry: str
    kind: str
    write: Callable[[str, str, Markup], None]  # (file name, title, body) of a sub-page
    data_dir: Path  # scripts of data the page loads (scatter points)


View = Callable[[Page], Markup]
# A page for every committed entry of one family: (run, entry names in manifest order).
FamilyView = Callable[[Run, list[str]], Markup]

VIEWS: dict[str, View] = {}
FAMILY_VIEWS: dict[str, tuple[str, FamilyView]] = {}


def view(name: str) -> Callable[[View], View]:
    """Register ``fn`` as the page of analysis ``name``."""
    def add(fn: View) -> View:
        if name in VIEWS:
            raise ValueError(f"a view for {name!r} is registered twice")
        VIEWS[name] = fn
        return fn
    return add


def family_view(family: str, page: str) -> Callable[[FamilyView], FamilyView]:
    """Register ``fn`` as the one page (file ``page``) of every entry of ``family``."""
    def add(fn: FamilyView) -> FamilyView:
        FAMILY_VIEWS[family] = (page, fn)
        return fn
    return add

