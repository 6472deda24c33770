"""``probes``: how well a linear classifier on each layer's features predicts the labels.

Which layer holds the information a task needs: Zeiler & Fergus (2014, "Visualizing and
Understanding Convolutional Networks", Table 7) trained a linear classifier on the features
of each layer of an ImageNet network and saw accuracy rise with depth; Yosinski et al. (2014,
"How transferable are features in deep neural networks?") studied how far up features stay
general. Here every layer gets the same seeded, stratified train/test split of the labelled
images and a linear probe (logistic regression or a linear SVM).

Two solvers fit the logistic probe. scikit-learn's (lbfgs, full batch, exact) is the reference;
``torch`` fits the same objective -- the mean cross-entropy plus ``||W||^2 / (2 C n)`` (the
bias unpenalised), scikit-learn's ``C`` scaled to a mean -- by minibatch Adam on the
run's device (a GPU when the workers have one) until the objective stops improving, then a few
L-BFGS steps over the whole split in chunks, so it reaches scikit-learn's optimum on float32
features standardised in place (scikit-learn works on a float64 copy) and on a GPU. On CIFAR-10
(ResNet-20, 7,500 training images) the two reach the same objective to 5 digits and test
accuracies within 0.05 points.
``solver: auto`` takes torch on a GPU or when scikit-learn's float64 copy of the features would
not fit comfortably in memory, and scikit-learn, the faster on CPU cores, otherwise.

Example manifest entry::

    - type: probes
      layers: [layer1, layer2, layer3]
      classifier: logistic   # logistic | linear_svm
      pool: avg              # avg | max | grid | none, as in ``features``
      test_size: 0.25
      seed: 0
      C: 1.0                 # inverse regularisation strength
      max_iter: 1000
      standardize: true      # scale features to unit variance (fitted on the train split only)
      solver: auto           # auto | sklearn | torch (logistic only; see above)
      shots_per_class: [5, 10, 20]   # few-shot curves (optional; see below)
      repeats: 3             # draws per shot count (needs shots_per_class)
      baseline: random_init  # also probe the untrained network (optional; see below)
      test_dataset: {kind: image_folder, root: ../other}   # train here, test there (optional)

Table ``probes/part-*.parquet``: ``layer``, ``classifier``, ``train_accuracy``,
``test_accuracy``, ``n_train``, ``n_test``; one row per layer, in manifest order. run.json's
stats name each layer's solver and give each layer's ``test_accuracy``.

Few-shot curves (Zeiler & Fergus 2014, Tables 4-5, with 15/30/45/60 training images per class
on Caltech-101 and 5 draws each): with ``shots_per_class``, every layer's probe is also fitted,
for each shot count ``k`` and each of ``repeats`` draws, on ``k`` training images per class drawn
from the same train split (:func:`few_shot_indices`: seeded per shot count, draw and class, so
it does not depend on dataset order) and scored on the same test split. The table then has two
more int64 columns, ``shots`` and ``repeat`` (null on the full-data rows), and each layer's
full-data row is followed by its few-shot rows (shots ascending, then repeat); ``n_train`` is the
size of the draw. A class with fewer than ``k`` training images gives all it has (so ``n_train``
can be less than ``k`` times the classes; the log says which classes). run.json's stats gain
``few_shot_test_accuracy``: ``{layer: {shots: {"mean", "std"}}}`` over the draws (``std`` the
sample standard deviation; null for a single draw). Without ``shots_per_class`` the table and
the stats are exactly as before.

Untrained baseline (Zeiler & Fergus 2014, Table 4's "non-pretrained" row; Yosinski et al. 2014 on
random weights): with ``baseline: random_init``, the map pass also runs every batch through the
same architecture built without its weights file -- initialised by its constructor after
``torch.manual_seed(seed)``, the same on every worker -- and every probe (full data and few-shot)
is fitted again on its features, with the same split and draws. Its rows follow the model's, with
a string column ``baseline`` (``random_init``; null on the model's own rows, and absent without a
baseline); run.json's stats gain ``random_init: {test_accuracy, few_shot_test_accuracy}``. Only
the model's heads are saved. With a checkpoint series the baseline is computed beside every
checkpoint (the same rows each time).

Transfer to another dataset: with ``test_dataset`` (a dataset spec, as the manifest's
``dataset`` section takes, paths relative to the manifest), every labelled image of the run's
dataset trains (no split; the few-shot draws come from all of them) and every labelled image of
the test dataset tests; ``test_size`` is then unused. The runner computes the test dataset's
pooled features in a pass of their own and hands them to the reduction as the partitions
``test_dataset/layer=<layer>`` (``pipeline.testset``). Both datasets must name the same classes:
labels are class indices.

Saved heads: the full-data probe of every layer is kept, as a sidecar table
``probes/_heads/part-*.parquet`` (:func:`heads_table`; one row per layer: ``layer``,
``classifier``, ``solver``, ``classes`` (the labels, in logit order), ``class_names``,
``dims``, ``weight`` (classes x dims, row-major, float64), ``bias``, and the standardisation
``mean`` / ``scale`` (null without ``standardize``)). The folder starts with ``_`` so that
Parquet readers of the probes table skip it; :class:`LinearHead` (and ``pipeline.heads``) maps
a layer's pooled features to logits: ``((x - mean) / scale) @ weight.T + bias``. A binary
probe's single scikit-learn decision function ``z`` is kept as the logits ``[0, z]`` (the same
argmax, and for the logistic probe the same probabilities under a softmax).

Unlabelled images are left out. The split is ``train_test_split`` stratified by label with
``random_state=seed`` over the labelled images sorted by image id, so it is the same for
every layer and does not depend on dataset order or batching.

Memory: a layer's features are streamed a record batch at a time into one float32 (images,
dims) array, the split indexes it, and the layer is dropped before the next is read; the
solver's copies of the training split come on top (``memory_plan`` says how much first).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from jobs.core.base import (
    AnalysisParams,
    DistinctLayers,
    MapBatch,
    MemoryPlan,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rows,
    listed_twice,
    register,
    unit_seed,
)
from jobs.core.kernels import logged_warnings, pooled_features, pooled_features_schema, read_features

# Estimates for memory_plan. Per image: its id in Arrow, its sort order and Python string (this
# layer's and the first layer's, kept to compare), its label.
IMAGE_BYTES = 160
# Streaming a layer's partials, beside its array: a run of row groups the Parquet reader
# buffers, a record batch and their decoding (an upper bound: ~560 MB was measured when the
# reader buffered whole part files and batches were 64 MiB; now about 16 MiB at a time).
STREAM_BYTES = 576 * 2**20
# What the reader's threads keep in Arrow's pool after it (measured: 55-95 MB).
STREAM_LEFT = 128 * 2**20


# Where a reduction finds the partials of the entry's test dataset: ``test_dataset/<partition>``.
TEST_DATASET = "test_dataset/"


def baseline_partition(baseline: str, layer: str) -> str:
    """Where the partials of a baseline model's layer go: ``<baseline>_layer=<layer>``."""
    return f"{baseline}_layer={layer}"


