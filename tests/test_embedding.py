"""The embedding analysis: PCA against numpy, seeded t-SNE/UMAP, cluster structure, tables and images."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from jobs import LocalContext, Rendered, TableInputs
from jobs.dataset import embedding
from jobs.dataset.embedding import Embedding, EmbeddingParams
from pipeline.writers import to_arrow
from tests.harness import as_table, run_local


def _inputs(features: np.ndarray, labels: np.ndarray, layer: str = "l", ids: list[str] | None = None) -> TableInputs:
    ids = ids if ids is not None else [f"img{i:04d}" for i in range(len(features))]
    return TableInputs({f"layer={layer}": pa.table({
        "image_id": pa.array(ids, pa.string()),
        "label": pa.array(np.asarray(labels, np.int64)),
        "feature": to_arrow(np.asarray(features, np.float32)),
    })})


def _ctx(n: int, label_names: list[str] | None = None) -> LocalContext:
    pixels = {f"img{i:04d}": np.full((8, 8, 3), i % 256, np.uint8) for i in range(n)}
    return LocalContext(model=nn.Identity(), pixels=pixels, input_size=(8, 8), label_names=label_names)


def _reduce(features, labels, **params):
    analysis = Embedding(EmbeddingParams(layers=["l"], **params))
    return analysis.reduce(_inputs(features, labels), _ctx(len(features)))


def _blobs(classes: int = 3, per_class: int = 30, dims: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters of unit spread whose centres are ~14 apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(classes, dims))
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(size=(len(labels), dims)), labels


def _one_nn_agreement(xy: np.ndarray, labels: np.ndarray) -> float:
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


def test_pca_matches_numpy_svd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 8)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2]) + 7.0
    x = (x @ np.linalg.qr(rng.normal(size=(8, 8)))[0]).astype(np.float32)  # rotate: loadings are mixed
    out = _reduce(x, np.zeros(60, np.int64), methods=["pca"], render=False)
    t = as_table(out)
    # Independent: centre, SVD, then the documented sign (largest |loading| positive).
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    v = vt[:2]
    v *= np.sign(v[np.arange(2), np.abs(v).argmax(1)])[:, None]
    expected = xc @ v.T
    got = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], 1)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    assert out.stats["points"] == 60
    assert set(t.column_names) == {"image_id", "label", "x", "y", "method", "layer"}  # no keys without render
    assert list(out.images) == []


def test_tsne_is_seeded_and_deterministic():
    x, labels = _blobs(per_class=20, seed=3)
    run = lambda seed: as_table(_reduce(x, labels, methods=["tsne"], seed=seed, render=False))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.equals(b)
    assert not np.array_equal(a.column("x").to_numpy(), c.column("x").to_numpy())


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])  # the one UMAP run of this file
def test_separated_clusters_stay_separated(method, monkeypatch):
    if method == "tsne":
        monkeypatch.setattr(embedding, "FFT_MIN_POINTS", 0)  # the large-dataset (FFT) gradient, on 90 points
    x, labels = _blobs()
    out = _reduce(x, labels, methods=[method], render=False)
    t = as_table(out)
    xy = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], 1)
    assert xy.shape == (90, 2) and np.isfinite(xy).all()
    assert _one_nn_agreement(xy, t.column("label").to_numpy()) >= 0.95
    if method == "umap":
        assert out.stats["layers"]["l"]["n_neighbors"] == 15


def test_small_datasets_clamp_perplexity_and_fail_clearly():
    x, labels = _blobs(per_class=2)  # 6 images
    out = _reduce(x, labels, methods=["pca", "tsne"], render=False)
    assert out.stats["layers"]["l"]["perplexity"] == pytest.approx(5 / 3)
    assert as_table(out).num_rows == 12
    with pytest.raises(ValueError, match=r"'pca' needs at least 3 images; layer 'l' has 2"):
        _reduce(x[:2], labels[:2], methods=["pca"])
    with pytest.raises(ValueError, match=r"'tsne' needs at least 3 images; layer 'l' has 2"):
        _reduce(x[:2], labels[:2], methods=["tsne"])
    with pytest.raises(ValueError, match=r"'umap' needs at least 4 images; layer 'l' has 3"):
        _reduce(x[:3], labels[:3], methods=["umap"])


def test_params_are_checked():
    with pytest.raises(ValidationError, match="listed once"):
        EmbeddingParams(layers=["l"], methods=["pca", "pca"])
    with pytest.raises(ValidationError, match="same image key"):
        EmbeddingParams(layers=["a.b", "a_b"])
    with pytest.raises(ValidationError):
        EmbeddingParams(layers=[])
    assert EmbeddingParams(layers=["l"]).methods == ["pca", "tsne"]


def tiny_cnn(seed: int = 0) -> nn.Module:
    """A small CNN with integer weights: on the {-2, 2} inputs of :func:`tiny_dataset` every sum
    is an exact small integer (and every mean a division by a power of two), so activations do
    not depend on the order a convolution sums in, hence not on the batch size."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 8, 3, padding=1),
        relu=nn.ReLU(),
        block=nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        fc=nn.Linear(16, 3),
    ))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randint(-1, 2, param.shape, generator=g).float())
    return model


