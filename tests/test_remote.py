"""Outputs on a filesystem a cluster shares: a whole run written to S3 and read back.

The S3 endpoint is real: moto's server, started on 127.0.0.1 by the fixture. Nothing else
is mocked; the run's workers write to it as they would to any bucket, and the tables are
read back with pyarrow alone. Nothing here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest
from pipeline.report import build_report

from .conftest import write_manifest

BUCKET = "convscope-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3-compatible endpoint on 127.0.0.1 with one bucket, and the standard environment
    (``AWS_ENDPOINT_URL`` and credentials) pointing at it."""
    pytest.importorskip("moto", reason="moto (a test dependency) provides the local S3 endpoint")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the S3 endpoint did not start"
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield fs
    proc.kill()
    proc.wait(timeout=10)
    log.close()


def run(path: Path, *overrides: str):
    return run_manifest(load_manifest(path, list(overrides)), log=lambda m: None)


def read_s3(fs: pafs.FileSystem, prefix: str) -> pd.DataFrame:
    df = pq.read_table(f"{BUCKET}/{prefix}", filesystem=fs).to_pandas()
    keys = [c for c in ("image_id", "class", "layer", "channel", "rank") if c in df.columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def read_local(folder: Path) -> pd.DataFrame:
    df = pq.read_table(folder).to_pandas()
    keys = [c for c in ("image_id", "class", "layer", "channel", "rank") if c in df.columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def test_a_whole_run_on_s3_equals_the_local_run_and_reports(ray_session, s3, resnet20_weights, tmp_path,
                                                            image_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a path would show up here as a folder
    analyses = [{"type": "features", "layers": ["layer1", "layer3"]}, {"type": "predictions"},
                {"type": "top_patches", "layers": ["layer2"], "k": 2, "channels": "0:3"},
                {"type": "grad_cam", "layer": "layer3", "sample": {"n": 4}, "steps": 2},
                {"type": "class_model", "classes": [0, 1], "steps": 3}]
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights, analyses=analyses,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    assert run(manifest, f"output={tmp_path / 'local'}").ok
    uri = f"s3://{BUCKET}/runs/a"
    result = run(manifest, f"output={uri}")
    assert result.ok, result.analyses
    assert not (tmp_path / "s3:").exists() and not list(tmp_path.glob("s3*"))

    listing = [i.path for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/a", recursive=True))]
    assert not [p for p in listing if "/.staging" in p or "/.inputs" in p], "staging left behind"
    for name in ("run.json", "errors.parquet", "images.parquet", "manifest.resolved.yaml", "run.log",
                 *(f"{e['type']}/_SUCCESS" for e in analyses)):
        assert f"{BUCKET}/runs/a/{name}" in listing, name
    local = tmp_path / "local"
    for table in ("features/layer=layer1", "features/layer=layer3", "predictions", "top_patches", "grad_cam",
                  "class_model"):
        pd.testing.assert_frame_equal(read_s3(s3, f"runs/a/{table}"), read_local(local / table), check_exact=True)
    # Rendered images too, byte for byte, under the same shard names.
    for entry in ("top_patches", "grad_cam", "class_model"):
        shards = sorted((local / entry / "_shards").glob("*.tar"))
        assert shards, entry
        for shard in shards:
            with s3.open_input_stream(f"{BUCKET}/runs/a/{entry}/_shards/{shard.name}") as f:
                assert f.read() == shard.read_bytes()

    # The report reads the run from the bucket and is uploaded beside it.
    index = build_report(uri)
    assert index == f"{uri}/report/index.html"
    with s3.open_input_stream(f"{BUCKET}/runs/a/report/index.html") as f:
        page = f.read().decode()
    assert "predictions" in page and "class_model" in page
    report_files = [i.path for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/a/report", recursive=True))]
    assert any(p.endswith(".png") for p in report_files)
    out = tmp_path / "local-report"
    assert cli(["report", uri, "--out", str(out)]) == 0 and (out / "index.html").is_file()

    # A rerun into the bucket finds every entry committed there.
    again = run(manifest, f"output={uri}")
    assert again.ok and {a["status"] for a in again.analyses.values()} == {"skipped"}


def test_an_output_no_filesystem_serves_exits_2(s3, resnet20_weights, tmp_path, image_folder, monkeypatch, capsys):
    import pipeline.execute as execute

    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(execute, "init_ray", lambda *a: started.append(a))
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    assert cli(["run", str(manifest), "--output", "nosuchfs://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "output" in err and "nosuchfs://" in err and "Traceback" not in err
    assert cli(["validate", str(manifest), "--set", "output=nosuchfs://bucket/run"]) == 2
    assert "no filesystem serves nosuchfs:// URIs" in capsys.readouterr().err
    # A bucket that is not there: refused before any work, with the reason.
    assert cli(["run", str(manifest), "--output", "s3://no-such-bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "output: cannot write to s3://no-such-bucket/run" in err and "Traceback" not in err
    assert started == [], "Ray started although the output cannot be written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "m.yaml"], "a URI became a local folder"


def test_file_uris_are_local_folders(tmp_path, image_folder, resnet20_weights):
    manifest = load_manifest(write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                                            dataset={"kind": "image_folder", "root": str(image_folder)}),
                             [f"output=file://{tmp_path}/there"])
    assert manifest.output == tmp_path / "there"
    assert load_manifest(tmp_path / "m.yaml", output=f"s3://{BUCKET}/x/").output == f"s3://{BUCKET}/x"
    assert os.path.isabs(str(load_manifest(tmp_path / "m.yaml", output="rel").output))
