"""Bad input, on purpose: malformed manifests (property-based) and broken image files.

Every malformed manifest must be refused by ``convscope validate`` and ``convscope run``
alike: exit code 2, a short message naming the field path or the YAML line, no traceback,
and no Ray and no output folder for ``run``. Every broken image must become exactly one
row of ``errors.parquet`` while the rest of the run completes.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import pipeline.execute
from jobs import REGISTRY
from pipeline.cli import main as cli
from pipeline.datasets import list_dataset
from pipeline.decode import MAX_PIXELS, decode_batch
from pipeline.execute import run_manifest
from pipeline.manifest import ImageFolderDataset, load_manifest

from .conftest import make_images

LAYERS = None  # the module names of cifar_resnet20, filled on first use


def layer_names() -> set[str]:
    global LAYERS
    if LAYERS is None:
        from pipeline.models import layer_names as names
        from pipeline.zoo import CifarResNet

        LAYERS = set(names(CifarResNet(20)))
    return LAYERS


# ----------------------------------------------------------------------------- malformed manifests


@pytest.fixture(scope="module")
def base_files(tmp_path_factory, resnet20_weights):
    root = tmp_path_factory.mktemp("bad-manifests")
    make_images(root / "images", classes=2, per_class=2, size=8)
    return root, resnet20_weights


def base_manifest(root: Path, weights: Path) -> dict:
    return {
        "name": "bad",
        "output": str(root / "out"),
        "dataset": {"kind": "image_folder", "root": str(root / "images")},
        "model": {"source": "builtin", "name": "cifar_resnet20", "weights": str(weights)},
        "analyses": [{"type": "features", "layers": ["layer1", "layer3"]}, {"type": "predictions"}],
        "execution": {"workers": 1, "batch_size": 8, "decode_batch_size": 8},
    }


def set_at(doc: dict, loc: tuple, value) -> None:
    node = doc
    for part in loc[:-1]:
        node = node[part]
    node[loc[-1]] = value


def path_text(loc: tuple) -> str:
    from pipeline.manifest import format_loc

    return format_loc(loc)


NOT_A_NUMBER = st.sampled_from(["lots", "ten", "1x", "", "null-ish", "∞"])
CONTAINERS = st.one_of(st.lists(st.integers(-3, 3), min_size=1, max_size=2),
                       st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), min_size=1))
BAD_INT = st.one_of(NOT_A_NUMBER, CONTAINERS, st.floats(0.1, 99.9).filter(lambda f: not f.is_integer()))
BAD_COUNT = st.one_of(BAD_INT, st.booleans(), st.sampled_from(["8", "1"]))  # execution's counts are strict
BAD_STR = CONTAINERS
BAD_PATH = st.one_of(CONTAINERS, st.none())

# (field path, strategy of values of the wrong type)
WRONG_TYPES = [
    (("execution", "batch_size"), BAD_COUNT), (("execution", "workers"), BAD_COUNT),
    (("execution", "decode_batch_size"), BAD_COUNT), (("execution", "rows_per_part"), BAD_COUNT),
    (("execution", "device"), st.one_of(BAD_STR, st.sampled_from(["gpu", "tpu", 3]))),
    (("execution", "max_error_fraction"), st.one_of(CONTAINERS, NOT_A_NUMBER, st.sampled_from([1.5, -0.1, 7]))),
    (("dataset", "limit"), BAD_INT), (("dataset", "extensions"), st.one_of(NOT_A_NUMBER, st.integers())),
    (("model", "name"), st.one_of(BAD_STR, st.sampled_from(["resnet20", "cifar_resnet21", 20]))),
    (("model", "weights"), st.one_of(CONTAINERS, st.integers())),
    (("dataset", "root"), BAD_PATH), (("output",), BAD_PATH), (("name",), st.one_of(BAD_STR, st.none())),
    (("analyses", 0, "layers"), st.one_of(st.sampled_from(["layer1", 3, None, []]), st.dictionaries(
        st.sampled_from(["a"]), st.integers()))),
    (("analyses", 0, "layers", 0), st.one_of(CONTAINERS, st.integers())),
    (("analyses", 0, "pool"), st.one_of(BAD_STR, st.sampled_from(["mean", "avg2", 1]))),
    (("analyses", 1, "top_k"), BAD_INT), (("analyses", 1, "logits"), st.one_of(CONTAINERS, NOT_A_NUMBER)),
    (("analyses", 0, "type"), st.one_of(CONTAINERS, st.integers(), st.none())),
    (("dataset", "kind"), st.one_of(CONTAINERS, st.integers(), st.none(), st.sampled_from(["folder", "imagefolder"]))),
    (("model", "source"), st.one_of(CONTAINERS, st.integers(), st.sampled_from(["zoo", "builtins"]))),
    (("model", "preprocess"), st.one_of(CONTAINERS.filter(lambda v: isinstance(v, list)), NOT_A_NUMBER)),
    (("dataset", "sample"), st.one_of(NOT_A_NUMBER, st.integers())),
    (("execution",), st.one_of(NOT_A_NUMBER, st.lists(st.integers(), min_size=1))),
    (("analyses",), st.one_of(NOT_A_NUMBER, st.dictionaries(st.sampled_from(["features"]), st.integers(), min_size=1))),
]

# (section path, its valid keys) for unknown keys
KEY_SECTIONS = [((), ["name", "output", "dataset", "model", "analyses", "execution"]),
                (("dataset",), ["kind", "root", "extensions", "limit", "sample"]),
                (("model",), ["source", "name", "weights", "num_classes", "preprocess"]),
                (("execution",), ["address", "workers", "min_workers", "cpus_per_worker", "batch_size", "device",
                                  "precision", "channels_last", "compile", "decode",
                                  "threads_per_worker", "decode_batch_size", "rows_per_part", "max_error_fraction"]),
                (("analyses", 0), ["type", "name", "layers", "pool", "grid"]),
                (("analyses", 1), ["type", "name", "top_k", "logits"])]

# fields that must be >= 1 (and max_error_fraction in [0, 1])
POSITIVE = [("execution", "batch_size"), ("execution", "workers"), ("execution", "decode_batch_size"),
            ("execution", "rows_per_part"), ("execution", "threads_per_worker"), ("dataset", "limit"),
            ("analyses", 1, "top_k"), ("analyses", 0, "grid"), ("model", "num_classes")]

KEY = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


@st.composite
def schema_mutation(draw, root: Path) -> tuple[dict, str]:
    """A base manifest with one schema problem, and the field path the error must name."""
    doc = base_manifest(root, Path("/nonexistent/placeholder"))
    kind = draw(st.sampled_from(["type", "key", "analysis", "size", "duplicate", "missing_file", "missing_section"]))
    if kind == "type":
        loc, values = draw(st.sampled_from(WRONG_TYPES))
        value = draw(values)
        set_at(doc, loc, value)
        want = path_text(loc)
    elif kind == "key":
        loc, valid = draw(st.sampled_from(KEY_SECTIONS))
        key = draw(KEY.filter(lambda k: k not in valid))
        node = doc
        for part in loc:
            node = node[part]
        node[key] = draw(st.one_of(st.integers(), NOT_A_NUMBER))
        want = path_text(loc + (key,)) if loc else key
    elif kind == "analysis":
        name = draw(KEY.filter(lambda k: k not in REGISTRY))
        i = draw(st.integers(0, 2))
        if i == 2:
            doc["analyses"].append({"type": name})
        else:
            doc["analyses"][i]["type"] = name
        want = f"analyses[{i}].type"
    elif kind == "size":
        loc = draw(st.sampled_from(POSITIVE))
        set_at(doc, loc, draw(st.integers(-10**6, 0)))
        want = path_text(loc)
        if loc in (("analyses", 1, "top_k"), ("analyses", 0, "grid")):
            pass
    elif kind == "duplicate":
        taken = draw(st.sampled_from(["features", "predictions", "run.json", "errors.parquet", "images.parquet",
                                      "report", "manifest.resolved.yaml", "../up", "a/b", ".hidden"]))
        entry = draw(st.sampled_from([{"type": "predictions"}, {"type": "features", "layers": ["layer2"]},
                                      {"type": "top_patches", "layers": ["layer2"], "k": 1}]))
        doc["analyses"].append({**entry, "name": taken})
        want = "analyses[2].name"
    elif kind == "missing_file":
        which = draw(st.sampled_from([("dataset", "root"), ("model", "weights")]))
        set_at(doc, which, str(root / draw(KEY) / "missing"))
        want = path_text(which)
    else:
        section = draw(st.sampled_from(["name", "output", "dataset", "model", "analyses"]))
        del doc[section]
        want = section
    return doc, want


@st.composite
def bad_layers(draw) -> tuple[dict, str]:
    """Unknown layer names, at any position of an entry's layer list."""
    names = sorted(layer_names())
    bad = draw(st.one_of(KEY, st.sampled_from(["layer4", "layer1.3", "fc.weight", "Layer1", "layer1.", "conv0"]),
                         st.text(min_size=1, max_size=10)).filter(lambda n: n not in layer_names()))
    good = draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    pos = draw(st.integers(0, len(good)))
    layers = good[:pos] + [bad] + good[pos:]
    which = draw(st.sampled_from(["features", "top_patches", "activation_stats"]))
    entry = {"type": which, "name": "probe", "layers": layers, **({"k": 1} if which == "top_patches" else {})}
    return entry, f"analyses[2].layers[{pos}]"


