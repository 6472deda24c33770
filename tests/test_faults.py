"""Fault injection, a real two-node cluster, and security: what survives a crash, and what cannot get in.

* A model-worker process SIGKILLed mid-stage: Ray Data restarts it and retries the batch;
  the tables lose and duplicate nothing.
* The driver SIGKILLed between two commits: nothing uncommitted looks committed, and the
  rerun resumes and ends with the tables of an uninterrupted run.
* Determinism, unwritable output, out of disk while committing one entry.
* A two-node Ray cluster started with ``ray start`` (slow; last in the file).
* A pickle-bomb checkpoint, and shard tars with path-traversal and symlink members.

Runs made as subprocesses (``convscope run``) start their own local Ray, in their own
process session, so killing them (``os.killpg`` + a sweep of that session) never touches
the test session's embedded Ray (``ray_session``). Nothing here runs ``ray stop``.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.cli import main as cli
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest
from pipeline.writers import STAGING, SUCCESS
from scripts.bench_driver import session_pids

from .conftest import ROOT, make_images, write_manifest

CONVSCOPE = [sys.executable, "-m", "pipeline.cli"]


def run(path: Path, *overrides: str):
    return run_manifest(load_manifest(path, list(overrides)), log=lambda m: None)


def read(out: Path, entry: str, layer: str | None = None) -> pd.DataFrame:
    folder = out / entry / (f"layer={layer}" if layer else "")
    df = pd.read_parquet(folder)
    keys = [c for c in ("image_id", "class", "key", "method") if c in df.columns] or list(df.columns[:1])
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def assert_same_tables(a: Path, b: Path, tables: list[tuple[str, str | None]]) -> None:
    for entry, layer in tables:
        pd.testing.assert_frame_equal(read(a, entry, layer), read(b, entry, layer), check_exact=True)


# ----------------------------------------------------------------------------- subprocess helpers


def _env() -> dict[str, str]:
    """The environment of a subprocess run: no RAY_ADDRESS, so it starts its own local Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_DEDUP_LOGS"] = "0"
    return env


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a subprocess's process group, then every process left in its session, by pid."""
    sid = proc.pid
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.time() + 20
    while time.time() < deadline:
        left = session_pids(sid)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    assert not session_pids(sid), "processes of the killed run survived"


