"""The real case: the shared ResNet-20 on the 10,000 CIFAR-10 test JPEGs.

Its known accuracy on these files (81.0%) checks decoding, preprocessing and loading at once.
"""

from __future__ import annotations

import pandas as pd
import pytest

from jobs.attribution.base import ATTRIBUTION
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest

from .conftest import ROOT, needs_shared, smaller

# What the cifar10 run below does smaller than the manifest. Most of the manifest's time is not
# its dataset pass but the attribution of 500 images by eight methods (deletion and insertion
# scoring alone is 34 forwards per map: 136,000 forwards against the pass's 10,000), then t-SNE
# and UMAP of all 10,000 images. The tests run every analysis on the real data, with attribution
# on 50 images, 100 neighbour queries, t-SNE and UMAP of a 2,000-image sample, fewer units of the
# two views nothing here reads, the sanity checks on 4 images (every map again per randomised
# block, class, noisy copy and ROAD point), the adversarial search on 20 and the class facets
# clustered from 300 images, not 1,000. What the assertions read (the whole pass's predictions,
# features and probes, the class models, the inversions) is as the manifest has it.
SAMPLE, QUERIES, EMBEDDED, CHECKED, FACET_SAMPLE = 50, 100, 2000, 4, 300
SMALLER = {**{name: {"sample.n": SAMPLE} for name in ATTRIBUTION},
           "neighbours": {"queries.sample": QUERIES}, "embedding": {"max_points": EMBEDDED},
           "neuron_ascent": {"channels": [0, 1]}, "deepdream": {"sample.n": 1},
           "sanity_checks": {"sample.n": CHECKED}, "adversarial": {"sample.n": 20},
           "class_model": {"facets.sample.n": FACET_SAMPLE}}


@pytest.fixture(scope="module")
def cifar10(ray_session, tmp_path_factory):
    """One run of the shipped manifest (smaller as above) and, beside its probes, the same probes
    fitted by the torch solver on the full data: every test below reads this one 10,000-image pass."""
    path = ROOT / "manifests" / "cifar10.yaml"
    out = tmp_path_factory.mktemp("cifar10") / "run"
    manifest = load_manifest(path, output=out, overrides=smaller(path, SMALLER))
    # The manifest's probes fitted by scikit-learn (the reference; `auto` would pick the torch
    # solver on a GPU), and beside them the torch solver's full-data probes.
    i, probes = next((i, a) for i, a in enumerate(manifest.analyses) if a.type == "probes")
    manifest.analyses[i] = probes.model_copy(update={"solver": "sklearn"})
    full = {"shots_per_class": None, "repeats": 1, "baseline": None}  # the full-data probes only
    manifest.analyses.append(probes.model_copy(update={"solver": "torch", "name": "probes_torch", **full}))
    return manifest, run_manifest(manifest, log=lambda m: None), out


