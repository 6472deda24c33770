"""What changed between two runs: pure functions over their tables (no files, no Ray).

``convscope compare RUN_A RUN_B`` (:mod:`pipeline.compare`) reads the tables of the entries
both runs committed under the same name and type and hands them to the functions here; each
returns a DataFrame with exactly the columns of its table in :data:`SCHEMAS`, and
:func:`to_table` turns it into Arrow with those types. Every table starts with ``entry``
(the analysis entry's name), so entries of one type sit in one table.

Sign convention: every ``delta`` is B minus A (positive: B is higher). The threshold
``accuracy_drop`` of ``--fail-on`` is A minus B, i.e. ``-delta``.

- ``predictions`` entries: :func:`match_predictions` pairs the two runs' rows by image id;
  :func:`accuracy_change` (one row per entry), :func:`per_class_change` (one per class),
  :func:`flipped` (one per image whose top-1 class changed).
- ``top_patches`` entries: :func:`topk_overlap`, per channel the overlap of the two top-k
  image sets.
- attribution entries (a ``map`` or ``prob_map`` column): :func:`map_correlations`, the
  Pearson correlation of the two maps of one image and target.
- ``probes`` entries: :func:`probe_change`, test accuracy per layer and shot count.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

ENTRY = pa.field("entry", pa.string())
IMAGE_ID = pa.field("image_id", pa.string())
LABEL = pa.field("label", pa.int64())

SCHEMAS: dict[str, pa.Schema] = {
    # One row per predictions entry: common images, labelled ones, accuracy of each run on
    # those, and how many of them flipped (fixed: A wrong, B right; broke: A right, B wrong).
    "accuracy": pa.schema([
        ENTRY, ("images", pa.int64()), ("labelled", pa.int64()), ("accuracy_a", pa.float64()),
        ("accuracy_b", pa.float64()), ("delta", pa.float64()), ("flipped", pa.int64()),
        ("flip_fraction", pa.float64()), ("fixed", pa.int64()), ("broke", pa.int64()),
        ("label_mismatches", pa.int64())]),
    # One row per (entry, class) over the labelled common images.
    "per_class": pa.schema([
        ENTRY, LABEL, ("label_name", pa.string()), ("images", pa.int64()), ("correct_a", pa.int64()),
        ("correct_b", pa.int64()), ("accuracy_a", pa.float64()), ("accuracy_b", pa.float64()),
        ("delta", pa.float64()), ("fixed", pa.int64()), ("broke", pa.int64())]),
    # One row per common image whose top-1 class differs between the runs.
    "flips": pa.schema([
        ENTRY, IMAGE_ID, LABEL, ("class_a", pa.int64()), ("class_b", pa.int64()), ("prob_a", pa.float64()),
        ("prob_b", pa.float64()), ("change", pa.string())]),
    # One row per (entry, layer, channel[, label]) of top_patches.
    "channels": pa.schema([
        ENTRY, ("layer", pa.string()), ("channel", pa.int64()), LABEL, ("images_a", pa.int64()),
        ("images_b", pa.int64()), ("common", pa.int64()), ("overlap", pa.float64())]),
    # One row per map present in both runs (same entry, image, method and target).
    "attribution": pa.schema([
        ENTRY, IMAGE_ID, LABEL, ("method", pa.string()), ("target", pa.int64()), ("neuron_layer", pa.string()),
        ("neuron_channel", pa.int64()), ("correlation", pa.float64())]),
    # One row per (entry, layer, classifier, shots) of probes: the full-data fit (shots null),
    # then the few-shot fits' mean over their repeats.
    "probes": pa.schema([
        ENTRY, ("layer", pa.string()), ("classifier", pa.string()), ("shots", pa.int64()),
        ("test_accuracy_a", pa.float64()),
        ("test_accuracy_b", pa.float64()), ("delta", pa.float64()), ("train_accuracy_a", pa.float64()),
        ("train_accuracy_b", pa.float64()), ("n_test_a", pa.int64()), ("n_test_b", pa.int64())]),
    # One row per entry that could not be compared, and the run(s) it is missing from.
    "unmatched": pa.schema([
        ENTRY, ("type_a", pa.string()), ("type_b", pa.string()), ("reason", pa.string())]),
}

# Change of an image's top-1 class between runs, as the ``change`` column of ``flips`` says it.
FIXED, BROKE, OTHER, UNLABELLED = "fixed", "broke", "other", "unlabelled"


def empty(name: str) -> pd.DataFrame:
    """An empty DataFrame with the columns of table ``name``.

    >>> list(empty("unmatched").columns)
    ['entry', 'type_a', 'type_b', 'reason']
    """
    return pd.DataFrame({f.name: pd.Series([], dtype=object) for f in SCHEMAS[name]})


def to_table(name: str, df: pd.DataFrame) -> pa.Table:
    """``df`` as an Arrow table with exactly the schema ``SCHEMAS[name]`` (NaN and None as null).

    >>> to_table("unmatched", pd.DataFrame({"entry": ["x"], "type_a": ["features"], "type_b": [None],
    ...                                      "reason": ["only in A"]})).num_rows
    1
    """
    schema = SCHEMAS[name]
    columns = []
    for f in schema:
        values = [plain(v) for v in df[f.name].tolist()] if f.name in df.columns else [None] * len(df)
        columns.append(pa.array(values, f.type))
    return pa.table(columns, schema=schema)


def plain(value: Any) -> Any:
    """A Python value for Arrow or JSON: NaN and pandas' NA as None, numpy scalars as Python's.

    >>> [plain(float("nan")), plain(np.int64(3)), plain("x")]
    [None, 3, 'x']
    """
    if value is None or value is pd.NA or (isinstance(value, float | np.floating) and np.isnan(value)):
        return None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def labels(values: pd.Series) -> pd.Series:
    """Labels as nullable integers; null and negative values (unlabelled) become ``<NA>``.

    >>> labels(pd.Series([0, None, -1, 2])).tolist()
    [0, <NA>, <NA>, 2]
    """
    out = pd.to_numeric(values, errors="coerce").astype("Float64").astype("Int64")
    return out.where(out >= 0, pd.NA)


# ----------------------------------------------------------------------------- predictions


def match_predictions(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The two runs' predictions of the images both have: ``image_id``, ``label``, ``class_a``,
    ``class_b``, ``prob_a``, ``prob_b``, ``label_mismatch``, sorted by image id.

    ``label`` is the label both runs agree on; an image the two runs label differently
    (``label_mismatch``) counts as unlabelled, since neither run is right about it.

    >>> a = pd.DataFrame({"image_id": ["x", "y", "z"], "label": [0, 1, 1], "pred": [0, 1, 0],
    ...                   "prob": [0.9, 0.8, 0.6]})
    >>> b = pd.DataFrame({"image_id": ["y", "x"], "label": [1, 0], "pred": [0, 0], "prob": [0.7, 0.5]})
    >>> match_predictions(a, b)[["image_id", "label", "class_a", "class_b"]].values.tolist()
    [['x', 0, 0, 0], ['y', 1, 1, 0]]
    """
    cols = ["image_id", "label", "pred", "prob"]
    for side, df in (("A", a), ("B", b)):
        if df["image_id"].duplicated().any():
            raise ValueError(f"run {side}'s predictions name an image more than once "
                             f"(e.g. {df.loc[df['image_id'].duplicated(), 'image_id'].iloc[0]!r})")
    m = a[cols].merge(b[cols], on="image_id", suffixes=("_a", "_b"), validate="one_to_one")
    label_a, label_b = labels(m["label_a"]), labels(m["label_b"])
    mismatch = (label_a.notna() & label_b.notna() & (label_a != label_b)).fillna(False).astype(bool)
    out = pd.DataFrame({
        "image_id": m["image_id"].astype(str),
        "label": label_a.where(~mismatch & label_b.notna(), pd.NA).astype("Int64"),
        "class_a": m["pred_a"].astype("int64"),
        "class_b": m["pred_b"].astype("int64"),
        "prob_a": m["prob_a"].astype("float64"),
        "prob_b": m["prob_b"].astype("float64"),
        "label_mismatch": mismatch.to_numpy(),
    })
    return out.sort_values("image_id", kind="stable").reset_index(drop=True)