def _cli_run(manifest: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([*CONVSCOPE, "run", str(manifest), *args], env=_env(), cwd=manifest.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_session(proc)  # whatever it left (an embedded Ray exits with its driver, normally)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


# ----------------------------------------------------------------------------- 1. a model worker dies


KILLER = """
import os
import pathlib
import signal

import torch.nn as nn

HERE = pathlib.Path(__file__).parent
DRIVER_PID = {driver_pid}
calls = 0


class Killer(nn.Module):
    \"\"\"Kills its own process (a Ray Data model actor) on its 5th real batch, once per test.\"\"\"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        global calls
        if x.shape[0] > 1 and os.getpid() != DRIVER_PID:
            calls += 1
            if calls == 5:
                try:  # created atomically: exactly one process ever wins
                    os.close(os.open(HERE / "KILLED", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass
                else:
                    (HERE / "kills.log").open("a").write(f"{{os.getpid()}}\\n")
                    os.kill(os.getpid(), signal.SIGKILL)
        return self.fc(self.conv(x).mean((2, 3)))


def build():
    return Killer()
"""


def test_model_worker_killed_mid_run_loses_and_duplicates_nothing(ray_session, tmp_path):
    root = tmp_path / "images"
    make_images(root, classes=4, per_class=50, size=16)  # 200 images, 25 batches of 8
    (tmp_path / "killer_model.py").write_text(KILLER.format(driver_pid=os.getpid()))
    model = {"source": "python", "entrypoint": "killer_model:build", "preprocess": {"resize": 16, "crop": 16}}
    manifest = write_manifest(tmp_path / "m.yaml", model=model, dataset={"kind": "image_folder", "root": str(root)},
                              analyses=[{"type": "features", "layers": ["conv"]}, {"type": "predictions"}],
                              execution={"batch_size": 8, "decode_batch_size": 8, "workers": 2})
    # The reference: the flag already exists, so nothing is killed.
    (tmp_path / "KILLED").write_text("")
    assert run(manifest, f"output={tmp_path / 'ref'}").ok
    (tmp_path / "KILLED").unlink()

    result = run(manifest, f"output={tmp_path / 'out'}")
    kills = (tmp_path / "kills.log").read_text().split()
    assert len(kills) == 1 and int(kills[0]) != os.getpid(), "the fault was injected exactly once, in a worker"
    assert result.ok, result.analyses
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    for entry, layer in (("features", "conv"), ("predictions", None)):
        got = read(tmp_path / "out", entry, layer)
        assert len(got) == 200 and got.image_id.is_unique, "a row was lost or duplicated"
        assert got.image_id.tolist() == ids
    assert_same_tables(tmp_path / "ref", tmp_path / "out", [("features", "conv"), ("predictions", None)])
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["analyses"]["predictions"]["rows"] == 200 and info["dataset"]["errors"] == 0


# ----------------------------------------------------------------------------- 2. the driver dies


def _committed_entries_are_whole(out: Path, entries: list[str]) -> list[str]:
    """Entries with ``_SUCCESS``; asserts no other entry exists under its final name."""
    committed = []
    for name in entries:
        folder = out / name
        if (folder / SUCCESS).is_file():
            committed.append(name)
            marker = json.loads((folder / SUCCESS).read_text())
            assert len(pd.read_parquet(folder)) == marker["rows"]
        else:
            assert not folder.exists(), f"{name} exists under its final name without {SUCCESS}"
    return committed


@pytest.mark.slow
def test_driver_killed_between_commits_then_resumes(ray_session, resnet20_weights, tmp_path, image_folder):
    entries = ["features", "predictions", "class_model"]
    analyses = [{"type": "features", "layers": ["layer1", "layer3"]}, {"type": "predictions"},
                {"type": "class_model", "classes": [0, 1], "steps": 12}]
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights, analyses=analyses,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    out = tmp_path / "out"
    proc = subprocess.Popen([*CONVSCOPE, "run", str(manifest)], env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (out / "features" / SUCCESS).exists() or not (out / "predictions" / SUCCESS).exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the map stage never committed"
            time.sleep(0.02)
        assert not (out / "class_model" / SUCCESS).exists(), "class_model finished before the kill"
        driver_children = session_pids(proc.pid)
    finally:
        _kill_session(proc)
    assert len(driver_children) > 1, "the run did not start its own Ray processes"
    assert proc.returncode == -signal.SIGKILL

    assert _committed_entries_are_whole(out, entries) == ["features", "predictions"]
    assert not (out / "run.json").exists()  # written only at the end

    resumed = _cli_run(manifest)
    assert resumed.returncode == 0, resumed.stdout
    assert "starting an embedded local Ray" in resumed.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["execution"]["address"] == "embedded"
    assert {n: info["analyses"][n]["status"] for n in entries} == {
        "features": "skipped", "predictions": "skipped", "class_model": "complete"}
    assert not (out / STAGING).exists()

    # An uninterrupted run (in this process, on the shared Ray) gives the same tables.
    assert run(manifest, f"output={tmp_path / 'ref'}").ok
    assert_same_tables(out, tmp_path / "ref", [("features", "layer1"), ("features", "layer3"),
                                               ("predictions", None), ("class_model", None)])


SLOW = """
import os
import pathlib
import time

import torch
import torch.nn as nn

HERE = pathlib.Path(__file__).parent


class Slow(nn.Module):
    \"\"\"A small deterministic CNN that takes its time and counts its batches (in forwards.log).\"\"\"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[0] > 1:  # the model actors' batches, not the manifest check's dry pass
            with open(HERE / "forwards.log", "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(0.25)
        return self.fc(self.conv(x).relu().mean((2, 3)))


def build():
    return Slow()
"""


def _ledger(out: Path, entry: str, base: str = "", rows: int = 8) -> set[int]:
    """The blocks (of ``rows`` images) in an entry's ledger; records are named by first row."""
    folder = out / base / STAGING / entry / "_ledger"
    return {int(p.stem.split("-")[1]) // rows for p in folder.glob("block-*.json")} if folder.is_dir() else set()


def _forwards(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


@pytest.mark.slow
def test_driver_killed_mid_pass_resumes_inside_it(ray_session, tmp_path):
    """SIGKILL at ~50% and again at ~90% of a pass: each rerun computes only the blocks that
    were not in the ledger, and the tables equal an uninterrupted run's, bit for bit and in order."""
    root = tmp_path / "images"
    make_images(root, classes=4, per_class=50, size=16)  # 200 images: 25 blocks of 8
    (tmp_path / "slow_model.py").write_text(SLOW)
    model = {"source": "python", "entrypoint": "slow_model:build", "preprocess": {"resize": 16, "crop": 16}}
    analyses = [{"type": "features", "layers": ["conv"]}, {"type": "predictions"},
                {"type": "activation_stats", "layers": ["conv"]}]
    manifest = write_manifest(tmp_path / "m.yaml", model=model, dataset={"kind": "image_folder", "root": str(root)},
                              analyses=analyses, execution={"batch_size": 8, "decode_batch_size": 8})
    out, log, blocks = tmp_path / "out", tmp_path / "forwards.log", 25
    entries = [("features", ""), ("predictions", ""), ("activation_stats", ".inputs")]
    ledgers = []
    for share in (0.5, 0.9):
        before = _forwards(log)
        proc = subprocess.Popen([*CONVSCOPE, "run", str(manifest)], env=_env(), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 180
            while len(_ledger(out, "features")) < share * blocks:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.time() < deadline, "the pass never got that far"
                time.sleep(0.02)
        finally:
            _kill_session(proc)
        assert proc.returncode == -signal.SIGKILL
        ledger = {entry: _ledger(out, entry, base) for entry, base in entries}
        assert not (out / "features" / SUCCESS).exists(), "the pass finished before the kill"
        if ledgers:  # the second run computed no block the first had recorded
            assert all(ledgers[-1][e] <= ledger[e] for e, _ in entries)
            missing = set(range(blocks)) - set.intersection(*ledgers[-1].values())
            assert _forwards(log) - before <= len(missing)
        ledgers.append(ledger)

    before = _forwards(log)
    finished = _cli_run(manifest)
    assert finished.returncode == 0, finished.stdout
    missing = set(range(blocks)) - set.intersection(*ledgers[-1].values())
    assert _forwards(log) - before == len(missing), "a block recorded before the kill was computed again"
    info = json.loads((out / "run.json").read_text())
    for entry, _ in entries:
        assert info["analyses"][entry]["blocks_resumed"] == len(ledgers[-1][entry]), entry
        assert info["analyses"][entry]["status"] == "complete"
    assert not (out / STAGING).exists() and not (out / ".inputs").exists()

    assert run(manifest, f"output={tmp_path / 'ref'}").ok
    for entry, layer in (("features", "conv"), ("predictions", None), ("activation_stats", None)):
        folder = f"{entry}/layer={layer}" if layer else entry
        got, want = pd.read_parquet(out / folder), pd.read_parquet(tmp_path / "ref" / folder)
        pd.testing.assert_frame_equal(got, want, check_exact=True)  # unsorted: the same order too
        names = sorted(p.relative_to(out).as_posix() for p in (out / folder).rglob("*"))
        assert names == sorted(p.relative_to(tmp_path / "ref").as_posix()
                               for p in (tmp_path / "ref" / folder).rglob("*"))
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert pd.read_parquet(out / "predictions").image_id.tolist() == ids, "rows are not in dataset order"


# ----------------------------------------------------------------------------- 3. determinism


def test_same_manifest_twice_gives_identical_tables(ray_session, resnet20_weights, tmp_path):
    root = tmp_path / "images"
    make_images(root, classes=3, per_class=8)
    analyses = [{"type": "features", "layers": ["layer2"]}, {"type": "predictions"},
                {"type": "embedding", "layers": ["layer3"], "methods": ["pca", "tsne"], "seed": 3},
                {"type": "saliency", "sample": {"n": 5, "seed": 1}, "steps": 2}]
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights, analyses=analyses,
                              dataset={"kind": "image_folder", "root": str(root)})
    assert run(manifest, f"output={tmp_path / 'a'}").ok
    assert run(manifest, f"output={tmp_path / 'b'}").ok
    assert_same_tables(tmp_path / "a", tmp_path / "b", [("features", "layer2"), ("predictions", None),
                                                        ("embedding", None), ("saliency", None)])
    assert len(read(tmp_path / "a", "saliency")) > 0
    for entry in ("embedding", "saliency"):
        shards_a = sorted((tmp_path / "a" / entry / "_shards").glob("*.tar"))
        assert shards_a, entry
        for shard in shards_a:  # rendered images too, byte for byte
            assert shard.read_bytes() == (tmp_path / "b" / entry / "_shards" / shard.name).read_bytes()


# ----------------------------------------------------------------------------- 4. unwritable, out of disk


@pytest.mark.parametrize("how", ["under-a-file", "read-only"])
def test_unwritable_output_exits_2_before_any_work(resnet20_weights, tmp_path, image_folder, monkeypatch, capsys, how):
    import pipeline.execute as execute

    started = []
    monkeypatch.setattr(execute, "init_ray", lambda *a: started.append(a))
    if how == "under-a-file":
        (tmp_path / "file").write_text("x")
        output = tmp_path / "file" / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write to a read-only folder")
        output = tmp_path / "ro"
        output.mkdir()
        output.chmod(0o555)
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    try:
        assert cli(["run", str(manifest), "--output", str(output)]) == 2
    finally:
        if how == "read-only":
            output.chmod(0o755)
    err = capsys.readouterr().err
    assert "output: cannot write to" in err and "Traceback" not in err
    assert started == [], "Ray started although the output is unwritable"
    assert not list(tmp_path.rglob(SUCCESS))


FULL_DISK = """
import errno
import os
import pathlib

from pipeline.store import Store
from pipeline.zoo import CifarResNet

HERE = pathlib.Path(__file__).parent
FLAG = HERE / "DISK_FULL"
_write_bytes = Store.write_bytes


def write_bytes(self, rel, data, durable=True):
    \"\"\"Out of disk for predictions' Parquet parts while FLAG exists (in whichever process writes).\"\"\"
    path = self.path(rel)
    if FLAG.exists() and "/.staging/predictions/" in path and ".parquet." in path:
        with open(HERE / "injected.log", "a") as f:
            f.write(path + "\\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return _write_bytes(self, rel, data, durable)


Store.write_bytes = write_bytes


def build():
    return CifarResNet(20)
"""


def test_out_of_disk_while_writing_one_entry(ray_session, resnet20_weights, tmp_path, image_folder):
    from pipeline.store import Store

    # The model's module fills the disk for one entry in every process that loads it: the
    # model actors, which write the blocks, included.
    (tmp_path / "fulldisk.py").write_text(FULL_DISK)
    (tmp_path / "DISK_FULL").write_text("")
    model = {"source": "python", "entrypoint": "fulldisk:build", "weights": str(resnet20_weights),
             "preprocess": {"resize": 32, "crop": 32}}
    analyses = [{"type": "predictions"}, {"type": "features", "layers": ["layer1"]},
                {"type": "embedding", "layers": ["layer3"], "methods": ["pca"]}]
    manifest = write_manifest(tmp_path / "m.yaml", model=model, analyses=analyses,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    out = tmp_path / "out"
    real = Store.write_bytes
    try:
        result = run(manifest)
    finally:
        Store.write_bytes = real  # this process loaded the model too (to check the manifest)
    injected = (tmp_path / "injected.log").read_text().split()
    assert len(injected) == 3, injected  # one part per block of 8 of the 18 images
    assert result.status == "failed"
    assert result.analyses["predictions"]["status"] == "failed"
    assert "No space left on device" in result.analyses["predictions"]["error"]
    for name in ("features", "embedding"):
        assert result.analyses[name]["status"] == "complete", result.analyses[name]
        assert (out / name / SUCCESS).is_file()
    assert len(read(out, "features", "layer1")) == 18
    assert not (out / "predictions").exists() and not (out / STAGING / "predictions").exists()
    info = json.loads((out / "run.json").read_text())
    assert (info["analyses"]["predictions"]["status"] == "failed"
            and info["analyses"]["features"]["status"] == "complete")

    # Space again: the rerun finishes the failed entry only.
    (tmp_path / "DISK_FULL").unlink()
    try:
        result = run(manifest)
    finally:
        Store.write_bytes = real
    assert result.ok
    assert result.analyses["predictions"]["status"] == "complete"
    assert result.analyses["features"]["status"] == "skipped" and result.analyses["embedding"]["status"] == "skipped"
    assert len(read(out, "predictions")) == 18


# ----------------------------------------------------------------------------- 6. security


class _Bomb:
    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_checkpoint_is_refused_and_never_runs(tmp_path, image_folder, capsys):
    pwned = tmp_path / "PWNED"
    weights = tmp_path / "evil.th"
    torch.save({"conv1.weight": _Bomb(pwned)}, weights)
    manifest = write_manifest(tmp_path / "m.yaml", weights=weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)})
    assert cli(["validate", str(manifest)]) == 2
    assert cli(["run", str(manifest), "--output", str(tmp_path / "out")]) == 2
    assert cli(["layers", "builtin:cifar_resnet20", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert f"cannot load checkpoint {weights}" in err and "Traceback" not in err
    assert not pwned.exists(), "the checkpoint ran code"
    assert not (tmp_path / "out" / "run.json").exists()
    # The payload is live: an unsafe load does run it (in a throwaway process).
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(weights)!r}, weights_only=False)"],
                   check=False, capture_output=True, timeout=120)
    assert pwned.exists()


def test_report_images_never_write_outside_their_folder(tmp_path):
    from pipeline.report import Run

    run_dir, out = tmp_path / "run", tmp_path / "report"
    entry = run_dir / "saliency"
    (entry / "_shards").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": "t", "analyses": {"saliency": {"status": "complete"}}}))
    (entry / SUCCESS).write_text("{}")
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (2, 2)).save(png, format="PNG")
    data = png.getvalue()
    with tarfile.open(entry / "_shards" / "shard-00000.tar", "w") as tar:
        def add(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("good.png")
        add("../../evil.png")
        add("/abs.png")
        add("a/../../x.png")
        add("link.png", tarfile.SYMTYPE, "../../../outside.png")
        add("hard.png", tarfile.LNKTYPE, "/etc/passwd")
        add("dev.png", tarfile.CHRTYPE)
        add("..png")
    before = {p for p in tmp_path.rglob("*")}
    found = Run(run_dir, out).images("saliency")
    folder = out / "img" / "saliency"
    created = {p for p in tmp_path.rglob("*")} - before
    assert created, "nothing was extracted"
    for p in created:
        assert p == out or folder == p or folder in p.parents or p in folder.parents, f"wrote {p}"
        assert not p.is_symlink()
    assert "good" in found and (folder / "good.png").read_bytes() == data
    assert "link" not in found and "hard" not in found and "dev" not in found
    for name in found.values():
        assert (out / name).resolve().parent == folder.resolve()
    assert not Path("/abs.png").exists() and not (tmp_path / "evil.png").exists() and not (tmp_path / "x.png").exists()
    assert not (tmp_path.parent / "evil.png").exists() and not (tmp_path / "outside.png").exists()


# ----------------------------------------------------------------------------- 5. a two-node cluster (last)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node(*args: str, temp: Path) -> subprocess.Popen:
    """``ray start ... --block`` in its own session: killing that session stops exactly this node."""
    ray_cli = Path(sys.executable).with_name("ray")
    log = open(temp / f"node-{len(list(temp.glob('node-*.log')))}.log", "w")
    return subprocess.Popen([str(ray_cli), "start", "--block", "--node-ip-address=127.0.0.1", *args],
                            env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_two_node_cluster_run_equals_embedded_run(ray_session, resnet20_weights, tmp_path, image_folder):
    # A short temp dir: Ray's socket paths must stay under the 107-byte limit.
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="cs-ray-"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(image_folder)},
                              analyses=[{"type": "features", "layers": ["layer1", "layer3"]}, {"type": "predictions"},
                                        {"type": "embedding", "layers": ["layer3"], "methods": ["pca"]}])
    nodes = [_ray_node("--head", f"--port={port}", "--num-cpus=1", '--resources={"head": 1}',
                       "--include-dashboard=false", f"--temp-dir={temp}", temp=temp)]
    try:
        ray_cli = str(Path(sys.executable).with_name("ray"))
        deadline = time.time() + 90
        while True:  # `ray status` lists every alive node (under Active: or Idle:) as "1 node_<id>"
            status = subprocess.run([ray_cli, "status", f"--address={address}"], env=_env(),
                                    capture_output=True, text=True, timeout=60)
            alive = re.findall(r"^\s*1 node_[0-9a-f]+", status.stdout, flags=re.M)
            if status.returncode == 0 and len(alive) == 2:
                break
            if status.returncode == 0 and len(nodes) == 1:  # the head is up: a second node joins it
                nodes.append(_ray_node(f"--address={address}", "--num-cpus=1", temp=temp))
            assert time.time() < deadline and all(n.poll() is None for n in nodes), status.stdout + status.stderr
            time.sleep(0.5)
        assert "2.0 CPU" in status.stdout or "0.0/2.0 CPU" in status.stdout, status.stdout

        done = _cli_run(manifest, "--output", str(tmp_path / "cluster"), "--address", address)
        assert done.returncode == 0, done.stdout
        assert f"joining the Ray cluster at {address}" in done.stdout
        info = json.loads((tmp_path / "cluster" / "run.json").read_text())
        assert info["status"] == "complete" and info["execution"]["address"] == address
    finally:
        for node in reversed(nodes):
            _kill_session(node)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)

    assert run(manifest, f"output={tmp_path / 'embedded'}").ok
    assert_same_tables(tmp_path / "cluster", tmp_path / "embedded",
                       [("features", "layer1"), ("features", "layer3"), ("predictions", None), ("embedding", None)])
    # The suite's own Ray (ray_session) is still there and usable: its CPUs come back once the run's actors
    # have exited, which Ray does asynchronously after the run returns.
    assert ray_session.is_initialized()
    deadline = time.time() + 60
    while ray_session.available_resources().get("CPU", 0) == 0 and time.time() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources().get("CPU", 0) > 0, ray_session.available_resources()