@needs_shared
def test_cifar10_manifest(cifar10):
    """Accuracy and features, and the model-level views of the trained network."""
    manifest, result, out = cifar10
    assert result.ok and result.errors == 0
    # Every attribution method mapped the same seeded sample, one map per image (eight methods
    # explaining the predicted class, and one unit's guided-backprop projection).
    methods = [p.entry_name for p in manifest.analyses if p.type in ATTRIBUTION]
    assert len(methods) == 9 and "neuron_guided_backprop" in methods
    samples = {name: set(pd.read_parquet(out / name, columns=["image_id"]).image_id) for name in methods}
    assert all(len(ids) == SAMPLE for ids in samples.values()), {k: len(v) for k, v in samples.items()}
    assert all(ids == samples[methods[0]] for ids in samples.values())
    assert result.analyses["embedding"]["points"] == EMBEDDED
    pred = pd.read_parquet(out / "predictions")
    assert len(pred) == 10_000 and pred.image_id.is_unique
    accuracy = (pred.pred == pred.label).mean()
    assert abs(accuracy - 0.810) <= 0.003, f"top-1 accuracy {accuracy:.4f}, expected 0.810 +- 0.003"
    feats = pd.read_parquet(out / "features")
    assert feats.groupby("layer", observed=True).size().to_dict() == {"layer1": 10_000, "layer2": 10_000,
                                                                      "layer3": 10_000}
    dims = feats.groupby("layer", observed=True).vector.apply(lambda v: len(v.iloc[0])).to_dict()
    assert dims == {"layer1": 16, "layer2": 32, "layer3": 64}
    # Class models of all ten classes, each called its class by the model.
    models = pd.read_parquet(out / "class_model")
    assert sorted(models["class"].unique()) == list(range(10))
    assert (models.probability > 0.9).all() and (models.predicted == models["class"]).all()
    assert (models.final_value > models.start_value + 20).all()
    # The neuron-level entries: projections of every top patch, the strongest map per image, a
    # facet per class and cluster, a search per sampled image.
    top = pd.read_parquet(out / "top_patches")
    assert len(top) == 9 * (16 + 32 + 64)
    assert all(len(p) == 3 * (b[3] - b[1]) * (b[2] - b[0]) for p, b in zip(top.projection_deconvnet, top.box))
    occlusion = pd.read_parquet(out / "occlusion")
    assert occlusion.feature_channel.between(0, 63).all()
    assert occlusion.feature_projection.map(len).eq(3 * 32 * 32).all()
    facets = pd.read_parquet(out / "class_model_facets")
    assert len(facets) == 30 and set(facets.facet) == {0, 1, 2}
    assert len(pd.read_parquet(out / "adversarial")) == 20
    # Inversion keeps more of the image at layer1 than at layer3.
    inversion = pd.read_parquet(out / "inversion")
    error = inversion.groupby("layer").pixel_error.mean()
    assert error["layer1"] < error["layer2"] < error["layer3"], error.to_dict()


@needs_shared
def test_cifar10_probes_rise_with_depth(cifar10):
    """Zeiler & Fergus' Table 7 on CIFAR-10: a linear probe reads more from deeper layers."""
    _, result, out = cifar10
    table = pd.read_parquet(out / "probes")
    own = table[table.baseline.isna()]  # the trained network's rows (the untrained one's below)
    probes = own[own.shots.isna()].set_index("layer")  # the full-data rows
    acc = probes.test_accuracy
    assert acc["layer1"] < acc["layer2"] < acc["layer3"], acc.to_dict()
    assert acc["layer3"] > 0.7  # near the network's own 81%: its last block is nearly linearly separable
    assert (probes.n_train + probes.n_test == 10_000).all() and (probes.n_test == 2_500).all()
    # Few-shot (Zeiler & Fergus 2014, Tables 4-5): the deepest layer's curve rises with the shots,
    # and stays under the full-data probe.
    few = own[own.shots.notna()]
    assert len(few) == 3 * 4 * 5 and (few.n_train == few.shots * 10).all()
    curve = result.analyses["probes"]["few_shot_test_accuracy"]["layer3"]
    means = [curve[str(k)]["mean"] for k in (15, 30, 45, 60)]
    assert means[0] < means[-1] <= acc["layer3"] + 0.01, means
    # The same architecture untrained (Zeiler & Fergus' "non-pretrained" row): training is what
    # makes the deepest layer linearly separable, at every shot count.
    random = result.analyses["probes"]["random_init"]
    assert random["test_accuracy"]["layer3"] < acc["layer3"] - 0.2, random["test_accuracy"]
    untrained = [random["few_shot_test_accuracy"]["layer3"][str(k)]["mean"] for k in (15, 30, 45, 60)]
    assert all(u < m for u, m in zip(untrained, means)), (untrained, means)


@needs_shared
def test_cifar10_torch_probes_agree_with_scikit_learn(cifar10):
    """The minibatch torch solver and scikit-learn's lbfgs, the reference, on the same CIFAR-10
    features and split: test accuracy within half a point at every layer."""
    manifest, result, out = cifar10
    table = pd.read_parquet(out / "probes")
    assert set(result.analyses["probes"]["solver"].values()) == {"sklearn"}
    reference = table[table.shots.isna() & table.baseline.isna()].set_index("layer").test_accuracy
    fitted = pd.read_parquet(out / "probes_torch").set_index("layer").test_accuracy
    assert (abs(fitted - reference) <= 0.005).all(), pd.DataFrame({"sklearn": reference, "torch": fitted})
    layers = next(a for a in manifest.analyses if a.type == "probes").layers
    assert result.analyses["probes_torch"]["solver"] == {layer: "torch" for layer in layers}