def syntax_error(text: str, draw) -> str:
    lines = text.splitlines()
    how = draw(st.sampled_from(["tab", "bracket", "indent", "brace", "colon", "dupkey"]))
    i = draw(st.integers(0, len(lines) - 1))
    if how == "tab":
        lines[i] = "\t" + lines[i]
    elif how == "bracket":
        lines[i] = lines[i] + " [unbalanced, list"
    elif how == "brace":
        lines.insert(i, "extra: {a: 1, b: [2")
    elif how == "indent":
        lines[i] = " " * draw(st.integers(1, 3)) + lines[i]
    elif how == "colon":
        lines[i] = lines[i] + ": x: y"
    else:
        top = [j for j, line in enumerate(lines) if line and not line[0].isspace()]
        j = draw(st.sampled_from(top))
        lines.insert(j, lines[j].split(":")[0] + ": again")
    return "\n".join(lines) + "\n"


def check_refused(path: Path, want: str | None, capsys, calls: list) -> None:
    """validate and run both exit 2 with the same short message that names ``want`` (or a line)."""
    firsts = []
    for command in ("validate", "run"):
        rc = cli([command, str(path)])
        captured = capsys.readouterr()
        err = captured.err
        assert rc == 2, (command, rc, err, path.read_text())
        assert "Traceback" not in err and "Traceback" not in captured.out
        lines = err.strip().splitlines()
        assert 1 <= len(lines) < 15, err
        prefix = f"convscope {command}: "
        assert lines[0].startswith(prefix), err
        firsts.append((lines[0][len(prefix):], "\n".join(lines[1:])))
        if want is not None:
            assert want in err, (want, err, path.read_text())
        else:
            assert re.search(r"\bline \d+", err), err
    assert firsts[0] == firsts[1], firsts
    assert not calls, "convscope run started Ray for an invalid manifest"
    assert not (path.parent / "out").exists(), "convscope run wrote output for an invalid manifest"


