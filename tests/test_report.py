"""The static report: page builders on hand-made run folders, then a real run opened in
headless Chromium (no console errors, no broken images, a scatter point hovered)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli
from pipeline.errors import UserError
from pipeline.report import Run, build_report, esc, predictions_body, script_json, table_html

from .browser import (
    broken_images,
    chromium_available,
    console_errors,
    headless_chromium,
    hover_scatter_point,
    load_all_images,
    wait_ready,
)
from .conftest import make_images, write_manifest

EVIL = "<script>alert(1)</script>.jpg"


def fake_run(root: Path, analyses: dict[str, dict], tables: dict[str, pd.DataFrame],
             errors: pd.DataFrame | None = None, label_names: list[str] | None = None) -> Path:
    """A run folder as the output contract describes it, with the given tables committed."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(json.dumps({
        "name": "fake", "status": "complete", "analyses": analyses,
        "dataset": {"kind": "image_folder", "images": 10, "errors": 0, "label_names": label_names},
        "model": {"source": "builtin", "name": "demo_cnn", "hash": "sha256:0"}, "execution": {}}))
    for entry, df in tables.items():
        (root / entry).mkdir()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), root / entry / "part-00000.parquet")
        (root / entry / "_SUCCESS").write_text("{}")
    errors = errors if errors is not None else pd.DataFrame({"image_id": [], "stage": [], "error": []})
    pq.write_table(pa.Table.from_pandas(errors, preserve_index=False), root / "errors.parquet")
    return root


def test_strings_from_data_are_escaped():
    assert esc(EVIL) == "&lt;script&gt;alert(1)&lt;/script&gt;.jpg"
    html = table_html(pd.DataFrame({"image_id": [EVIL], "score": [0.5]}))
    assert "<script>" not in html and "&lt;script&gt;" in html and '<td class="num">0.500</td>' in html
    blob = script_json({"id": EVIL + "<!--"})
    assert "<" not in blob and json.loads(blob) == {"id": EVIL + "<!--"}


def test_confusion_matrix_and_accuracy_match_pandas(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, 200))
    df = pd.DataFrame({"image_id": [f"i{i}" for i in range(200)], "label": labels, "pred": pred,
                       "prob": rng.random(200)})
    root = fake_run(tmp_path / "run", {"predictions": {"type": "predictions", "status": "complete"}},
                    {"predictions": df}, label_names=["cat", "dog", EVIL])
    body = predictions_body(Run(root, tmp_path / "r"), "predictions")
    assert f"{(labels == pred).mean():.2%}" in body
    crosstab = pd.crosstab(labels, pred)
    for i in range(3):
        cells = body.split(f"<tr><th>{esc(['cat', 'dog', EVIL][i])}</th>")[1].split("</tr>")[0]
        counts = [int(c.split(">")[1].replace(",", "")) for c in cells.split("</td>")[:-1]]
        assert counts == crosstab.loc[i].tolist()
    assert "<script>" not in body


def test_index_names_failed_and_missing_analyses_and_stays_small(tmp_path):
    errors = pd.DataFrame({"image_id": [f"bad{i}.png" for i in range(5000)], "stage": "decode",
                           "error": "cannot identify image file"})
    analyses = {"predictions": {"type": "predictions", "status": "complete", "rows": 3},
                "probes": {"type": "probes", "status": "failed", "error": "ValueError: only one class <b>"},
                "embedding": {"type": "embedding", "status": "not run"}}
    root = fake_run(tmp_path / "run", analyses,
                    {"predictions": pd.DataFrame({"image_id": ["a", "b", "c"], "label": [0, 1, 1], "pred": [0, 1, 0],
                                                  "prob": [0.9, 0.8, 0.6]})}, errors=errors)
    index = build_report(root)
    text = index.read_text()
    assert 'class="badge failed">failed' in text and "ValueError: only one class &lt;b&gt;" in text
    assert "not run" in text and 'href="predictions.html"' in text
    assert 'href="probes.html"' not in text and not (index.parent / "probes.html").exists()
    assert "5,000 input(s) could not be used" in text and text.count("bad") <= 60  # 50 rows, then a link
    assert (index.parent / "errors.html").is_file()
    assert index.stat().st_size < 60_000