def tiny_dataset(per_class: int = 10, size: int = 16, seed: int = 0):
    """Three classes of black-and-white noise (pixels 0 or 255, normalised to exactly -2 or 2):
    class c has channel c mostly on and the other channels mostly off."""
    rng = np.random.default_rng(seed)
    pixels, labels, ids = [], [], []
    for c in range(3):
        for i in range(per_class):
            on = rng.random((size, size, 3)) < 0.2
            on[..., c] = rng.random((size, size)) < 0.8
            pixels.append(np.where(on, 255, 0).astype(np.uint8))
            labels.append(c)
            ids.append(f"c{c}/{i:02d}.png")
    return ids, np.stack(pixels), labels


class CountingContext(LocalContext):
    calls = 0

    def images(self, image_ids):
        CountingContext.calls += 1
        return super().images(image_ids)


def test_end_to_end_table_images_and_batching():
    ids, pixels, labels = tiny_dataset()
    labels[0] = -1  # one unlabelled image
    model = tiny_cnn()
    params = EmbeddingParams(layers=["conv", "block.1"], methods=["pca", "tsne"], atlas_cells=4, thumb=8)
    names = ["red", "green", "blue"]
    a = run_local(Embedding(params), model, ids, pixels, labels, batch_size=1, label_names=names)
    b = run_local(Embedding(params), model, ids, pixels, labels, batch_size=7, label_names=names)
    ta, tb = as_table(a), as_table(b)
    assert ta.equals(tb)  # batching changes nothing

    n = len(ids)
    assert ta.num_rows == n * 2 * 2  # images x methods x layers
    assert ta.schema.field("label").type == pa.int64() and ta.column("label").null_count == 4
    assert ta.schema.field("x").type == pa.float32() and ta.schema.field("y").type == pa.float32()
    assert ta.column("layer").to_pylist() == ["conv"] * 2 * n + ["block.1"] * 2 * n
    assert ta.column("method").to_pylist()[:2 * n] == ["pca"] * n + ["tsne"] * n
    assert ta.column("image_id").to_pylist()[:n] == sorted(ids)
    assert set(ta.column("scatter_key").to_pylist()) == {"conv-pca-scatter", "conv-tsne-scatter",
                                                         "block_1-pca-scatter", "block_1-tsne-scatter"}

    keys = set(ta.column("scatter_key").to_pylist()) | set(ta.column("atlas_key").to_pylist())
    thumbs = set(ta.column("thumb_key").to_pylist())
    assert len(thumbs) == n  # one per image, shared by every layer and method
    rendered = list(a.images)
    got = [k for k, _ in rendered]
    assert len(got) == len(set(got)) == 8 + n and set(got) == keys | thumbs
    assert all("." not in k and "/" not in k for k in got)
    sizes = dict((k, img.size) for k, img in rendered)
    assert sizes["conv-pca-atlas"] == (4 * 8, 4 * 8)
    assert sizes["conv-pca-scatter"][1] == 640
    # A well-separated colour per class: even the first conv layer keeps the classes apart.
    pca = ta.filter(pa.compute.equal(ta.column("method"), "pca")).slice(0, n)
    xy = np.stack([pca.column("x").to_numpy(), pca.column("y").to_numpy()], 1)
    lab = np.array([int(i[1]) for i in pca.column("image_id").to_pylist()])
    assert _one_nn_agreement(xy, lab) >= 0.95
    assert a.stats["points"] == n and set(a.stats["layers"]) == {"conv", "block.1"}


def test_images_are_drawn_lazily():
    x, labels = _blobs(per_class=5)
    CountingContext.calls = 0
    ctx = CountingContext(model=nn.Identity(), pixels=_ctx(15).pixels, input_size=(8, 8))
    out = Embedding(EmbeddingParams(layers=["l"], methods=["pca"], atlas_cells=3)).reduce(_inputs(x, labels), ctx)
    assert isinstance(out.images, Rendered) and CountingContext.calls == 0
    # What goes to the render tasks names images, never holds their pixels.
    assert len(pickle.dumps((out.images.items, out.images.shared))) < 20_000
    drawn = [k for k, _ in out.images]
    assert drawn[:2] == ["l-pca-scatter", "l-pca-atlas"] and len(drawn) == 2 + 15  # then the thumbnails
    assert CountingContext.calls == 2  # the atlas' images, then the thumbnails in one chunk