def refuse(doc: dict, tmp_path: Path, want: str | None, capsys, calls: list) -> None:
    """Write ``doc`` as the manifest ``m.yaml`` and :func:`check_refused` it."""
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    check_refused(path, want, capsys, calls)


@pytest.fixture
def no_ray(monkeypatch):
    calls: list = []
    monkeypatch.setattr(pipeline.execute, "init_ray", lambda *a, **k: calls.append(a))
    return calls


HYP = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.filter_too_much])


def test_base_manifest_is_valid(base_files, tmp_path, capsys, no_ray):
    root, weights = base_files
    doc = base_manifest(root, weights)
    doc["output"] = str(tmp_path / "out")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert cli(["validate", str(tmp_path / "m.yaml")]) == 0, capsys.readouterr().err


@settings(max_examples=40, **HYP)
@given(data=st.data())
def test_schema_errors_name_the_field(base_files, tmp_path, capsys, no_ray, data):
    root, weights = base_files
    doc, want = data.draw(schema_mutation(root))
    if doc.get("model", {}).get("weights") == "/nonexistent/placeholder":
        doc["model"]["weights"] = str(weights)
    if "output" in doc and isinstance(doc["output"], str):
        doc["output"] = str(tmp_path / "out")
    refuse(doc, tmp_path, want, capsys, no_ray)


