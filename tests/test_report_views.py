"""Each analysis owns its page: the blocks it declares are drawn from its own table, escaped,
and every registered analysis has a page (a view, declared blocks, or its table)."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from jobs import REGISTRY
from jobs.core.views import Bars, Gallery, Summary, Table
from pipeline.report import Run, build_report
from pipeline.report.blocks import draw
from pipeline.report.charts import bar_chart
from pipeline.report.views import FAMILY_VIEWS, VIEWS

from .test_report import EVIL, fake_run


def test_every_analysis_has_a_page():
    for name, cls in REGISTRY.items():
        assert name in VIEWS or cls.family in FAMILY_VIEWS or cls.view, f"{name}: no page but its table"


def test_declared_blocks_are_drawn_from_the_table_and_escaped(tmp_path):
    df = pd.DataFrame({"image_id": [EVIL, "b", "c"], "layer": ["l1", "l1", "l2"], "err": [0.5, 0.25, 1.0],
                       "key": ["k1", "k2", "k3"]})
    root = fake_run(tmp_path / "run", {"x": {"type": "x", "status": "complete"}}, {"x": df})
    blocks = (Summary("mean error <b>{{ rows.err.mean()|num }}</b>"),
              Gallery("{{ r.image_id }}<br>{{ r.layer }}", unique=("layer",)),
              Bars("layer", "err", "error per layer"),
              Table(drop=("key",), collapsed=True))
    html = str(draw(Run(root, tmp_path / "r"), "x", blocks))
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "mean error <b>0.583</b>" in html  # (0.5 + 0.25 + 1.0) / 3, the template's own tags kept
    assert html.count("<figure>") == 2  # one per layer
    assert html.count('<div class="item">') == 2
    assert "<details><summary>table</summary>" in html and "<th>key</th>" not in html
    assert html.count("<svg") == 1 and "error per layer" in html
    # The means under the chart: 0.375 for l1, 1.000 for l2.
    assert '<td class="num">0.375</td>' in html and '<td class="num">1.000</td>' in html


def test_a_chart_escapes_its_labels_and_names_no_url():
    svg = str(bar_chart([(EVIL, 0.5), ("$x$ & y", 0.25)], "<b>title</b>"))
    assert "<script>" not in svg and "http" not in svg and "<b>" not in svg
    assert re.search(r"&lt;script&gt;", svg) and "&amp; y" in svg


@pytest.mark.parametrize("kind", ["class_model", "inversion"])
def test_model_pages_come_from_their_blocks(tmp_path, kind):
    rows = {"class_model": {"class": [0, 1], "class_name": ["cat", None], "restart": [0, 0],
                            "probability": [0.9, 0.7], "key": ["a", "b"]},
            "inversion": {"image_id": ["i", "j"], "layer": ["l1", "l2"], "pixel_error": [0.1, 0.2],
                          "relative_feature_error": [0.3, 0.4], "key": ["a", "b"]}}[kind]
    root = fake_run(tmp_path / "run", {kind: {"type": kind, "status": "complete"}}, {kind: pd.DataFrame(rows)})
    page = (build_report(root).parent / f"{kind}.html").read_text()
    assert "not drawn" not in page and page.count("<figure>") == 2
    if kind == "class_model":
        assert "cat · restart 0" in page and "1 · restart 0" in page and "<b>0.800</b>" in page