def test_report_is_replaced_atomically(tmp_path):
    root = fake_run(tmp_path / "run", {"predictions": {"type": "predictions", "status": "complete"}},
                    {"predictions": pd.DataFrame({"image_id": ["a"], "label": [0], "pred": [0], "prob": [1.0]})})
    first = build_report(root).read_text()
    # A table that cannot be read costs its section only, which says why.
    (root / "predictions" / "part-00000.parquet").write_bytes(b"not parquet")
    page = (build_report(root).parent / "predictions.html").read_text()
    assert "not drawn" in page and "could not be drawn" in page
    # A run folder that cannot be read at all leaves the last report whole.
    good = (root / "report" / "index.html").read_text()
    run_json = (root / "run.json").read_text()
    (root / "run.json").write_text(run_json[:40])
    with pytest.raises(UserError, match="run.json: not valid JSON"):
        build_report(root)
    assert (root / "report" / "index.html").read_text() == good != ""
    assert not list(root.glob(".report-*"))
    assert cli(["report", str(tmp_path / "nowhere")]) == 2
    assert first


# ----------------------------------------------------------------------------- a real run, a real browser


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, demo_cnn_weights):
    import ray  # noqa: F401  (the session's Ray is started by the ray_session fixture)

    from pipeline.execute import run_manifest
    from pipeline.manifest import load_manifest

    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    make_images(images, classes=3, per_class=5)
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(images / "class1" / "<img src=x onerror=alert(1)>.png")
    model = {"source": "builtin", "name": "demo_cnn", "num_classes": 4, "weights": str(demo_cnn_weights),
             "preprocess": {"resize": 32, "crop": 32}}
    analyses = [
        {"type": "predictions"}, {"type": "features", "layers": ["relu4"]},
        {"type": "activation_stats", "layers": ["relu2"]},
        {"type": "top_patches", "layers": ["relu2"], "k": 3, "channels": [0, 1, 2], "project": ["deconvnet"]},
        {"type": "top_patches", "name": "top_patches_per_class", "layers": ["relu2"], "k": 2, "channels": [0],
         "per_class": True},
        {"type": "neighbours", "layer": "relu4", "k": 3, "queries": {"sample": 3, "seed": 0}},
        {"type": "embedding", "layers": ["relu4"], "methods": ["pca"]},
        {"type": "probes", "layers": ["relu2", "relu4"]},
        {"type": "grad_cam", "layer": "relu3", "sample": {"n": 4}, "steps": 2},
        {"type": "saliency", "sample": {"n": 4}, "steps": 2},
        {"type": "guided_backprop", "name": "unit_gbp", "sample": {"n": 4},
         "target": {"neuron": {"layer": "relu4", "channel": 0}}},
        {"type": "occlusion", "window": 16, "stride": 16, "sample": {"n": 4}, "steps": 2,
         "feature": {"layer": "relu3", "channel": "strongest"}},
        {"type": "attribution_summary"},
        {"type": "saliency_segmentation", "methods": ["saliency", "grad_cam"], "sample": {"n": 3}, "min_seeds": 3},
        {"type": "adversarial", "sample": {"n": 4}, "epsilons": [0.05, 0.2, 0.5], "steps": 2},
        {"type": "sanity_checks", "sample": {"n": 3}, "sensitivity": {"samples": 2}, "road": {"percentages": [50]}},
        {"type": "filters"}, {"type": "class_model", "steps": 5},
        {"type": "inversion", "layers": ["relu1", "relu3"], "sample": {"n": 2}, "steps": 5},
        {"type": "deepdream", "layers": ["relu3"], "sample": {"n": 2}, "steps": 2, "octaves": 1},
        {"type": "invariance", "layers": ["relu1"], "sample": {"n": 2}, "rotate": [0, 90], "scale": [1.0],
         "axis": ["x", "y"]},
        {"type": "activation_maps", "layers": ["relu1"], "sample": {"n": 2}},
        {"type": "neuron_ascent", "layer": "relu3", "channels": [0, 1], "steps": 5},
    ]
    path = write_manifest(root / "m.yaml", model=model, analyses=analyses,
                          dataset={"kind": "image_folder", "root": str(images)})
    result = run_manifest(load_manifest(path), log=lambda message: None)
    assert result.ok, {k: v.get("error") for k, v in result.analyses.items() if v.get("error")}
    return root / "out"