class ProbesParams(AnalysisParams):
    layers: DistinctLayers
    classifier: Literal["logistic", "linear_svm"] = "logistic"
    pool: Literal["avg", "max", "grid", "none"] = "avg"
    grid: int = Field(default=2, ge=1, description="cells per side when pool is 'grid'")
    test_size: float = Field(default=0.25, gt=0, lt=1, description="fraction of labelled images held out")
    seed: int = 0
    C: float = Field(default=1.0, gt=0, description="inverse regularisation strength")
    max_iter: int = Field(default=1000, ge=1, description="scikit-learn's iterations; torch: the most epochs")
    standardize: bool = True
    solver: Literal["auto", "sklearn", "torch"] = "auto"
    batch_size: int = Field(default=1024, ge=1, description="torch solver: images per step")
    shots_per_class: list[int] | None = Field(
        default=None, description="few-shot curves: training images per class for each extra fit (distinct, >= 1)")
    repeats: int = Field(default=1, ge=1, description="few-shot draws per shot count (needs shots_per_class)")
    test_dataset: dict[str, Any] | None = Field(
        default=None, description="train on every labelled image of the run's dataset and test on this dataset's "
        "(a dataset spec, as the manifest's dataset section takes; classes named alike)")
    baseline: Literal["random_init"] | None = Field(
        default=None, description="random_init: also fit every probe on the features of the same architecture "
        "with seeded random weights (the untrained network's row)")

    @field_validator("shots_per_class")
    @classmethod
    def _distinct_shots(cls, shots: list[int] | None) -> list[int] | None:
        if shots is None:
            return None
        if not shots:
            raise ValueError("needs at least one shot count (or leave shots_per_class out)")
        small = [k for k in shots if k < 1]
        if small:
            raise ValueError(f"every shot count must be at least 1 training image per class, got {small}")
        twice = listed_twice(shots)
        if twice:
            raise ValueError(f"shot counts must be distinct; listed more than once: {', '.join(map(str, twice))}")
        return sorted(shots)

    @field_validator("repeats")
    @classmethod
    def _repeats_need_shots(cls, repeats: int, info: ValidationInfo) -> int:
        # Absent from ``data`` when shots_per_class itself failed: that error is enough.
        if repeats > 1 and "shots_per_class" in info.data and info.data["shots_per_class"] is None:
            raise ValueError(f"repeats {repeats} draws few-shot subsets, which needs shots_per_class "
                             "(e.g. shots_per_class: [5, 10, 20])")
        return repeats

    @model_validator(mode="after")
    def _solver_fits(self) -> ProbesParams:
        if self.solver == "torch" and self.classifier != "logistic":
            raise ValueError(f"solver 'torch' fits the logistic probe only, not {self.classifier!r}; "
                             "use solver: sklearn (or auto) for linear_svm")
        return self