def test_rows_do_not_depend_on_input_order():
    x, labels = _blobs(per_class=10, seed=5)
    ids = [f"img{i:04d}" for i in range(30)]
    perm = np.random.default_rng(0).permutation(30)
    p = EmbeddingParams(layers=["l"], methods=["pca", "tsne"], render=False)
    a = as_table(Embedding(p).reduce(_inputs(x, labels, ids=ids), _ctx(30)))
    # Shuffled, and in several record batches as the runner commits them.
    shuffled = _inputs(x[perm], labels[perm], ids=[ids[i] for i in perm]).tables["layer=l"]
    chunked = TableInputs({"layer=l": pa.concat_tables([shuffled.slice(s, 7) for s in range(0, 30, 7)])})
    assert chunked.tables["layer=l"].column("feature").num_chunks == 5
    b = as_table(Embedding(p).reduce(chunked, _ctx(30)))
    assert a.equals(b)


def _xy(t: pa.Table) -> np.ndarray:
    return np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], 1).astype(np.float64)


def _svd_scores(x: np.ndarray, k: int = 2) -> np.ndarray:
    """Scores on the k leading principal components by numpy's SVD, with the documented sign rule."""
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    v = vt[:k] * np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])[:, None]
    return xc @ v.T


class RecordingContext(LocalContext):
    def images(self, image_ids):
        self.asked = getattr(self, "asked", set()) | set(image_ids)
        return super().images(image_ids)


def test_max_points_maps_the_seeded_sample_in_id_order():
    rng = np.random.default_rng(2)
    n, m, seed = 200, 50, 3
    x = (rng.normal(size=(n, 12)) * np.linspace(4.0, 0.5, 12)).astype(np.float32)
    ids = [f"img{i:04d}" for i in range(n)]
    perm = rng.permutation(n)  # the dataset order is not the id order
    inputs = _inputs(x[perm], np.arange(n)[perm] % 3, ids=[ids[i] for i in perm])
    ctx = RecordingContext(model=nn.Identity(), pixels=_ctx(n).pixels, input_size=(8, 8))
    params = EmbeddingParams(layers=["l"], methods=["pca"], max_points=m, seed=seed, atlas_cells=3, thumb=4)
    out = Embedding(params).reduce(inputs, ctx)
    t = as_table(out)
    # Independent: the seeded draw over the sorted ids, kept in id order (ids are img0000... so index = rank).
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    assert t.column("image_id").to_pylist() == [ids[i] for i in chosen]
    assert t.column("label").to_pylist() == [int(i % 3) for i in chosen]
    np.testing.assert_allclose(_xy(t), _svd_scores(x[chosen]), atol=1e-4 * np.abs(_svd_scores(x[chosen])).max())
    assert out.stats["points"] == m and out.stats["layers"]["l"]["points"] == m
    assert out.stats["layers"]["l"]["total"] == n
    # Thumbnails and atlas only for the sampled images.
    drawn = [k for k, _ in out.images]
    assert len(drawn) == 2 + m and set(drawn[2:]) == set(t.column("thumb_key").to_pylist())
    assert ctx.asked == {ids[i] for i in chosen}
    # max_points at or above the count (or None) maps every image.
    for everything in (n, None):
        t = as_table(Embedding(EmbeddingParams(layers=["l"], methods=["pca"], max_points=everything,
                                               render=False)).reduce(inputs, ctx))
        assert t.column("image_id").to_pylist() == ids


def test_results_do_not_depend_on_block_size():
    x, labels = _blobs(per_class=20, seed=4)
    p = EmbeddingParams(layers=["l"], methods=["pca", "tsne"], max_points=25, render=False)
    whole = _inputs(x, labels)
    blocks = TableInputs(whole.tables, batch_rows=7)
    assert len(list(blocks.batches("layer=l"))) == 9  # 60 rows, 7 a block
    a = Embedding(p).reduce(whole, _ctx(60))
    b = Embedding(p).reduce(blocks, _ctx(60))
    assert as_table(a).num_rows == 2 * 25
    assert as_table(a).equals(as_table(b))


