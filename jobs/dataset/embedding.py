"""``embedding``: images as points in the plane, by PCA, t-SNE or UMAP of a layer's features.

Maps of a dataset in a CNN's feature space: images the layer finds alike land close together.
``pca`` is the linear projection on the two leading principal components; ``tsne`` is t-SNE
(van der Maaten & Hinton 2008, "Visualizing Data using t-SNE"), computed by openTSNE with
FFT-accelerated interpolation of the gradient (Linderman et al. 2019) from 10,000 images and
Barnes-Hut below (openTSNE's own rule: faster there); ``umap`` is UMAP (McInnes et al. 2018,
"UMAP: Uniform Manifold Approximation and Projection"), computed by umap-learn.

Example manifest entry::

    - type: embedding
      layers: [layer3]
      methods: [pca, tsne]   # pca | tsne | umap
      pool: avg              # avg | max | grid | none, as in ``features``
      seed: 0
      max_points: 10000      # a layer with more images maps a seeded sample of 10,000 (null: all)
      threads: auto          # t-SNE threads: 1 below 20,000 points, every core from there
      pca_dims: 50           # t-SNE and UMAP run on the features reduced to 50 principal components
      perplexity: 30         # t-SNE; at most (images - 1) / 3
      n_neighbors: 15        # UMAP; at most images - 1
      min_dist: 0.1          # UMAP
      atlas_cells: 32        # the atlas: a 32 x 32 grid of thumbnails laid over the map
      thumb: 32              # px per atlas cell and per image thumbnail
      thumbs: true           # a thumbnail of every mapped image (for the report's hover)

Table ``embedding/part-*.parquet``: ``image_id``, ``label``, ``x``, ``y``, ``method``,
``layer``, and with ``render`` the ``scatter_key``/``scatter_shard`` (points coloured by
label) and ``atlas_key``/``atlas_shard`` (each grid cell shows the image nearest its centre)
of the layer and method, and with ``thumbs`` the image's own thumbnail
``thumb_key``/``thumb_shard``. Rows by layer (manifest order), method, image id.

Sampling: a layer with more than ``max_points`` images maps a seeded random sample of
``max_points`` of them (``seed``; drawn from the images sorted by id, as a ``sample`` of the
same size and seed elsewhere draws, and kept in id order). The table, the scatter plots, the
atlases and the thumbnails then hold only the sampled images; run.json gives per layer the
``points`` mapped and the ``total`` the layer has. Features are read a block at a time and
only the sampled rows are kept, in one float32 (points, dims) array: the driver holds about
points x dims x 4 bytes, whatever the dataset's size (``memory_plan`` says how much first).

Determinism: rows are sorted by image id before anything is computed, so coordinates do not
depend on dataset order or batching, and a seed gives the same map on every machine.

* PCA is scikit-learn's, with an exact solver: the covariance's eigenvectors when there are
  at least ten times as many points as dims (at most 1,000), as scikit-learn's own rule picks,
  else the SVD; or, above 2**26 matrix entries (points x dims) and not tall and narrow, its
  randomized solver with ``random_state=seed`` (close to the exact leading components, far
  faster and leaner). Every component's sign is fixed: its loading of largest magnitude is
  positive, so maps never flip between runs.
* t-SNE starts from the PCA map scaled to standard deviation 1e-4 plus seeded jitter (what
  openTSNE's ``initialization="pca"`` does, from the sign-fixed PCA above), with
  ``random_state=seed``.
* UMAP uses its spectral initialisation with ``random_state=seed``, which makes umap-learn run
  single-threaded: it stays so, whatever ``threads`` says, for reproducibility.

Threads trade exactness for speed: with one thread t-SNE is bit-reproducible, with several
the gradient's sums (and the neighbour index) are rounded in a varying order, so maps agree
only to about the rounding, not bit for bit. ``threads: auto`` therefore uses one thread
below 20,000 points, where t-SNE is quick anyway, and every core from there, where one thread
is several times slower; give ``threads: 1`` for bit-identical large maps.

As usual, t-SNE and UMAP run on the features reduced to ``pca_dims`` principal components
(fewer when the dataset or the layer has fewer): the neighbour search is faster and less
noisy, and pairwise distances barely change. For small datasets ``perplexity`` is lowered to
(n - 1) / 3 and ``n_neighbors`` to n - 1 (the values used go to run.json).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, field_validator

from jobs.core.base import (
    AnalysisParams,
    DistinctLayers,
    Images,
    MapBatch,
    MemoryPlan,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rendered,
    Rows,
    image_key,
    listed_twice,
    register,
    safe_key,
)
from jobs.core.kernels import logged_warnings, pooled_features, pooled_features_schema, read_sample
from jobs.core.render import atlas, atlas_cells, scatter

Method = Literal["pca", "tsne", "umap"]

# From this many images t-SNE uses the FFT-interpolated gradient (O(n)); below it, Barnes-Hut
# (O(n log n)) is several times faster, as openTSNE's own "auto" rule says.
FFT_MIN_POINTS = 10_000

# Fewest images each method can map: two principal components need three points; umap-learn's
# spectral initialisation needs more points than the embedding has dimensions plus one.
MIN_POINTS: dict[str, int] = {"pca": 3, "tsne": 3, "umap": 4}

# Above this many matrix entries (points x dims, 256 MiB of float32) PCA uses the randomized
# solver: the exact SVD's time grows as n d^2 and it holds a second (n, d) factor.
RANDOMIZED_MIN_ENTRIES = 2**26
# Tall and narrow matrices (n >= 10 d, d <= 1,000) use the covariance's eigenvectors at any size:
# exact, one pass over the matrix and a (d, d) matrix of work (scikit-learn's own "auto" rule).
COVARIANCE_MAX_DIMS = 1_000

# From this many points ``threads: auto`` runs t-SNE on every core (below, one: bit-reproducible).
THREADS_MIN_POINTS = 20_000

# Estimates for memory_plan. Per image of a layer: its id in Arrow, the id-sorted copy that
# finds duplicates, and the sort order (ids of ~40 characters).
ID_BYTES = 128
# Per row of the output table, while it is built: the id, label, coordinates, names and keys.
ROW_BYTES = 256
# Per neighbour of a point in t-SNE's affinities or UMAP's graph: index and distance of the
# search, and the symmetrised sparse matrix made from them.
NEIGHBOUR_BYTES = 32


def _default_methods() -> list[Method]:
    return ["pca", "tsne"]


class EmbeddingParams(AnalysisParams):
    layers: DistinctLayers
    methods: list[Method] = Field(default_factory=_default_methods, min_length=1)
    pool: Literal["avg", "max", "grid", "none"] = "avg"
    grid: int = Field(default=2, ge=1, description="cells per side when pool is 'grid'")
    seed: int = 0
    max_points: int | None = Field(
        default=10_000, ge=max(MIN_POINTS.values()),
        description="a layer with more images maps a seeded sample (seed) of this many, and the table, plots and "
                    "thumbnails hold only those; None: every image")
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="t-SNE threads; 'auto': 1 (bit-reproducible) below 20,000 points, every core from there. "
                    "UMAP is seeded, hence single-threaded, whatever this says")
    pca_dims: int = Field(default=50, ge=2, description="principal components t-SNE and UMAP start from")
    perplexity: float = Field(default=30.0, gt=0, description="t-SNE; lowered to (n - 1) / 3 for small n")
    n_neighbors: int = Field(default=15, ge=2, description="UMAP; lowered to n - 1 for small n")
    min_dist: float = Field(default=0.1, ge=0, le=1, description="UMAP; at most its spread (1)")
    render: bool = True
    atlas_cells: int = Field(default=32, ge=1, description="cells per side of the atlas grid")
    thumb: int = Field(default=32, ge=1, description="px per atlas cell and per image thumbnail")
    thumbs: bool = Field(default=True, description="store a thumbnail of every mapped image (needs render)")

    @field_validator("layers")
    @classmethod
    def _distinct_keys(cls, layers: list[str]) -> list[str]:
        # Image keys are built from safe_key(layer); two layers must not share one.
        keys: dict[str, str] = {}
        for name in layers:
            other = keys.setdefault(safe_key(name), name)
            if other != name:
                raise ValueError(f"layers {other!r} and {name!r} give the same image key {safe_key(name)!r}")
        return layers

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, methods: list[str]) -> list[str]:
        twice = listed_twice(methods)
        if twice:
            raise ValueError(f"each method may be listed once; repeated: {', '.join(twice)}")
        return methods


def pca_solver(n: int, d: int) -> Literal["auto", "covariance_eigh", "randomized"]:
    """scikit-learn's PCA solver for an (n, d) matrix: its own ``auto`` up to RANDOMIZED_MIN_ENTRIES
    entries (so small runs map as they always did), then the covariance's eigenvectors for a tall,
    narrow matrix (exact, one pass, d x d memory) or the randomized SVD (``random_state=seed``).
    """
    if n * d <= RANDOMIZED_MIN_ENTRIES:
        return "auto"
    return "covariance_eigh" if d <= COVARIANCE_MAX_DIMS and n >= 10 * d else "randomized"


def principal_components(features: np.ndarray, dims: int, seed: int = 0,
                         overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scores on the leading ``dims`` principal components (N, k) and their explained variance ratios.

    k = min(dims, N, D). The solver is :func:`pca_solver`'s: exact (SVD or the covariance's
    eigenvectors), or scikit-learn's randomized SVD (``random_state=seed``) for large
    matrices. Each component's sign is fixed so that its loading of largest magnitude (the
    first, on ties) is positive.
    ``overwrite`` lets scikit-learn centre ``features`` in place (no copy of the matrix).
    """
    from sklearn.decomposition import PCA

    n, d = features.shape
    k = min(dims, n, d)
    pca = PCA(n_components=k, svd_solver=pca_solver(n, d), random_state=seed, copy=not overwrite)
    scores = pca.fit_transform(features)
    components = pca.components_
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    signs[signs == 0] = 1.0
    ratio = np.nan_to_num(pca.explained_variance_ratio_, nan=0.0)
    return scores * signs, ratio