def change_kind(label: Any, class_a: int, class_b: int) -> str:
    """How an image's top-1 class changed: ``fixed`` (A wrong, B right), ``broke`` (A right,
    B wrong), ``other`` (wrong both times, or the same class), ``unlabelled``.

    >>> [change_kind(1, 0, 1), change_kind(1, 1, 0), change_kind(2, 0, 1), change_kind(None, 0, 1)]
    ['fixed', 'broke', 'other', 'unlabelled']
    """
    if label is None or label is pd.NA or (isinstance(label, float) and np.isnan(label)):
        return UNLABELLED
    if class_b == label and class_a != label:
        return FIXED
    if class_a == label and class_b != label:
        return BROKE
    return OTHER


def flipped(matched: pd.DataFrame, entry: str) -> pd.DataFrame:
    """The images whose top-1 class differs between the runs (the ``flips`` table).

    Order: the most confident flips first, by ``min(prob_a, prob_b)`` descending (an image
    both models are sure about, differently, leads), then by image id.

    >>> m = pd.DataFrame({"image_id": ["x", "y", "z"], "label": pd.array([0, 1, None], dtype="Int64"),
    ...                   "class_a": [0, 1, 2], "class_b": [1, 1, 0], "prob_a": [0.9, 0.8, 0.7],
    ...                   "prob_b": [0.6, 0.9, 0.8]})
    >>> flipped(m, "predictions")[["image_id", "change"]].values.tolist()
    [['z', 'unlabelled'], ['x', 'broke']]
    """
    f = matched[matched["class_a"] != matched["class_b"]].copy()
    f["change"] = [change_kind(lab, ca, cb) for lab, ca, cb in zip(f["label"], f["class_a"], f["class_b"])]
    f["entry"] = entry
    f["_confidence"] = np.minimum(f["prob_a"].to_numpy(float), f["prob_b"].to_numpy(float))
    f = f.sort_values(["_confidence", "image_id"], ascending=[False, True], kind="stable")
    return f[SCHEMAS["flips"].names].reset_index(drop=True)


