"""The real case: the shared ResNet-20 on the 10,000 CIFAR-10 test JPEGs.

Its known accuracy on these files (81.0%) checks decoding, preprocessing and loading at once.
"""

from __future__ import annotations

import pandas as pd

from jobs.attribution.base import ATTRIBUTION
from pipeline.execute import run_manifest
from pipeline.manifest import load_manifest

from .conftest import ROOT, needs_shared, smaller

# What test_cifar10_manifest runs smaller than the manifest does. Most of the manifest's time
# is not its dataset pass but the attribution of 500 images by eight methods (deletion and
# insertion scoring alone is 34 forwards per map: 136,000 forwards against the pass's 10,000),
# then t-SNE and UMAP of all 10,000 images. The test runs every analysis on the real data, with
# attribution on 50 images, 100 neighbour queries, t-SNE and UMAP of a 2,000-image sample, and
# fewer units of the two views nothing here reads, the sanity checks on 4 images (every map again
# per randomised block, class, noisy copy and ROAD point) and the adversarial search on 20. What
# the assertions read (the whole pass's predictions and features, the class models, the
# inversions) is as the manifest has it.
SAMPLE, QUERIES, EMBEDDED, CHECKED = 50, 100, 2000, 4
SMALLER = {**{name: {"sample.n": SAMPLE} for name in ATTRIBUTION},
           "neighbours": {"queries.sample": QUERIES}, "embedding": {"max_points": EMBEDDED},
           "neuron_ascent": {"channels": [0, 1]}, "deepdream": {"sample.n": 1},
           "sanity_checks": {"sample.n": CHECKED}, "adversarial": {"sample.n": 20}}


@needs_shared
def test_cifar10_manifest(ray_session, tmp_path):
    """Accuracy and features, and the model-level views of the trained network."""
    path = ROOT / "manifests" / "cifar10.yaml"
    manifest = load_manifest(path, output=tmp_path / "cifar10", overrides=smaller(path, SMALLER))
    result = run_manifest(manifest, log=lambda m: None)
    assert result.ok and result.errors == 0
    # Every attribution method mapped the same seeded sample, one map per image (eight methods
    # explaining the predicted class, and one unit's guided-backprop projection).
    methods = [p.entry_name for p in manifest.analyses if p.type in ATTRIBUTION]
    assert len(methods) == 9 and "neuron_guided_backprop" in methods
    samples = {name: set(pd.read_parquet(tmp_path / "cifar10" / name, columns=["image_id"]).image_id)
               for name in methods}
    assert all(len(ids) == SAMPLE for ids in samples.values()), {k: len(v) for k, v in samples.items()}
    assert all(ids == samples[methods[0]] for ids in samples.values())
    assert result.analyses["embedding"]["points"] == EMBEDDED
    pred = pd.read_parquet(tmp_path / "cifar10" / "predictions")
    assert len(pred) == 10_000 and pred.image_id.is_unique
    accuracy = (pred.pred == pred.label).mean()
    assert abs(accuracy - 0.810) <= 0.003, f"top-1 accuracy {accuracy:.4f}, expected 0.810 +- 0.003"
    feats = pd.read_parquet(tmp_path / "cifar10" / "features")
    assert feats.groupby("layer", observed=True).size().to_dict() == {"layer1": 10_000, "layer2": 10_000,
                                                                      "layer3": 10_000}
    dims = feats.groupby("layer", observed=True).vector.apply(lambda v: len(v.iloc[0])).to_dict()
    assert dims == {"layer1": 16, "layer2": 32, "layer3": 64}
    # Class models of all ten classes, each called its class by the model.
    models = pd.read_parquet(tmp_path / "cifar10" / "class_model")
    assert sorted(models["class"].unique()) == list(range(10))
    assert (models.probability > 0.9).all() and (models.predicted == models["class"]).all()
    assert (models.final_value > models.start_value + 20).all()
    # The neuron-level entries: projections of every top patch, the strongest map per image, a
    # facet per class and cluster, a search per sampled image.
    top = pd.read_parquet(tmp_path / "cifar10" / "top_patches")
    assert len(top) == 9 * (16 + 32 + 64)
    assert all(len(p) == 3 * (b[3] - b[1]) * (b[2] - b[0]) for p, b in zip(top.projection_deconvnet, top.box))
    occlusion = pd.read_parquet(tmp_path / "cifar10" / "occlusion")
    assert occlusion.feature_channel.between(0, 63).all()
    assert occlusion.feature_projection.map(len).eq(3 * 32 * 32).all()
    facets = pd.read_parquet(tmp_path / "cifar10" / "class_model_facets")
    assert len(facets) == 30 and set(facets.facet) == {0, 1, 2}
    assert len(pd.read_parquet(tmp_path / "cifar10" / "adversarial")) == 20
    # Inversion keeps more of the image at layer1 than at layer3.
    inversion = pd.read_parquet(tmp_path / "cifar10" / "inversion")
    error = inversion.groupby("layer").pixel_error.mean()
    assert error["layer1"] < error["layer2"] < error["layer3"], error.to_dict()


