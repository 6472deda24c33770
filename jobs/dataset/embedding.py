"""``embedding``: every image as a point in the plane, by PCA, t-SNE or UMAP of a layer's features.

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
      pca_dims: 50           # t-SNE and UMAP run on the features reduced to 50 principal components
      perplexity: 30         # t-SNE; at most (images - 1) / 3
      n_neighbors: 15        # UMAP; at most images - 1
      min_dist: 0.1          # UMAP
      atlas_cells: 32        # the atlas: a 32 x 32 grid of thumbnails laid over the map
      thumb: 32              # px per atlas cell and per image thumbnail
      thumbs: true           # a thumbnail of every image (for the report's hover)

Table ``embedding/part-*.parquet``: ``image_id``, ``label``, ``x``, ``y``, ``method``,
``layer``, and with ``render`` the ``scatter_key``/``scatter_shard`` (points coloured by
label) and ``atlas_key``/``atlas_shard`` (each grid cell shows the image nearest its centre)
of the layer and method, and with ``thumbs`` the image's own thumbnail
``thumb_key``/``thumb_shard``. Rows by layer (manifest order), method, image id.

Determinism: rows are sorted by image id before anything is computed, so coordinates do not
depend on dataset order or batching, and a seed gives the same map on every machine.

* PCA is exact up to the solver's rounding (scikit-learn, ``random_state=seed`` where it
  picks the randomized solver for large inputs), and every component's sign is fixed: its
  loading of largest magnitude is positive, so maps never flip between runs.
* t-SNE starts from the PCA map scaled to standard deviation 1e-4 plus seeded jitter (what
  openTSNE's ``initialization="pca"`` does, from the sign-fixed PCA above), with
  ``random_state=seed`` and one thread (more threads change the rounding of the gradient).
* UMAP uses its spectral initialisation with ``random_state=seed`` (which makes umap-learn
  run single-threaded).

As usual, t-SNE and UMAP run on the features reduced to ``pca_dims`` principal components
(fewer when the dataset or the layer has fewer): the neighbour search is faster and less
noisy, and pairwise distances barely change. For small datasets ``perplexity`` is lowered to
(n - 1) / 3 and ``n_neighbors`` to n - 1 (the values used go to run.json).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, field_validator

from jobs.core.base import (
    AnalysisParams,
    DistinctLayers,
    MapBatch,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rows,
    image_key,
    listed_twice,
    register,
    safe_key,
)
from jobs.core.kernels import pooled_features, pooled_features_schema, read_features, worth_logging
from jobs.core.render import atlas, atlas_cells, scatter

Method = Literal["pca", "tsne", "umap"]

# From this many images t-SNE uses the FFT-interpolated gradient (O(n)); below it, Barnes-Hut
# (O(n log n)) is several times faster, as openTSNE's own "auto" rule says.
FFT_MIN_POINTS = 10_000

# Fewest images each method can map: two principal components need three points; umap-learn's
# spectral initialisation needs more points than the embedding has dimensions plus one.
MIN_POINTS: dict[str, int] = {"pca": 3, "tsne": 3, "umap": 4}


def _default_methods() -> list[Method]:
    return ["pca", "tsne"]


class EmbeddingParams(AnalysisParams):
    layers: DistinctLayers
    methods: list[Method] = Field(default_factory=_default_methods, min_length=1)
    pool: Literal["avg", "max", "grid", "none"] = "avg"
    grid: int = Field(default=2, ge=1, description="cells per side when pool is 'grid'")
    seed: int = 0
    pca_dims: int = Field(default=50, ge=2, description="principal components t-SNE and UMAP start from")
    perplexity: float = Field(default=30.0, gt=0, description="t-SNE; lowered to (n - 1) / 3 for small n")
    n_neighbors: int = Field(default=15, ge=2, description="UMAP; lowered to n - 1 for small n")
    min_dist: float = Field(default=0.1, ge=0, le=1, description="UMAP; at most its spread (1)")
    render: bool = True
    atlas_cells: int = Field(default=32, ge=1, description="cells per side of the atlas grid")
    thumb: int = Field(default=32, ge=1, description="px per atlas cell and per image thumbnail")
    thumbs: bool = Field(default=True, description="store a thumbnail of every image (needs render)")

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


def principal_components(features: np.ndarray, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores on the leading ``dims`` principal components (N, k) and their explained variance ratios.

    k = min(dims, N, D). Each component's sign is fixed so that its loading of largest
    magnitude (the first, on ties) is positive.
    """
    from sklearn.decomposition import PCA

    n, d = features.shape
    k = min(dims, n, d)
    pca = PCA(n_components=k, random_state=seed)
    scores = pca.fit_transform(features)
    components = pca.components_
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    signs[signs == 0] = 1.0
    ratio = np.nan_to_num(pca.explained_variance_ratio_, nan=0.0)
    return scores * signs, ratio


