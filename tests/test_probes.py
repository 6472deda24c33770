"""The probes analysis: linear classifiers per layer against separable, random and directly fitted data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn

from jobs import LocalContext, TableInputs
from jobs.core.base import unit_seed
from jobs.core.kernels import matrix, read_features
from jobs.dataset import probes
from jobs.dataset.probes import Probes, ProbesParams, TorchLogistic, choose_solver, make_classifier
from pipeline.writers import to_arrow
from tests.harness import as_table, run_local
from tests.test_embedding import tiny_cnn, tiny_dataset


def _table(ids: list[str], labels, features: np.ndarray) -> pa.Table:
    labels = np.asarray(labels, np.int64)
    return pa.table({
        "image_id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.int64(), mask=labels == -2),  # -2 here: a null label
        "feature": to_arrow(np.asarray(features, np.float32)),
    })


def _run(layers: dict[str, np.ndarray], labels, ids: list[str] | None = None, batch_rows: int = 65536, **params):
    n = len(labels)
    ids = ids if ids is not None else [f"img{i:04d}" for i in range(n)]
    inputs = TableInputs({f"layer={name}": _table(ids, labels, f) for name, f in layers.items()}, batch_rows)
    ctx = LocalContext(model=nn.Identity(), pixels={}, input_size=(8, 8), label_names=["cat", "dog", "eel"])
    return Probes(ProbesParams(layers=list(layers), **params)).reduce(inputs, ctx)


def _noisy(n: int = 150, classes: int = 3, dims: int = 10, spread: float = 2.0, seed: int = 0):
    """Gaussian classes whose means are one unit apart per axis: overlapping, so accuracy is < 1."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    return np.eye(classes, dims)[labels] + rng.normal(scale=spread / 4, size=(n, dims)), labels


def test_separable_features_give_perfect_accuracy_and_random_labels_chance():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    separable = np.eye(3, 10)[labels] * 5 + rng.normal(scale=0.3, size=(120, 10))
    random_features = rng.normal(size=(120, 10))
    out = _run({"good": separable, "noise": random_features}, labels)
    t = as_table(out)
    assert t.column("layer").to_pylist() == ["good", "noise"]
    assert t.column("test_accuracy").to_pylist()[0] == 1.0 and t.column("train_accuracy").to_pylist()[0] == 1.0
    assert out.stats["test_accuracy"]["good"] == 1.0
    # Random labels on random features: chance level (1/2) on held-out images.
    rand_labels = rng.integers(0, 2, size=400)
    chance = as_table(_run({"l": rng.normal(size=(400, 20))}, rand_labels)).column("test_accuracy")[0].as_py()
    assert 0.35 <= chance <= 0.65
    assert t.schema == pa.schema([("layer", pa.string()), ("classifier", pa.string()),
                                  ("train_accuracy", pa.float64()), ("test_accuracy", pa.float64()),
                                  ("n_train", pa.int64()), ("n_test", pa.int64())])
    assert t.column("n_train").to_pylist() == [90, 90] and t.column("n_test").to_pylist() == [30, 30]


@pytest.mark.parametrize("classifier", ["logistic", "linear_svm"])
@pytest.mark.parametrize("batch_rows", [7, 65536])  # features streamed in many record batches, or one
def test_equals_a_direct_sklearn_fit_on_the_same_split(classifier, batch_rows):
    x, labels = _noisy()
    labels = labels.copy()
    labels[[3, 17]] = -1  # unlabelled
    labels[5] = -2  # null label
    ids = [f"img{(i * 37) % 150:04d}" for i in range(150)]  # not in id order
    out = _run({"l": x}, labels, ids=ids, batch_rows=batch_rows, classifier=classifier, seed=4, C=0.5)
    row = as_table(out).to_pylist()[0]
    # Independently: labelled images sorted by id, the stratified split, the scaled classifier.
    keep = labels >= 0
    order = np.argsort(np.array(ids)[keep])
    xs, ys = x[keep][order].astype(np.float32), labels[keep][order]
    train, test = train_test_split(np.arange(len(ys)), test_size=0.25, stratify=ys, random_state=4)
    model = (LogisticRegression(C=0.5, max_iter=1000, random_state=4) if classifier == "logistic"
             else LinearSVC(C=0.5, max_iter=1000, random_state=4))
    clf = make_pipeline(StandardScaler(), model).fit(xs[train], ys[train])
    assert row["classifier"] == classifier
    assert row["n_train"] == len(train) and row["n_test"] == len(test) and len(train) + len(test) == 147
    assert row["test_accuracy"] == clf.score(xs[test], ys[test])
    assert row["train_accuracy"] == clf.score(xs[train], ys[train])
    assert 0.5 < row["test_accuracy"] < 1.0  # overlapping classes: a real test of the split