@settings(max_examples=25, **HYP)
@given(data=st.data())
def test_unknown_layers_are_named(base_files, tmp_path, capsys, no_ray, data):
    root, weights = base_files
    doc = base_manifest(root, weights)
    doc["output"] = str(tmp_path / "out")
    entry, want = data.draw(bad_layers())
    doc["analyses"].append(entry)
    refuse(doc, tmp_path, want, capsys, no_ray)


@settings(max_examples=40, **HYP)
@given(data=st.data())
def test_yaml_syntax_errors_name_the_line(base_files, tmp_path, capsys, no_ray, data):
    root, weights = base_files
    doc = base_manifest(root, weights)
    doc["output"] = str(tmp_path / "out")
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=data.draw(st.sampled_from([False, None])))
    bad = syntax_error(text, data.draw)
    try:
        loaded = yaml.safe_load(bad)
    except yaml.YAMLError:
        loaded = None
    else:
        # Still YAML: only keep it when it repeats a key (which YAML loaders silently allow).
        assume(loaded is not None and "duplicate" in str(_dupes(bad)))
    path = tmp_path / "m.yaml"
    path.write_text(bad)
    check_refused(path, None, capsys, no_ray)


def _dupes(text: str) -> list[str]:
    from pipeline.manifest import duplicate_keys

    return duplicate_keys(text)


def test_specific_regressions(base_files, tmp_path, capsys, no_ray):
    """Inputs that once crashed or were accepted (each is also in the generated space)."""
    root, weights = base_files
    cases = [
        (lambda d: d["analyses"][0].update(type=["features"]), "analyses[0].type"),   # TypeError: unhashable
        (lambda d: d["dataset"].update(kind={"a": 1}), "dataset.kind"),                # TypeError: unhashable
        (lambda d: d["model"].update(source=["builtin"]), "model.source"),             # TypeError: unhashable
        (lambda d: d.update(analyses=None), "analyses"),                               # validated; run crashed
        (lambda d: d["analyses"].append({"type": "predictions", "name": "run.json"}), "analyses[2].name"),
        (lambda d: d["execution"].update(max_error_fraction=2), "execution.max_error_fraction"),
        (lambda d: d["analyses"][0].update(type=None), "analyses[0].type"),            # line put mid-path
        (lambda d: d["execution"].update(decode_batch_size="big"), "execution.decode_batch_size"),
    ]
    for mutate, want in cases:
        doc = base_manifest(root, weights)
        doc["output"] = str(tmp_path / "out")
        mutate(doc)
        refuse(doc, tmp_path, want, capsys, no_ray)
    text = yaml.safe_dump(base_manifest(root, weights), sort_keys=False) + "name: again\n"
    (tmp_path / "m.yaml").write_text(text.replace(str(root / "out"), str(tmp_path / "out")))
    check_refused(tmp_path / "m.yaml", "duplicate key 'name'", capsys, no_ray)


# ----------------------------------------------------------------------------- broken images


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (8-bit RGB) and holds one empty data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


DECODABLE = ["good/a.png", "good/b.png", "good/c.png", "odd/gray16.png", "odd/rgba.png", "odd/palette.png",
             "odd/gray.png", "odd/cmyk.jpg", "odd/one.png"]