def tsne(reduced: np.ndarray, start: np.ndarray, perplexity: float, seed: int = 0) -> np.ndarray:
    """t-SNE coordinates (N, 2) of ``reduced`` features, starting from the 2-D map ``start``.

    ``start`` is scaled to standard deviation 1e-4 and jittered (seeded), as openTSNE's own
    PCA initialisation does; a map with no spread starts from seeded random points instead.
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
        n_jobs=1,
        verbose=False,
    ).fit(np.ascontiguousarray(reduced, dtype=np.float64))
    return np.asarray(embedding, np.float64)


def umap_2d(reduced: np.ndarray, n_neighbors: int, min_dist: float, seed: int = 0) -> np.ndarray:
    """UMAP coordinates (N, 2) of ``reduced`` features (spectral initialisation, seeded)."""
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


def embed(features: np.ndarray, params: EmbeddingParams, layer: str = "",
          log: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Coordinates (N, 2) float32 by every method of ``params``, and what was used (for run.json).

    One PCA serves all methods: its first two components are the ``pca`` map and the start
    of t-SNE; its first ``pca_dims`` are the input of t-SNE and UMAP.
    """
    n, d = features.shape
    check_count(n, params.methods, layer)
    if d < 2:
        raise ValueError(f"embedding needs features of at least 2 dimensions; layer {layer!r} gives {d}")
    say = log or (lambda message: None)
    info: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores, ratio = principal_components(features, params.pca_dims, params.seed)
        info["explained_variance_ratio"] = [float(r) for r in ratio[:2]]
        coords: dict[Method, np.ndarray] = {}
        for method in params.methods:
            if method == "pca":
                coords[method] = scores[:, :2]
            elif method == "tsne":
                perplexity = min(params.perplexity, (n - 1) / 3)
                info["perplexity"] = perplexity
                coords[method] = tsne(scores, scores[:, :2], perplexity, params.seed)
            else:
                k = min(params.n_neighbors, n - 1)
                info["n_neighbors"] = k
                coords[method] = umap_2d(scores, k, params.min_dist, params.seed)
    # What the libraries warn about (a failed spectral start, zero variance) goes to the log, once.
    for message in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught if worth_logging(w)):
        say(f"embedding: layer {layer!r}: {message}")
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

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        p = self.params
        columns: dict[str, list[np.ndarray]] = {k: [] for k in ("image_id", "label", "x", "y", "method", "layer")}
        keys: dict[str, list[np.ndarray]] = {"scatter_key": [], "atlas_key": []}
        maps: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        stats: dict = {"points": 0}
        for layer in p.layers:
            ids, labels, features = read_features(inputs, layer)
            coords, info = embed(features, p, layer, ctx.log)
            stats["points"] = len(ids)
            stats.setdefault("layers", {})[layer] = info
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

    def _render(self, maps: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                ctx: ReduceContext) -> Iterator[tuple[str, Image.Image]]:
        """Scatter plot and atlas of every (layer, method), drawn only as the runner asks for them."""
        p = self.params
        for prefix, ids, labels, xy in maps:
            yield f"{prefix}-scatter", scatter(xy, labels, ctx.label_names)
            chosen = atlas_cells(xy, p.atlas_cells)
            pixels = ctx.images([ids[i] for i in chosen.values()])
            # An image that no longer decodes leaves its cell empty rather than failing the atlas.
            thumbs = {cell: pixels[ids[i]] for cell, i in chosen.items() if ids[i] in pixels}
            yield f"{prefix}-atlas", atlas(thumbs, p.atlas_cells, cell=p.thumb)
        if p.thumbs and maps:
            yield from _thumbnails(list(maps[0][1]), p.thumb, ctx)


def thumb_key(image_id: str) -> str:
    return image_key(image_id, "thumb")


def _thumbnails(ids: list[str], side: int, ctx: ReduceContext, chunk: int = 512) -> Iterator[tuple[str, Image.Image]]:
    """Every image at ``side`` px (its longer side), decoded a chunk at a time."""
    for start in range(0, len(ids), chunk):
        pixels = ctx.images(ids[start:start + chunk])
        for image_id, px in pixels.items():
            image = Image.fromarray(px)
            image.thumbnail((side, side))
            yield thumb_key(image_id), image
