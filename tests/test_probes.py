"""The probes analysis: linear classifiers per layer against separable, random and directly fitted data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn

from jobs import LocalContext, TableInputs
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
