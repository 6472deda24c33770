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