def test_report_of_a_small_run_has_a_page_per_analysis(ray_session, small_run):
    assert cli(["report", str(small_run)]) == 0
    report = small_run / "report"
    pages = {p.name for p in report.glob("*.html")}
    for name in ("index", "predictions", "features", "activation_stats", "neighbours", "embedding", "probes",
                 "attribution", "filters", "class_model", "inversion", "deepdream", "invariance",
                 "activation_maps", "neuron_ascent", "adversarial"):
        assert f"{name}.html" in pages, name
    assert any(p.startswith("top_patches--relu2--c") for p in pages)
    assert {f"top_patches_per_class--relu2--l{label}-c0.html" for label in range(3)} <= pages
    attribution = (report / "attribution.html").read_text()
    assert attribution.count('<div class="item">') == 4 and "grad_cam" in attribution and "saliency" in attribution
    # The sanity checks: a randomisation chart per order, the random-logit, sensitivity and ROAD tables.
    assert "Sanity checks" in attribution and 'aria-label="mprt_cascading: spearman_abs' in attribution
    assert 'aria-label="mprt_independent: spearman_abs' in attribution
    assert "Random logit" in attribution and "max_sensitivity" in attribution and "morf_auc" in attribution
    assert "deletion_auc_lo" not in attribution and " [" in attribution  # scores shown as mean [lo, hi]
    assert "unit_gbp</b> · unit relu4[0] at (" in attribution  # a unit's map names the unit
    assert attribution.count("-projection.png") == 4  # occlusion's strongest feature map, per image
    assert "Segmentation from the maps" in attribution and "mask share of image" in attribution
    assert "translate y" in (report / "invariance.html").read_text()
    assert (report / "top_patches.html").read_text().count("deconvnet-grid.png") == 3  # one grid per channel
    adversarial = (report / "adversarial.html").read_text()
    assert "Predictions flipped within the largest step" in adversarial and "clean · adversarial" in adversarial
    for page in report.glob("*.html"):
        text = page.read_text()
        assert "<img src=x" not in text
        assert "not drawn" not in text, page.name  # every section could be drawn
        assert "http://" not in text and "https://" not in text  # self-contained
    points = (report / "data").glob("*.js")
    blob = next(points).read_text()
    assert "<img" not in blob and "\\u003cimg src=x onerror=alert(1)\\u003e" in blob


def test_report_in_headless_chromium(ray_session, small_run, tmp_path):
    missing = chromium_available()
    if missing is not None:
        if os.environ.get("CONVSCOPE_REQUIRE_BROWSER"):
            pytest.fail(f"CONVSCOPE_REQUIRE_BROWSER is set but {missing}")
        pytest.skip(missing)
    from selenium.common.exceptions import NoAlertPresentException

    index = build_report(small_run)
    report = index.parent
    shots = tmp_path / "screens"
    shots.mkdir()
    with headless_chromium() as driver:
        visited = []
        for page in sorted(report.glob("*.html")):
            if "--" in page.name and "c0" not in page.name:
                continue  # one channel page is enough
            driver.get(page.as_uri())
            wait_ready(driver)
            load_all_images(driver)
            assert broken_images(driver) == [], page.name
            assert console_errors(driver) == [], page.name
            with pytest.raises(NoAlertPresentException):  # no script from the data ran
                driver.switch_to.alert  # noqa: B018
            driver.save_screenshot(str(shots / f"{page.stem}.png"))
            visited.append(page.name)
        driver.get((report / "embedding.html").as_uri())
        wait_ready(driver)
        text = hover_scatter_point(driver, 0, 0)
        data = json.loads((next((report / "data").glob("*.js")).read_text().split("] = ", 1)[1].rstrip(";\n")))
        first = data["points"][0]
        assert first[3] in text and data["labels"][first[2]] in text
        driver.save_screenshot(str(shots / "embedding-hover.png"))
        tip = driver.execute_script("var i = document.querySelector('.scatter-tip img');"
                                    "return i ? i.naturalWidth : -1")
        assert tip > 0  # the hovered image's thumbnail loaded
    assert len(visited) >= 15
    for shot in shots.glob("*.png"):
        assert shot.stat().st_size > 5_000
