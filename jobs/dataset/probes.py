"""``probes``: how well a linear classifier on each layer's features predicts the labels.

Which layer holds the information a task needs: Zeiler & Fergus (2014, "Visualizing and
Understanding Convolutional Networks", Table 7) trained a linear classifier on the features
of each layer of an ImageNet network and saw accuracy rise with depth; Yosinski et al. (2014,
"How transferable are features in deep neural networks?") studied how far up features stay
general. Here every layer gets the same seeded, stratified train/test split of the labelled
images and a linear probe (logistic regression or a linear SVM, scikit-learn).

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

Table ``probes/part-*.parquet``: ``layer``, ``classifier``, ``train_accuracy``,
``test_accuracy``, ``n_train``, ``n_test``; one row per layer, in manifest order.

Unlabelled images are left out. The split is ``train_test_split`` stratified by label with
``random_state=seed`` over the labelled images sorted by image id, so it is the same for
every layer and does not depend on dataset order or batching.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from jobs.core.base import (
    AnalysisParams,
    DistinctLayers,
    MapBatch,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rows,
    register,
)
from jobs.core.kernels import pooled_features, pooled_features_schema, read_features, worth_logging


class ProbesParams(AnalysisParams):
    layers: DistinctLayers
    classifier: Literal["logistic", "linear_svm"] = "logistic"
    pool: Literal["avg", "max", "grid", "none"] = "avg"
    grid: int = Field(default=2, ge=1, description="cells per side when pool is 'grid'")
    test_size: float = Field(default=0.25, gt=0, lt=1, description="fraction of labelled images held out")
    seed: int = 0
    C: float = Field(default=1.0, gt=0, description="inverse regularisation strength")
    max_iter: int = Field(default=1000, ge=1)
    standardize: bool = True


def _class_name(c: int, names: Sequence[str] | None) -> str:
    return f"{c} ({names[c]})" if names is not None and 0 <= c < len(names) else str(c)


def split(labels: np.ndarray, test_size: float, seed: int = 0,
          label_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices into ``labels`` (all >= 0): stratified, seeded.

    ValueError, with the counts, when a stratified split is impossible: fewer than two
    classes, a class with a single image, or a split side smaller than the number of classes.
    """
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    if len(classes) < 2:
        raise ValueError(f"probes needs labelled images of at least 2 classes; got {n} labelled image(s) "
                         f"of {len(classes)} class(es)")
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


@register
class Probes(ReduceAnalysis):
    """Train/test accuracy of a linear classifier on each layer's pooled features."""

    Params = ProbesParams
    params: ProbesParams

    def schema(self) -> dict[str, pa.Schema]:
        return pooled_features_schema(self.params.layers)

    def map_batch(self, batch: MapBatch) -> Rows:
        return pooled_features(batch, self.params.layers, self.params.pool, self.params.grid)

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        p = self.params
        rows: dict[str, list] = {k: [] for k in ("layer", "train_accuracy", "test_accuracy", "n_train", "n_test")}
        accuracy: dict[str, float] = {}
        first_ids: np.ndarray | None = None
        for layer in p.layers:
            ids, labels, features = read_features(inputs, layer)
            keep = labels >= 0
            ids, labels, features = ids[keep], labels[keep], features[keep]
            # Every layer sees the same images, hence the same split; say so if not.
            if first_ids is None:
                first_ids = ids
            elif len(ids) != len(first_ids) or (ids != first_ids).any():
                raise ValueError(f"probes: layer {layer!r} has other images than layer {p.layers[0]!r}")
            train, test = split(labels, p.test_size, p.seed, ctx.label_names)
            model = make_classifier(p.classifier, p.C, p.max_iter, p.seed, p.standardize)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.fit(features[train], labels[train])
            # E.g. not converged within max_iter: worth knowing, not fatal.
            for message in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught if worth_logging(w)):
                ctx.log(f"probes: layer {layer!r}: {message}")
            rows["layer"].append(layer)
            rows["train_accuracy"].append(float(model.score(features[train], labels[train])))
            rows["test_accuracy"].append(float(model.score(features[test], labels[test])))
            rows["n_train"].append(len(train))
            rows["n_test"].append(len(test))
            accuracy[layer] = rows["test_accuracy"][-1]
        table = pa.table({
            "layer": pa.array(rows["layer"], pa.string()),
            "classifier": pa.array([p.classifier] * len(rows["layer"]), pa.string()),
            "train_accuracy": pa.array(rows["train_accuracy"], pa.float64()),
            "test_accuracy": pa.array(rows["test_accuracy"], pa.float64()),
            "n_train": pa.array(rows["n_train"], pa.int64()),
            "n_test": pa.array(rows["n_test"], pa.int64()),
        })
        return ReduceOutput(tables={"": table}, stats={"test_accuracy": accuracy})
