"""The neighbours analysis: the blocked knn kernel and the whole analysis against brute force."""

from __future__ import annotations

import importlib.util

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from jobs.core.base import LocalContext, TableInputs
from jobs.dataset import neighbours
from jobs.dataset.neighbours import Neighbours, NeighboursParams, knn, search_exact
from tests.harness import as_table, normalise, run_local


def brute_force(q: np.ndarray, x: np.ndarray, k: int, metric: str, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Full float64 distance matrix, then per row (float32 distance, index) order."""
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    if metric == "cosine":
        def unit(a):
            n = np.linalg.norm(a, axis=1, keepdims=True)
            return a / np.where(n > 0, n, 1.0)
        # Elementwise products summed per pair, not a BLAS matmul: every pair is reduced the same
        # way, so copies of one vector get the same distance wherever they sit.
        d = 1.0 - (unit(q64)[:, None, :] * unit(x64)[None, :, :]).sum(-1)
    else:
        d = np.sqrt(((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1))
    d32 = d.astype(np.float32)
    n = len(x)
    k = min(k, n - 1 if exclude is not None else n)
    idx = np.zeros((len(q), k), np.int64)
    for r in range(len(q)):
        order = [j for j in np.lexsort((np.arange(n), d32[r])) if exclude is None or j != exclude[r]]
        idx[r] = order[:k]
    return np.take_along_axis(d, idx, 1), idx


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("block", [1, 3, 7, 1000])
def test_knn_matches_brute_force(metric, block):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(41, 6)).astype(np.float32)
    x[5] = 0.0  # a zero vector: cosine distance 1 to everything
    rows = np.array([0, 3, 5, 17, 40, 22, 9])
    dist, idx = knn(torch.from_numpy(x[rows]), torch.from_numpy(x), 4, metric, exclude=torch.from_numpy(rows),
                    block=block)
    ref_d, ref_i = brute_force(x[rows], x, 4, metric, exclude=rows)
    assert dist.dtype == torch.float32 and idx.shape == (7, 4)
    assert idx.tolist() == ref_i.tolist()
    np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-5, atol=1e-6)
    assert not (idx.numpy() == rows[:, None]).any()  # never the query itself
    # Outside queries (nothing excluded) may find any row.
    q = rng.normal(size=(5, 6)).astype(np.float32)
    dist, idx = knn(torch.from_numpy(q), torch.from_numpy(x), 6, metric, block=block)
    ref_d, ref_i = brute_force(q, x, 6, metric)
    assert idx.tolist() == ref_i.tolist()
    np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("block", [1, 3, 7, 1000])
def test_knn_duplicates_tie_to_the_lower_index(metric, block):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 5)).astype(np.float32) * 10
    x[12] = x[3]
    x[25] = x[3]
    rows = np.arange(30)
    dist, idx = knn(torch.from_numpy(x), torch.from_numpy(x), 5, metric, exclude=torch.from_numpy(rows), block=block)
    # A duplicated image finds its copies first, at distance 0, in index order.
    assert idx[3, :2].tolist() == [12, 25] and idx[12, :2].tolist() == [3, 25] and idx[25, :2].tolist() == [3, 12]
    assert dist[3, :2].tolist() == [0.0, 0.0] and dist[25, :2].tolist() == [0.0, 0.0]
    # Any other query sees the three copies at one distance, adjacent and in index order.
    for r in range(30):
        found = [j for j in idx[r].tolist() if j in (3, 12, 25)]
        assert found == sorted(found)
    near = torch.from_numpy(x[3] + 0.01 * rng.normal(size=(1, 5)).astype(np.float32))
    assert knn(near, torch.from_numpy(x), 3, metric, block=block)[1].tolist() == [[3, 12, 25]]
    # Equal distances in general: the lower index first.
    d, i = knn(torch.zeros(1, 1), torch.tensor([[2.0], [-1.0], [1.0], [-2.0]]), 4, "l2", block=block)
    assert i.tolist() == [[1, 2, 0, 3]] and d.tolist() == [[1.0, 1.0, 2.0, 2.0]]


def test_knn_k_larger_than_database():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [4.0, 4.0]])
    dist, idx = knn(x, x, 10, "l2", exclude=torch.arange(4), block=2)
    assert idx.shape == (4, 3)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [2, 1, 0]]
    assert dist[0].tolist() == pytest.approx([1.0, 3.0, np.sqrt(32)])
    assert knn(x, x, 10, "l2", block=3)[1].shape == (4, 4)  # nothing excluded: all of them
    assert knn(x[:1], x[:1], 3, "l2", exclude=torch.tensor([0]))[1].shape == (1, 0)
    with pytest.raises(ValueError, match="metric"):
        knn(x, x, 1, "manhattan")


class CountingContext(LocalContext):
    calls: int = 0

    def parallel_map(self, fn, items, shared=None, gpu=False):
        self.calls += 1
        self.items = len(items)
        return [fn(shared, item) for item in items]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_parallel_path_equals_inline(monkeypatch, metric):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(57, 9)).astype(np.float32)
    rows = np.sort(rng.choice(57, 23, replace=False))
    inline = CountingContext(model=torch.nn.Identity(), pixels={}, input_size=(1, 1), workers=3)
    d1, i1 = search_exact(x, rows, 4, metric, inline)
    assert inline.calls == 0  # small problems stay inline
    monkeypatch.setattr(neighbours, "PARALLEL_MIN", 1)
    monkeypatch.setattr(neighbours, "BLOCK", 5)
    spread = CountingContext(model=torch.nn.Identity(), pixels={}, input_size=(1, 1), workers=3)
    d2, i2 = search_exact(x, rows, 4, metric, spread)
    assert spread.calls == 1 and spread.items > 1
    assert i1.tolist() == i2.tolist()
    np.testing.assert_array_equal(d1, d2)
    assert i1.tolist() == brute_force(x[rows], x, 4, metric, exclude=rows)[1].tolist()


# -- the analysis end to end ------------------------------------------------------------------------------------

class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    pixels[7] = pixels[2]  # an exact duplicate
    ids = [f"img-{i:03d}" for i in range(30)]
    labels = [i % 3 if i % 5 else -1 for i in range(30)]
    return model, ids, pixels, labels


def expected_vectors(model, pixels, space, pixel_size):
    """Features and pixel vectors computed directly: one forward, plain pooling in numpy."""
    x = normalise(pixels)
    if space == "pixel":
        a = x.numpy()
        if pixel_size is None or pixel_size >= a.shape[2]:
            return a.reshape(len(a), -1)
        f = a.shape[2] // pixel_size  # whole-number factors: adaptive pooling is a block mean
        return a.reshape(len(a), 3, pixel_size, f, pixel_size, f).mean(axis=(3, 5)).reshape(len(a), -1)
    store = {}
    handle = model.conv2.register_forward_hook(lambda m, i, o: store.setdefault("a", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return store["a"].numpy().mean(axis=(2, 3))


def expected_table(model, ids, pixels, labels, p: NeighboursParams, rows):
    out = {c: [] for c in ["image_id", "label", "space", "rank", "neighbour_id", "distance", "key"]}
    for space in p.spaces:
        vectors = expected_vectors(model, pixels, space, p.pixel_size)
        metric = p.metric if space == "feature" else "l2"
        dist, idx = brute_force(vectors[rows], vectors, p.k, metric, exclude=rows)
        for q, r in enumerate(rows):
            for rank, (j, d) in enumerate(zip(idx[q], dist[q]), 1):
                out["image_id"].append(ids[r])
                out["label"].append(None if labels[r] < 0 else labels[r])
                out["space"].append(space)
                out["rank"].append(rank)
                out["neighbour_id"].append(ids[j])
                out["distance"].append(d)
                out["key"].append(f"{space}-{q:06d}")
    return out


@pytest.mark.parametrize("settings", [
    dict(layer="conv2", metric="cosine", k=4, pixel_size=8),
    dict(layer="conv2", metric="l2", k=3, pixel_size=None, queries={"sample": 7, "seed": 3}),
    dict(layer="conv2", k=5, queries=["img-011", "img-002", "img-029"]),
])
def test_analysis_matches_brute_force(data, settings):
    model, ids, pixels, labels = data
    p = NeighboursParams(**settings)
    analysis = Neighbours(p)
    out = run_local(analysis, model, ids, pixels, labels, batch_size=4)
    table = as_table(out)
    assert table.schema.field("label").type == pa.int64() and table.schema.field("rank").type == pa.int32()
    assert table.schema.field("distance").type == pa.float32()
    got = table.to_pydict()
    if p.queries == "all" or getattr(p.queries, "sample", 0) >= 30:  # the default sample holds them all
        rows = np.arange(30)
    elif isinstance(p.queries, list):
        rows = np.array([ids.index(q) for q in p.queries])
    else:
        rows = np.sort(np.random.default_rng(3).choice(30, 7, replace=False))
    want = expected_table(model, ids, pixels, labels, p, rows)
    for column in ["image_id", "label", "space", "rank", "neighbour_id", "key"]:
        assert got[column] == want[column], column
    np.testing.assert_allclose(got["distance"], want["distance"], rtol=1e-5, atol=1e-5)
    assert all(a != b for a, b in zip(got["image_id"], got["neighbour_id"]))
    assert out.stats["queries"] == len(rows) and "recall_at_k" not in out.stats
    # Batching does not change a thing.
    again = as_table(run_local(Neighbours(p), model, ids, pixels, labels, batch_size=7))
    assert again.equals(table)


def test_duplicate_image_is_the_first_neighbour(data):
    model, ids, pixels, labels = data
    out = run_local(Neighbours(NeighboursParams(layer="conv2", k=2, queries=["img-007"])), model, ids, pixels, labels)
    t = as_table(out).to_pydict()
    assert t["space"] == ["feature", "feature", "pixel", "pixel"]
    assert t["neighbour_id"][0] == t["neighbour_id"][2] == "img-002"
    assert t["distance"][0] == t["distance"][2] == 0.0


def test_strips(data):
    model, ids, pixels, labels = data
    p = NeighboursParams(layer="conv2", k=3, thumb=32, queries={"sample": 5, "seed": 1})
    out = run_local(Neighbours(p), model, ids, pixels, labels)
    images = list(out.images)
    keys = [k for k, _ in images]
    assert len(images) == 5 * 2  # one strip per query per space
    assert len(set(keys)) == len(keys) and not any("." in k or "/" in k for k in keys)
    assert set(keys) == set(as_table(out).column("key").to_pylist())
    pad, tile = 2, 32  # 16 px enlarged 2x to reach thumb
    for _, image in images:
        assert image.size == (pad + 4 * (tile + pad), pad + tile + pad)  # the query and k=3 neighbours
    # The first tile of a strip is the query itself, enlarged by whole pixels.
    first = np.asarray(images[0][1])[pad:pad + tile, pad:pad + tile]
    q = as_table(out).column("image_id")[0].as_py()
    assert (first == pixels[ids.index(q)].repeat(2, 0).repeat(2, 1)).all()
    quiet = run_local(Neighbours(NeighboursParams(layer="conv2", render=False)), model, ids, pixels, labels)
    assert "key" not in as_table(quiet).column_names and list(quiet.images) == []


def test_map_batch_partials(data):
    model, ids, pixels, labels = data
    from tests.harness import map_batches

    only_pixels = Neighbours(NeighboursParams(spaces=["pixel"], pixel_size=4))
    assert only_pixels.layers() == []  # no hooks for pixel space alone
    rows = map_batches(only_pixels, model, ids[:5], pixels[:5], labels[:5], batch_size=5)[0][""]
    assert set(rows) == {"image_id", "label", "pixel"}
    assert rows["pixel"].shape == (5, 3 * 4 * 4) and rows["pixel"].dtype == np.float32
    assert rows["label"].dtype == np.int64 and rows["label"].tolist() == labels[:5]
    both = Neighbours(NeighboursParams(layer="conv2", pool="max"))
    assert both.layers() == [(("layer",), "conv2")]
    rows = map_batches(both, model, ids[:5], pixels[:5], labels[:5], batch_size=5)[0][""]
    # The default pixel_size (32) is larger than the 16 px input: kept at 16, never enlarged.
    assert rows["feature"].shape == (5, 6) and rows["pixel"].shape == (5, 3 * 16 * 16)


def test_check_dataset_names_unknown_ids():
    ids = [f"img-{i:03d}" for i in range(10)]
    assert Neighbours(NeighboursParams(layer="x", queries=["img-001"])).check_dataset(ids) == []
    assert Neighbours(NeighboursParams(layer="x")).check_dataset(ids) == []
    wanted = ["img-001"] + [f"gone-{i}" for i in range(7)]
    [(path, message)] = Neighbours(NeighboursParams(layer="x", queries=wanted)).check_dataset(ids)
    assert path == ("queries",)
    assert "7 query id(s) not in the dataset" in message and "'gone-4'" in message
    assert "'gone-5'" not in message and "2 more" in message


def test_params_validation(monkeypatch):
    with pytest.raises(ValidationError, match="needs a layer"):
        NeighboursParams()
    NeighboursParams(spaces=["pixel"])  # pixel space needs no layer
    with pytest.raises(ValidationError, match="repeated: pixel"):
        NeighboursParams(spaces=["pixel", "pixel"])
    with pytest.raises(ValidationError):
        NeighboursParams(spaces=[])
    with pytest.raises(ValidationError):
        NeighboursParams(layer="x", k=0)
    with pytest.raises(ValidationError):
        NeighboursParams(layer="x", queries={"sample": 0})
    with pytest.raises(ValidationError):
        NeighboursParams(layer="x", queries={"sample": "5"})  # strict: no strings for numbers
    with pytest.raises(ValidationError):
        NeighboursParams(layer="x", queries={"n": 5})
    with pytest.raises(ValidationError, match="more than once"):
        NeighboursParams(layer="x", queries=["a", "b", "a"])
    assert NeighboursParams(layer="x", queries={"sample": 3}).queries.seed == 0
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    with pytest.raises(ValidationError, match=r"faiss-cpu package \(pip install 'convscope\[ann\]'\)"):
        NeighboursParams(layer="x", index="faiss")
    with pytest.raises(ValidationError, match=r"index 'faiss_ivf' needs the faiss-cpu package"):
        NeighboursParams(layer="x", index="faiss_ivf")
    with pytest.raises(ValidationError, match="nlist"):
        NeighboursParams(layer="x", nlist=0)
    with pytest.raises(ValidationError, match="nprobe"):
        NeighboursParams(layer="x", nprobe=0)


def test_faiss_recall_on_clustered_data():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(12, 16)) * 10
    x = (centres[rng.integers(0, 12, 600)] + rng.normal(size=(600, 16))).astype(np.float32)
    ids = [f"v{i:04d}" for i in range(600)]
    tables = {"": pa.table({"image_id": ids, "label": np.full(600, -1, np.int64),
                            "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 16)})}
    ctx = LocalContext(model=torch.nn.Identity(), pixels={}, input_size=(1, 1))
    for metric in ["cosine", "l2"]:
        p = NeighboursParams(spaces=["feature"], layer="x", metric=metric, k=5, index="faiss", recall_sample=200,
                             render=False)
        out = Neighbours(p).reduce(TableInputs(tables), ctx)
        assert out.stats["recall_at_k"]["feature"] >= 0.9
        t = out.tables[""].to_pydict()
        assert len(t["image_id"]) == 600 * 5
        assert all(a != b for a, b in zip(t["image_id"], t["neighbour_id"]))
        exact = Neighbours(p.model_copy(update={"index": "exact"})).reduce(TableInputs(tables), ctx)
        assert "recall_at_k" not in exact.stats


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_float32_screen_equals_float64_search(metric):
    """The screened search returns exactly what a float64 pass over every row returns."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(3000, 128)).astype(np.float32))
    rows = torch.arange(0, 3000, 7)
    dist, idx = knn(x[rows], x, 10, metric, exclude=rows, block=512)
    x64 = x.double()
    if metric == "cosine":
        x64 = torch.nn.functional.normalize(x64, dim=1)
    sq = (x64 * x64).sum(1)
    ref_d, ref_i = neighbours.exhaustive(x64[rows], x64, sq[rows], sq, 11, metric, 512)
    ref_d, ref_i = neighbours.drop_excluded(ref_d, ref_i, rows)
    assert idx.tolist() == ref_i.tolist()
    assert torch.equal(dist, ref_d)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_near_ties_the_float32_screen_cannot_order_are_searched_again(metric):
    # 60 rows whose distances to the query differ by far less than float32 rounding of the
    # screen (which sees them as one tie) but are distinct in float64, the nearest ones at
    # the highest indices: more near-ties than the screen keeps, so a result trusted to the
    # screen would be wrong; the bound check must send the query to the float64 search.
    rng = np.random.default_rng(4)
    n = 60
    offsets = 1e-5 * (1 + np.arange(n)[::-1] * 1e-3)  # distinct, nearest last
    x = np.zeros((n + 20, 3))
    x[:n, 0] = 1.0
    x[:n, 2] = offsets
    x[n:] = rng.normal(size=(20, 3)) + 5.0  # far rows
    q = np.array([[1.0, 0.0, 0.0]])
    ref_d, ref_i = brute_force(q, x, 5, metric)
    assert ref_i[0].tolist() == [n - 1, n - 2, n - 3, n - 4, n - 5]
    dist, idx = knn(torch.from_numpy(q), torch.from_numpy(x), 5, metric)
    assert idx.tolist() == ref_i.tolist()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_screen_blocks_do_not_change_the_result(metric, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[100:110] = x[7]  # exact duplicates: ties by index across screen blocks
    rows = np.arange(0, 300, 11)
    ref_d, ref_i = brute_force(x[rows], x, 6, metric, exclude=rows)
    for queries, elements in [(1, 7), (5, 64), (256, 2**22)]:
        monkeypatch.setattr(neighbours, "SCREEN_QUERIES", queries)
        monkeypatch.setattr(neighbours, "SCREEN_ELEMENTS", elements)
        dist, idx = knn(torch.from_numpy(x[rows]), torch.from_numpy(x), 6, metric, exclude=torch.from_numpy(rows))
        assert idx.tolist() == ref_i.tolist()
        np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-5, atol=1e-6)


class BlockContext(CountingContext):
    """Hands out copies on put/get, as an object store would: what the tasks see is never the driver's array."""

    def put(self, value):
        return np.array(value)

    def get(self, handle):
        view = handle.view()
        view.flags.writeable = False  # the object store's arrays are read-only
        return view


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("batch_rows, workers", [(1000, 1), (7, 1), (7, 3), (16, 2)])
def test_reduce_equals_float64_brute_force_at_every_block_size_and_worker_count(monkeypatch, metric, batch_rows,
                                                                               workers):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(61, 6)).astype(np.float32)
    x[40:43] = x[2]  # exact duplicates: ties by index across database blocks
    ids = [f"v{i:03d}" for i in range(61)]
    tables = {"": pa.table({"image_id": ids, "label": np.arange(61) % 4,
                            "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 6)})}
    monkeypatch.setattr(neighbours, "PARALLEL_MIN", 1)
    monkeypatch.setattr(neighbours, "BLOCK", 5)
    monkeypatch.setattr(neighbours, "DATABASE_BLOCK_BYTES", 1)  # each record batch a database block of its own
    ctx = BlockContext(model=torch.nn.Identity(), pixels={}, input_size=(1, 1), workers=workers)
    p = NeighboursParams(spaces=["feature"], layer="x", metric=metric, k=4, queries="all", render=False)
    out = Neighbours(p).reduce(TableInputs(tables, batch_rows=batch_rows), ctx)
    got = out.tables[""].to_pydict()
    ref_d, ref_i = brute_force(x, x, 4, metric, exclude=np.arange(61))
    assert got["neighbour_id"] == [ids[j] for j in ref_i.reshape(-1)]
    assert got["image_id"] == [i for i in ids for _ in range(4)]
    np.testing.assert_allclose(got["distance"], ref_d.reshape(-1), rtol=1e-5, atol=1e-6)
    assert ctx.calls == (1 if workers > 1 else 0)
    assert len(Neighbours(p).database(TableInputs(tables, batch_rows=batch_rows), "feature", ctx)[0]) == \
        -(-61 // batch_rows)  # the database really is in that many blocks


def test_rowblocks_take_across_blocks_equals_one_matrix():
    x = torch.arange(40.0).view(10, 4)
    db = neighbours.RowBlocks([x[:3], x[3:4], x[4:9], x[9:]])
    index = torch.tensor([[9, 0, 3], [4, 8, 2]])
    assert torch.equal(db.take(index), x[index]) and len(db) == 10
    assert [(s, len(c)) for s, c in db.chunks(2)] == [(0, 2), (2, 1), (3, 1), (4, 2), (6, 2), (8, 1), (9, 1)]


def test_strips_only_for_a_seeded_sample_of_the_queries(data):
    model, ids, pixels, labels = data
    p = NeighboursParams(layer="conv2", k=2, queries="all", strips=4, spaces=["feature"])
    out = run_local(Neighbours(p), model, ids, pixels, labels, batch_size=8)
    table = as_table(out).to_pydict()
    drawn = Neighbours(p).strip_positions(30)
    assert drawn.tolist() == sorted(np.random.default_rng(0).choice(30, 4, replace=False).tolist())
    keys = {k for k in table["key"] if k is not None}
    assert keys == {f"feature-{q:06d}" for q in drawn}
    assert out.stats["strips"] == 4 and len(table["image_id"]) == 30 * 2  # every query in the table
    assert NeighboursParams(layer="x").queries == neighbours.QuerySample(sample=1000, seed=0)


def test_memory_plan_counts_the_float32_database_and_refuses_over_the_budget():
    from pipeline.reduce import check_memory

    x = np.zeros((500, 64), np.float32)
    tables = {"": pa.table({"image_id": [str(i) for i in range(500)], "label": np.zeros(500, np.int64),
                            "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64),
                            "pixel": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(500 * 12, np.float32)),
                                                                       12)})}
    analysis = Neighbours(NeighboursParams(layer="x", k=5, queries={"sample": 100}))
    plan = analysis.memory_plan(TableInputs(tables))
    assert plan.bytes >= 500 * 64 * 4 and "500 x 64 (feature space)" in plan.what
    check_memory(analysis, TableInputs(tables), plan.bytes)  # at the budget: runs
    with pytest.raises(MemoryError, match=r"execution\.driver_memory.*queries: \{sample"):
        check_memory(analysis, TableInputs(tables), plan.bytes - 1)


def _vectors_table(x: np.ndarray) -> dict[str, pa.Table]:
    n, d = x.shape
    return {"": pa.table({"image_id": [f"v{i:04d}" for i in range(n)], "label": np.full(n, -1, np.int64),
                          "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)})}


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_faiss_ivf_probing_every_list_equals_exact_search(metric):
    pytest.importorskip("faiss")
    x = np.random.default_rng(11).normal(size=(400, 12)).astype(np.float32)  # no exact ties
    tables = _vectors_table(x)
    ctx = LocalContext(model=torch.nn.Identity(), pixels={}, input_size=(1, 1))
    p = NeighboursParams(spaces=["feature"], layer="x", metric=metric, k=6, queries="all", index="faiss_ivf",
                         nlist=8, nprobe=8, recall_sample=100, render=False)
    out = Neighbours(p).reduce(TableInputs(tables, batch_rows=64), ctx)  # the database in 7 blocks
    exact = Neighbours(p.model_copy(update={"index": "exact"})).reduce(TableInputs(tables), ctx)
    got, want = out.tables[""].to_pydict(), exact.tables[""].to_pydict()
    assert got["image_id"] == want["image_id"]
    # faiss ranks by its float32 distances, the exact search by float64: the two may order
    # neighbours whose distances agree to float32 rounding differently (one such pair here, at
    # 2.7779157 vs 2.7779159 in float64), and nowhere else.
    swapped = [i for i, (a, b) in enumerate(zip(got["neighbour_id"], want["neighbour_id"])) if a != b]
    assert len(swapped) <= 2
    np.testing.assert_allclose(got["distance"], want["distance"], rtol=1e-6, atol=1e-6)
    assert out.stats["recall_at_k"]["feature"] >= 0.99 and out.stats["ivf"] == {"feature": {"nlist": 8, "nprobe": 8}}
    assert "ivf" not in exact.stats


def test_faiss_ivf_recall_is_recorded_with_the_default_lists():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(12, 16)) * 10
    x = (centres[rng.integers(0, 12, 600)] + rng.normal(size=(600, 16))).astype(np.float32)
    ctx = LocalContext(model=torch.nn.Identity(), pixels={}, input_size=(1, 1))
    p = NeighboursParams(spaces=["feature"], layer="x", metric="l2", k=5, queries="all", index="faiss_ivf",
                         nprobe=4, recall_sample=200, render=False)
    out = Neighbours(p).reduce(TableInputs(_vectors_table(x)), ctx)
    assert out.stats["ivf"] == {"feature": {"nlist": 98, "nprobe": 4}}  # round(4 sqrt(600)) lists
    assert 0.5 <= out.stats["recall_at_k"]["feature"] < 1.0  # 4 of 98 lists: approximate, and said so
    t = out.tables[""].to_pydict()
    assert len(t["image_id"]) == 600 * 5 and all(a != b for a, b in zip(t["image_id"], t["neighbour_id"]))
    # The same lists and the same results on a second run (seeded sample and k-means).
    again = Neighbours(p).reduce(TableInputs(_vectors_table(x), batch_rows=100), ctx)
    assert again.tables[""].equals(out.tables[""]) and again.stats == out.stats


def test_ivf_lists_and_training_rows():
    assert neighbours.ivf_lists(1_000_000, None) == 4000  # about 4 sqrt(n)
    assert neighbours.ivf_lists(10**10, None) == neighbours.IVF_MAX_LISTS
    assert neighbours.ivf_lists(10, None) == 10 and neighbours.ivf_lists(100, 500) == 100  # never more than n
    assert neighbours.ivf_lists(1_000_000, 1024) == 1024
    assert neighbours.ivf_train_rows(1_000_000, 4000) == 4000 * neighbours.IVF_TRAIN_PER_LIST
    assert neighbours.ivf_train_rows(600, 98) == 600


def test_memory_plan_allows_for_the_ivf_index():
    n, d, k, q = 5000, 32, 5, 100
    tables = _vectors_table(np.zeros((n, d), np.float32))

    def plan(**params):
        return Neighbours(NeighboursParams(spaces=["feature"], layer="x", k=k, queries={"sample": q},
                                           **params)).memory_plan(TableInputs(tables)).bytes

    lists = round(4 * 5000 ** 0.5)  # 283
    train = min(n, neighbours.IVF_TRAIN_PER_LIST * lists)
    database = n * d * 4
    # Its copy and ids, centroids and training sample (twice each), a block being added, the queries.
    allowance = database + n * 8 + 2 * (lists + train) * d * 4 + 2 * database + q * (d * 4 * 2 + (k + 1) * 32)
    assert plan(index="faiss_ivf") - plan() == allowance
    assert plan(index="faiss_ivf", nlist=8) < plan(index="faiss_ivf")  # fewer lists train on fewer rows


def _tied_data(kind: str) -> np.ndarray:
    """Vectors with ties at the cut: random with copies, or small integers (many equal distances)."""
    rng = np.random.default_rng(7)
    if kind == "duplicates":
        x = rng.normal(size=(300, 8)).astype(np.float32)
        x[100:140] = x[5]  # 41 copies: more than k + the screen's margin
        x[200:203] = x[7]
        return x
    return rng.integers(-2, 3, size=(300, 3)).astype(np.float32)  # a few hundred distinct distances


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("kind", ["random", "duplicates", "grid"])
@pytest.mark.parametrize("k", [5, 30])
def test_faiss_screen_equals_float64_brute_force_and_the_torch_screen(metric, kind, k, monkeypatch):
    pytest.importorskip("faiss")
    x = np.random.default_rng(3).normal(size=(300, 8)).astype(np.float32) if kind == "random" else _tied_data(kind)
    rows = np.arange(len(x))
    xt, excl = torch.from_numpy(x), torch.from_numpy(rows)
    ref_d, ref_i = brute_force(x, x, k, metric, exclude=rows)
    got = {screen: knn(xt, xt, k, metric, exclude=excl, screen=screen) for screen in ("faiss", "torch", "auto")}
    for dist, idx in got.values():
        assert idx.tolist() == ref_i.tolist()
        np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["faiss"][0], got["torch"][0])  # the float64 pass fixes the values too
    # Small margins, several faiss calls over a database of many blocks: every fallback stage runs.
    monkeypatch.setattr(neighbours, "SCREEN_EXTRA", 1)
    monkeypatch.setattr(neighbours, "CHECK_EXTRA", 0)
    monkeypatch.setattr(neighbours, "FAISS_ELEMENTS", 8 * x.shape[1])
    db = neighbours.RowBlocks([xt[:90], xt[90:91], xt[91:]])
    for screen in ("faiss", "torch"):
        dist, idx = knn(xt, db, k, metric, exclude=excl, screen=screen, block=64)
        assert idx.tolist() == ref_i.tolist()
        assert torch.equal(dist, got["faiss"][0])
    # Outside queries, nothing excluded, exact copies of database rows among them.
    q = np.concatenate([x[[5, 7, 0]], np.random.default_rng(4).normal(size=(4, x.shape[1])).astype(np.float32)])
    ref_d, ref_i = brute_force(q, x, k, metric)
    for screen in ("faiss", "torch"):
        dist, idx = knn(torch.from_numpy(q), xt, k, metric, screen=screen)
        assert idx.tolist() == ref_i.tolist()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_faiss_screen_near_ties_fall_back_to_the_float64_search(metric):
    pytest.importorskip("faiss")
    # Rows closer together than the float32 screen can resolve: the float64 pass orders them.
    rng = np.random.default_rng(5)
    base = rng.normal(size=(1, 16)).astype(np.float32)
    x = np.repeat(base, 60, axis=0) + np.float32(1e-4) * rng.integers(-2, 3, size=(60, 16)).astype(np.float32)
    x = np.concatenate([x, rng.normal(size=(100, 16)).astype(np.float32)])
    rows = np.arange(len(x))
    ref_d, ref_i = brute_force(x, x, 4, metric, exclude=rows)
    faiss_d, faiss_i = knn(torch.from_numpy(x), torch.from_numpy(x), 4, metric, exclude=torch.from_numpy(rows),
                           screen="faiss")
    torch_d, torch_i = knn(torch.from_numpy(x), torch.from_numpy(x), 4, metric, exclude=torch.from_numpy(rows),
                           screen="torch")
    assert faiss_i.tolist() == torch_i.tolist() == ref_i.tolist()
    assert torch.equal(faiss_d, torch_d)


def test_screen_choice(monkeypatch):
    x = torch.from_numpy(np.random.default_rng(6).normal(size=(40, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="unknown screen 'gpu'"):
        knn(x, x, 3, "l2", screen="gpu")  # type: ignore[arg-type]
    monkeypatch.setattr(neighbours, "faiss_screen", lambda: None)
    with pytest.raises(ValueError, match=r"screen 'faiss' needs the faiss-cpu package"):
        knn(x, x, 3, "l2", screen="faiss")
    # Without faiss, auto is the torch screen.
    assert knn(x, x, 3, "l2")[1].tolist() == brute_force(x.numpy(), x.numpy(), 3, "l2")[1].tolist()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("screen", ["faiss", "torch"])
def test_knn_near_ties_at_the_cut_are_screened_again_with_more_candidates(metric, screen, monkeypatch):
    # The first screen keeps one candidate beyond the width: a query whose width-th and next
    # rows are closer than float32 rounding (12 near-ties, distinct in float64, the nearest at
    # the highest indices, and exact copies among them) cannot be settled by it, and a result
    # trusted to it would be wrong. The second screen (more candidates) must find them all.
    if screen == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(8)
    ties = 12
    x = np.zeros((ties + 200, 3))
    x[:ties, 0] = 1.0
    x[:ties, 2] = 1e-5 * (1 + np.arange(ties)[::-1] * 1e-3)  # distinct, nearest last
    x[3] = x[9]  # exact copies: tied in float64 too, the lower index first
    x[ties:] = rng.normal(size=(200, 3)) + 5.0  # far rows
    q = np.concatenate([[[1.0, 0.0, 0.0]], x[ties:ties + 20] + 1e-3 * rng.normal(size=(20, 3))])
    calls: list[int] = []
    search = neighbours._Pass.search

    def spy(self, queries, c, first, found=None):
        calls.append(c)
        return search(self, queries, c, first, found)

    monkeypatch.setattr(neighbours._Pass, "search", spy)
    for k in (3, 5, 8):
        calls.clear()
        ref_d, ref_i = brute_force(q, x, k, metric)
        dist, idx = knn(torch.from_numpy(q), torch.from_numpy(x), k, metric, screen=screen)
        assert idx.tolist() == ref_i.tolist()
        np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-5, atol=1e-6)
        assert calls == [k + neighbours.SCREEN_FIRST, k + neighbours.SCREEN_EXTRA]  # both screens ran
    # Every row as a query, itself excluded: 10 rows around one point, closer together than
    # the screen resolves (exact copies among them), among random rows.
    base = rng.normal(size=(1, 8))
    y = np.concatenate([base + 1e-4 * rng.integers(-2, 3, size=(10, 8)), rng.normal(size=(150, 8))])
    y[[4, 7]] = y[2]
    rows = np.arange(len(y))
    ref_d, ref_i = brute_force(y, y, 4, metric, exclude=rows)
    dist, idx = knn(torch.from_numpy(y), torch.from_numpy(y), 4, metric, exclude=torch.from_numpy(rows), screen=screen)
    assert idx.tolist() == ref_i.tolist()
    np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("kind", ["random", "duplicates", "grid"])
def test_mutual_screen_of_a_database_against_itself_equals_float64_brute_force(metric, kind, monkeypatch):
    # Queries that are the database itself are screened from each pair's product once, both
    # ways: small strips (many, ragged last ones, the diagonal inside one), copies and near-ties
    # across them.
    pytest.importorskip("faiss")
    x = np.random.default_rng(9).normal(size=(300, 8)).astype(np.float32) if kind == "random" else _tied_data(kind)
    monkeypatch.setattr(neighbours, "MUTUAL_MIN", 1)
    monkeypatch.setattr(neighbours, "MUTUAL_BLOCK", 37)
    monkeypatch.setattr(neighbours, "MUTUAL_ELEMENTS", 37 * 50)  # strips of 50 columns
    used: list[bool] = []
    mutual = neighbours._screen_mutual

    def spy(*args):
        found = mutual(*args)
        used.append(found is not None)
        return found

    monkeypatch.setattr(neighbours, "_screen_mutual", spy)
    rows = np.arange(len(x))
    xt = torch.from_numpy(x)
    for k in (1, 5, 30):
        ref_d, ref_i = brute_force(x, x, k, metric, exclude=rows)
        dist, idx = knn(xt, xt, k, metric, exclude=torch.from_numpy(rows))
        assert idx.tolist() == ref_i.tolist()
        np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-5, atol=1e-6)
        # The same vectors in another tensor take the plain screen, to the same result.
        other = knn(xt.clone(), xt, k, metric, exclude=torch.from_numpy(rows))
        assert torch.equal(other[0], dist) and torch.equal(other[1], idx)
        assert used[-2:] == [True, False]
        # Every row of a database against all of it: one mutual search.
        found = neighbours.knn_database(neighbours.RowBlocks([xt]), rows, k, metric)
        assert found[1].tolist() == ref_i.tolist() and used[-1]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("screen", ["faiss", "torch"])
def test_first_screen_checks_its_extra_candidates_where_the_cut_is_a_near_tie(metric, screen, monkeypatch):
    # The float64 pass of the first screen looks at the width + CHECK_FIRST best candidates,
    # then at all of them for the queries where the next one screened within the rounding
    # bound: rows 1e-4 apart (and exact copies, a zero vector) around the cut must come out
    # as the float64 brute force orders them, without a second screen when the extra
    # candidates settle them.
    if screen == "faiss":
        pytest.importorskip("faiss")
    monkeypatch.setattr(neighbours, "MUTUAL_MIN", 1)
    rng = np.random.default_rng(12)
    base = rng.normal(size=(1, 6))
    near = base + 1e-4 * rng.integers(-3, 4, size=(6, 6))
    x = np.concatenate([near, near[:2], rng.normal(size=(120, 6)) * 3, np.zeros((1, 6))]).astype(np.float32)
    calls: list[tuple[int, int]] = []
    search = neighbours._Pass.search

    def spy(self, queries, c, first, found=None):
        calls.append((c, first))
        return search(self, queries, c, first, found)

    monkeypatch.setattr(neighbours._Pass, "search", spy)
    rows = np.arange(len(x))
    xt = torch.from_numpy(x)
    for k in (3, 4, 7):
        calls.clear()
        ref_d, ref_i = brute_force(x, x, k, metric, exclude=rows)
        dist, idx = knn(xt, xt, k, metric, exclude=torch.from_numpy(rows), screen=screen)
        assert idx.tolist() == ref_i.tolist()
        np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-5, atol=1e-6)
        width = k + 1
        assert calls[0] == (width + neighbours.SCREEN_FIRST, width + neighbours.CHECK_FIRST)
        # Queries as a copy (no mutual screen), and against the database without exclusion.
        other = knn(xt.clone(), xt, k, metric, exclude=torch.from_numpy(rows), screen=screen)
        assert torch.equal(other[0], dist) and torch.equal(other[1], idx)
        ref_d, ref_i = brute_force(x[:10], x, k, metric)
        assert knn(xt[:10], xt, k, metric, screen=screen)[1].tolist() == ref_i.tolist()


@pytest.mark.parametrize("d", [1, 7, 64, 257])
def test_candidates_divided_by_row_lengths_are_bit_for_bit_unit64(d):
    # The float64 check normalises gathered cosine candidates by their rows' lengths: the
    # values must be exactly unit64's (ties and near-ties are ordered on them), zero rows,
    # tiny and huge ones, and rows from several blocks included.
    rng = np.random.default_rng(13)
    x = torch.from_numpy((rng.normal(size=(600, d)) * np.logspace(-18, 18, 600)[:, None]).astype(np.float32))
    x[[3, 400]] = 0.0
    db = neighbours.RowBlocks([x[:250], x[250:251], x[251:]])
    lengths = neighbours.row_lengths(db)
    cand = torch.from_numpy(rng.integers(0, len(x), size=(90, 13)))
    cand[0, :3] = torch.tensor([3, 400, 250])
    q = neighbours.unit64(x[:90], "cosine")
    q_sq = (q * q).sum(dim=1)
    x_sq = neighbours.squared_norms(db, "cosine")
    got = neighbours._exact(q, db, q_sq, x_sq, cand, "cosine", lengths)
    assert torch.equal(got, neighbours._exact(q, db, q_sq, x_sq, cand, "cosine"))
    assert torch.equal(db.take(cand).double() / lengths[cand][..., None],
                       neighbours.unit64(db.take(cand), "cosine"))
