"""Pages of the analyses that train the model: fine-tuning's curves against its linear probe."""

from __future__ import annotations

import pandas as pd
from markupsafe import Markup

from pipeline.report.charts import bar_chart, line_chart
from pipeline.report.html import esc, num, render, table_html
from pipeline.report.views.base import Page, view


def _series(name: str, values: pd.Series) -> tuple[str, list, list, list]:
    """A line with no band (lo = hi = the values); missing points stay gaps."""
    points = [None if pd.isna(v) else float(v) for v in values]
    return name, points, points, points


@view("finetune")
def finetune(page: Page) -> Markup:
    """Per-epoch accuracy and loss, and the held-out accuracy of the fine-tuned model against the
    linear probe on the same split (from run.json)."""
    df = page.run.table(page.entry).sort_values("epoch", kind="stable").reset_index(drop=True)
    stats = page.run.analyses.get(page.entry, {})
    x = [f"{int(r.epoch)} {r.phase}" for r in df.itertuples()]
    curves = line_chart(x, [_series("held out", df.held_out_accuracy), _series("train (running)", df.train_accuracy)],
                        "accuracy per epoch", "accuracy")
    losses = line_chart(x, [_series("held out", df.held_out_loss), _series("train (running)", df.train_loss)],
                        "cross-entropy per epoch", "loss")
    final = stats.get("held_out_accuracy", df.held_out_accuracy.iloc[-1] if len(df) else None)
    candidates = [("fine-tuned", final), ("linear probe (frozen features)", stats.get("probe_held_out_accuracy")),
                  ("before training", df.held_out_accuracy.iloc[0] if len(df) else None)]
    compared = [(name, float(value)) for name, value in candidates if value is not None and not pd.isna(value)]
    bars = bar_chart(compared, "held-out accuracy")
    summary = Markup(
        f"<p>Held-out accuracy after fine-tuning <b>{esc(num(final))}</b>; a logistic regression on the frozen "
        f"penultimate features of the same train split: <b>{esc(num(stats.get('probe_held_out_accuracy')))}</b>. "
        f"{esc(num(stats.get('n_train')))} images trained on, {esc(num(stats.get('n_held_out')))} held out; "
        f"training took {esc(num(stats.get('train_seconds')))} s.</p>")
    shown = df.assign(trained=[", ".join(t) if t is not None and len(t) else "" for t in df.trained])
    return render("cards.html", sections=[("", summary + bars), ("Curves", curves + losses),
                                          ("Per epoch", table_html(shown))])