def test_split_does_not_depend_on_row_order_or_batching():
    x, labels = _noisy(seed=2)
    ids = [f"img{i:04d}" for i in range(150)]
    a = as_table(_run({"l": x, "m": x[:, ::-1]}, labels, ids=ids, standardize=False))
    perm = np.random.default_rng(1).permutation(150)
    shuffled = {f"layer={k}": _table([ids[i] for i in perm], labels[perm], v[perm]) for k, v in
                {"l": x, "m": x[:, ::-1]}.items()}
    chunked = TableInputs({k: pa.concat_tables([t.slice(s, 40) for s in range(0, 150, 40)])
                           for k, t in shuffled.items()})
    ctx = LocalContext(model=nn.Identity(), pixels={}, input_size=(8, 8))
    b = as_table(Probes(ProbesParams(layers=["l", "m"], standardize=False)).reduce(chunked, ctx))
    assert a.equals(b)
    assert a.column("test_accuracy").to_pylist()[0] < 1.0


def test_too_few_classes_or_images_fail_clearly():
    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match=r"at least 2 classes; got 8 labelled image\(s\) of 1 class"):
        _run({"l": x}, [0] * 8 + [-1, -1])
    with pytest.raises(ValueError, match=r"1 of 3 classes have 1 \(2 \(eel\)\)"):
        _run({"l": x}, [0, 0, 0, 0, 1, 1, 1, 1, 1, 2])
    with pytest.raises(ValueError, match=r"4 labelled images into 3 train and 1 test.*2 classes"):
        _run({"l": x[:4]}, [0, 0, 1, 1])
    with pytest.raises(ValidationError):
        ProbesParams(layers=["l"], test_size=1.0)
    with pytest.raises(ValidationError):
        ProbesParams(layers=["l"], C=0)
    with pytest.raises(ValidationError, match="unique"):
        ProbesParams(layers=["l", "l"])


def test_end_to_end_through_the_harness():
    ids, pixels, labels = tiny_dataset(per_class=12)
    params = ProbesParams(layers=["conv", "block.1"], classifier="linear_svm")
    a = run_local(Probes(params), tiny_cnn(), ids, pixels, labels, batch_size=1)
    b = run_local(Probes(params), tiny_cnn(), ids, pixels, labels, batch_size=7)
    ta = as_table(a)
    assert ta.equals(as_table(b))
    assert ta.column("layer").to_pylist() == ["conv", "block.1"]
    assert ta.column("classifier").to_pylist() == ["linear_svm"] * 2
    assert ta.column("n_train").to_pylist() == [27, 27] and ta.column("n_test").to_pylist() == [9, 9]
    assert set(a.stats["test_accuracy"]) == {"conv", "block.1"}
    assert a.stats["test_accuracy"]["conv"] == 1.0  # the class colour survives the first conv
    assert list(a.images) == []


def test_convergence_warnings_go_to_the_log():
    class Recording(LocalContext):
        def log(self, message: str) -> None:
            self.messages.append(message)

    x, labels = _noisy()
    ctx = Recording(model=nn.Identity(), pixels={}, input_size=(8, 8))
    ctx.messages = []
    inputs = TableInputs({"layer=l": _table([f"i{i:03d}" for i in range(150)], labels, x)})
    Probes(ProbesParams(layers=["l"], max_iter=1)).reduce(inputs, ctx)
    assert any("ConvergenceWarning" in m and "'l'" in m for m in ctx.messages)


def _objective(model_w: np.ndarray, model_b: np.ndarray, z: np.ndarray, y: np.ndarray, C: float) -> float:
    """scikit-learn's multinomial logistic objective divided by C n, computed here in float64."""
    logits = z @ model_w.T + model_b
    logits -= logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits).sum(axis=1))
    return float((lse - logits[np.arange(len(y)), y]).mean() + (model_w ** 2).sum() / (2 * C * len(y)))


