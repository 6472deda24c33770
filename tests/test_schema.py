"""The manifest's JSON Schema and the registry's names: one source for both.

The schema is checked by an independent validator (``jsonschema``, which Ray depends on)
against the manifests shipped in ``manifests/`` and against broken ones.
"""

from __future__ import annotations

import json
import typing

import jsonschema
import pytest
import yaml

from jobs import REGISTRY
from pipeline.cli import main as cli
from pipeline.manifest import ANALYSIS_PARAMS, TOP_LEVEL, json_schema

from .conftest import ROOT


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "manifests").glob("*.yaml")))
def test_the_shipped_manifests_follow_the_schema(validator, name):
    doc = yaml.safe_load((ROOT / "manifests" / name).read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors


@pytest.mark.parametrize("change,where", [
    (lambda d: d["analyses"].append({"type": "featurs", "layers": ["x"]}), "analyses"),
    (lambda d: d["analyses"][0].update(no_such_field=1), "analyses"),
    (lambda d: d["dataset"].update(kind="folder"), "dataset"),
    (lambda d: d["execution"].update(device="tpu"), "execution"),
    (lambda d: d.update(extra_section={}), ""),
    (lambda d: d.pop("model"), ""),
])
def test_the_schema_refuses_what_the_loader_refuses(validator, change, where):
    doc = yaml.safe_load((ROOT / "manifests" / "demo.yaml").read_text())
    doc.setdefault("execution", {})
    change(doc)
    errors = list(validator.iter_errors(doc))
    assert errors, "the schema accepted a broken manifest"
    assert any((list(e.absolute_path)[:1] or [""])[0] == where for e in errors), [e.message for e in errors]


def test_the_schema_lists_every_analysis_and_section():
    schema = json_schema()
    assert sorted(schema["properties"]) == sorted(TOP_LEVEL)
    mapping = schema["properties"]["analyses"]["items"]["discriminator"]["mapping"]
    assert sorted(mapping) == sorted(REGISTRY)


def test_convscope_schema_prints_it(tmp_path, capsys):
    assert cli(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(json_schema()))
    out = tmp_path / "s.json"
    assert cli(["schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == printed


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_an_analysis_is_named_once_by_its_module(name):
    cls = REGISTRY[name]
    assert cls.name == name == cls.__module__.rsplit(".", 1)[-1]
    assert cls.__module__.split(".")[1] in ("attribution", "dataset", "model"), cls.__module__
    params = cls.Params
    assert ANALYSIS_PARAMS[name] is params
    assert typing.get_args(params.model_fields["type"].annotation) == (name,)
    assert params.model_fields["type"].default == name