@needs_shared
def test_cifar10_probes_rise_with_depth(ray_session, tmp_path):
    """Zeiler & Fergus' Table 7 on CIFAR-10: a linear probe reads more from deeper layers."""
    manifest = load_manifest(ROOT / "manifests" / "cifar10.yaml", output=tmp_path / "probes")
    manifest.analyses = [a for a in manifest.analyses if a.type == "probes"]
    result = run_manifest(manifest, log=lambda m: None)
    assert result.ok, result.analyses
    table = pd.read_parquet(tmp_path / "probes" / "probes")
    probes = table[table.shots.isna()].set_index("layer")  # the full-data rows
    acc = probes.test_accuracy
    assert acc["layer1"] < acc["layer2"] < acc["layer3"], acc.to_dict()
    assert acc["layer3"] > 0.7  # near the network's own 81%: its last block is nearly linearly separable
    assert (probes.n_train + probes.n_test == 10_000).all() and (probes.n_test == 2_500).all()
    # Few-shot (Zeiler & Fergus 2014, Tables 4-5): the deepest layer's curve rises with the shots,
    # and stays under the full-data probe.
    few = table[table.shots.notna()]
    assert len(few) == 3 * 4 * 5 and (few.n_train == few.shots * 10).all()
    curve = result.analyses["probes"]["few_shot_test_accuracy"]["layer3"]
    means = [curve[str(k)]["mean"] for k in (15, 30, 45, 60)]
    assert means[0] < means[-1] <= acc["layer3"] + 0.01, means


@needs_shared
def test_cifar10_torch_probes_agree_with_scikit_learn(ray_session, tmp_path):
    """The minibatch torch solver and scikit-learn's lbfgs, the reference, on the same CIFAR-10
    features and split: test accuracy within half a point at every layer."""
    manifest = load_manifest(ROOT / "manifests" / "cifar10.yaml", output=tmp_path / "probes")
    probes = next(a for a in manifest.analyses if a.type == "probes")
    full = {"shots_per_class": None, "repeats": 1}  # the full-data probes only
    manifest.analyses = [probes.model_copy(update={"solver": "sklearn", **full}),
                         probes.model_copy(update={"solver": "torch", "name": "probes_torch", **full})]
    result = run_manifest(manifest, log=lambda m: None)
    assert result.ok, result.analyses
    reference = pd.read_parquet(tmp_path / "probes" / "probes").set_index("layer").test_accuracy
    fitted = pd.read_parquet(tmp_path / "probes" / "probes_torch").set_index("layer").test_accuracy
    assert (abs(fitted - reference) <= 0.005).all(), pd.DataFrame({"sklearn": reference, "torch": fitted})
    assert result.analyses["probes_torch"]["solver"] == {layer: "torch" for layer in probes.layers}
