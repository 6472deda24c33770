"""Manifest loading: every error names its field path; overrides; layer checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.errors import ManifestError, suggest
from pipeline.manifest import apply_overrides, format_loc, load_manifest, parse_set_path
from pipeline.models import check_manifest

from .conftest import CIFAR, RESNET20, ROOT, needs_shared


def good(tmp_path: Path, image_folder: Path) -> dict:
    return {
        "name": "t",
        "output": "out",
        "dataset": {"kind": "image_folder", "root": str(image_folder)},
        "model": {"source": "builtin", "name": "cifar_resnet20"},
        "analyses": [{"type": "features", "layers": ["layer1"]}, {"type": "predictions"}],
    }


def load(tmp_path: Path, doc: dict | str, **kw):
    path = tmp_path / "m.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return load_manifest(path, **kw)


# (what to change, the field path that must be named, a phrase the message must hold)
BAD = [
    (lambda d: d.pop("dataset"), "dataset", "required section is missing"),
    (lambda d: d.update(outptu="x"), "outptu", "did you mean 'output'?"),
    (lambda d: d["dataset"].update(kind="imagefolder"), "dataset.kind", "did you mean 'image_folder'?"),
    (lambda d: d["dataset"].update(root="/nonexistent/dir"), "dataset.root", "not a folder"),
    (lambda d: d["dataset"].update(limit=-3), "dataset.limit", "greater than or equal to 1"),
    (lambda d: d["dataset"].update(sample={"n": "many"}), "dataset.sample.n", "valid integer"),
    (lambda d: d["dataset"].update(roots="x"), "dataset.roots", "did you mean 'root'?"),
    (lambda d: d["model"].update(name="cifar_resnt20"), "model.name", "did you mean 'cifar_resnet20'?"),
    (lambda d: d["model"].update(source="keras"), "model.source", "Valid: torchvision, builtin"),
    (lambda d: d["model"].update(weights="missing.th"), "model.weights", "weights file does not exist"),
    (lambda d: d["model"].update(preprocess={"crop": 0}), "model.preprocess", "must be positive"),
    (lambda d: d["analyses"].append({"type": "featurs", "layers": ["x"]}), "analyses[2].type",
     "did you mean 'features'?"),
    (lambda d: d["analyses"][0].update(pool="mean"), "analyses[0].pool", "'avg', 'max', 'none' or 'grid'"),
    (lambda d: d["analyses"][0].update(layers=[]), "analyses[0].layers", "at least 1 item"),
    (lambda d: d["analyses"][0].update(layer_names=["a"]), "analyses[0].layer_names", "did you mean 'layers'?"),
    (lambda d: d["analyses"].append({"type": "predictions"}), "analyses[2].name", "already used by analyses[1]"),
    (lambda d: d["analyses"][1].update(name="../escape"), "analyses[1].name", "plain folder name"),
    (lambda d: d.update(execution={"batch_size": 0}), "execution.batch_size", "greater than or equal to 1"),
    (lambda d: d.update(execution={"device": "tpu"}), "execution.device", "'auto', 'cpu' or 'cuda'"),
    (lambda d: d.update(analyses=[]), "analyses", "at least 1 item"),
    (lambda d: d.update(name="has space"), "name", "should match pattern"),
]


@pytest.mark.parametrize("change,field,phrase", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_manifest_names_the_field(tmp_path, image_folder, change, field, phrase):
    doc = good(tmp_path, image_folder)
    change(doc)
    with pytest.raises(ManifestError) as info:
        load(tmp_path, doc)
    message = str(info.value)
    lines = [line.strip() for line in message.splitlines()[1:]]
    matching = [line for line in lines if line.split(" (line")[0].split(":")[0] == field]
    assert matching, f"no problem names {field!r} in:\n{message}"
    assert any(phrase in line for line in matching), f"{phrase!r} not in:\n{message}"


def test_all_problems_reported_at_once(tmp_path, image_folder):
    doc = good(tmp_path, image_folder)
    doc["dataset"]["limit"] = 0
    doc["execution"] = {"workers": 0}
    doc["analyses"][0]["pool"] = "median"
    with pytest.raises(ManifestError) as info:
        load(tmp_path, doc)
    assert len(info.value.problems) == 3
    assert "3 problems" in str(info.value)


def test_errors_carry_yaml_lines(tmp_path, image_folder):
    text = yaml.safe_dump(good(tmp_path, image_folder), sort_keys=False).replace("pool", "x")
    text = text.replace("- type: predictions", "- type: predictions\n  top_k: -1")
    with pytest.raises(ManifestError) as info:
        load(tmp_path, text)
    line_no = next(i for i, line in enumerate(text.splitlines(), 1) if "top_k" in line)
    assert f"analyses[1].top_k (line {line_no})" in str(info.value)


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(ManifestError, match=r"line 3, column \d+: YAML syntax error"):
        load(tmp_path, "name: x\nmodel:\n  source: a: b\n")


def test_layers_checked_against_model(tmp_path, image_folder):
    doc = good(tmp_path, image_folder)
    doc["analyses"][0]["layers"] = ["layer1", "layer2.0.con1"]
    manifest = load(tmp_path, doc)
    with pytest.raises(ManifestError) as info:
        check_manifest(manifest)
    assert "analyses[0].layers[1]: unknown layer 'layer2.0.con1'; did you mean 'layer2.0.conv1'?" in str(info.value)


def test_relative_paths_resolve_against_manifest(tmp_path, image_folder):
    doc = good(tmp_path, image_folder)
    doc["dataset"]["root"] = "images"
    manifest = load(tmp_path, doc)
    assert manifest.dataset.root == image_folder
    assert manifest.output == tmp_path / "out"


def test_set_overrides(tmp_path, image_folder):
    manifest = load(tmp_path, good(tmp_path, image_folder),
                    overrides=["execution.batch_size=7", "analyses[0].layers=[layer2, layer3]",
                               "analyses.1.top_k=3", "dataset.sample={n: 4, seed: 1}"])
    assert manifest.execution.batch_size == 7
    assert manifest.analyses[0].layers == ["layer2", "layer3"]
    assert manifest.analyses[1].top_k == 3
    assert manifest.dataset.sample.n == 4


def test_set_override_errors(tmp_path, image_folder):
    with pytest.raises(ManifestError, match="expected key=value"):
        load(tmp_path, good(tmp_path, image_folder), overrides=["execution.batch_size"])
    with pytest.raises(ManifestError, match=r"analyses\[5\] does not exist"):
        apply_overrides({"analyses": []}, ["analyses[5].layers=[a]"])
    with pytest.raises(ManifestError, match="execution.batch_size"):
        load(tmp_path, good(tmp_path, image_folder), overrides=["execution.batch_size=big"])


def test_output_and_address_flags(tmp_path, image_folder):
    manifest = load(tmp_path, good(tmp_path, image_folder), output=tmp_path / "elsewhere", address="auto")
    assert manifest.output == tmp_path / "elsewhere"
    assert manifest.execution.address == "auto"


def test_resolved_yaml_round_trips(tmp_path, image_folder):
    manifest = load(tmp_path, good(tmp_path, image_folder))
    again = load(tmp_path, manifest.resolved_yaml())
    assert again.model_dump() == manifest.model_dump()
    resolved = yaml.safe_load(manifest.resolved_yaml())
    assert resolved["model"]["preprocess"] == {"resize": 32, "crop": 32, "mean": [0.485, 0.456, 0.406],
                                               "std": [0.229, 0.224, 0.225]}
    assert resolved["analyses"][0]["pool"] == "avg"


def test_helpers():
    assert format_loc(("analyses", 2, "layers", 0)) == "analyses[2].layers[0]"
    assert parse_set_path("analyses[2].layers") == ("analyses", 2, "layers")
    assert parse_set_path("a.0.b") == ("a", 0, "b")
    assert "did you mean 'vgg11'" in suggest("vgg1", ["vgg11", "resnet18"])


def test_demo_manifest_validates():
    manifest = load_manifest(ROOT / "manifests" / "demo.yaml")
    check_manifest(manifest)  # the demo CNN's architecture is enough; nothing is trained here


@needs_shared
def test_cifar10_manifest_validates():
    manifest = load_manifest(ROOT / "manifests" / "cifar10.yaml")
    assert manifest.dataset.root == CIFAR  # absolute, links kept as written
    assert manifest.model.weights == RESNET20
    check_manifest(manifest)


def test_decode_block_auto_aims_at_32_mib_of_pixels():
    from pipeline.execute import decode_block

    assert decode_block("auto", (32, 32)) == 1024          # capped: CIFAR images are 3 KiB
    assert decode_block("auto", (224, 224)) == 32 * 2**20 // (224 * 224 * 3) == 222
    assert decode_block("auto", (2048, 2048)) == 64        # at least 64 per task
    assert decode_block("auto", None) == 256               # sizes not fixed by the preprocessing
    assert decode_block(7, (32, 32)) == 7                  # a number is used as given


def test_actor_pool_and_cpu_settings(tmp_path, image_folder):
    manifest = load(tmp_path, good(tmp_path, image_folder), overrides=["execution.workers=4", "execution.min_workers=2",
                                                                       "execution.cpus_per_worker=2.5"])
    assert (manifest.execution.min_workers, manifest.execution.cpus_per_worker) == (2, 2.5)
    assert load(tmp_path, good(tmp_path, image_folder)).execution.cpus_per_worker == "auto"
    with pytest.raises(ManifestError, match=r"execution: .*min_workers \(3\) must not exceed workers \(2\)"):
        load(tmp_path, good(tmp_path, image_folder), overrides=["execution.workers=2", "execution.min_workers=3"])
    auto = load(tmp_path, good(tmp_path, image_folder), overrides=["execution.workers=auto", "execution.min_workers=3"])
    assert auto.execution.workers == "auto"  # min_workers is checked once auto has its number
    with pytest.raises(ManifestError, match=r"execution.workers: expected a whole number >= 1 or 'auto', got 'all'"):
        load(tmp_path, good(tmp_path, image_folder), overrides=["execution.workers=all"])
    with pytest.raises(ManifestError, match=r"execution.cpus_per_worker: expected a number of CPUs > 0 or 'auto'"):
        load(tmp_path, good(tmp_path, image_folder), overrides=["execution.cpus_per_worker=0"])