def thread_count(threads: int | Literal["auto"], points: int) -> int:
    """t-SNE threads for ``points`` points: ``threads``, or for "auto" 1 below THREADS_MIN_POINTS, else all cores."""
    if threads != "auto":
        return threads
    return 1 if points < THREADS_MIN_POINTS else os.cpu_count() or 1


def tsne(reduced: np.ndarray, start: np.ndarray, perplexity: float, seed: int = 0, threads: int = 1) -> np.ndarray:
    """t-SNE coordinates (N, 2) of ``reduced`` features, starting from the 2-D map ``start``.

    ``start`` is scaled to standard deviation 1e-4 and jittered (seeded), as openTSNE's own
    PCA initialisation does; a map with no spread starts from seeded random points instead.
    With one thread the result is bit-reproducible; more change the rounding of the gradient.
    """
    import openTSNE
    from openTSNE.initialization import jitter, random, rescale

    start = np.asarray(start, np.float64)
    if np.std(start[:, 0]) > 0:
        init = jitter(rescale(start), random_state=seed)
    else:
        init = random(len(start), n_components=2, random_state=seed)
    embedding = openTSNE.TSNE(
        n_components=2,
        perplexity=perplexity,
        initialization=init,
        negative_gradient_method="fft" if len(start) >= FFT_MIN_POINTS else "bh",
        random_state=seed,
        n_jobs=threads,
        verbose=False,
    ).fit(np.ascontiguousarray(reduced, dtype=np.float64))
    return np.asarray(embedding, np.float64)


