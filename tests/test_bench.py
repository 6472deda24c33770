"""The benchmarks run and agree with their baselines (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from scripts import bench


def test_bench_quick_agrees_with_every_baseline(ray_session, tmp_path):
    """``scripts/bench.py --quick``, the smoke test: every row's result agrees with its baseline.

    Without ../shared the cifar case runs a random-weights ResNet-20 on generated images;
    the agreement checks are the same.
    """
    result = bench.main(["--quick", "--case", "cifar", "--loader-workers", "1", "--work", str(tmp_path / "w"),
                         "--json", str(tmp_path / "bench.json")])
    rows = result["rows"]
    assert result["disagreements"] == [], result["disagreements"]
    seen = {(r["analysis"], r["baseline"].split(" (")[0]) for r in rows}
    expected = {
        ("features", "plain PyTorch loop"), ("features NHWC", "plain loop, NHWC"),
        ("features NHWC+bf16", "plain loop, NHWC+bf16"),
        ("activation_stats", "plain PyTorch loop"), ("top_patches", "plain PyTorch loop"),
        ("saliency", "captum Saliency"), ("smoothgrad", "captum NoiseTunnel(Saliency)"),
        ("guided_backprop", "captum GuidedBackprop"), ("deconvnet", "captum Deconvolution"),
        ("grad_cam", "captum LayerGradCam"), ("grad_cam", "pytorch-grad-cam GradCAM"),
        ("guided_grad_cam", "captum GuidedGradCam"), ("occlusion", "captum Occlusion, default"),
        ("occlusion", "captum Occlusion, best per_eval"), ("neighbours", "faiss IndexFlat"),
        ("embedding tsne", "scikit-learn TSNE"), ("occlusion incr.", "batched sweep"),
    }
    assert expected <= seen, expected - seen
    # The demo CNN's row runs the incremental path (the ResNet-20's regions save too little).
    assert [r["incremental"] for r in rows if r["analysis"] == "occlusion incr."] == [True, False]
    untimed = [r for r in rows if not (r["images"] > 0 and r["convscope_s"] > 0 and r["baseline_s"] > 0)]
    assert untimed == [], untimed
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == rows


def test_bench_demo_row_times_a_whole_run_and_checks_it(tmp_path, image_folder, resnet20_weights):
    """The demo row on a tiny manifest: a whole ``convscope run`` process, every entry complete,
    a quiet log; a manifest whose entry fails is a row that does not agree."""
    from tests.conftest import write_manifest

    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    case = bench.Case("tiny", [], [], {}, {"device": "cpu", "batch_size": 8}, tmp_path / "w")
    case.work.mkdir()
    got = bench.bench_demo(case, manifest, target_s=600)
    row = case.rows[-1]
    assert got["returncode"] == 0 and got["errors"] == [] and got["incomplete"] == []
    assert row["agrees"] and row["images"] == len(list(image_folder.rglob("*.png"))) and row["convscope_s"] > 0
    assert row["ratio"] == round(600 / row["convscope_s"], 2)
    broken = write_manifest(tmp_path / "broken.yaml", weights=resnet20_weights,
                            dataset={"kind": "image_folder", "root": str(image_folder)},
                            analyses=[{"type": "features", "layers": ["layer3"]},
                                      {"type": "grad_cam", "layer": "no_such_layer"}])
    bench.bench_demo(case, broken, target_s=600)
    assert not case.rows[-1]["agrees"]


def test_bench_attribution_times_every_attribution_entry(tmp_path):
    from scripts import bench_attribution

    from .conftest import write_manifest

    path = write_manifest(tmp_path / "m.yaml", dataset={"kind": "shapes", "root": str(tmp_path / "shapes"),
                                                         "n": 6, "size": 32},
                          model={"source": "builtin", "name": "demo_cnn"},
                          analyses=[{"type": "predictions"}, {"type": "grad_cam", "layer": "relu3", "steps": 2},
                                    {"type": "occlusion", "window": 16, "stride": 16, "sample": {"n": 4}}])
    result = bench_attribution.main([str(path), "--json", str(tmp_path / "b.json")])
    assert set(result["entries"]) == {"grad_cam", "occlusion"}
    assert result["entries"]["grad_cam"]["maps"] == 6 and result["entries"]["occlusion"]["images"] == 4
    assert all(e["images_per_s"] > 0 for e in result["entries"].values())
    assert (tmp_path / "b.json").is_file()


def test_bench_model_times_batched_against_one_unit_at_a_time(tmp_path):
    from scripts import bench_model

    from .conftest import write_manifest

    path = write_manifest(tmp_path / "m.yaml", dataset={"kind": "shapes", "root": str(tmp_path / "shapes"),
                                                         "n": 6, "size": 32},
                          model={"source": "builtin", "name": "demo_cnn"},
                          analyses=[{"type": "predictions"}, {"type": "class_model", "steps": 3},
                                    {"type": "inversion", "layers": ["relu1"], "sample": {"n": 3}, "steps": 3},
                                    {"type": "filters"}])
    result = bench_model.main([str(path), "--json", str(tmp_path / "b.json")])
    assert set(result["entries"]) == {"class_model", "inversion"}  # filters has one unit: nothing to batch
    assert result["entries"]["class_model"]["units"] == 4 and result["entries"]["inversion"]["units"] == 3
    assert all(e["batched_s"] > 0 and e["one_at_a_time_s"] > 0 for e in result["entries"].values())
    assert (tmp_path / "b.json").is_file()


def test_bench_reduce_fits_both_solvers_alike():
    from scripts.bench_reduce import probes_one

    rows = [probes_one(3000, 16, 5, solver) for solver in ("sklearn", "torch")]
    for row in rows:
        keys = {"analysis", "variant", "n", "d", "classes", "peak_driver_rss_bytes", "peak_task_rss_bytes", "seconds",
                "test_accuracy"}
        assert keys <= set(row)
        assert row["peak_driver_rss_bytes"] > 0 and row["seconds"] >= 0
    assert abs(rows[0]["test_accuracy"] - rows[1]["test_accuracy"]) <= 0.01, rows


def test_bench_reduce_neighbours_before_and_after_agree(tmp_path):
    from scripts import bench_reduce

    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, bench_reduce.__file__, "--rows", "neighbours", "--n", "3000", "--d", "8",
                    "--wide-n", "0", "--queries", "50", "--scratch", str(tmp_path),
                    "--json", str(out)], check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["n"]) for r in rows] == [("before", 3000), ("after", 3000)]
    for r in rows:
        assert r["peak_driver_rss_bytes"] > 0 and r["rows"] == 50 * 5 and r["queries"] == 50
    assert rows[1]["same_as_before"] is True  # ids and distances


def test_bench_reduce_every_new_row_runs_and_reports(ray_session, tmp_path):
    """embedding (pca), tsne, top_patches and probes, before and after, through reduce_entry (rows in this process)."""
    from scripts import bench_reduce

    out = tmp_path / "rows.json"
    rows = bench_reduce.main(["--rows", "embedding,tsne,top_patches,probes", "--n", "600", "--d", "8", "--wide-n", "0",
                              "--tsne-n", "150", "--classes", "3", "--batch", "16", "--block", "64", "--k", "3",
                              "--scratch", str(tmp_path), "--json", str(out), "--in-process"])
    assert json.loads(out.read_text()) == rows
    got = [(r["analysis"], r.get("method"), r["variant"], r["n"]) for r in rows]
    assert got == [("embedding", "pca", "before", 600), ("embedding", "pca", "after", 600),
                   ("embedding", "tsne", "before", 150), ("embedding", "tsne", "after", 150),
                   ("top_patches", None, "before", 600), ("top_patches", None, "after", 600),
                   ("probes", None, "before", 600), ("probes", None, "after", 600)]
    for r in rows:
        assert {"analysis", "n", "d", "peak_driver_rss_bytes", "peak_task_rss_bytes", "seconds"} <= set(r), r
        assert "failed" not in r and r["d"] == 8 and r["peak_driver_rss_bytes"] > 0 and r["seconds"] >= 0
    by = {(r["analysis"], r.get("method"), r["variant"]): r for r in rows}
    assert by["embedding", "pca", "after"]["points"] == 600 and by["embedding", "tsne", "after"]["points"] == 150
    # 600 images in batches of 16: 3 candidates per channel of each of 38 batches, 8 channels.
    assert by["top_patches", None, "after"]["candidates"] == 38 * 3 * 8
    assert by["top_patches", None, "after"]["rows"] == 8 * 3
    assert by["top_patches", None, "after"]["same_as_before"] is True
    assert by["probes", None, "after"]["same_as_before"] is True
    assert 0 <= by["probes", None, "after"]["test_accuracy"] <= 1
    assert not any("same_as_before" in r for r in rows if r["analysis"] == "embedding")  # not comparable


def test_bench_reduce_driver_peak_is_the_row_process_own():
    """A row's process reports its own peak, not the larger one of the process that started it."""
    import numpy as np

    from scripts import bench_reduce

    held = np.ones(2**26)  # 512 MiB resident here, in the parent
    code = "from scripts.bench_reduce import peak_rss; print(peak_rss())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=bench_reduce.ROOT)
    assert 0 < int(out.stdout.strip().splitlines()[-1]) < held.nbytes / 2