@pytest.mark.parametrize("batch_size", [32, 4096])
def test_the_torch_solver_reaches_scikit_learns_optimum(batch_size):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 12)) * rng.uniform(0.5, 5, size=12) + rng.normal(size=12)
    y = (x @ rng.normal(size=(12, 4)) + rng.normal(scale=2.0, size=(600, 4))).argmax(axis=1)
    sk = make_classifier("logistic", 0.5, 10_000, 0, True).fit(x, y)
    fitted = TorchLogistic(C=0.5, batch_size=batch_size, seed=0).fit(x, y)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    ours = _objective(fitted.linear.weight.detach().double().numpy(), fitted.linear.bias.detach().double().numpy(),
                      z, y, 0.5)
    reference = _objective(sk[-1].coef_, sk[-1].intercept_, z, y, 0.5)
    assert abs(ours - reference) <= 1e-4 * reference, (ours, reference)
    assert (fitted.predict(x) == sk.predict(x)).mean() >= 0.99


def test_solver_choice_and_refusal():
    memory = 24 * 2**30
    assert choose_solver("auto", "logistic", 7_500, 64, "cpu", memory) == "sklearn"
    assert choose_solver("auto", "logistic", 960_000, 256, "cpu", memory) == "sklearn"  # 2 GB in float64
    assert choose_solver("auto", "logistic", 960_000, 2_048, "cpu", memory) == "torch"  # 16 GB in float64
    assert choose_solver("auto", "logistic", 7_500, 64, "cuda", memory) == "torch"
    assert choose_solver("auto", "linear_svm", 960_000, 2_048, "cpu", memory) == "sklearn"
    assert choose_solver("sklearn", "logistic", 960_000, 2_048, "cuda", memory) == "sklearn"
    with pytest.raises(ValueError, match="solver 'torch' fits the logistic probe only"):
        ProbesParams(layers=["l"], classifier="linear_svm", solver="torch")


def test_read_features_streams_what_a_whole_column_read_gives():
    x, labels = _noisy(n=61, dims=5)
    labels[4] = -2  # a null label reads as -1
    ids = [f"img{(i * 7) % 61:04d}" for i in range(61)]
    table = _table(ids, labels, x)
    order = np.argsort(np.array(ids), kind="stable")
    for batch_rows in (1, 8, 61):
        got_ids, got_labels, got = read_features(TableInputs({"layer=l": table}, batch_rows), "l")
        assert got_ids.tolist() == [ids[i] for i in order]
        assert got_labels.tolist() == [-1 if i == 4 else int(labels[i]) for i in order]
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert got.tobytes() == matrix(table.column("feature"))[order].tobytes()


def _plan_inputs(n: int, dims: dict[str, int], classes: int = 3) -> TableInputs:
    labels = np.arange(n) % classes
    labels[:2] = -1  # unlabelled: not in the split
    ids = [f"img{i:04d}" for i in range(n)]
    return TableInputs({f"layer={name}": _table(ids, labels, np.zeros((n, d))) for name, d in dims.items()})


@pytest.mark.parametrize("float64_copy", [False, True])
def test_memory_plan_counts_the_features_the_split_copies_and_the_read(monkeypatch, float64_copy):
    monkeypatch.setattr(probes, "lbfgs_copies_float64", lambda: float64_copy)
    inputs = _plan_inputs(200, {"a": 8, "b": 16}, classes=20)
    # 198 labelled images: 50 test (rounded up), 148 train; 20 classes. The wider layer needs most.
    n, d, rows, c = 200, 16, 148, 20
    features, ids = n * d * 4, n * probes.IMAGE_BYTES
    read, left = min(3 * n * d * 4, probes.STREAM_BYTES), min(n * d * 2, probes.STREAM_LEFT)
    split = rows * 4 * d
    # logistic: the scaled copy (and in older scikit-learn a float64 one) and the loss' arrays,
    # or StandardScaler's float64 centred copy and NaN mask, whichever is more.
    logistic = split + rows * max(9 * d, 4 * d + (8 * d if float64_copy else 0) + 12 * c)
    assert left + logistic > read  # the fit's peak, not the read's
    plan = Probes(ProbesParams(layers=["a", "b"])).memory_plan(inputs)
    assert plan is not None and plan.bytes == features + ids + left + logistic
    assert "200 x 16 of b" in plan.what and "sklearn solver's copies of the 148-image split, 20 classes" in plan.what
    assert plan.bytes > Probes(ProbesParams(layers=["a"])).memory_plan(inputs).bytes
    # liblinear: scaled, float64 and (index, value) copies: more than the read.
    svm = split + rows * (4 * d + 8 * d + 16 * d)
    assert left + svm > read
    assert Probes(ProbesParams(layers=["a", "b"], classifier="linear_svm")).memory_plan(inputs).bytes == \
        features + ids + left + svm
    torch_fit = rows * (12 * d + 8 * c)  # the split, standardised, and the intermediate while scoring
    assert Probes(ProbesParams(layers=["b"], solver="torch")).memory_plan(inputs).bytes == \
        features + ids + left + torch_fit
    # Few images: streaming the partials is the peak.
    small = _plan_inputs(200, {"b": 16}, classes=2)
    assert Probes(ProbesParams(layers=["b"], solver="torch")).memory_plan(small).bytes == features + ids + read
    assert Probes(ProbesParams(layers=["gone"])).memory_plan(inputs) is None  # no partials: nothing planned


