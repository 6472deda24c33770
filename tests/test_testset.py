"""``probes.test_dataset``: train on every labelled image of the run's dataset, test on another dataset's.

The probes of a run with a test dataset must equal scikit-learn fitted directly on the pooled
features of the run's images (a ``features`` entry of the same run) and scored on the test
dataset's (a ``features`` run over it); a corrupt test image is recorded and skipped; a rerun
reuses everything; a test dataset whose classes differ is refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from jobs.dataset.probes import few_shot_indices
from pipeline.errors import UserError
from pipeline.writers import INPUTS

from .conftest import make_images
from .test_checkpoints import TINY, _checkpoints, _manifest, _run

LAYERS = ["relu1", "relu2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("testset")
    make_images(root / "images", classes=3, per_class=8, size=16)
    make_images(root / "other", classes=3, per_class=5, size=16, seed=1)
    (root / "other" / "class1" / "broken.png").write_bytes(b"not a png")
    (root / "tiny_model.py").write_text(TINY)
    return root, _checkpoints(root)[1]


def _features(folder: Path, layer: str) -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_parquet(folder / "features" / f"layer={layer}").sort_values("image_id", kind="stable")
    return np.stack(df.vector.to_numpy()).astype(np.float32), df.label.to_numpy()


def _fit(x: np.ndarray, y: np.ndarray):
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=0)).fit(x, y)


def test_probes_train_on_the_dataset_and_test_on_the_test_dataset(ray_session, folders):
    root, weights = folders
    other = {"kind": "image_folder", "root": str(root / "other")}
    probes = {"type": "probes", "layers": LAYERS, "shots_per_class": [2], "repeats": 2, "test_dataset": other}
    run = _manifest(root, "run", {"weights": str(weights)}, [{"type": "features", "layers": LAYERS}, probes])
    result = _run(run)
    assert result.ok, result.analyses
    reference = _manifest(root, "reference", {"weights": str(weights)}, [{"type": "features", "layers": LAYERS}])
    (root / "reference.yaml").write_text((root / "reference.yaml").read_text().replace(
        str(root / "images"), str(root / "other")))
    assert _run(reference).ok

    table = pd.read_parquet(root / "run" / "probes")
    for layer in LAYERS:
        x, y = _features(root / "run", layer)
        tx, ty = _features(root / "reference", layer)
        assert len(y) == 24 and len(ty) == 15  # the broken test image is left out
        rows = table[table.layer == layer]
        full = rows[rows.shots.isna()].iloc[0]
        assert (full.n_train, full.n_test) == (24, 15)
        assert full.test_accuracy == _fit(x, y).score(tx, ty)
        assert full.train_accuracy == _fit(x, y).score(x, y)
        for repeat in range(2):
            chosen = few_shot_indices(y, np.arange(len(y)), 2, seed=0, repeat=repeat)
            row = rows[(rows.shots == 2) & (rows.repeat == repeat)].iloc[0]
            assert row.n_train == 6 and row.n_test == 15
            assert row.test_accuracy == _fit(x[chosen], y[chosen]).score(tx, ty)

    info = json.loads((root / "run" / "run.json").read_text())
    record = info["analyses"]["probes"]
    assert record["test_dataset"]["images"] == 16 and record["test_dataset"]["errors"] == 1
    errors = pd.read_parquet(root / "run" / "errors.parquet")
    assert errors[errors.image_id == "class1/broken.png"].stage.tolist() == ["test_dataset:decode"]
    assert info["status"] == "complete"  # a bad test image does not count against the run's dataset
    assert not (root / "run" / INPUTS).exists()  # the partials, the test dataset's too, are gone

    # A rerun reuses the committed entry; another test dataset recomputes it.
    again = _run(run)
    assert again.analyses["probes"]["status"] == "skipped"
    fewer = _run(run, 'analyses[1].test_dataset.sample={"n": 9, "seed": 0}')
    assert fewer.ok and fewer.analyses["probes"]["status"] == "complete"
    assert fewer.analyses["features"]["status"] == "skipped"
    assert (pd.read_parquet(root / "run" / "probes").n_test <= 9).all()


def test_a_test_dataset_of_other_classes_is_refused_before_any_work(folders, tmp_path):
    root, weights = folders
    make_images(tmp_path / "renamed", classes=3, per_class=2, size=16)
    (tmp_path / "renamed" / "class2").rename(tmp_path / "renamed" / "zebra")
    probes = {"type": "probes", "layers": LAYERS, "test_dataset": {"kind": "image_folder",
                                                                    "root": str(tmp_path / "renamed")}}
    path = _manifest(root, "refused", {"weights": str(weights)}, [probes])
    with pytest.raises(UserError, match=r"analyses\[0\]\.test_dataset: its classes \(class0, class1, zebra\)"):
        _run(path)
    assert not (root / "refused").exists()
