"""The blocks an analysis declares for its page (:mod:`jobs.core.views`), drawn from its table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup

from jobs.core.views import Bars, Block, Gallery, Summary, Table
from pipeline.report.charts import bar_chart
from pipeline.report.html import ENV, figure, paged, render, table_html
from pipeline.report.run import Run


def _template(text: str) -> Any:
    return ENV.from_string(text)


def _rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    # Plain Python values, so templates can test them (``r.class_name or r['class']``).
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
            for row in df.to_dict(orient="records")]


def draw(run: Run, entry: str, blocks: Sequence[Block]) -> Markup:
    """Every block of ``blocks`` over ``entry``'s committed table, in order."""
    df = run.table(entry)
    label = run.label
    sections: list[tuple[str, Markup]] = []
    for block in blocks:
        if isinstance(block, Summary):
            text = Markup(_template(block.text).render(rows=df, label=label))  # autoescaped when rendered
            sections.append(("", Markup("<p>") + text + Markup("</p>")))
        elif isinstance(block, Gallery):
            shown = df.drop_duplicates(list(block.unique)) if block.unique else df
            caption = _template(block.caption)
            items = [figure(run.image(entry, r.get(block.key)), Markup(caption.render(r=r, label=label)), paged=True,
                            pixelated=block.pixelated)
                     for r in _rows(shown)]
            sections.append((block.title, paged(items, block.per_page)))
        elif isinstance(block, Table):
            table = table_html(df.drop(columns=[c for c in block.drop if c in df.columns]), limit=block.limit)
            body = Markup("<details><summary>table</summary>") + table + Markup("</details>") if block.collapsed \
                else table
            sections.append((block.title, body))
        elif isinstance(block, Bars):
            means = df.groupby(block.by, sort=False)[list(block.columns or (block.value,))].mean().reset_index()
            chart = bar_chart(list(zip(means[block.by], means[block.value])), block.title,
                              top=max(block.top, float(means[block.value].max()) if len(means) else 0.0))
            sections.append(("", chart + table_html(means)))
        else:
            raise TypeError(f"{entry}: unknown view block {type(block).__name__}")
    return render("cards.html", sections=sections)