def test_memory_plan_refuses_over_the_budget_with_the_fix():
    from pipeline.reduce import check_memory

    inputs = _plan_inputs(200, {"b": 16})
    analysis = Probes(ProbesParams(layers=["b"], classifier="linear_svm", pool="none"))
    plan = analysis.memory_plan(inputs)
    check_memory(analysis, inputs, plan.bytes)  # at the budget: runs
    with pytest.raises(MemoryError, match=r"probes would hold .* over execution\.driver_memory") as refused:
        check_memory(analysis, inputs, plan.bytes - 1)
    message = str(refused.value)
    assert "200 x 16 of b" in message and "pool: avg (not none)" in message and "dataset.sample" in message
    assert "classifier: logistic with solver: torch" in message  # liblinear's copies are the larger


# ----------------------------------------------------------------------------- few-shot curves and saved heads


def _uneven(seed: int = 0):
    """Three overlapping Gaussian classes of 30, 24 and 6 images (the last too small for 5 shots)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], [30, 24, 6])
    x = np.eye(3, 6)[labels] * 1.5 + rng.normal(size=(len(labels), 6))
    return x, labels


def test_few_shot_indices_are_stratified_sized_deterministic_and_order_free():
    _, labels = _uneven()
    train, _ = probes.split(labels, 0.25, seed=1)
    by_class = {c: set(train[labels[train] == c].tolist()) for c in range(3)}
    assert len(by_class[2]) == 4  # fewer than 5 shots
    chosen = probes.few_shot_indices(labels, train, 5, seed=1, repeat=0)
    assert set(chosen.tolist()) <= set(train.tolist()) and (np.diff(chosen) > 0).all()
    counts = {c: int((labels[chosen] == c).sum()) for c in range(3)}
    assert counts == {0: 5, 1: 5, 2: 4}  # the short class gives all it has
    assert set(chosen[labels[chosen] == 2].tolist()) == by_class[2]
    again = probes.few_shot_indices(labels, np.random.default_rng(9).permutation(train), 5, seed=1, repeat=0)
    assert again.tolist() == chosen.tolist()  # deterministic, whatever the order of the train indices
    others = [probes.few_shot_indices(labels, train, 5, seed=s, repeat=r).tolist() for s, r in ((1, 1), (2, 0))]
    assert all(o != chosen.tolist() for o in others)  # another draw, another seed: other images
    # A class's draw depends on its own images only: dropping class 1 keeps class 0's choice.
    no_dogs = train[labels[train] != 1]
    kept = probes.few_shot_indices(np.where(labels == 1, 0, labels), no_dogs, 5, seed=1, repeat=0)
    assert kept[labels[kept] == 0].tolist() == chosen[labels[chosen] == 0].tolist()
    with pytest.raises(ValueError, match="at least 1 image per class"):
        probes.few_shot_indices(labels, train, 0)
    with pytest.raises(ValueError, match=r"1 class\(es\) have no training image \(2 \(eel\)\)"):
        probes.few_shot_indices(labels, train[labels[train] != 2], 3, label_names=["cat", "dog", "eel"])


@pytest.mark.parametrize("classifier", ["logistic", "linear_svm"])
def test_few_shot_rows_equal_direct_sklearn_fits_on_the_drawn_images(classifier):
    x, labels = _uneven()
    ids = [f"img{(i * 7) % 60:04d}" for i in range(60)]  # not in id order
    out = _run({"l": x, "m": x[:, ::-1] * 2}, labels, ids=ids, classifier=classifier, seed=3,
               shots_per_class=[2, 5], repeats=3)
    t = as_table(out)
    assert t.schema.field("shots").type == pa.int64() and t.schema.field("repeat").type == pa.int64()
    rows = t.to_pylist()
    assert [(r["layer"], r["shots"], r["repeat"]) for r in rows] == [
        (layer, k, r) for layer in ("l", "m") for k, r in [(None, None)] + [(k, r) for k in (2, 5) for r in range(3)]]
    # Independently: labelled images sorted by id, the same stratified split, a fit on each draw.
    order = np.argsort(np.array(ids))
    xs, ys = x[order].astype(np.float32), labels[order]
    train, test = train_test_split(np.arange(60), test_size=0.25, stratify=ys, random_state=3)
    for row in rows[1:7]:
        chosen = probes.few_shot_indices(ys, train, row["shots"], 3, row["repeat"])
        assert set(chosen) <= set(train)
        # The documented draw, written out: per class its training images in ascending order,
        # k of them by a generator seeded with (seed, "few_shot", shots, repeat, class).
        drawn = []
        for c in range(3):
            pool = np.sort(train[ys[train] == c])
            if len(pool) > row["shots"]:
                rng = np.random.default_rng(unit_seed(3, ["few_shot", row["shots"], row["repeat"], c]))
                pool = pool[rng.choice(len(pool), size=row["shots"], replace=False)]
            drawn.append(pool)
        assert chosen.tolist() == sorted(np.concatenate(drawn).tolist())
        assert np.bincount(ys[chosen]).tolist() == [min(row["shots"], int((ys[train] == c).sum())) for c in range(3)]
        model = (LogisticRegression(C=1.0, max_iter=1000, random_state=3) if classifier == "logistic"
                 else LinearSVC(C=1.0, max_iter=1000, random_state=3))
        clf = make_pipeline(StandardScaler(), model).fit(xs[chosen], ys[chosen])
        assert row["n_train"] == len(chosen) and row["n_test"] == len(test)
        assert row["test_accuracy"] == clf.score(xs[test], ys[test])
        assert row["train_accuracy"] == clf.score(xs[chosen], ys[chosen])
    # Draws differ; the stats are their mean and sample std per layer and shot count.
    five = [r["test_accuracy"] for r in rows if r["layer"] == "l" and r["shots"] == 5]
    stats = out.stats["few_shot_test_accuracy"]
    assert set(stats) == {"l", "m"} and set(stats["l"]) == {"2", "5"}
    assert stats["l"]["5"]["mean"] == pytest.approx(np.mean(five))
    assert stats["l"]["5"]["std"] == pytest.approx(np.std(five, ddof=1))
    assert out.stats["test_accuracy"]["l"] == rows[0]["test_accuracy"]


def test_few_shot_rows_do_not_depend_on_row_order():
    x, labels = _uneven(seed=1)
    ids = [f"img{i:04d}" for i in range(60)]
    perm = np.random.default_rng(5).permutation(60)
    a = as_table(_run({"l": x}, labels, ids=ids, shots_per_class=[3], repeats=2, solver="sklearn"))
    b = as_table(_run({"l": x[perm]}, labels[perm], ids=[ids[i] for i in perm], batch_rows=7,
                      shots_per_class=[3], repeats=2, solver="sklearn"))
    assert a.equals(b)
    assert "shots" not in as_table(_run({"l": x}, labels, ids=ids)).column_names  # unchanged without shots


def test_few_shot_parameters_are_checked():
    assert ProbesParams(layers=["l"], shots_per_class=[10, 5]).shots_per_class == [5, 10]
    for bad, phrase in (([], "at least one shot count"), ([0, 3], "at least 1 training image"),
                        ([5, 5], "listed more than once: 5")):
        with pytest.raises(ValidationError, match=phrase) as info:
            ProbesParams(layers=["l"], shots_per_class=bad)
        assert info.value.errors()[0]["loc"] == ("shots_per_class",)
    with pytest.raises(ValidationError, match="needs shots_per_class") as info:
        ProbesParams(layers=["l"], repeats=3)
    assert info.value.errors()[0]["loc"] == ("repeats",)
    with pytest.raises(ValidationError) as info:
        ProbesParams(layers=["l"], shots_per_class=[5], repeats=0)
    assert info.value.errors()[0]["loc"] == ("repeats",)


def test_bad_few_shot_fields_are_named_in_the_manifest(tmp_path, image_folder):
    from pipeline.errors import ManifestError
    from tests.test_manifest import good, load

    doc = good(tmp_path, image_folder)
    doc["analyses"] = [{"type": "probes", "layers": ["layer1"], "shots_per_class": [3, 3]},
                       {"type": "probes", "name": "p2", "layers": ["layer1"], "repeats": 4}]
    with pytest.raises(ManifestError) as info:
        load(tmp_path, doc)
    message = str(info.value)
    assert "analyses[0].shots_per_class" in message and "listed more than once: 3" in message
    assert "analyses[1].repeats" in message and "needs shots_per_class" in message


def _commit(root, output) -> None:
    """The reduction's tables committed as the runner does: staged as block 0, then renamed."""
    from pipeline.reduce import as_table as arrow
    from pipeline.store import Store
    from pipeline.writers import Result, StagedEntry, write_result

    store = Store.open(root)
    staged = StagedEntry(store, "probes", {"key": "k"})
    staged.open()
    record = write_result(staged.folder, 0, Result(tables={p: arrow(t) for p, t in output.tables.items()}))
    staged.record(record)
    staged.commit([record])


