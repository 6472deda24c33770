"""``probes.baseline: random_init``: every probe also fitted on an untrained network of the same architecture.

The baseline is the architecture as its constructor initialises it after ``torch.manual_seed(seed)``.
The tiny test model's first checkpoint is exactly that network for seed 0, so the baseline rows of
a run must equal the probes of a run of that checkpoint, and they must be the same whichever
checkpoint of a series the run computes them beside.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from pipeline.models import random_init_model
from pipeline.zoo import BUILTINS

from .test_checkpoints import _manifest, _read, _run
from .test_checkpoints import setup as setup  # noqa: F401 -- the module's fixture, shared

PROBES = {"type": "probes", "layers": ["relu1", "relu2"], "shots_per_class": [2], "repeats": 2, "seed": 0}
KEYS = ["layer", "shots", "repeat"]


def test_random_init_is_the_seeded_constructor(resnet20_weights):
    from pipeline.manifest.schema import BuiltinModel

    trained = BuiltinModel(source="builtin", name="cifar_resnet20", weights=resnet20_weights)
    got = random_init_model(trained, seed=3).state_dict()
    torch.manual_seed(3)
    want = BUILTINS["cifar_resnet20"]().state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    other = random_init_model(trained, seed=4).state_dict()
    assert not torch.equal(other["conv1.weight"], got["conv1.weight"])
    loaded = torch.load(resnet20_weights, weights_only=True)
    assert not torch.equal(loaded["conv1.weight"], got["conv1.weight"])  # no weights file was read


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    cols = ["layer", "shots", "repeat", "train_accuracy", "test_accuracy", "n_train", "n_test"]
    return df[cols].sort_values(KEYS, na_position="first", kind="stable").reset_index(drop=True)


def test_baseline_rows_equal_a_run_of_the_untrained_network(ray_session, setup):  # noqa: F811
    root, paths = setup
    checkpoints = [{"name": "epoch01", "weights": str(paths[0])}, {"name": "epoch02", "weights": str(paths[1])}]
    series = _manifest(root, "baseline-series", {"checkpoints": checkpoints},
                       [{**PROBES, "baseline": "random_init"}])
    alone = _manifest(root, "baseline-epoch01", {"weights": str(paths[0])}, [PROBES])
    assert _run(series).ok and _run(alone).ok

    reference = _rows(_read(root / "baseline-epoch01" / "probes"))
    assert len(reference) == 2 * (1 + 2)  # per layer: the full-data fit, then 2 draws of 2 shots
    table = _read(root / "baseline-series" / "probes")
    assert set(table.baseline.dropna()) == {"random_init"}
    for checkpoint in ("epoch01", "epoch02"):
        rows = table[table.checkpoint == checkpoint]
        pd.testing.assert_frame_equal(_rows(rows[rows.baseline == "random_init"]), reference)
    own = table[table.baseline.isna()]
    # epoch01 is the seeded start: its own rows are the baseline's too; epoch02's are its own.
    pd.testing.assert_frame_equal(_rows(own[own.checkpoint == "epoch01"]), reference)
    assert not _rows(own[own.checkpoint == "epoch02"]).equals(reference)

    info = json.loads((root / "baseline-series" / "run.json").read_text())
    stats = info["analyses"]["probes"]["checkpoints"]["epoch02"]
    alone_stats = json.loads((root / "baseline-epoch01" / "run.json").read_text())["analyses"]["probes"]
    assert stats["random_init"]["test_accuracy"] == alone_stats["test_accuracy"]
    assert stats["random_init"]["few_shot_test_accuracy"] == alone_stats["few_shot_test_accuracy"]
    # The saved heads are the model's only.
    heads = pd.read_parquet(root / "baseline-series" / "probes" / "checkpoint=epoch02" / "_heads")
    assert heads.layer.tolist() == ["relu1", "relu2"]