def umap_2d(reduced: np.ndarray, n_neighbors: int, min_dist: float, seed: int = 0) -> np.ndarray:
    """UMAP coordinates (N, 2) of ``reduced`` features (spectral initialisation, seeded).

    Single-threaded: umap-learn runs so whenever ``random_state`` is set (and warns when asked
    for more threads), and the seed is what makes the map reproducible.
    """
    import umap  # slow to import (numba compiles it): only when asked for

    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, init="spectral",
                        random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(np.ascontiguousarray(reduced, dtype=np.float32)), np.float64)


def check_count(n: int, methods: Sequence[str], layer: str) -> None:
    """ValueError naming the method and the image count when there are too few images to map."""
    for method in methods:
        if n < MIN_POINTS[method]:
            raise ValueError(f"embedding method {method!r} needs at least {MIN_POINTS[method]} images; "
                             f"layer {layer!r} has {n}")


def kept_count(total: int, max_points: int | None) -> int:
    """How many of a layer's ``total`` images are mapped."""
    return total if max_points is None else min(total, max_points)


def planned_bytes(total: int, n: int, d: int, params: EmbeddingParams) -> int:
    """The driver memory one layer needs at its peak: ``total`` images, ``n`` of them mapped, ``d`` dims.

    Kept float32 features (n d 4, centred in place by PCA); PCA scores and their float64
    copies (n k 8 3, k the components kept), plus the SVD's (n, min(n, d)) and (min(n, d), d)
    float32 factors or the covariance's two (d, d) float32 matrices; t-SNE's or UMAP's
    neighbour graph, the larger (NEIGHBOUR_BYTES per neighbour); the ids and sort order of
    every image of the layer (ID_BYTES each); the output table's rows of every layer and
    method (ROW_BYTES each). Pixels decoded for the atlas and the thumbnails (a chunk at a
    time) are not counted: their size depends on the input size.
    """
    p = params
    k = min(p.pca_dims, n, d)
    size = n * d * 4 + n * k * 8 * 3
    solver = pca_solver(n, d)
    if solver == "auto":  # at most what an exact SVD holds (scikit-learn's own choice, small inputs)
        size += (n * min(n, d) + min(n, d) * d) * 4
    elif solver == "covariance_eigh":
        size += 2 * d * d * 4
    neighbours = 0
    if "tsne" in p.methods:
        neighbours = max(neighbours, min(n - 1, int(3 * min(p.perplexity, (n - 1) / 3))))
    if "umap" in p.methods:
        neighbours = max(neighbours, min(p.n_neighbors, n - 1))
    size += n * max(neighbours, 0) * NEIGHBOUR_BYTES
    size += total * ID_BYTES + n * len(p.methods) * len(p.layers) * ROW_BYTES
    return size