@pytest.mark.parametrize("classifier,solver,classes", [("logistic", "sklearn", 3), ("linear_svm", "sklearn", 3),
                                                       ("logistic", "torch", 3), ("logistic", "sklearn", 2),
                                                       ("linear_svm", "sklearn", 2)])
def test_saved_heads_reproduce_the_full_data_accuracy(tmp_path, classifier, solver, classes):
    from pipeline.heads import load_head, load_heads

    x, labels = _noisy(n=150, classes=classes, dims=8, seed=5)
    x = x * np.arange(1, 9) + 3.0  # scales and offsets for the standardisation to matter
    ids = [f"img{i:04d}" for i in range(150)]
    # torch: the heads alone, few epochs (the head is whatever was fitted).
    few = {"shots_per_class": [4], "repeats": 2} if solver == "sklearn" else {"max_iter": 20}
    out = _run({"l": x, "m": -x}, labels, ids=ids, classifier=classifier, solver=solver, C=0.5, **few)
    _commit(tmp_path, out)
    entry = tmp_path / "probes"
    table = pd.read_parquet(entry)  # pyarrow's dataset reader skips the _heads folder
    full = (table[table.shots.isna()] if "shots" in table else table).set_index("layer")
    assert len(table) == (2 * 3 if "shots" in table else 2)
    heads = load_heads(entry)
    assert list(heads) == ["l", "m"]
    train, test = train_test_split(np.arange(150), test_size=0.25, stratify=labels, random_state=0)
    for layer, features in (("l", x), ("m", -x)):
        head = load_head(entry, layer)
        assert head.classifier == classifier and head.solver == solver
        assert head.classes.tolist() == list(range(classes)) and head.class_names == ["cat", "dog", "eel"][:classes]
        assert head.logits(features[test]).shape == (len(test), classes) and head.mean is not None
        assert head.score(features[test], labels[test]) == full.loc[layer, "test_accuracy"]
        assert head.score(features[train], labels[train]) == full.loc[layer, "train_accuracy"]
    with pytest.raises(KeyError, match="saved: l, m"):
        load_head(entry, "n")


