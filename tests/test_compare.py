"""``convscope compare``: two small runs of one manifest with different weights, checked against
independent pandas / numpy computations from the runs' own tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main as cli

from .conftest import write_manifest

ANALYSES = [
    {"type": "predictions"},
    {"type": "top_patches", "layers": ["relu2", "relu4"], "k": 3, "channels": [0, 1, 2, 3], "render": False},
    {"type": "top_patches", "name": "top_per_class", "layers": ["relu2"], "k": 2, "channels": [0, 1],
     "per_class": True, "render": False},
    {"type": "saliency", "target": "label", "render": False, "metrics": False},
    {"type": "grad_cam", "layer": "relu3", "target": {"top": 2}, "render": False, "metrics": False},
    {"type": "probes", "layers": ["relu2", "relu4"], "shots_per_class": [1, 2], "repeats": 2},
]


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory) -> tuple[Path, Path]:
    """Run A and run B: the same shapes dataset, the demo CNN trained briefly from two seeds
    (weak models whose mistakes differ); A also has a features entry that B lacks."""
    from pipeline.demo import train_demo_model
    from pipeline.execute import run_manifest
    from pipeline.manifest import load_manifest

    root = tmp_path_factory.mktemp("compare")
    dataset = {"kind": "shapes", "root": str(root / "shapes"), "n": 24, "size": 32}
    outs = []
    for name, seed, extra in (("a", 1, [{"type": "features", "layers": ["relu4"]}]), ("b", 2, [])):
        weights = root / f"{name}.pt"
        train_demo_model(weights, n_train=256, epochs=2, size=32, seed=seed, log=lambda message: None)
        model = {"source": "builtin", "name": "demo_cnn", "num_classes": 4, "weights": str(weights),
                 "preprocess": {"resize": 32, "crop": 32}}
        path = write_manifest(root / f"{name}.yaml", model=model, dataset=dataset, analyses=ANALYSES + extra,
                              output=str(root / f"run-{name}"))
        result = run_manifest(load_manifest(path), log=lambda message: None)
        assert result.ok, {k: v.get("error") for k, v in result.analyses.items() if v.get("error")}
        outs.append(root / f"run-{name}")
    return outs[0], outs[1]


@pytest.fixture(scope="module")
def compared(runs) -> Path:
    a, b = runs
    assert cli(["compare", str(a), str(b)]) == 0
    return b / f"compare-{a.name}"


def table(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(folder / name)


def test_output_layout(runs, compared):
    for name in ("accuracy", "per_class", "flips", "channels", "attribution", "probes", "unmatched"):
        assert list((compared / name).glob("part-*.parquet")), name
    assert (compared / "_SUCCESS").is_file() and (compared / "index.html").is_file()
    assert not list(compared.parent.glob(f".{compared.name}-*"))
    summary = json.loads((compared / "summary.json").read_text())
    assert summary["same_dataset"] and not summary["same_model"]
    assert summary["entries"]["features"] == {"type_a": "features", "type_b": None, "compared": False,
                                              "reason": "only in run A"}
    unmatched = table(compared, "unmatched")
    assert unmatched[["entry", "type_a", "reason"]].values.tolist() == [["features", "features", "only in run A"]]
    page = (compared / "index.html").read_text()
    assert "Flipped predictions" in page and "assets/report.css" in page and (compared / "assets").is_dir()


def test_flips_and_per_class_against_pandas(runs, compared):
    a, b = (pd.read_parquet(r / "predictions") for r in runs)
    m = a.merge(b, on="image_id", suffixes=("_a", "_b"))
    assert (m.label_a == m.label_b).all()
    flips = table(compared, "flips")
    want = m[m.pred_a != m.pred_b]
    assert 0 < len(want) < len(m), "the two models should disagree on some images, not all"
    assert sorted(flips.image_id) == sorted(want.image_id)
    got = flips.set_index("image_id").loc[want.image_id]
    assert (got.class_a.to_numpy() == want.pred_a.to_numpy()).all()
    assert (got.class_b.to_numpy() == want.pred_b.to_numpy()).all()
    assert np.allclose(got.prob_a, want.prob_a) and np.allclose(got.prob_b, want.prob_b)
    expected = np.where(want.pred_b == want.label_a, "fixed", np.where(want.pred_a == want.label_a, "broke", "other"))
    assert (got.change.to_numpy() == expected).all()
    assert {"fixed", "broke"} <= set(flips.change), "the two seeds should give both kinds of flips"
    smaller = np.minimum(flips.prob_a, flips.prob_b).to_numpy()
    assert (np.diff(smaller) <= 0).all(), "most confident flips first"

    acc = table(compared, "accuracy").iloc[0]
    assert acc.images == acc.labelled == len(m)
    assert acc.accuracy_a == pytest.approx((m.pred_a == m.label_a).mean())
    assert acc.accuracy_b == pytest.approx((m.pred_b == m.label_a).mean())
    assert acc.flip_fraction == pytest.approx(len(want) / len(m))
    assert acc.fixed == (expected == "fixed").sum() and acc.broke == (expected == "broke").sum()

    per_class = table(compared, "per_class").set_index("label")
    want_pc = m.assign(ra=m.pred_a == m.label_a, rb=m.pred_b == m.label_a).groupby("label_a")
    assert list(per_class.index) == list(want_pc.size().index)
    assert np.allclose(per_class.accuracy_a, want_pc.ra.mean()) and np.allclose(per_class.accuracy_b, want_pc.rb.mean())
    assert (per_class.images == want_pc.size()).all()
    names = json.loads((runs[0] / "run.json").read_text())["dataset"]["label_names"]
    assert per_class.label_name.tolist() == [names[i] for i in per_class.index]


def test_topk_overlap_against_sets(runs, compared):
    channels = table(compared, "channels")
    for entry, keys in (("top_patches", ["layer", "channel"]), ("top_per_class", ["layer", "channel", "label"])):
        a, b = (pd.read_parquet(r / entry) for r in runs)
        sets_a = {k: set(g.image_id) for k, g in a.groupby(keys)}
        sets_b = {k: set(g.image_id) for k, g in b.groupby(keys)}
        got = channels[channels.entry == entry]
        assert len(got) == len(set(sets_a) | set(sets_b))
        for row in got.itertuples():
            key = (row.layer, row.channel) if len(keys) == 2 else (row.layer, row.channel, row.label)
            sa, sb = sets_a.get(key, set()), sets_b.get(key, set())
            assert row.common == len(sa & sb) and row.images_a == len(sa) and row.images_b == len(sb)
            assert row.overlap == pytest.approx(len(sa & sb) / max(len(sa), len(sb)))


def test_attribution_correlations_against_corrcoef(runs, compared):
    attribution = table(compared, "attribution")
    for entry in ("saliency", "grad_cam"):
        a, b = (pd.read_parquet(r / entry) for r in runs)
        pairs = a.merge(b, on=["image_id", "target"], suffixes=("_a", "_b"))
        got = attribution[attribution.entry == entry].set_index(["image_id", "target"])
        assert len(pairs) and len(got) == len(pairs), entry
        for row in pairs.itertuples():
            with np.errstate(invalid="ignore", divide="ignore"):  # a constant map: NaN, as compare says
                want = np.corrcoef(np.asarray(row.map_a, float), np.asarray(row.map_b, float))[0, 1]
            assert got.loc[(row.image_id, row.target), "correlation"] == pytest.approx(want, abs=1e-9, nan_ok=True)
        assert got.correlation.notna().sum() > len(got) / 2, entry
    assert len(attribution[attribution.entry == "saliency"]) == 24  # target: label pairs every image


def test_probes_per_layer(runs, compared):
    """Full-data fits as they are; few-shot fits as the mean of their repeats (a pandas groupby)."""
    tables = [pd.read_parquet(r / "probes") for r in runs]
    probes = table(compared, "probes")
    full = probes[probes.shots.isna()].set_index("layer")
    a, b = (t[t.shots.isna()].set_index("layer") for t in tables)
    assert list(full.index) == ["relu2", "relu4"]
    assert np.allclose(full.test_accuracy_a, a.test_accuracy.loc[full.index])
    assert np.allclose(full.delta, b.test_accuracy.loc[full.index] - a.test_accuracy.loc[full.index])
    means = [t[t.shots.notna()].groupby(["layer", "shots"]).test_accuracy.mean() for t in tables]
    few = probes[probes.shots.notna()].set_index(["layer", "shots"]).sort_index()
    assert list(few.index) == [(layer, shots) for layer in ("relu2", "relu4") for shots in (1, 2)]
    assert np.allclose(few.test_accuracy_a, means[0].loc[few.index])
    assert np.allclose(few.delta, means[1].loc[few.index] - means[0].loc[few.index])


def test_fail_on_exit_codes(runs, compared, tmp_path, capsys):
    a, b = runs
    acc = table(compared, "accuracy").iloc[0]
    out = str(tmp_path / "cmp")
    assert cli(["compare", str(a), str(b), "-o", out, "--fail-on", "accuracy_drop=1,flips=1"]) == 0
    capsys.readouterr()
    assert cli(["compare", str(a), str(b), "-o", out, "--fail-on", f"flips={acc.flip_fraction / 2}"]) == 1
    assert "flips=" in capsys.readouterr().err
    assert (tmp_path / "cmp" / "_SUCCESS").is_file()  # a threshold passed is a result, written in full
    # B against A: the accuracy change has the other sign.
    drop_ab = acc.accuracy_a - acc.accuracy_b
    worse, better = (a, b) if drop_ab > 0 else (b, a)
    assert cli(["compare", str(worse), str(better), "-o", out, "--fail-on", "accuracy_drop=0"]) == 1
    assert "accuracy dropped" in capsys.readouterr().err
    assert cli(["compare", str(better), str(worse), "-o", out, "--fail-on", "accuracy_drop=0"]) == 0
    for bad in ("flip=0.1", "flips=lots", "accuracy_drop", "flips=2"):
        assert cli(["compare", str(a), str(b), "-o", out, "--fail-on", bad]) == 2, bad
        assert "accuracy_drop, flips" in capsys.readouterr().err
    # Nothing to check: the runs share no committed predictions entry.
    no_preds = tmp_path / "no-preds"
    shutil.copytree(b, no_preds, ignore=shutil.ignore_patterns("compare-*"))
    (no_preds / "predictions" / "_SUCCESS").unlink()
    assert cli(["compare", str(a), str(no_preds), "-o", str(tmp_path / "x"), "--fail-on", "flips=0.1"]) == 2
    assert "nothing to check" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli(["compare", str(a), str(no_preds), "-o", str(tmp_path / "x")]) == 0
    assert "predictions: not compared (not committed in run B)" in capsys.readouterr().out


def test_bad_runs_exit_2_naming_the_path(runs, tmp_path, capsys):
    a, _ = runs
    assert cli(["compare", str(a), str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(["compare", str(tmp_path / "empty"), str(a), "-o", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'empty'}: no run.json" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(a / "run.json", unfinished / "run.json")
    assert cli(["compare", str(a), str(unfinished), "-o", str(tmp_path / "o")]) == 2
    assert f"{unfinished}: no committed analysis" in capsys.readouterr().err
    # An existing folder that is not a comparison is never replaced.
    assert cli(["compare", str(a), str(a), "-o", str(unfinished)]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    # A checkpoint series holds every checkpoint in its tables: one of them is named with @.
    series = tmp_path / "series"
    shutil.copytree(a, series)
    info = json.loads((series / "run.json").read_text())
    info["model"]["checkpoints"] = [{"name": "epoch01", "weights": "e1.pt", "hash": "sha256:0"}]
    (series / "run.json").write_text(json.dumps(info))
    assert cli(["compare", str(a), str(series), "-o", str(tmp_path / "o")]) == 2
    assert f"{series}: a checkpoint series (epoch01); compare one checkpoint of it, as {series}@epoch01" \
        in capsys.readouterr().err
    assert cli(["compare", str(a), f"{series}@epoch09", "-o", str(tmp_path / "o")]) == 2
    assert "no checkpoint 'epoch09'; the series has epoch01" in capsys.readouterr().err
    assert cli(["compare", f"{a}@epoch01", str(a), "-o", str(tmp_path / "o")]) == 2
    assert "not a checkpoint series, so @epoch01 names nothing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_output_is_atomic(runs, tmp_path, monkeypatch):
    import pipeline.compare as compare

    a, b = runs
    out = tmp_path / "cmp"
    assert cli(["compare", str(a), str(b), "-o", str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "_SUCCESS"}
    seen = {}

    def failing_page(*args, **kwargs):
        staging = [p for p in tmp_path.iterdir() if p.name.startswith(".cmp-staging-")]
        seen["staging"] = staging
        seen["tables_in_staging"] = bool(staging) and (staging[0] / "flips").is_dir()
        seen["staging_success"] = bool(staging) and (staging[0] / "_SUCCESS").exists()
        raise RuntimeError("disk full")

    monkeypatch.setattr(compare, "report_page", failing_page)
    with pytest.raises(RuntimeError, match="disk full"):
        cli(["compare", str(a), str(b), "-o", str(out)])
    assert seen == {"staging": seen["staging"], "tables_in_staging": True, "staging_success": False}
    # The earlier comparison is untouched and still complete; no staging folder is left.
    assert (out / "_SUCCESS").is_file()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "_SUCCESS"} \
        == before
    assert [p.name for p in tmp_path.iterdir()] == ["cmp"]
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        cli(["compare", str(a), str(b), "-o", str(fresh)])
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir()] == ["cmp"]


def test_probe_rows_leave_a_baselines_rows_out():
    from jobs.compare import probe_rows

    t = pd.DataFrame({"layer": ["l1"] * 4, "classifier": ["logistic"] * 4, "shots": [None, 2, None, 2],
                      "repeat": [None, 0, None, 0], "test_accuracy": [0.9, 0.5, 0.1, 0.3],
                      "train_accuracy": [1.0] * 4, "n_test": [4] * 4,
                      "baseline": [None, None, "random_init", "random_init"]})
    assert probe_rows(t)[["shots", "test_accuracy"]].fillna(-1).values.tolist() == [[-1, 0.9], [2, 0.5]]