def embed(features: np.ndarray, params: EmbeddingParams, layer: str = "",
          log: Callable[[str], None] | None = None, overwrite: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Coordinates (N, 2) float32 by every method of ``params``, and what was used (for run.json).

    One PCA serves all methods: its first two components are the ``pca`` map and the start
    of t-SNE; its first ``pca_dims`` are the input of t-SNE and UMAP. ``overwrite``: PCA may
    centre ``features`` in place (the caller no longer needs them).
    """
    n, d = features.shape
    check_count(n, params.methods, layer)
    if d < 2:
        raise ValueError(f"embedding needs features of at least 2 dimensions; layer {layer!r} gives {d}")
    say = log or (lambda message: None)
    info: dict = {"pca_solver": pca_solver(n, d)}
    # What the libraries warn about (a failed spectral start, zero variance) goes to the log, once.
    with logged_warnings(say, f"embedding: layer {layer!r}: "):
        scores, ratio = principal_components(features, params.pca_dims, params.seed, overwrite=overwrite)
        info["explained_variance_ratio"] = [float(r) for r in ratio[:2]]
        coords: dict[Method, np.ndarray] = {}
        for method in params.methods:
            if method == "pca":
                coords[method] = scores[:, :2]
            elif method == "tsne":
                perplexity = min(params.perplexity, (n - 1) / 3)
                threads = thread_count(params.threads, n)
                info["perplexity"], info["threads"] = perplexity, threads
                coords[method] = tsne(scores, scores[:, :2], perplexity, params.seed, threads)
            else:
                k = min(params.n_neighbors, n - 1)
                info["n_neighbors"] = k
                coords[method] = umap_2d(scores, k, params.min_dist, params.seed)
    if ratio.sum() == 0:
        say(f"embedding: layer {layer!r}: every image has the same features; the maps show no structure")
    for method, xy in coords.items():
        if not np.isfinite(xy).all():
            raise ValueError(f"embedding method {method!r} gave non-finite coordinates for layer {layer!r}")
    return {m: xy.astype(np.float32) for m, xy in coords.items()}, info


@register
class Embedding(ReduceAnalysis):
    """2-D maps of the dataset from each layer's pooled features, with scatter plots and atlases."""

    Params = EmbeddingParams
    params: EmbeddingParams

    def schema(self) -> dict[str, pa.Schema]:
        return pooled_features_schema(self.params.layers)

    def map_batch(self, batch: MapBatch) -> Rows:
        return pooled_features(batch, self.params.layers, self.params.pool, self.params.grid)

    def memory_plan(self, inputs: ReduceInputs) -> MemoryPlan | None:
        """The peak of the layer that needs most (:func:`planned_bytes`), named by its sampled features."""
        p = self.params
        worst: tuple[int, str, int, int, int] | None = None
        partitions = set(inputs.partitions())
        for layer in p.layers:
            partition = f"layer={layer}"
            if partition not in partitions:
                continue
            total = inputs.rows(partition)
            n, d = kept_count(total, p.max_points), inputs.width(partition, "feature")
            size = planned_bytes(total, n, d, p)
            if worst is None or size > worst[0]:
                worst = (size, layer, n, d, total)
        if worst is None:
            return None
        size, layer, n, d, total = worst
        which = f"sampled images (of {total:,})" if n < total else "images"
        what = f"the float32 features of {n:,} x {d:,} {which} of {layer}, with their PCA"
        if p.max_points is None:
            fix = "Set max_points (e.g. 10000) to map a sample, or pool the layer to fewer dimensions"
        else:
            fix = f"Lower max_points (now {p.max_points:,}), or pool the layer to fewer dimensions"
        return MemoryPlan(bytes=size, what=what, fix=fix)

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        p = self.params
        columns: dict[str, list[np.ndarray]] = {k: [] for k in ("image_id", "label", "x", "y", "method", "layer")}
        keys: dict[str, list[np.ndarray]] = {"scatter_key": [], "atlas_key": []}
        maps: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        stats: dict = {"points": 0}
        for layer in p.layers:
            ids, labels, features, total = read_sample(inputs, layer, p.max_points, p.seed)
            coords, info = embed(features, p, layer, ctx.log, overwrite=True)
            del features  # centred in place by PCA; the next layer's take its place
            stats["points"] = len(ids)
            stats.setdefault("layers", {})[layer] = {"points": len(ids), "total": total, **info}
            for method in p.methods:
                xy = coords[method]
                n = len(ids)
                columns["image_id"].append(ids)
                columns["label"].append(labels)
                columns["x"].append(xy[:, 0])
                columns["y"].append(xy[:, 1])
                columns["method"].append(np.full(n, method, dtype=object))
                columns["layer"].append(np.full(n, layer, dtype=object))
                prefix = f"{safe_key(layer)}-{method}"
                keys["scatter_key"].append(np.full(n, f"{prefix}-scatter", dtype=object))
                keys["atlas_key"].append(np.full(n, f"{prefix}-atlas", dtype=object))
                maps.append((prefix, ids, labels, xy))
        labels_all = np.concatenate(columns["label"])
        table = {
            "image_id": pa.array(np.concatenate(columns["image_id"]).tolist(), pa.string()),
            "label": pa.array(labels_all, pa.int64(), mask=labels_all < 0),
            "x": pa.array(np.concatenate(columns["x"]), pa.float32()),
            "y": pa.array(np.concatenate(columns["y"]), pa.float32()),
            "method": pa.array(np.concatenate(columns["method"]).tolist(), pa.string()),
            "layer": pa.array(np.concatenate(columns["layer"]).tolist(), pa.string()),
        }
        if p.render:
            for name, parts in keys.items():
                table[name] = pa.array(np.concatenate(parts).tolist(), pa.string())
            if p.thumbs:
                table["thumb_key"] = pa.array([thumb_key(i) for i in table["image_id"].to_pylist()], pa.string())
        images = self._render(maps, ctx) if p.render else ()
        return ReduceOutput(tables={"": pa.table(table)}, images=images, stats=stats)

    def _render(self, maps: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], ctx: ReduceContext) -> Rendered:
        """Scatter plot and atlas of every (layer, method), then one thumbnail per mapped image:
        items the runner draws in tasks (a map's ids, labels and coordinates; a chunk of ids)."""
        p = self.params
        items: list[tuple] = [("map", prefix, ids, labels, xy) for prefix, ids, labels, xy in maps]
        if p.thumbs and maps:
            # One thumbnail per mapped image: every image some layer's map (hence a table row) shows.
            ids = sorted(set().union(*(ids for _, ids, _, _ in maps)))
            items += [("thumbs", ids[s:s + THUMB_CHUNK]) for s in range(0, len(ids), THUMB_CHUNK)]
        return Rendered(draw_maps, items, (ctx.label_names, p.atlas_cells, p.thumb), ctx.images)


# Thumbnails decoded and drawn together.
THUMB_CHUNK = 512


def thumb_key(image_id: str) -> str:
    return image_key(image_id, "thumb")


def draw_maps(shared: tuple[list[str] | None, int, int], item: tuple, images: Images
              ) -> Iterator[tuple[str, Image.Image]]:
    """One item: ("map", prefix, ids, labels, xy) draws that map's scatter plot and atlas;
    ("thumbs", ids) a thumbnail of each image at ``thumb`` px (its longer side)."""
    label_names, cells, side = shared
    if item[0] == "map":
        _, prefix, ids, labels, xy = item
        yield f"{prefix}-scatter", scatter(xy, labels, label_names)
        chosen = atlas_cells(xy, cells)
        pixels = images([ids[i] for i in chosen.values()])
        # An image that no longer decodes leaves its cell empty rather than failing the atlas.
        thumbs = {cell: pixels[ids[i]] for cell, i in chosen.items() if ids[i] in pixels}
        yield f"{prefix}-atlas", atlas(thumbs, cells, cell=side)
        return
    for image_id, px in images(item[1]).items():
        image = Image.fromarray(px)
        image.thumbnail((side, side))
        yield thumb_key(image_id), image