def test_heads_round_trip_and_the_sidecar_is_no_table_part(tmp_path):
    from pipeline.reduce import EntryInputs
    from pipeline.report import Run
    from pipeline.store import Store

    x, labels = _noisy(n=90, seed=1)
    out = _run({"l": x}, labels, standardize=False)
    heads = probes.heads_from_table(as_table(out, probes.HEADS))
    assert heads[0].mean is None and heads[0].scale is None
    again = probes.heads_from_table(probes.heads_table(heads))
    assert again[0].weight.tobytes() == heads[0].weight.tobytes() and again[0].layer == "l"
    _commit(tmp_path, out)
    (tmp_path / "run.json").write_text('{"analyses": {"probes": {"type": "probes", "status": "complete"}}}')
    parts = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "probes").rglob("*.parquet"))
    assert parts == ["probes/_heads/part-000000000-000.parquet", "probes/part-000000000-000.parquet"]
    run = Run(tmp_path, tmp_path / "report")
    assert run.parts("probes") == ["probes/part-000000000-000.parquet"]
    assert list(run.table("probes").columns) == as_table(out).column_names
    assert EntryInputs(Store.open(tmp_path), ["probes"]).read("probes").equals(as_table(out))
    assert json.loads((tmp_path / "probes" / "_SUCCESS").read_text())["rows"] == 1  # the heads are not rows
    assert pd.read_parquet(tmp_path / "probes").shape == (1, 6)


