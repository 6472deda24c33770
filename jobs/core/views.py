"""What an analysis shows in the report, declared beside it: blocks over its own table.

An analysis lists ``view = (Gallery(...), Table(...), ...)``; the report (``pipeline.report``)
reads the entry's committed table and draws each block in order, so a new analysis gets its
page without any change to the report. Captions and titles are Jinja2 templates over a row
``r`` (autoescaped: values from the data are escaped, the template's own tags are kept), with
the filter ``num`` (a number as the report prints it) and the function ``label`` (a class
index as its name: ``{{ label(r.label) }}``).

Example (``class_model``)::

    view = (
        Summary("Mean probability the model gives each class model for its class: "
                "<b>{{ rows.probability.mean()|num }}</b>."),
        Gallery("{{ r.class_name or r['class'] }} · restart {{ r.restart }}<br>p {{ r.probability|num }}"),
        Table(drop=("image", "history", "key", "shard")),
    )

Analyses whose page needs more than these (an interactive scatter, sub-pages per channel, a
page shared by a family) register a view function in ``pipeline.report.views`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """A paragraph, a template over the whole table ``rows`` (a pandas DataFrame)."""

    text: str


@dataclass(frozen=True)
class Gallery:
    """A picture per row (its image named by the ``key`` column) with a caption, paged.

    ``unique``: the columns whose first row only is shown (rows that share a picture).
    """

    caption: str
    key: str = "key"
    per_page: int = 48
    unique: tuple[str, ...] = ()
    title: str = ""
    pixelated: bool = True  # False for plots and smooth pictures


@dataclass(frozen=True)
class Table:
    """The table itself, without the ``drop`` columns (raw arrays, keys), at most ``limit`` rows."""

    drop: tuple[str, ...] = ()
    limit: int = 500
    title: str = ""
    collapsed: bool = False


@dataclass(frozen=True)
class Bars:
    """A horizontal bar chart of the mean of ``value`` per ``by`` (in table order), from 0 to
    at least ``top``; the means of ``columns`` (default: ``value``) as a table under it."""

    by: str
    value: str
    title: str
    top: float = 1.0
    columns: tuple[str, ...] = ()


Block = Summary | Gallery | Table | Bars