def accuracy_change(matched: pd.DataFrame, entry: str) -> pd.DataFrame:
    """One row: top-1 accuracy of each run over the labelled common images, and its change.

    ``accuracy_x = mean(class_x == label)`` over the labelled images both runs have;
    ``delta = accuracy_b - accuracy_a``; ``flip_fraction = flipped / labelled`` where
    ``flipped`` counts the labelled images with ``class_a != class_b``.

    >>> m = pd.DataFrame({"image_id": ["x", "y"], "label": pd.array([0, 1], dtype="Int64"),
    ...                   "class_a": [0, 1], "class_b": [0, 0], "prob_a": [0.9, 0.8], "prob_b": [0.6, 0.9],
    ...                   "label_mismatch": [False, False]})
    >>> accuracy_change(m, "p").loc[0, ["accuracy_a", "accuracy_b", "delta", "flip_fraction"]].tolist()
    [1.0, 0.5, -0.5, 0.5]
    """
    lab = matched[matched["label"].notna()]
    n = len(lab)
    y = lab["label"].to_numpy(dtype="int64")
    right_a, right_b = lab["class_a"].to_numpy() == y, lab["class_b"].to_numpy() == y
    acc_a = float(right_a.mean()) if n else np.nan
    acc_b = float(right_b.mean()) if n else np.nan
    flips = int((lab["class_a"].to_numpy() != lab["class_b"].to_numpy()).sum())
    row = {"entry": entry, "images": len(matched), "labelled": n, "accuracy_a": acc_a, "accuracy_b": acc_b,
           "delta": acc_b - acc_a, "flipped": flips, "flip_fraction": flips / n if n else np.nan,
           "fixed": int((~right_a & right_b).sum()), "broke": int((right_a & ~right_b).sum()),
           "label_mismatches": int(matched["label_mismatch"].sum()) if "label_mismatch" in matched else 0}
    return pd.DataFrame([row], columns=SCHEMAS["accuracy"].names)