BAD = {"odd/empty.jpg": "decode", "odd/truncated.jpg": "decode", "odd/bomb.png": "decode",
       "odd/bomb_warn.png": "decode", "odd/text.png": "decode", "odd/folder.png": "read",
       "odd/dangling.png": "read"}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-images") / "images"
    rng = np.random.default_rng(7)
    good = root / "good"
    good.mkdir(parents=True)
    for name in "abc":
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good / f"{name}.png")
    odd = root / "odd"
    odd.mkdir()
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (odd / "empty.jpg").write_bytes(b"")
    jpeg = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
    (odd / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    g16 = (np.arange(32 * 32).reshape(32, 32) * 63).astype(np.uint16)
    Image.fromarray(g16).save(odd / "gray16.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)]), "RGBA").save(odd / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(odd / "palette.png")
    Image.fromarray(rgb[:, :, 0]).save(odd / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(odd / "cmyk.jpg", quality=95)
    Image.fromarray(rgb[:1, :1]).save(odd / "one.png")
    (odd / "bomb.png").write_bytes(png_header(30000, 30000))  # over 2x the limit: PIL raises
    side = int((MAX_PIXELS * 1.1) ** 0.5) + 1  # between the limit and 2x: PIL only warns
    assert MAX_PIXELS < side * side < 2 * MAX_PIXELS
    (odd / "bomb_warn.png").write_bytes(png_header(side, side))
    (odd / "text.png").write_text("this is not an image\n")
    (odd / "folder.png").mkdir()  # unreadable even for root
    (odd / "dangling.png").symlink_to(odd / "nowhere.png")
    if os.geteuid() != 0:
        (odd / "secret.png").write_bytes((odd / "gray.png").read_bytes())
        (odd / "secret.png").chmod(0)
    return root


def test_odd_images_decode_to_sensible_rgb(bad_folder):
    """The decode step the pipeline runs (``decode_batch``), on every file of the folder."""
    index = list_dataset(ImageFolderDataset(kind="image_folder", root=bad_folder))
    out = decode_batch(index.table.to_pydict(), resize=32, crop=32)
    got = dict(zip(out["image_id"], zip(out["pixels"], out["error"], out["error_stage"])))
    for image_id in DECODABLE:
        assert got[image_id][1] == "", (image_id, got[image_id][1])
    for image_id, stage in BAD.items():
        assert got[image_id][1] and got[image_id][2] == stage, (image_id, got[image_id][1:])
    for image_id in ("odd/palette.png", "odd/cmyk.jpg", "odd/rgba.png", "odd/gray.png", "good/a.png"):
        want = np.asarray(Image.open(bad_folder / image_id).convert("RGB"))
        assert np.array_equal(got[image_id][0], want), image_id
    g16 = np.asarray(Image.open(bad_folder / "odd/gray16.png"), dtype=np.float64)
    want = np.round(g16 / 65535 * 255)
    assert np.abs(got["odd/gray16.png"][0][..., 0] - want).max() <= 1  # scaled, not clipped at 255
    assert (got["odd/gray16.png"][0][..., 0] == got["odd/gray16.png"][0][..., 2]).all()
    assert len(np.unique(got["odd/one.png"][0].reshape(-1, 3), axis=0)) == 1  # 1x1 upscaled to one colour
    assert "pixel" in got["odd/bomb.png"][1] and "pixel" in got["odd/bomb_warn.png"][1]


def _count_rows(out: Path, entry: str) -> int:
    return pq.read_table(out / entry).num_rows


def test_bad_images_become_error_rows(ray_session, resnet20_weights, bad_folder, tmp_path, capsys):
    from .conftest import write_manifest

    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "image_folder", "root": str(bad_folder)},
                              analyses=[{"type": "features", "layers": ["layer1"]}, {"type": "predictions"}],
                              execution={"batch_size": 8, "decode_batch_size": 8})
    result = run_manifest(load_manifest(manifest), log=lambda m: None)
    out = tmp_path / "out"
    assert result.status == "complete", result.analyses
    bad = dict(BAD)
    if os.geteuid() != 0:
        bad["odd/secret.png"] = "read"
    errors = pd.read_parquet(out / "errors.parquet")
    assert sorted(errors.image_id) == sorted(bad)  # exactly one row each
    for row in errors.itertuples():
        assert row.stage == bad[row.image_id], row
        assert row.error and len(row.error) < 500 and "Traceback" not in row.error
    for entry in ("predictions", "features/layer=layer1"):
        ids = pd.read_parquet(out / entry).image_id.tolist()
        assert sorted(ids) == sorted(DECODABLE), entry
    info = json.loads((out / "run.json").read_text())
    d = info["dataset"]
    assert d["images"] == len(DECODABLE) + len(bad)
    assert d["ok"] + d["errors"] == d["images"]
    assert d["ok"] == _count_rows(out, "predictions") and d["errors"] == len(errors)

    # max_error_fraction: too many bad images fail the run (exit 1), but keep every table.
    strict = tmp_path / "strict"
    args = ["run", str(manifest), "--output", str(strict), "--set", "execution.max_error_fraction=0.25"]
    assert cli(args) == 1
    assert "max_error_fraction" in capsys.readouterr().out
    for attempt in range(2):  # the rerun skips every entry, and still counts the bad images
        info = json.loads((strict / "run.json").read_text())
        assert info["status"] == "failed", attempt
        assert "max_error_fraction=0.25" in info["error"] and f"{len(bad)} of {d['images']}" in info["error"]
        assert info["dataset"]["errors"] == len(bad)
        assert (strict / "features" / "_SUCCESS").exists() and (strict / "predictions" / "_SUCCESS").exists()
        assert _count_rows(strict, "predictions") == len(DECODABLE)
        assert len(pd.read_parquet(strict / "errors.parquet")) == len(bad)
        if attempt == 0:
            assert cli(args) == 1
            assert capsys.readouterr()
    # Under the limit it passes.
    args[-1] = f"execution.max_error_fraction={len(bad) / d['images'] + 0.01:.3f}"
    assert cli(args) == 0
    assert json.loads((strict / "run.json").read_text())["status"] == "complete"
    assert "error" not in json.loads((strict / "run.json").read_text())


def test_webdataset_truncated_member_is_one_error_row(ray_session, resnet20_weights, tmp_path):
    from .conftest import write_manifest

    files = make_images(tmp_path / "src", classes=1, per_class=4, size=16)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i, f in enumerate(files):
            for name, data in ((f"k{i}.png", f.read_bytes()), (f"k{i}.cls", b"%d" % (i % 2))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        last = tar.getmember("k3.png")
    data = shard.read_bytes()
    shard.write_bytes(data[: last.offset_data + last.size // 2])  # k3.png loses its second half
    manifest = write_manifest(tmp_path / "m.yaml", weights=resnet20_weights,
                              dataset={"kind": "webdataset", "path": str(shard)},
                              analyses=[{"type": "features", "layers": ["layer1"]}, {"type": "predictions"}])
    result = run_manifest(load_manifest(manifest), log=lambda m: None)
    out = tmp_path / "out"
    assert result.status == "complete"
    errors = pd.read_parquet(out / "errors.parquet")
    per_image = errors[errors.stage != "list"]
    assert per_image.image_id.tolist() == ["k3"] and per_image.stage.tolist() == ["read"]
    assert "truncated" in per_image.error.iloc[0]
    assert sorted(pd.read_parquet(out / "predictions").image_id) == ["k0", "k1", "k2"]
    d = json.loads((out / "run.json").read_text())["dataset"]
    assert d["images"] == 4 and d["ok"] == 3 and d["errors"] == 1 and d["ok"] + d["errors"] == d["images"]


def test_max_error_fraction_is_documented():
    from pipeline.manifest import Execution

    field = Execution.model_fields["max_error_fraction"]
    assert field.default == 1.0 and field.description and "fail" in field.description