def _class_name(c: int, names: Sequence[str] | None) -> str:
    return f"{c} ({names[c]})" if names is not None and 0 <= c < len(names) else str(c)


def check_classes(labels: np.ndarray) -> None:
    """ValueError unless ``labels`` hold at least two classes (a probe needs two to separate)."""
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"probes needs labelled images of at least 2 classes; got {len(labels)} labelled image(s) "
                         f"of {len(classes)} class(es)")


def split(labels: np.ndarray, test_size: float, seed: int = 0,
          label_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices into ``labels`` (all >= 0): stratified, seeded.

    ValueError, with the counts, when a stratified split is impossible: fewer than two
    classes, a class with a single image, or a split side smaller than the number of classes.
    """
    from sklearn.model_selection import train_test_split

    check_classes(labels)
    classes, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    single = classes[counts < 2]
    if len(single):
        listed = ", ".join(_class_name(int(c), label_names) for c in single[:10])
        raise ValueError(f"probes needs at least 2 labelled images per class for a stratified split; "
                         f"{len(single)} of {len(classes)} classes have 1 ({listed})")
    # The sizes train_test_split uses: the test side rounds up.
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    if min(n_test, n_train) < len(classes):
        raise ValueError(f"probes: test_size {test_size} splits {n} labelled images into {n_train} train and "
                         f"{n_test} test, but a stratified split needs at least one image per class on each "
                         f"side ({len(classes)} classes)")
    train, test = train_test_split(np.arange(n), test_size=test_size, stratify=labels, random_state=seed)
    return train, test


def few_shot_indices(labels: np.ndarray, train: np.ndarray, shots: int, seed: int = 0, repeat: int = 0,
                     label_names: Sequence[str] | None = None) -> np.ndarray:
    """``shots`` training images per class: indices into ``labels``, a subset of ``train``, ascending.

    Stratified: each class of ``labels[train]`` gives ``shots`` of its training images, drawn
    without replacement by ``np.random.default_rng(unit_seed(seed, ["few_shot", shots, repeat,
    class]))`` from its training indices in ascending order, so the draw depends on the shot
    count, the repeat and the class only: not on the order of ``train``, nor on the other
    classes. With ``labels`` in image id order (as :class:`Probes` has them) it does not depend
    on dataset order either. A class with fewer than ``shots`` training images gives all of
    them. ValueError when ``shots < 1``, or when a class of ``labels`` has no training image
    (named with ``label_names``; a stratified :func:`split` always leaves one).

    >>> labels = np.array([0, 1, 0, 1, 0, 1, 2])
    >>> few_shot_indices(labels, np.array([0, 1, 2, 3, 4, 6]), shots=2).size  # class 2 has one image
    5
    """
    if shots < 1:
        raise ValueError(f"few-shot probes need at least 1 image per class, got {shots}")
    labels = np.asarray(labels)
    train = np.sort(np.asarray(train, np.int64))
    by_class = labels[train]
    missing = np.setdiff1d(np.unique(labels[labels >= 0]), by_class)
    if len(missing):
        listed = ", ".join(_class_name(int(c), label_names) for c in missing[:10])
        raise ValueError(f"few-shot probes: {len(missing)} class(es) have no training image ({listed})")
    chosen = []
    for c in np.unique(by_class):
        pool = train[by_class == c]
        if len(pool) > shots:
            rng = np.random.default_rng(unit_seed(seed, ["few_shot", int(shots), int(repeat), int(c)]))
            pool = pool[rng.choice(len(pool), size=shots, replace=False)]
        chosen.append(pool)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


@dataclass
class LinearHead:
    """A fitted linear probe of one layer: pooled features -> logits, in NumPy (float64).

    ``logits(x) = ((x - mean) / scale) @ weight.T + bias`` (no standardisation when ``mean``
    is None); column ``j`` is the class ``classes[j]`` (a label), named ``class_names[j]`` when
    the dataset names its classes.
    """

    layer: str
    classifier: str
    solver: str
    classes: np.ndarray  # (c,) int64 labels, in logit order
    weight: np.ndarray  # (c, d) float64
    bias: np.ndarray  # (c,) float64
    mean: np.ndarray | None = None  # (d,) float64
    scale: np.ndarray | None = None  # (d,) float64
    class_names: list[str] | None = None

    @property
    def dims(self) -> int:
        """The length of the feature vectors the head reads."""
        return int(self.weight.shape[1])

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(n, c) float64 logits of the features (n, d)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dims:
            raise ValueError(f"the head of {self.layer!r} takes (n, {self.dims}) features, got {x.shape}")
        if self.mean is not None:
            x = x - self.mean
        if self.scale is not None:
            x = x / self.scale
        return x @ self.weight.T + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The predicted labels (n,) of the features (n, d)."""
        return self.classes[self.logits(features).argmax(axis=1)]

    def score(self, features: np.ndarray, labels: np.ndarray) -> float:
        """Accuracy on ``features``, ``labels``."""
        labels = np.asarray(labels)
        return float((self.predict(features) == labels).mean()) if len(labels) else float("nan")


def linear_head(model: Any, layer: str, classifier: str, solver: str,
                label_names: Sequence[str] | None = None) -> LinearHead:
    """The :class:`LinearHead` of a fitted probe: a :class:`TorchLogistic`, or a scikit-learn
    linear model (alone, or after a StandardScaler in a pipeline, as :func:`make_classifier` builds)."""
    mean: np.ndarray | None
    scale: np.ndarray | None
    if isinstance(model, TorchLogistic):
        classes = np.asarray(model.classes, np.int64)
        weight = model.linear.weight.detach().double().cpu().numpy()
        bias = model.linear.bias.detach().double().cpu().numpy()
        mean, scale = (model.mean.double().cpu().numpy(), model.scale.double().cpu().numpy()) \
            if model.standardize else (None, None)
    else:
        steps = getattr(model, "steps", None)
        estimator = steps[-1][1] if steps else model
        scaler = steps[0][1] if steps and len(steps) > 1 else None
        classes = np.asarray(estimator.classes_, np.int64)
        weight = np.asarray(estimator.coef_, np.float64)
        bias = np.asarray(estimator.intercept_, np.float64).reshape(-1)
        if len(classes) == 2 and weight.shape[0] == 1:
            # One decision function z for the second class: logits [0, z] have its sign as argmax.
            weight = np.vstack([np.zeros_like(weight), weight])
            bias = np.array([0.0, bias[0]])
        mean = np.asarray(scaler.mean_, np.float64) if scaler is not None and scaler.mean_ is not None else None
        scale = np.asarray(scaler.scale_, np.float64) if scaler is not None and scaler.scale_ is not None else None
    names = [label_names[int(c)] if 0 <= int(c) < len(label_names) else str(int(c)) for c in classes] \
        if label_names is not None else None
    return LinearHead(layer=layer, classifier=classifier, solver=solver, classes=classes, weight=weight, bias=bias,
                      mean=mean, scale=scale, class_names=names)


HEADS = "_heads"  # the sidecar partition of the saved heads: readers of the table skip "_" folders
FLOATS64 = pa.list_(pa.float64())
HEADS_SCHEMA = pa.schema([
    ("layer", pa.string()), ("classifier", pa.string()), ("solver", pa.string()),
    ("classes", pa.list_(pa.int64())), ("class_names", pa.list_(pa.string())), ("dims", pa.int64()),
    ("weight", FLOATS64), ("bias", FLOATS64), ("mean", FLOATS64), ("scale", FLOATS64),
])


def _floats(a: np.ndarray | None) -> list[float] | None:
    return None if a is None else np.asarray(a, np.float64).reshape(-1).tolist()


def heads_table(heads: Sequence[LinearHead]) -> pa.Table:
    """The heads as a table, one row per head (:data:`HEADS_SCHEMA`; ``weight`` row-major)."""
    return pa.table({
        "layer": [h.layer for h in heads],
        "classifier": [h.classifier for h in heads],
        "solver": [h.solver for h in heads],
        "classes": [np.asarray(h.classes, np.int64).tolist() for h in heads],
        "class_names": [h.class_names for h in heads],
        "dims": [h.dims for h in heads],
        "weight": [_floats(h.weight) for h in heads],
        "bias": [_floats(h.bias) for h in heads],
        "mean": [_floats(h.mean) for h in heads],
        "scale": [_floats(h.scale) for h in heads],
    }, schema=HEADS_SCHEMA)


def _vector(values: list[float] | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, np.float64)


def heads_from_table(table: pa.Table) -> list[LinearHead]:
    """The heads of a :func:`heads_table` (in its row order)."""
    heads = []
    for row in table.to_pylist():
        classes = np.asarray(row["classes"], np.int64)
        dims = int(row["dims"])
        heads.append(LinearHead(
            layer=row["layer"], classifier=row["classifier"], solver=row["solver"], classes=classes,
            weight=np.asarray(row["weight"], np.float64).reshape(len(classes), dims),
            bias=np.asarray(row["bias"], np.float64), mean=_vector(row["mean"]), scale=_vector(row["scale"]),
            class_names=row["class_names"]))
    return heads


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class TorchLogistic:
    """Multinomial logistic regression by minibatch Adam, then L-BFGS over the whole split.

    Minimises ``mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C n)``: scikit-learn's
    ``LogisticRegression(C)`` objective divided by ``n``. Features are standardised with the
    training split's mean and standard deviation when ``standardize`` (zero-variance columns
    kept as they are, as StandardScaler does). After each epoch the objective is measured on a
    seeded ``holdout`` share of the training split held out from the steps (early stopping;
    0, the default, measures it on the whole split, as scikit-learn's convergence test does):
    the best weights are kept, the learning rate halves when an epoch improves it by less than
    ``tol`` (relative), and training stops after ``patience`` such epochs or ``max_epochs``.
    Then, without a holdout, ``polish`` L-BFGS iterations on the whole objective. Deterministic
    for a seed on one device.

    >>> x = np.array([[0.0], [1.0], [10.0], [11.0]] * 20, np.float32)
    >>> y = np.array([0, 0, 1, 1] * 20)
    >>> TorchLogistic(seed=0).fit(x, y).score(x, y)
    1.0
    """

    def __init__(self, C: float = 1.0, max_epochs: int = 200, batch_size: int = 1024, lr: float = 0.01,
                 patience: int = 8, seed: int = 0, standardize: bool = True, device: str | torch.device = "cpu",
                 holdout: float = 0.0, tol: float = 1e-4, polish: int = 100):
        self.C, self.max_epochs, self.batch_size, self.lr, self.holdout = C, max_epochs, batch_size, lr, holdout
        self.tol, self.polish = tol, polish
        self.patience, self.seed, self.standardize, self.device = patience, seed, standardize, torch.device(device)
        self.epochs = 0

    def _prepare(self, x: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.ascontiguousarray(x, np.float32), device=self.device)
        return (t - self.mean) / self.scale

    def fit(self, x: np.ndarray, y: np.ndarray, inplace: bool = False) -> TorchLogistic:
        """Fit on features ``x`` (n, d) and labels ``y`` (n,). ``inplace`` standardises a
        float32 ``x`` in place on the CPU (no second copy of a large feature matrix)."""
        gen = torch.Generator().manual_seed(self.seed)
        self.classes = np.unique(y)
        index = {c: i for i, c in enumerate(self.classes)}
        targets = torch.as_tensor(np.array([index[c] for c in y]), device=self.device)
        array = np.asarray(x, np.float32)
        # One copy at most, standardised in place.
        data = torch.from_numpy(array) if inplace and array.flags.c_contiguous and self.device.type == "cpu" \
            else torch.tensor(array, device=self.device)
        n, d = data.shape
        held = torch.randperm(n, generator=gen)
        n_val = int(n * self.holdout) if n >= 20 else 0
        val, fit = held[:n_val].to(self.device), held[n_val:].to(self.device)
        self.mean = torch.zeros(d, device=self.device)
        self.scale = torch.ones(d, device=self.device)
        if self.standardize:
            fitted = data[fit] if n_val else data
            self.mean = fitted.mean(dim=0)
            std = fitted.std(dim=0, unbiased=False)
            self.scale = torch.where(std > 0, std, torch.ones_like(std))
            del fitted
            data.sub_(self.mean).div_(self.scale)
        linear = torch.nn.Linear(d, len(self.classes)).to(self.device)
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
        optimiser = torch.optim.Adam(linear.parameters(), lr=self.lr)
        penalty = 1.0 / (2.0 * self.C * len(fit))
        check = val if n_val else fit

        def loss_on(rows: torch.Tensor) -> float:
            with torch.no_grad():
                ce = torch.nn.functional.cross_entropy(linear(data[rows]), targets[rows])
                return float(ce + penalty * linear.weight.pow(2).sum())

        best, best_state, stale = loss_on(check), copy.deepcopy(linear.state_dict()), 0
        for epoch in range(self.max_epochs):
            order = fit[torch.randperm(len(fit), generator=gen).to(self.device)]
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                loss = torch.nn.functional.cross_entropy(linear(data[rows]), targets[rows])
                loss = loss + penalty * linear.weight.pow(2).sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            self.epochs = epoch + 1
            current = loss_on(check)
            if current < best - self.tol * max(1.0, abs(best)):
                best, best_state, stale = current, copy.deepcopy(linear.state_dict()), 0
            else:
                stale += 1
                for group in optimiser.param_groups:
                    group["lr"] /= 2
                if stale >= self.patience:
                    break
        linear.load_state_dict(best_state)
        if self.polish and not n_val:
            self._polish(linear, data, targets, penalty)  # every row is a training row
        self.linear = linear
        return self

    def _polish(self, linear: torch.nn.Linear, data: torch.Tensor, targets: torch.Tensor, penalty: float) -> None:
        """L-BFGS on the whole training objective from where Adam stopped, its gradient summed
        over chunks of ``batch_size * 16`` rows (bounded memory): the minibatch steps get near
        the optimum fast, these few full steps reach it as scikit-learn's lbfgs does."""
        optimiser = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=self.polish, tolerance_grad=1e-7,
                                      tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")
        n, chunk = len(targets), self.batch_size * 16

        def closure() -> torch.Tensor:
            optimiser.zero_grad(set_to_none=True)
            total = torch.zeros((), device=data.device)
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                part = torch.nn.functional.cross_entropy(linear(data[rows]), targets[rows], reduction="sum") / n
                part.backward()
                total += part.detach()
            reg = penalty * linear.weight.pow(2).sum()
            reg.backward()
            return total + reg.detach()

        optimiser.step(closure)

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.classes[self.linear(self._prepare(x)).argmax(dim=1).cpu().numpy()]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        """Accuracy on ``x``, ``y``."""
        return float((self.predict(x) == np.asarray(y)).mean()) if len(y) else float("nan")


def choose_solver(solver: str, classifier: str, n_train: int, d: int, device: str | torch.device = "cpu",
                  memory: int | None = None) -> str:
    """The solver a probe uses: ``sklearn`` or ``torch`` (logistic only).

    ``auto`` takes torch for the logistic probe on a GPU, or when scikit-learn's float64 copy of
    the training features (``8 n_train d`` bytes) would take more than a quarter of ``memory``
    (default: this machine's RAM); else scikit-learn, the faster of the two on CPU cores
    (``scripts/bench_reduce.py``).

    >>> choose_solver("auto", "logistic", 7_500, 64, memory=2**34)
    'sklearn'
    >>> choose_solver("auto", "logistic", 960_000, 2_048, memory=2**34)
    'torch'
    """
    if solver == "torch" and classifier != "logistic":
        raise ValueError(f"probes: solver 'torch' fits the logistic probe only, not {classifier!r}; "
                         "use solver: sklearn (or auto) for linear_svm")
    if solver != "auto":
        return solver
    if classifier != "logistic":
        return "sklearn"
    memory = physical_memory() if memory is None else memory
    too_big = memory > 0 and 8 * n_train * d > memory // 4
    return "torch" if torch.device(device).type == "cuda" or too_big else "sklearn"


@functools.cache
def lbfgs_copies_float64() -> bool:
    """Whether this scikit-learn fits lbfgs on a float64 copy of float32 features (older releases do)."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = LogisticRegression(max_iter=1).fit(np.array([[0.0], [1.0]], np.float32), [0, 1])
    return bool(fitted.coef_.dtype != np.float32)


def solver_bytes(solver: str, classifier: str, rows: int, d: int, classes: int, standardize: bool) -> int:
    """Bytes a probe's fit and scores hold beyond the features, for a split of ``rows`` images, ``c`` classes.

    torch: ``rows (12 d + 8 c)``: the split's float32 copy, standardised into a second with a
    third intermediate while scoring (``TorchLogistic.predict``), and the logits.
    sklearn: the split's float32 copy (4 d), then the most of StandardScaler's fit (a float64
    centred copy and a NaN mask, 9 d) and the classifier's fit: the scaled copy (4 d), a
    float64 copy (8 d; for lbfgs only in older scikit-learn) and the loss' per-class arrays
    (12 c), or liblinear's (index, value) node per value (16 d).
    """
    if solver == "torch":
        return rows * (12 * d + 8 * classes)
    scaler_fit, scaled = (9 * d, 4 * d) if standardize else (0, 0)
    if classifier == "linear_svm":
        fit = scaled + 8 * d + 16 * d
    else:
        fit = scaled + (8 * d if lbfgs_copies_float64() else 0) + 12 * classes
    return rows * (4 * d + max(scaler_fit, fit))


def make_classifier(kind: str, C: float, max_iter: int, seed: int, standardize: bool):
    """An unfitted scikit-learn estimator: the linear model, after a StandardScaler when asked."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if kind == "logistic":
        model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    elif kind == "linear_svm":
        model = LinearSVC(C=C, max_iter=max_iter, random_state=seed)
    else:
        raise ValueError(f"unknown classifier {kind!r}; expected logistic or linear_svm")
    # Inside a pipeline the scaler is fitted on the training split only.
    return make_pipeline(StandardScaler(), model) if standardize else model


def read_test_dataset(inputs: ReduceInputs, layer: str, partition: str) -> tuple[np.ndarray, np.ndarray]:
    """The labelled rows of a test dataset's layer (``partition`` of ``inputs``): features, labels.
    ValueError when it has none (nothing to score on)."""
    if partition not in inputs.partitions():
        raise ValueError(f"probes: the test dataset has no partials for layer {layer!r} (no image of it could be "
                         "used)")
    _, labels, features = read_features(inputs, layer, partition)
    labelled = np.flatnonzero(labels >= 0)
    if not len(labelled):
        raise ValueError(f"probes: the test dataset has no labelled image (layer {layer!r})")
    return features[labelled], labels[labelled]


@register
class Probes(ReduceAnalysis):
    """Train/test accuracy of a linear classifier on each layer's pooled features."""

    Params = ProbesParams
    params: ProbesParams

    def schema(self) -> dict[str, pa.Schema]:
        p = self.params
        found = pooled_features_schema(p.layers)
        if p.baseline:
            found.update({baseline_partition(p.baseline, layer): found[f"layer={layer}"] for layer in p.layers})
        return found

    def baselines(self) -> dict[str, int]:
        return {self.params.baseline: self.params.seed} if self.params.baseline else {}

    def map_batch(self, batch: MapBatch) -> Rows:
        p = self.params
        rows = pooled_features(batch, p.layers, p.pool, p.grid)
        if p.baseline:
            base = pooled_features(batch.baselines[p.baseline], p.layers, p.pool, p.grid)
            rows.update({baseline_partition(p.baseline, layer): base[f"layer={layer}"] for layer in p.layers})
        return rows

    def memory_plan(self, inputs: ReduceInputs) -> MemoryPlan | None:
        """The peak of the layer that needs most: ``N d 4 + N IMAGE_BYTES + max(read, left + fit)``.

        ``N`` images of ``d`` float32 features; ``read`` = min(3 N d 4, STREAM_BYTES) while they
        stream in, ``left`` = min(N d 2, STREAM_LEFT) after; ``fit`` = :func:`solver_bytes` of
        the larger split side, for the solver :func:`choose_solver` takes on the CPU (on a GPU
        the torch solver holds less here). With a ``test_dataset``, every labelled image is the
        training side and the test dataset's ``T`` images add ``T (d 4 + IMAGE_BYTES)``.
        """
        p = self.params
        present = set(inputs.partitions())
        layers = [layer for layer in p.layers if f"layer={layer}" in present]
        if not layers:
            return None
        # Every layer has the same images: the labels of one give the split and the classes.
        labels = inputs.read(f"layer={layers[0]}", ["label"]).column("label").fill_null(-1).to_numpy()
        labelled = labels[labels >= 0]
        classes = len(np.unique(labelled))
        n_test = math.ceil(p.test_size * len(labelled))
        n_train = len(labelled) - n_test
        if p.test_dataset is not None:  # every labelled image trains; the test dataset's rows come on top
            n_train = len(labelled)
            first = TEST_DATASET + f"layer={layers[0]}"
            n_test = inputs.rows(first) if first in present else 0
        rows = max(n_train, n_test)
        worst: tuple[int, str, int, int, str, int] | None = None
        for layer in layers:
            total, d = inputs.rows(f"layer={layer}"), inputs.width(f"layer={layer}", "feature")
            solver = choose_solver(p.solver, p.classifier, n_train, d, "cpu")
            read, left = min(3 * total * d * 4, STREAM_BYTES), min(total * d * 2, STREAM_LEFT)
            fit = solver_bytes(solver, p.classifier, rows, d, classes, p.standardize)
            size = total * d * 4 + total * IMAGE_BYTES + max(read, left + fit)
            if p.test_dataset is not None:  # the test dataset's features, held beside the layer's
                size += n_test * (d * 4 + IMAGE_BYTES)
            if worst is None or size > worst[0]:
                worst = (size, layer, total, d, solver, fit)
        if worst is None:
            return None
        size, layer, total, d, solver, fit = worst
        what = (f"the float32 features of {total:,} x {d:,} of {layer} and the {solver} solver's copies of "
                f"the {rows:,}-image split, {classes} classes")
        fixes = [f"pool: avg (not {p.pool}) for fewer dimensions"] if p.pool in ("none", "grid") else []
        fixes.append("a smaller dataset.sample")
        if solver == "sklearn" and solver_bytes("torch", "logistic", rows, d, classes, p.standardize) < fit:
            fixes.append("solver: torch" if p.classifier == "logistic" else "classifier: logistic with solver: torch")
        fix = "Use " + ", or ".join(fixes)
        return MemoryPlan(bytes=int(size), what=what, fix=fix)

    def fit(self, x: np.ndarray, y: np.ndarray, ctx: ReduceContext, what: str) -> tuple[Any, str]:
        """A probe fitted on features ``x`` (a copy of our own: the torch solver standardises it in
        place) and labels ``y``, and its solver; the fit's warnings go to the log."""
        p = self.params
        solver = choose_solver(p.solver, p.classifier, len(y), x.shape[1], ctx.device)
        model: TorchLogistic | Any
        if solver == "torch":
            model = TorchLogistic(C=p.C, max_epochs=p.max_iter, batch_size=p.batch_size, seed=p.seed,
                                  standardize=p.standardize, device=ctx.device)
        else:
            model = make_classifier(p.classifier, p.C, p.max_iter, p.seed, p.standardize)
        # E.g. not converged within max_iter: worth knowing, not fatal.
        with logged_warnings(ctx.log, f"probes: {what}: "):
            if isinstance(model, TorchLogistic):
                model.fit(x, y, inplace=True)
            else:
                model.fit(x, y)
        return model, solver

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        p = self.params
        shots = p.shots_per_class or []
        columns = ("layer", "train_accuracy", "test_accuracy", "n_train", "n_test", "shots", "repeat", "baseline")
        records: list[tuple] = []  # one per fit, in the order of ``columns``
        solvers: dict[str, str] = {}
        accuracy: dict[str, dict[str, float]] = {}
        few_shot: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
        heads: list[LinearHead] = []
        first_ids: np.ndarray | None = None
        # The model's rows, then the baseline's (the same images, hence the same splits and draws).
        sources: list[str | None] = [None] + ([p.baseline] if p.baseline else [])
        for source in sources:
            accuracy[source or ""], few_shot[source or ""] = {}, {}
            for layer in p.layers:
                partition = baseline_partition(source, layer) if source else f"layer={layer}"
                ids, labels, features = read_features(inputs, layer, partition)
                # Rows of the labelled images: the split indexes them (no copy of the features).
                labelled = np.flatnonzero(labels >= 0)
                ids, labels = ids[labelled], labels[labelled]
                # Every layer sees the same images, hence the same split; say so if not.
                if first_ids is None:
                    first_ids = ids
                elif len(ids) != len(first_ids) or (ids != first_ids).any():
                    where = f"{source} " if source else ""
                    raise ValueError(f"probes: {where}layer {layer!r} has other images than layer {p.layers[0]!r}")
                what = f"{source} layer {layer!r}" if source else f"layer {layer!r}"
                if p.test_dataset is None:
                    train, test = split(labels, p.test_size, p.seed, ctx.label_names)
                    x_train = labelled[train]
                    test_x, test_y = features[labelled[test]], labels[test]  # kept for the few-shot scores
                else:  # every labelled image trains; the test dataset's test
                    check_classes(labels)
                    train = np.arange(len(labels))
                    x_train = labelled
                    test_x, test_y = read_test_dataset(inputs, layer, TEST_DATASET + partition)
                # features[x_train] is a copy of our own.
                model, solver = self.fit(features[x_train], labels[train], ctx, what)
                records.append((layer, float(model.score(features[x_train], labels[train])),
                                float(model.score(test_x, test_y)), len(train), len(test_y), None, None, source))
                accuracy[source or ""][layer] = records[-1][2]
                if source is None:
                    solvers[layer] = solver
                    heads.append(linear_head(model, layer, p.classifier, solver, ctx.label_names))
                del model
                if shots:
                    classes, counts = np.unique(labels[train], return_counts=True)
                    short = [f"{_class_name(int(c), ctx.label_names)}: {n}" for c, n in zip(classes, counts)
                             if n < shots[-1]]
                    if short and layer == p.layers[0] and source is None:
                        ctx.log(f"probes: {len(short)} class(es) have fewer training images than {shots[-1]} "
                                f"shots and give all they have ({', '.join(short[:10])})")
                    few_shot[source or ""][layer] = {}
                    for k in shots:
                        scores = []
                        for repeat in range(p.repeats):
                            chosen = few_shot_indices(labels, train, k, p.seed, repeat, ctx.label_names)
                            model, _ = self.fit(features[labelled[chosen]], labels[chosen], ctx,
                                                f"{what}, {k} shots, repeat {repeat}")
                            records.append((layer, float(model.score(features[labelled[chosen]], labels[chosen])),
                                            float(model.score(test_x, test_y)), len(chosen), len(test_y), k,
                                            repeat, source))
                            scores.append(records[-1][2])
                            del model
                        few_shot[source or ""][layer][str(k)] = {
                            "mean": float(np.mean(scores)),
                            "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None}
                del features, test_x, test_y  # before the next layer's are read
        rows = {name: [r[i] for r in records] for i, name in enumerate(columns)}
        table = pa.table({
            "layer": pa.array(rows["layer"], pa.string()),
            "classifier": pa.array([p.classifier] * len(rows["layer"]), pa.string()),
            "train_accuracy": pa.array(rows["train_accuracy"], pa.float64()),
            "test_accuracy": pa.array(rows["test_accuracy"], pa.float64()),
            "n_train": pa.array(rows["n_train"], pa.int64()),
            "n_test": pa.array(rows["n_test"], pa.int64()),
        })
        stats: dict[str, Any] = {"test_accuracy": accuracy[""], "solver": solvers}
        if shots:
            table = table.append_column("shots", pa.array(rows["shots"], pa.int64()))
            table = table.append_column("repeat", pa.array(rows["repeat"], pa.int64()))
            stats["few_shot_test_accuracy"] = few_shot[""]
        if p.baseline:
            table = table.append_column("baseline", pa.array(rows["baseline"], pa.string()))
            stats[p.baseline] = {"test_accuracy": accuracy[p.baseline],
                                 **({"few_shot_test_accuracy": few_shot[p.baseline]} if shots else {})}
        return ReduceOutput(tables={"": table, HEADS: heads_table(heads)}, stats=stats)
