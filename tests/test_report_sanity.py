"""The attribution page's sanity-check section and the summary's intervals, from synthetic tables."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from pipeline.report import Run
from pipeline.report.charts import line_chart
from pipeline.report.views.attribution import attribution, interval, sanity_section, summary_tables

from .test_report import EVIL, fake_run

BLOCKS = ["", "fc", "layer3", "layer2"]


def sanity_frame(methods=("saliency", "grad_cam"), tests=("mprt_cascading", "mprt_independent", "random_logit",
                                                          "sensitivity", "road"), per_image=True) -> pd.DataFrame:
    rows = []

    def add(method, test, step, step_name, metric, value, image_id=None):
        rows.append({"method": method, "test": test, "step": step, "step_name": step_name, "image_id": image_id,
                     "label": None if image_id is None else 1, "target": None if image_id is None else 1,
                     "metric": metric, "value": value, "n": None if image_id else 8,
                     "lo": None if image_id else value - 0.05, "hi": None if image_id else value + 0.05})

    for m, method in enumerate(methods):
        for test in tests:
            if test.startswith("mprt"):
                for step, name in enumerate(BLOCKS):
                    for metric in ("spearman", "spearman_abs", "ssim", "hog"):
                        add(method, test, step, name, metric, round(1 - 0.2 * step - 0.01 * m, 4))
                    if per_image:
                        add(method, test, step, name, "spearman_abs", 123.0, image_id="a.png")
            elif test == "random_logit":
                add(method, test, None, None, "ssim", 0.61 + m / 100)
                add(method, test, None, None, "spearman_abs", 0.52 + m / 100)
            elif test == "sensitivity":
                add(method, test, None, None, "max_sensitivity", 0.33 + m / 100)
                add(method, test, None, None, "avg_sensitivity", 0.21 + m / 100)
            else:
                add(method, test, None, None, "morf_auc", 0.14 + m / 100)
                add(method, test, None, None, "lerf_auc", 0.77 + m / 100)
                for pct in (10, 50):
                    add(method, test, pct, None, "morf", 0.5 - pct / 200)
                    add(method, test, pct, None, "lerf", 0.9 - pct / 1000)
    df = pd.DataFrame(rows)
    df["step"] = df["step"].astype("Int64")
    df["n"] = df["n"].astype("Int64")
    return df


def summary_frame(intervals=True) -> pd.DataFrame:
    df = pd.DataFrame({"method": ["saliency", "saliency", "grad_cam"], "label": [None, 0, None],
                       "label_name": [None, "cat", None], "maps": [4, 2, 4], "images": [4, 2, 4],
                       "deletion_auc": [0.25, 0.5, 0.125], "insertion_auc": [0.75, 0.5, 0.625], "boxed": [2, 1, 2],
                       "pointing_game": [0.5, 1.0, np.nan], "box_energy": [0.375, 0.25, 0.5]})
    if intervals:
        for score in ("deletion_auc", "insertion_auc", "pointing_game", "box_energy"):
            at = df.columns.get_loc(score) + 1
            df.insert(at, f"{score}_lo", df[score] - 0.1)
            df.insert(at + 1, f"{score}_hi", df[score] + 0.1)
    return df


def test_interval_text():
    assert interval(0.5, 0.25, 0.75) == "0.500 [0.250, 0.750]"
    assert interval(0.5, np.nan, np.nan) == "0.500"
    assert interval(np.nan, np.nan, np.nan) == "—"


def test_sanity_section_charts_each_mprt_order_and_tables_every_test():
    html = str(sanity_section(sanity_frame()))
    labels = re.findall(r'<svg class="chart" role="img" aria-label="([^"]*)"', html)
    assert len(labels) == 2
    assert labels[0].startswith("mprt_cascading: spearman_abs") and labels[1].startswith("mprt_independent:")
    # Step 0 is "none", then the blocks by name.
    assert "0 none" in html and "1 fc" in html and "3 layer2" in html
    # Every MPRT metric per method and step, with its interval; per-image rows are not drawn.
    assert html.count("<td>hog</td>") == 4 and "123.000" not in html
    assert "0.600 [0.550, 0.650]" in html  # saliency, step 2
    # Random logit, sensitivity and ROAD: method x metric, mean [lo, hi].
    assert "Random logit" in html and "0.610 [0.560, 0.660]" in html and "0.530 [0.480, 0.580]" in html
    assert "max_sensitivity" in html and "avg_sensitivity" in html and "0.340 [0.290, 0.390]" in html
    assert "morf_auc" in html and "lerf_auc" in html and "0.770 [0.720, 0.820]" in html
    assert "10%" in html and "50%" in html and "0.450 [0.400, 0.500]" in html  # the MoRF curve at 10%
    assert "8 images" in html


def test_sanity_section_draws_only_the_tests_present_and_escapes_names():
    html = str(sanity_section(sanity_frame(methods=(EVIL,), tests=("mprt_independent", "road"), per_image=False)))
    assert 'aria-label="mprt_independent' in html and "mprt_cascading" not in html
    assert "Random logit" not in html and "Sensitivity" not in html and "ROAD" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "No sanity-check rows" in str(sanity_section(sanity_frame().iloc[:0]))


def test_line_chart_bands_and_missing_points():
    svg = str(line_chart(["0 none", "1 <b>fc</b>"], [("a", [1.0, 0.5], [0.9, 0.4], [1.0, 0.6]),
                                                        ("b", [1.0, None], [None, None], [None, None])],
                         "mprt_cascading: test", y_label="spearman_abs"))
    assert svg.startswith("<svg") and 'aria-label="mprt_cascading: test"' in svg and "<b>" not in svg


def test_summary_tables_show_intervals_and_old_summaries_still_render():
    overall, per_class = summary_tables(summary_frame())
    assert "0.250 [0.150, 0.350]" in overall and "deletion_auc_lo" not in overall
    assert per_class is not None and "cat" in per_class and "0.500 [0.400, 0.600]" in per_class
    assert "—" in overall  # grad_cam has no pointing game
    overall, per_class = summary_tables(summary_frame(intervals=False))
    assert "0.250" in overall and " [" not in overall and "cat" in str(per_class)
    overall, per_class = summary_tables(summary_frame().iloc[[0, 2]])
    assert per_class is None


def test_the_page_picks_the_summary_by_type_and_keeps_reduce_entries_out_of_the_grid(tmp_path):
    maps = pd.DataFrame({"image_id": ["a.png", "b.png"], "label": [0, 1], "method": "saliency", "target": [0, 1],
                         "score": [0.9, 0.8], "deletion_auc": [0.2, 0.3], "insertion_auc": [0.7, 0.6],
                         "pointing": [1.0, np.nan], "key": ["k0", "k1"]})
    analyses = {"saliency": {"type": "saliency", "status": "complete"},
                "sanity_checks": {"type": "sanity_checks", "status": "complete"},
                "summary": {"type": "attribution_summary", "status": "complete"}}
    tables = {"saliency": maps, "sanity_checks": sanity_frame(), "summary": summary_frame()}
    root = fake_run(tmp_path / "run", analyses, tables, label_names=["cat", "dog"])
    html = str(attribution(Run(root, tmp_path / "report"), list(analyses)))
    assert "Faithfulness by method" in html and "0.250 [0.150, 0.350]" in html
    assert "Sanity checks" in html and 'aria-label="mprt_cascading: spearman_abs' in html
    assert html.count('<div class="item">') == 2  # the two images of saliency; no row of a reduce entry
    assert "<b>saliency</b>" in html and "<b>sanity_checks</b>" not in html and "<b>summary</b>" not in html
    # A run whose summary has no intervals (and no sanity checks) renders as before.
    root = fake_run(tmp_path / "old", {k: analyses[k] for k in ("saliency", "summary")},
                    {"saliency": maps, "summary": summary_frame(intervals=False)})
    html = str(attribution(Run(root, tmp_path / "report2"), ["saliency", "summary"]))
    assert "Faithfulness by method" in html and "Sanity checks" not in html and "0.250" in html