def test_duplicate_ids_and_ragged_features_fail_clearly():
    x, labels = _blobs(per_class=3)
    ids = [f"img{i:04d}" for i in range(9)]
    twice = _inputs(x, labels, ids=ids[:8] + ["img0001"])
    with pytest.raises(ValueError, match="listed more than once, e.g. 'img0001'"):
        Embedding(EmbeddingParams(layers=["l"], methods=["pca"])).reduce(twice, _ctx(9))
    ragged = TableInputs({"layer=l": pa.table({
        "image_id": pa.array(ids), "label": pa.array(labels),
        "feature": pa.array([list(v) for v in x[:8]] + [list(x[8, :5])], pa.list_(pa.float32())),
    })})
    with pytest.raises(ValueError, match="different lengths"):
        Embedding(EmbeddingParams(layers=["l"], methods=["pca"])).reduce(ragged, _ctx(9))


def test_memory_plan_follows_max_points_and_its_formula():
    total, d = 1000, 64
    inputs = _inputs(np.zeros((total, d), np.float32), np.zeros(total, np.int64))

    def plan(**params):
        return Embedding(EmbeddingParams(layers=["l"], **params)).memory_plan(inputs)

    small = plan(methods=["pca"], max_points=100)
    # Written out: features n d 4, scores n k 8 3, the exact SVD's U (n, min(n, d)) and Vt, ids, table rows.
    n, k = 100, 50
    expected = n * d * 4 + n * k * 8 * 3 + (n * d + d * d) * 4 + total * embedding.ID_BYTES + n * embedding.ROW_BYTES
    assert small.bytes == expected
    assert "100 x 64 sampled images (of 1,000) of l" in small.what and "max_points" in small.fix
    # t-SNE adds its neighbour graph: 3 x perplexity neighbours per point.
    with_tsne = plan(methods=["pca", "tsne"], max_points=100)
    assert with_tsne.bytes == expected + n * 90 * embedding.NEIGHBOUR_BYTES + n * embedding.ROW_BYTES
    sizes = [plan(methods=["pca"], max_points=m).bytes for m in (100, 400, 1000)]
    assert sizes[0] < sizes[1] < sizes[2] == plan(methods=["pca"], max_points=None).bytes
    assert "sampled" not in plan(methods=["pca"], max_points=None).what


def test_randomized_pca_agrees_with_the_exact_solver(monkeypatch):
    rng = np.random.default_rng(7)
    # Rank 4, well separated spectrum, off-centre; 300 x 60 is not tall enough for the covariance solver.
    x = (rng.normal(size=(300, 4)) * [9.0, 5.0, 2.0, 1.0]) @ np.linalg.qr(rng.normal(size=(60, 4)))[0].T + 3.0
    from sklearn.decomposition import PCA

    used = []
    fit_transform = PCA.fit_transform
    monkeypatch.setattr(PCA, "fit_transform", lambda self, x: used.append(self.svd_solver) or fit_transform(self, x))
    exact = _reduce(x, np.zeros(300, np.int64), methods=["pca"], render=False)
    monkeypatch.setattr(embedding, "RANDOMIZED_MIN_ENTRIES", 1000)
    fast = _reduce(x, np.zeros(300, np.int64), methods=["pca"], render=False)
    assert used == ["auto", "randomized"]  # what scikit-learn was asked for, as run.json says
    assert [r.stats["layers"]["l"]["pca_solver"] for r in (exact, fast)] == used
    a, b = _xy(as_table(exact)), _xy(as_table(fast))
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())
    np.testing.assert_allclose(a, _svd_scores(x.astype(np.float32)), atol=1e-4 * np.abs(a).max())


def test_threads_follow_the_point_count(monkeypatch):
    assert embedding.thread_count("auto", embedding.THREADS_MIN_POINTS - 1) == 1
    monkeypatch.setattr(embedding.os, "cpu_count", lambda: 6)
    assert embedding.thread_count("auto", embedding.THREADS_MIN_POINTS) == 6
    assert embedding.thread_count(3, 10) == 3
    import openTSNE

    asked = []

    class Recording(openTSNE.TSNE):
        def __init__(self, **kwargs):
            asked.append(kwargs["n_jobs"])
            super().__init__(**kwargs)

    monkeypatch.setattr(openTSNE, "TSNE", Recording)
    x, labels = _blobs(per_class=5)
    assert embedding.tsne(x, x[:, :2], 4.0, 0, threads=2).shape == (15, 2) and asked == [2]
    seen = []
    monkeypatch.setattr(embedding, "tsne", lambda reduced, start, perplexity, seed, threads: seen.append(threads)
                        or np.zeros((len(reduced), 2)))
    monkeypatch.setattr(embedding, "THREADS_MIN_POINTS", 10)
    out = _reduce(x, labels, methods=["tsne"], render=False)
    assert seen == [6] and out.stats["layers"]["l"]["threads"] == 6
    with pytest.raises(ValidationError):
        EmbeddingParams(layers=["l"], threads=0)
    with pytest.raises(ValidationError):
        EmbeddingParams(layers=["l"], max_points=3)