def test_bench_reduce_partials_share_their_classes():
    """Every part file of the synthetic features draws new points around the same class centres."""
    import numpy as np

    from scripts.bench_reduce import features

    (x0, l0), (x1, l1) = features(4000, 64, 2, part=0), features(4000, 64, 2, part=1)
    assert not np.array_equal(x0, x1)
    gap0, gap1 = (x[labels == 0].mean(0) - x[labels == 1].mean(0) for x, labels in ((x0, l0), (x1, l1)))
    assert np.corrcoef(gap0, gap1)[0, 1] > 0.8


def test_bench_neuron_times_every_new_analysis(tmp_path):
    from scripts import bench_neuron

    from .conftest import write_manifest

    path = write_manifest(tmp_path / "m.yaml", dataset={"kind": "shapes", "root": str(tmp_path / "shapes"),
                                                         "n": 12, "size": 32},
                          model={"source": "builtin", "name": "demo_cnn"}, analyses=[{"type": "predictions"}])
    result = bench_neuron.main([str(path), "--n", "12", "--layer", "relu3", "--channel", "1", "--repeats", "1",
                                "--layers", "relu2", "relu3", "--json", str(tmp_path / "b.json")])
    names = [row["analysis"] for row in result["rows"]]
    assert len(names) == 7 and all(row["per_s"] > 0 for row in result["rows"])
    assert all(row["ratio"] > 0 for row in result["rows"] if "ratio" in row)
    assert (tmp_path / "b.json").is_file()


def test_bench_resnet50_flags_reach_the_manifest(tmp_path, monkeypatch):
    """--compile and --gpu-decode set the resnet50 case's execution (decode: gpu only with a GPU)."""
    from pipeline.manifest import load_manifest

    case = bench.resnet50_case(tmp_path, 2, compile=True, gpu_decode=True)
    execution = load_manifest(case.manifest([{"type": "predictions"}], 2, tmp_path / "out")).execution
    gpu = bench.torch.cuda.is_available()
    assert execution.compile and execution.decode == ("gpu" if gpu else "cpu")
    assert (execution.precision, execution.channels_last) == (("bfloat16", True) if gpu else ("float32", False))
    assert gpu or "--gpu-decode left off" in case.note
    plain = bench.resnet50_case(tmp_path, 2)
    assert not plain.execution["compile"] and plain.execution["decode"] == "cpu"
