"""HTML from Jinja2 templates (``templates/``), autoescaped: every value from the data is escaped.

Builders hand templates plain values; a string that already is HTML (a caption built from
escaped parts, a rendered block) passes as :class:`markupsafe.Markup`, everything else is
escaped on the way in. ``|text`` prints a value as :func:`esc` does (None and NaN as an em
dash).

>>> esc("<b>")
'&lt;b&gt;'
>>> cells = str(table_html(pd.DataFrame({"id": ["<i>"], "p": [0.5]}))).split("<tbody>")[1]
>>> cells
'<tr><td>&lt;i&gt;</td><td class="num">0.500</td></tr></tbody></table></div>'
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

TEMPLATES = Path(__file__).with_name("templates")
PAGE_SIZE = 24


def esc(value: Any) -> str:
    """Any value as HTML text (None as an em dash)."""
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else html.escape(str(value))


def num(value: Any, digits: int = 3) -> str:
    """A number as the report prints it: integers with thousands separators, floats to ``digits``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def script_json(obj: Any) -> str:
    """JSON safe inside a <script>: no ``</script>`` or ``<!--`` can end it early."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026")


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
ENV.filters["text"] = lambda value: Markup(esc(value))
ENV.filters["num"] = num
ENV.globals["script_json"] = lambda obj: Markup(script_json(obj))


def render(template: str, **context: Any) -> Markup:
    """``templates/<template>`` rendered with ``context``."""
    return Markup(ENV.get_template(template).render(**context))


def _macro(name: str) -> Any:
    return getattr(ENV.get_template("macros.html").module, name)


def html_of(value: str | Markup) -> Markup:
    """A string this module's callers built as HTML (its data already escaped)."""
    return value if isinstance(value, Markup) else Markup(value)


class Cell:
    """A table cell: numbers right-aligned and formatted, anything else as text."""

    __slots__ = ("number", "text")

    def __init__(self, value: Any, digits: int):
        self.number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        self.text = num(value, digits) if self.number else value


def table_html(df: pd.DataFrame, sortable: bool = True, digits: int = 3, limit: int | None = None) -> Markup:
    """A DataFrame as an escaped HTML table (numbers right-aligned)."""
    shown = df if limit is None else df.head(limit)
    rows = [[Cell(v, digits) for v in record] for record in shown.itertuples(index=False)]
    return Markup(_macro("table")([str(c) for c in shown.columns], rows, sortable, len(df) - len(shown)))


def figure(src: str | None, caption: str | Markup = "", lazy: bool = True, paged: bool = False,
           pixelated: bool = True, alt: str = "") -> Markup:
    """A <figure> with an image (``data-src`` inside paged lists, so it loads when shown);
    ``caption`` is HTML."""
    # Line breaks of a caption read as commas in its alt text (striptags would join the words).
    alt = alt or Markup(re.sub(r"<br\s*/?>", ", ", str(html_of(caption)))).striptags()
    return Markup(_macro("figure")(src, html_of(caption), lazy, paged, pixelated, alt))


def paged(items: Sequence[str | Markup], page_size: int = PAGE_SIZE, cls: str = "grid") -> Markup:
    """Items (HTML) the browser shows a page at a time (``report.js``); images inside use data-src."""
    return Markup(_macro("paged")([html_of(i) for i in items], page_size, cls))


def badge(status: str) -> Markup:
    return Markup(_macro("badge")(status))
