"""The features benchmark runs and its two sides agree (timings are not asserted)."""

from __future__ import annotations

from scripts import bench_features

from .conftest import needs_shared


@needs_shared
def test_bench_features_agrees_with_plain_loop(ray_session, tmp_path):
    result = bench_features.main(["--limit", "300", "--repeats", "1", "--loader-workers", "0",
                                  "--json", str(tmp_path / "bench.json")])
    assert result["images"] == 300
    assert result["max_abs_feature_diff"] <= 1e-5
    assert result["plain_loop_images_per_s"] > 0 and result["convscope_images_per_s"] > 0
    assert (tmp_path / "bench.json").is_file()


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