def _probes_page(root, output) -> str:
    """The report's probes page of a run holding only the reduction's tables (committed as the runner does)."""
    from pipeline.report import build_report

    _commit(root, output)
    (root / "run.json").write_text(json.dumps({
        "name": "t", "status": "complete", "analyses": {"probes": {"type": "probes", "status": "complete"}},
        "dataset": {"label_names": ["cat", "dog", "eel"]}, "model": {}, "execution": {}}))
    pq.write_table(pa.table({"image_id": pa.array([], pa.string()), "stage": pa.array([], pa.string()),
                             "error": pa.array([], pa.string())}), root / "errors.parquet")
    return (build_report(root).parent / "probes.html").read_text()


def test_the_report_draws_the_few_shot_curve(tmp_path):
    from pipeline.report.views.dataset import few_shot_summary

    x, labels = _uneven()
    out = _run({"l": x, "m": x[:, ::-1]}, labels, shots_per_class=[2, 5], repeats=3)
    page = _probes_page(tmp_path, out)
    assert "few-shot linear probe test accuracy" in page and "training images per class" in page
    summary = few_shot_summary(pd.read_parquet(tmp_path / "probes"))
    assert summary[["layer", "shots"]].values.tolist() == [["l", 2], ["l", 5], ["m", 2], ["m", 5]]
    assert (summary.draws == 3).all() and summary.n_train.tolist() == [6, 15, 6, 15]


def test_baseline_rows_are_the_probes_of_the_baselines_features(tmp_path):
    x, labels = _uneven()
    noise = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    ids = [f"img{i:04d}" for i in range(len(labels))]
    tables = {"layer=l": _table(ids, labels, x), "random_init_layer=l": _table(ids, labels, noise)}
    ctx = LocalContext(model=nn.Identity(), pixels={}, input_size=(8, 8), label_names=["cat", "dog", "eel"])
    params = ProbesParams(layers=["l"], shots_per_class=[2, 5], repeats=2, baseline="random_init")
    assert set(Probes(params).schema()) == set(tables)
    out = Probes(params).reduce(TableInputs(tables), ctx)
    own = _run({"l": x}, labels, shots_per_class=[2, 5], repeats=2)
    alone = _run({"l": noise}, labels, shots_per_class=[2, 5], repeats=2)
    table = as_table(out).to_pandas()
    assert out.tables[""].column("baseline").to_pylist() == [None] * 5 + ["random_init"] * 5
    for rows, want in ((table[table.baseline.isna()], own), (table[table.baseline.notna()], alone)):
        pd.testing.assert_frame_equal(rows.drop(columns="baseline").reset_index(drop=True),
                                      as_table(want).to_pandas())
    assert out.stats["test_accuracy"] == own.stats["test_accuracy"]
    assert out.stats["random_init"] == {"test_accuracy": alone.stats["test_accuracy"],
                                        "few_shot_test_accuracy": alone.stats["few_shot_test_accuracy"]}
    assert out.tables[probes.HEADS].equals(own.tables[probes.HEADS])  # the model's heads only

    page = _probes_page(tmp_path, out)
    assert "l (random_init)" in page and "random_init (test)" in page


def test_memory_plan_counts_a_test_datasets_features():
    from jobs.dataset.probes import IMAGE_BYTES, TEST_DATASET

    inputs = _plan_inputs(300, {"l": 16})
    test = _plan_inputs(120, {"l": 16})
    tables = {**inputs.tables, **{TEST_DATASET + k: v for k, v in test.tables.items()}}
    alone = Probes(ProbesParams(layers=["l"], solver="sklearn")).memory_plan(inputs)
    both = Probes(ProbesParams(layers=["l"], solver="sklearn", test_dataset={"kind": "list"})).memory_plan(
        TableInputs(tables))
    assert alone is not None and both is not None
    # The training side grows from the split's 225 images to all 300 (the fit's copies), plus the test features.
    assert both.bytes >= alone.bytes + 120 * (16 * 4 + IMAGE_BYTES)