def per_class_change(matched: pd.DataFrame, entry: str, label_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Per class (label), top-1 accuracy of each run over the labelled common images.

    >>> m = pd.DataFrame({"image_id": ["x", "y", "z"], "label": pd.array([0, 1, 1], dtype="Int64"),
    ...                   "class_a": [0, 1, 0], "class_b": [0, 0, 1], "prob_a": [0.9, 0.8, 0.7],
    ...                   "prob_b": [0.6, 0.9, 0.8]})
    >>> per_class_change(m, "p", ["cat", "dog"])[["label_name", "accuracy_a", "accuracy_b", "fixed"]].values.tolist()
    [['cat', 1.0, 1.0, 0], ['dog', 0.5, 0.5, 1]]
    """
    lab = matched[matched["label"].notna()]
    if not len(lab):
        return empty("per_class")
    y = lab["label"].to_numpy(dtype="int64")
    right_a, right_b = lab["class_a"].to_numpy() == y, lab["class_b"].to_numpy() == y
    g = pd.DataFrame({"label": y, "a": right_a, "b": right_b, "fixed": ~right_a & right_b,
                      "broke": right_a & ~right_b}).groupby("label", sort=True)
    out = pd.DataFrame({"images": g.size(), "correct_a": g["a"].sum(), "correct_b": g["b"].sum(),
                        "fixed": g["fixed"].sum(), "broke": g["broke"].sum()}).reset_index()
    out["accuracy_a"] = out["correct_a"] / out["images"]
    out["accuracy_b"] = out["correct_b"] / out["images"]
    out["delta"] = out["accuracy_b"] - out["accuracy_a"]
    names = list(label_names or [])
    out["label_name"] = [names[i] if 0 <= i < len(names) else str(i) for i in out["label"]]
    out["entry"] = entry
    return out[SCHEMAS["per_class"].names]


# ----------------------------------------------------------------------------- top-k sets


def overlap(a: AbstractSet[Any], b: AbstractSet[Any]) -> float:
    """``|A ∩ B| / max(|A|, |B|)``: 1 for the same set, 0 for disjoint ones (NaN for two empty sets).

    >>> overlap({"x", "y", "z"}, {"y", "z", "w"})
    0.6666666666666666
    """
    size = max(len(a), len(b))
    return len(a & b) / size if size else float("nan")


def topk_overlap(a: pd.DataFrame, b: pd.DataFrame, entry: str) -> pd.DataFrame:
    """Per channel (``layer``, ``channel``, and ``label`` for per-class tables), the overlap of the
    two runs' top-k image sets: the distinct image ids among the channel's rows in each run.

    A channel only one run has counts with an empty set on the other side (overlap 0).

    >>> a = pd.DataFrame({"layer": ["l1"] * 3, "channel": [0, 0, 0], "image_id": ["x", "y", "z"]})
    >>> b = pd.DataFrame({"layer": ["l1"] * 3, "channel": [0, 0, 0], "image_id": ["z", "w", "x"]})
    >>> topk_overlap(a, b, "top_patches")[["images_a", "images_b", "common", "overlap"]].to_dict("records")
    [{'images_a': 3, 'images_b': 3, 'common': 2, 'overlap': 0.6666666666666666}]
    """
    per_class = "label" in a.columns and "label" in b.columns
    keys = ["layer", "channel"] + (["label"] if per_class else [])

    def sets(df: pd.DataFrame) -> pd.Series:
        df = df.assign(layer=df["layer"].astype(str), channel=df["channel"].astype("int64"))
        if per_class:
            df = df.assign(label=labels(df["label"]).fillna(-1).astype("int64"))
        return df.groupby(keys, sort=True)["image_id"].agg(lambda ids: frozenset(map(str, ids)))

    both = pd.concat({"a": sets(a), "b": sets(b)}, axis=1).sort_index()
    rows = []
    for key, (set_a, set_b) in zip(both.index, both[["a", "b"]].itertuples(index=False)):
        key = key if isinstance(key, tuple) else (key,)
        sa = set_a if isinstance(set_a, frozenset) else frozenset()
        sb = set_b if isinstance(set_b, frozenset) else frozenset()
        label = key[2] if per_class and key[2] >= 0 else None
        rows.append({"entry": entry, "layer": key[0], "channel": int(key[1]), "label": label,
                     "images_a": len(sa), "images_b": len(sb), "common": len(sa & sb), "overlap": overlap(sa, sb)})
    return pd.DataFrame(rows, columns=SCHEMAS["channels"].names) if rows else empty("channels")


# ----------------------------------------------------------------------------- attribution maps

MAP_COLUMNS = ("map", "prob_map")  # the attribution map: ``map``, or occlusion's target probability map
SHAPE_COLUMNS = ("channels", "height", "width")
MAP_KEYS = ["image_id", "method", "target", "neuron_layer", "neuron_channel"]  # what pairs two maps


def map_column(columns: Sequence[str]) -> str | None:
    """The column holding a table's attribution map, or None when it has none.

    >>> map_column(["image_id", "prob_map", "label_map"])
    'prob_map'
    """
    return next((c for c in MAP_COLUMNS if c in columns), None)


def correlation(x: Any, y: Any) -> float:
    """Pearson correlation of two maps flattened (float64); NaN when their sizes differ or one is
    constant.

    ``r = sum((x - mean x)(y - mean y)) / sqrt(sum((x - mean x)^2) sum((y - mean y)^2))``

    >>> round(correlation([1, 2, 3, 4], [2, 4, 6, 9]), 4)
    0.9944
    >>> correlation([1, 1, 1], [1, 2, 3])
    nan
    """
    if x is None or y is None:
        return float("nan")
    xs, ys = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if xs.size != ys.size or xs.size < 2:
        return float("nan")
    xs, ys = xs - xs.mean(), ys - ys.mean()
    denom = np.sqrt((xs * xs).sum() * (ys * ys).sum())
    return float((xs * ys).sum() / denom) if denom > 0 else float("nan")


def map_keys(df: pd.DataFrame) -> pd.DataFrame:
    """The columns that pair maps across runs (:data:`MAP_KEYS`), nulls made comparable (-1, "").

    >>> map_keys(pd.DataFrame({"image_id": ["x"], "target": [None]})).values.tolist()
    [['x', '', -1, '', -1]]
    """
    out = pd.DataFrame({"image_id": df["image_id"].astype(str)})
    out["method"] = df["method"].fillna("").astype(str) if "method" in df.columns else ""
    for col in ("target", "neuron_channel"):
        out[col] = (pd.to_numeric(df[col], errors="coerce").astype("Float64").astype("Int64").fillna(-1)
                    if col in df.columns else -1)
    out["neuron_layer"] = df["neuron_layer"].fillna("").astype(str) if "neuron_layer" in df.columns else ""
    return out[MAP_KEYS]



def map_correlations(a: pd.DataFrame, b: pd.DataFrame, entry: str) -> pd.DataFrame:
    """Per map both runs computed (same image, method and target class, or the same neuron for
    neuron targets), the Pearson :func:`correlation` of the two maps. Maps of different shapes
    (``channels``, ``height``, ``width``) give NaN. Rows are sorted by image id, then target.

    >>> a = pd.DataFrame({"image_id": ["x", "x"], "label": [0, 0], "method": ["saliency"] * 2,
    ...                   "target": [0, 1], "map": [[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]]})
    >>> b = pd.DataFrame({"image_id": ["x"], "label": [0], "method": ["saliency"], "target": [0],
    ...                   "map": [[0.0, 2.0, 4.5]]})
    >>> map_correlations(a, b, "saliency")[["image_id", "target", "correlation"]].round(4).values.tolist()
    [['x', 0, 0.9979]]
    """
    col_a, col_b = map_column(list(a.columns)), map_column(list(b.columns))
    if col_a is None or col_b is None:
        return empty("attribution")

    def side(df: pd.DataFrame, col: str) -> pd.DataFrame:
        keyed = map_keys(df)
        keyed["label"] = labels(df["label"]) if "label" in df.columns else pd.NA
        keyed["map"] = df[col].to_numpy()
        keyed["shape"] = ([tuple(r) for r in df[list(SHAPE_COLUMNS)].itertuples(index=False)]
                          if all(c in df.columns for c in SHAPE_COLUMNS) else None)
        return keyed.drop_duplicates(MAP_KEYS, keep="first")

    m = side(a, col_a).merge(side(b, col_b), on=MAP_KEYS, suffixes=("_a", "_b"))
    if not len(m):
        return empty("attribution")
    m["correlation"] = [
        correlation(x, y) if sa is None or sb is None or tuple(sa) == tuple(sb) else float("nan")
        for x, y, sa, sb in zip(m["map_a"], m["map_b"], m["shape_a"], m["shape_b"])]
    m["entry"] = entry
    m["label"] = m["label_a"].where(m["label_a"].notna(), m["label_b"])
    m["method"] = m["method"].replace("", None)
    m["neuron_layer"] = m["neuron_layer"].replace("", None)
    for col in ("target", "neuron_channel"):
        m[col] = m[col].astype("Int64").where(m[col] >= 0, pd.NA)
    m = m.sort_values(["image_id", "method", "target", "neuron_layer", "neuron_channel"], kind="stable",
                      na_position="last")
    return m[SCHEMAS["attribution"].names].reset_index(drop=True)


# ----------------------------------------------------------------------------- probes


def probe_rows(probes: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, classifier, shots): the full-data fit as it is (``shots`` null), and per
    shot count the mean of its repeats (test and train accuracy; ``n_test`` of the first draw).
    A baseline's rows (``baseline`` not null: an untrained network's probes) are left out.

    >>> t = pd.DataFrame({"layer": ["l1"] * 3, "classifier": ["logistic"] * 3, "shots": [None, 2, 2],
    ...                   "repeat": [None, 0, 1], "test_accuracy": [0.9, 0.5, 0.7],
    ...                   "train_accuracy": [1.0, 1.0, 1.0], "n_test": [4, 4, 4]})
    >>> probe_rows(t)[["layer", "shots", "test_accuracy"]].values.tolist()
    [['l1', nan, 0.9], ['l1', 2.0, 0.6]]
    """
    if "baseline" in probes.columns:
        probes = probes[probes["baseline"].isna()]
    out = pd.DataFrame({"layer": probes["layer"].astype(str),
                        "classifier": probes["classifier"].astype(str) if "classifier" in probes.columns else "",
                        "shots": pd.to_numeric(probes["shots"], errors="coerce") if "shots" in probes.columns
                        else np.nan})
    for col in ("test_accuracy", "train_accuracy", "n_test"):
        out[col] = pd.to_numeric(probes[col], errors="coerce") if col in probes.columns else np.nan
    full = out[out["shots"].isna()].drop_duplicates(["layer", "classifier"], keep="first")
    few = (out[out["shots"].notna()]
           .groupby(["layer", "classifier", "shots"], sort=False, as_index=False)
           .agg(test_accuracy=("test_accuracy", "mean"), train_accuracy=("train_accuracy", "mean"),
                n_test=("n_test", "first")))
    return pd.concat([full, few], ignore_index=True)


def probe_change(a: pd.DataFrame, b: pd.DataFrame, entry: str) -> pd.DataFrame:
    """Per layer, classifier and shot count (:func:`probe_rows`: the full-data fit, and the mean
    over repeats of each few-shot fit), the probes' test accuracy in each run and its change
    ``delta = test_accuracy_b - test_accuracy_a``; a row only one run has is NaN on the other side.

    >>> a = pd.DataFrame({"layer": ["l1", "l2"], "classifier": ["logistic"] * 2, "train_accuracy": [1.0, 1.0],
    ...                   "test_accuracy": [0.5, 0.75], "n_train": [6, 6], "n_test": [4, 4]})
    >>> b = a.assign(test_accuracy=[0.75, 0.5])
    >>> probe_change(a, b, "probes")[["layer", "delta"]].values.tolist()
    [['l1', 0.25], ['l2', -0.25]]
    """
    keys = ["layer", "classifier", "shots"]
    sa, sb = probe_rows(a), probe_rows(b)
    # -1 stands for "full data" while merging: NaN keys do not match in a merge on every pandas.
    sa["shots"], sb["shots"] = sa["shots"].fillna(-1), sb["shots"].fillna(-1)
    order = list(dict.fromkeys([*map(tuple, sa[keys].values.tolist()), *map(tuple, sb[keys].values.tolist())]))
    m = sa.merge(sb, on=keys, how="outer", suffixes=("_a", "_b"))
    rank = {key: i for i, key in enumerate(order)}
    m = m.assign(_order=[rank[tuple(k)] for k in m[keys].values.tolist()]).sort_values("_order")
    m["delta"] = m["test_accuracy_b"] - m["test_accuracy_a"]
    m["classifier"] = m["classifier"].replace("", None)
    m["shots"] = m["shots"].where(m["shots"] >= 0).astype("Int64")
    m["entry"] = entry
    return m[SCHEMAS["probes"].names].reset_index(drop=True)
