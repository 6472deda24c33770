"""``neighbours``: each query image's nearest images in a layer's feature space and in pixel space.

Krizhevsky et al. (2012, Fig. 4) showed that images near each other in the last hidden layer
of a CNN look alike semantically, while neighbours by L2 distance on raw pixels share mostly
colour and layout. This analysis draws both columns of that figure for a whole dataset:
every query image against every other image of the dataset (the query itself excluded).

Example manifest entry::

    - type: neighbours
      spaces: [feature, pixel]
      layer: layer3
      metric: cosine          # feature space: cosine | l2 (pixel space is always l2)
      pool: avg               # avg | max | grid | none, as in ``features``
      pixel_size: 32          # pixel space: the model input area-averaged down to 32x32 (null: full size)
      k: 5
      queries: {sample: 1000, seed: 0}  # the default; all | {sample, seed} | [image ids]
      strips: 1000            # strips drawn per space (a seeded sample of the queries when more)
      index: exact            # exact | faiss (HNSW) | faiss_ivf (inverted file); approximate, need convscope[ann]
      # nlist: 4000           # faiss_ivf: k-means lists (default about 4 sqrt(images), at most 16,384)
      # nprobe: 16            # faiss_ivf: lists each query scans

Table ``neighbours/part-*.parquet``: ``image_id`` (the query), ``label``, ``space``,
``rank`` (1..k), ``neighbour_id``, ``distance``, ``key`` and ``shard`` (the strip: the query
then its neighbours, ``<key>.png`` in that tar; null for a query whose strip was not drawn).
Rows by space, query, rank.

Exact search ranks by (float32 distance, database index): equal distances go to the image
earlier in the dataset, and the result does not depend on block size or worker count.
``faiss`` (an HNSW graph) and ``faiss_ivf`` (an inverted file of exact distances: k-means lists
trained on a seeded sample, ``nprobe`` of them scanned per query; for databases of more than a
million images, where the graph grows large) are approximate: run.json's ``recall_at_k`` gives
their recall against exact search on a seeded sample of ``recall_sample`` queries.

At scale: the database is read a record batch at a time and each batch goes to the object
store as it is read, so the driver holds one float32 copy of it and every task reads that
same copy (no per-task copy, no float64 copy: rows are converted a block at a time). Query
blocks run as tasks on the workers (on their GPU when they have one).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Collection, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.core.base import (
    FLOATS,
    IMAGE_ID,
    LABEL,
    AnalysisParams,
    Images,
    MapBatch,
    MemoryPlan,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rendered,
    Rows,
    listed_twice,
    register,
)
from jobs.core.kernels import matrix, pool, topk_first
from jobs.core.render import strip

# Rows of queries and of database vectors per distance block: a block pair holds at most
# BLOCK x BLOCK float64 distances (32 MiB).
BLOCK = 2048
# Query x database pairs from which exact search is spread over the context's workers.
PARALLEL_MIN = 2**26
# Distances below this fraction of the vectors' scale count as 0: float64 rounding of the
# dot products (which depends on the matrix shapes BLAS sees) must not separate exact
# duplicates, and the square root in l2 would magnify it to ~1e-7.
SNAP = 2.0**-36
# F.normalize's floor on a row's length (its default): zero rows stay zero.
NORM_EPS = 1e-12
# Bytes of float32 vectors per database block in the object store.
DATABASE_BLOCK_BYTES = 64 * 2**20
# Queries whose strips are rendered from one ``ctx.images`` call.
RENDER_CHUNK = 256
# faiss_ivf: the most inverted lists by default, the training points per list (a seeded sample
# of the database, seeded by IVF_SEED, as is k-means), and the queries searched at once.
IVF_MAX_LISTS = 16_384
IVF_TRAIN_PER_LIST = 40
IVF_SEED = 0
IVF_QUERY_CHUNK = 16_384

Space = Literal["feature", "pixel"]
# The float32 screen of exact search: faiss when installed (auto), or either one.
Screen = Literal["auto", "faiss", "torch"]


class QuerySample(BaseModel):
    """A seeded random sample of the dataset's images as queries (all of them when larger)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sample: int = Field(ge=1)
    seed: int = 0


def _both_spaces() -> list[Space]:
    return ["feature", "pixel"]


class NeighboursParams(AnalysisParams):
    spaces: list[Space] = Field(default_factory=_both_spaces, min_length=1)
    layer: str | None = None
    metric: Literal["cosine", "l2"] = "cosine"
    pool: Literal["avg", "max", "grid", "none"] = "avg"
    grid: int = Field(default=2, ge=1, description="cells per side when pool is 'grid'")
    pixel_size: int | None = Field(default=32, ge=1)
    k: int = Field(default=5, ge=1)
    queries: Literal["all"] | QuerySample | list[str] = Field(
        default_factory=lambda: QuerySample(sample=1000),
        description="the query images: a seeded sample (default 1,000), 'all', or a list of image ids")
    index: Literal["exact", "faiss", "faiss_ivf"] = Field(
        default="exact", description="exact search, or approximate: faiss (HNSW) or faiss_ivf (inverted file)")
    nlist: int | None = Field(default=None, ge=1, description="faiss_ivf: k-means lists; default about "
                                                             "4 sqrt(images), at most 16,384")
    nprobe: int = Field(default=16, ge=1, description="faiss_ivf: lists scanned per query (nlist: every list, exact)")
    recall_sample: int = Field(default=1000, ge=1)
    render: bool = True
    strips: int = Field(default=1000, ge=0, description="queries per space whose strips are drawn (a seeded "
                                                       "sample of the queries when there are more)")
    thumb: int = Field(default=64, ge=1)

    @field_validator("spaces")
    @classmethod
    def _distinct_spaces(cls, spaces: list[str]) -> list[str]:
        repeated = listed_twice(spaces)
        if repeated:
            raise ValueError(f"each space may be listed once; repeated: {', '.join(repeated)}")
        return spaces

    @field_validator("queries")
    @classmethod
    def _distinct_queries(cls, queries: Any) -> Any:
        if isinstance(queries, list):
            if not queries:
                raise ValueError("queries: an empty list; name at least one image id, or use 'all'")
            seen: set[str] = set()
            repeated: list[str] = []
            for q in queries:
                if q in seen:
                    repeated.append(q)
                seen.add(q)
            if repeated:
                raise ValueError(f"queries: ids listed more than once: {', '.join(map(repr, repeated[:5]))}")
        return queries

    @field_validator("index")
    @classmethod
    def _faiss_installed(cls, index: str) -> str:
        if index != "exact" and importlib.util.find_spec("faiss") is None:
            raise ValueError(f"index {index!r} needs the faiss-cpu package (pip install 'convscope[ann]')")
        return index

    @model_validator(mode="after")
    def _layer_for_features(self) -> NeighboursParams:
        if "feature" in self.spaces and self.layer is None:
            raise ValueError("space 'feature' needs a layer (e.g. layer: layer3); "
                             "for pixel-space neighbours alone use spaces: [pixel]")
        return self


class RowBlocks:
    """An (N, D) matrix held as row blocks, read as one: the database of a search.

    The blocks are whatever the rows were read in (record batches of the committed
    features, each put in the object store as it was read), so no step ever needs the
    whole matrix in one piece or a second copy of it.

    >>> db = RowBlocks([torch.zeros(2, 3), torch.ones(1, 3)])
    >>> len(db), db.dim, db.take(torch.tensor([[2, 0]])).sum().item()
    (3, 3, 3.0)
    """

    def __init__(self, blocks: Sequence[torch.Tensor]):
        self.blocks = [b for b in blocks if len(b)]
        if not self.blocks:
            raise ValueError("a database needs at least one row")
        dims = {b.shape[1] for b in self.blocks if b.dim() == 2}
        if len(dims) != 1 or any(b.dim() != 2 for b in self.blocks):
            raise ValueError(f"database blocks must be (rows, D) of one D, got shapes "
                             f"{[tuple(b.shape) for b in self.blocks][:4]}")
        self.dim = dims.pop()
        sizes = torch.tensor([len(b) for b in self.blocks])
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.device = self.blocks[0].device

    def __len__(self) -> int:
        return int(self.starts[-1]) + len(self.blocks[-1])

    def to(self, device: torch.device) -> RowBlocks:
        return RowBlocks([b.to(device) for b in self.blocks])

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, view of at most ``rows`` rows), in order, never across two blocks."""
        for start, b in zip(self.starts.tolist(), self.blocks):
            for s in range(0, len(b), rows):
                yield start + s, b[s:s + rows]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` names (any shape), as ``index.shape + (D,)``."""
        if len(self.blocks) == 1:
            return self.blocks[0][index]
        flat = index.reshape(-1).cpu()
        which = torch.searchsorted(self.starts, flat, right=True) - 1
        out = torch.empty((len(flat), self.dim), dtype=self.blocks[0].dtype, device=self.device)
        for b in which.unique().tolist():
            hit = (which == b).nonzero()[:, 0]
            out[hit.to(self.device)] = self.blocks[b][(flat[hit] - self.starts[b]).to(self.device)]
        return out.view(*index.shape, self.dim)


def as_rows(database: torch.Tensor | RowBlocks) -> RowBlocks:
    return database if isinstance(database, RowBlocks) else RowBlocks([database])


def unit64(rows: torch.Tensor, metric: str) -> torch.Tensor:
    """Rows in float64, on the unit sphere for cosine (zero rows stay zero): what distances use."""
    rows = rows.to(torch.float64)
    return F.normalize(rows, dim=-1, eps=NORM_EPS) if metric == "cosine" else rows


def unit32(rows: torch.Tensor, metric: str) -> torch.Tensor:
    """The float32 screen's copy of rows: ``unit64(rows).float()``, a slice at a time (bounded memory)."""
    if metric != "cosine" and rows.dtype == torch.float32:
        return rows  # float32 -> float64 -> float32 is the identity
    out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    step = convert_rows(rows.shape[-1])
    for s in range(0, len(rows), step):
        out[s:s + step] = unit64(rows[s:s + step], metric)
    return out


def row_lengths(db: RowBlocks) -> torch.Tensor:
    """(N,) float64 Euclidean lengths of every row, clamped as ``F.normalize`` clamps them: a row
    divided by its length is bit for bit its ``unit64`` (one reduction kernel per row, whatever
    the batch), so gathered candidate rows are normalised without reducing them again."""
    out = torch.empty(len(db), dtype=torch.float64, device=db.device)
    for start, c in db.chunks(convert_rows(db.dim)):
        out[start:start + len(c)] = torch.linalg.vector_norm(c.to(torch.float64), dim=-1).clamp_min(NORM_EPS)
    return out


def squared_norms(db: RowBlocks, metric: str) -> torch.Tensor:
    """(N,) float64 squared norms of ``unit64`` of every row, a slice at a time."""
    # Written into one preallocated vector: small results kept between the slices' large
    # temporaries fragment the heap (at 1.28M x 256, 2.4 GB of it resident).
    out = torch.empty(len(db), dtype=torch.float64, device=db.device)
    for start, c in db.chunks(convert_rows(db.dim)):
        out[start:start + len(c)] = unit64(c, metric).pow(2).sum(dim=1)
    return out


def knn(queries: torch.Tensor, database: torch.Tensor | RowBlocks, k: int, metric: str,
        exclude: torch.Tensor | None = None, block: int = BLOCK,
        norms: torch.Tensor | None = None, screen: Screen = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest database rows of every query row: distances (M, k) float32, indices (M, k).

    ``metric``: ``cosine`` (1 - cosine similarity; a zero vector is at distance 1 from
    everything) or ``l2`` (Euclidean). ``exclude`` (M,) names one database index per query
    that is never returned (the query itself; -1: none); with it, k is capped at N - 1,
    without it at N. Neighbours are ordered by (float32 distance, database index).
    ``database`` is an (N, D) tensor or a :class:`RowBlocks` of any float dtype (float32
    is what a run holds); ``norms`` may give ``squared_norms(database, metric)`` when the
    same database serves many calls.

    Exact, in passes. A float32 screen keeps ``c = w + SCREEN_FIRST`` candidates per query
    (``w``: k, or k + 1 with ``exclude``): faiss' exact flat search (``faiss.knn``) on a CPU
    when faiss is installed, else blocked matrix products of at most ``SCREEN_QUERIES``
    queries x ``SCREEN_ELEMENTS / SCREEN_QUERIES`` database rows with a running top-c
    (``screen``: ``auto``, ``faiss`` or ``torch`` picks one); a database searched against
    itself (``queries`` is its one float32 block, faiss installed) is screened from half the
    products (``_screen_mutual``). Their distances are then taken again in float64, which
    fixes the reported float32 values and the order, so neither depends on the screen or the
    blocking. A query is verified when every row left out screened farther than its k-th
    neighbour by more than the screen's worst-case rounding error (the bound ``SCREEN_ERROR *
    (D + 8) * 2^-24`` times the squared norms, which covers both screens); a query that is not
    (ties or near-ties at the cut) is screened again with ``c = w + SCREEN_EXTRA`` candidates
    and checked the same way, and one still open is searched in float64 against the whole
    database, in blocks of ``block`` x ``block``. Rows are converted to float64 (and
    normalised, for cosine) a block at a time: memory is the database itself plus
    O(SCREEN_ELEMENTS + block^2 + M (c + D) + N), never M x N and never a float64 copy of the
    database.

    >>> d, i = knn(torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.0], [1.0], [3.0]]), 1, "l2",
    ...            exclude=torch.tensor([0, 1, 2]))
    >>> i.tolist(), d.tolist()
    ([[1], [0], [1]], [[1.0], [1.0], [2.0]])
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"unknown metric {metric!r}; expected cosine or l2")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    if screen not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown screen {screen!r}; expected auto, faiss or torch")
    if isinstance(database, torch.Tensor) and (database.dim() != 2 or len(database) == 0):
        if database.dim() == 2 and queries.dim() == 2 and queries.shape[1] == database.shape[1]:
            m = queries.shape[0]
            return (torch.zeros((m, 0), dtype=torch.float32), torch.zeros((m, 0), dtype=torch.long))
        raise ValueError(f"knn needs (M, D) queries and (N, D) database, got shapes {tuple(queries.shape)} "
                         f"and {tuple(database.shape)}")
    db = as_rows(database)
    if queries.dim() != 2 or queries.shape[1] != db.dim:
        raise ValueError(f"knn needs (M, D) queries and (N, D) database, got shapes {tuple(queries.shape)} "
                         f"and ({len(db)}, {db.dim})")
    m, n = queries.shape[0], len(db)
    device = db.device
    k_eff = max(0, min(k, n - 1 if exclude is not None else n))
    if m == 0 or k_eff == 0:
        return (torch.zeros((m, k_eff), dtype=torch.float32, device=device),
                torch.zeros((m, k_eff), dtype=torch.long, device=device))
    faiss = faiss_screen() if screen != "torch" and device.type == "cpu" else None
    if screen == "faiss" and faiss is None:
        raise ValueError("screen 'faiss' needs the faiss-cpu package (pip install 'convscope[ann]') "
                         "and a database on the CPU")
    # One extra candidate per query, so the excluded index can be dropped afterwards: the
    # top k+1 by (distance, index) minus one member is the top k of the rest.
    width = k_eff + 1 if exclude is not None else k_eff
    x_sq = squared_norms(db, metric) if norms is None else norms.to(device=device, dtype=torch.float64)
    pass_ = _Pass(db, x_sq, width, metric, block, faiss)
    # A first screen keeps a few candidates beyond the ``width`` needed: enough to prove
    # nearly every query (a gap wider than the rounding bound after the width-th), at about
    # the cost of faiss' own top-k. The queries it does not settle are screened again with
    # more slack, and those still open are searched in float64 against the whole database.
    c_first = min(n, width + SCREEN_FIRST)
    c = min(n, width + SCREEN_EXTRA)
    # Every row against every other (the queries are the database): faiss' heaps fed from
    # each block pair's products once, both ways.
    mutual = _screen_mutual(faiss, queries, db, c_first, metric, pass_.x_sq32) if faiss is not None else None
    out_d, out_i = [], []
    for gs in range(0, m, SCREEN_GROUP):
        group = queries[gs:gs + SCREEN_GROUP].to(device)
        found = None if mutual is None else (mutual[0][gs:gs + len(group)], mutual[1][gs:gs + len(group)])
        dist, idx, settled = pass_.search(group, c_first, min(c_first, width + CHECK_FIRST), found)
        if c > c_first and not settled.all():
            r = (~settled).nonzero()[:, 0]
            dist[r], idx[r], settled[r] = pass_.search(group[r], c, min(c, width + CHECK_EXTRA))
        # A block of queries at a time: memory stays block x block float64 distances.
        open_ = (~settled).nonzero()[:, 0]
        for s in range(0, len(open_), block):
            r = open_[s:s + block]
            q = unit64(group[r], metric)
            dist[r], idx[r] = exhaustive(q, db, (q * q).sum(dim=1), x_sq, width, metric, block, raw=True)
        if exclude is not None:
            dist, idx = drop_excluded(dist, idx, exclude[gs:gs + len(group)].to(device))
        out_d.append(dist)
        out_i.append(idx)
    return torch.cat(out_d), torch.cat(out_i)


class _Pass:
    """One screen-and-check pass of exact search over a database (see ``knn``)."""

    def __init__(self, db: RowBlocks, x_sq: torch.Tensor, width: int, metric: str, block: int, faiss: Any):
        self.db, self.x_sq, self.width, self.metric, self.faiss = db, x_sq, width, metric, faiss
        self.x_sq32, self.x_sq_max = x_sq.float(), x_sq.max()
        self.lengths = row_lengths(db) if metric == "cosine" else None
        self.qb = min(block, SCREEN_QUERIES)
        # The float64 pass in blocks of CHECK_ELEMENTS float64 query elements: few, larger tensor
        # operations (its memory per query is bounded by ``_exact``'s chunks, not by the block).
        self.cb = max(1, CHECK_ELEMENTS // db.dim)

    def search(self, queries: torch.Tensor, c: int, first: int,
               found: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best ``width`` among each query's ``c`` screened candidates by float64 distance, and
        whether that is provably the best of the whole database (``settled``); ``found``: the
        queries' screen, when it was done already."""
        db, metric, width = self.db, self.metric, self.width
        if found is None:
            q32 = unit32(queries, metric)
            found = _screen_faiss(self.faiss, q32, db, c, metric) if self.faiss is not None else None
            found = found if found is not None else _screen(q32, db, self.x_sq32, c, metric, self.qb)
        screened, cands = found
        out_d, out_i, out_s = [], [], []
        for qs in range(0, len(queries), self.cb):
            q = unit64(queries[qs:qs + self.cb], metric)
            q_sq = (q * q).sum(dim=1)
            # The float64 pass looks at the best ``first`` screened candidates, then at all c
            # for the queries those do not settle.
            order = screened[qs:qs + self.cb].argsort(dim=1)
            value = screened[qs:qs + self.cb].gather(1, order).double()
            cand = cands[qs:qs + self.cb].gather(1, order)
            dist, idx = _best(_exact(q, db, q_sq, self.x_sq, cand[:, :first], metric, self.lengths),
                              cand[:, :first], width)
            scale = q_sq + self.x_sq_max
            err = SCREEN_ERROR * (db.dim + 8) * 2.0**-24 * scale
            if first < c:
                # Every row not yet looked at screened at >= the first candidate left out.
                redo = ~_settled(value[:, first], err, scale, dist[:, -1], metric)
                if redo.any():
                    r = redo.nonzero()[:, 0]
                    dist[r], idx[r] = _best(_exact(q[r], db, q_sq[r], self.x_sq, cand[r], metric, self.lengths),
                                            cand[r], width)
            # Every row left out screened at >= the largest kept screen value.
            settled = (_settled(value[:, -1], err, scale, dist[:, -1], metric) if c < len(db)
                       else torch.ones(len(q), dtype=torch.bool, device=q.device))
            out_d.append(dist)
            out_i.append(idx)
            out_s.append(settled)
        return torch.cat(out_d), torch.cat(out_i), torch.cat(out_s)


# Candidates beyond the width needed that the first float32 screen keeps per query. One is
# enough on random data, but on clustered data a fifth of the queries then have near-ties at
# the cut and are screened again against the whole database (a fifth of the work again);
# with four almost none are, and the heaps cost about the same.
SCREEN_FIRST = 4
# Screened candidates beyond the width that the float64 pass of the first screen looks at
# first (the rest only for the queries they do not settle).
CHECK_FIRST = 1
# Candidates beyond k that the second float32 screen keeps per query (for the queries the first
# did not settle): slack for near-ties at the cut.
SCREEN_EXTRA = 32
# Screened candidates beyond the ``width`` needed that the float64 pass looks at first.
CHECK_EXTRA = 4
# float64 query elements per block of the float64 pass (32 MiB).
CHECK_ELEMENTS = 2**22
# Queries per screen block, and float32 distances per screen block (64 MiB): wide blocks
# keep the matrix products efficient and the top-c merges few.
SCREEN_QUERIES = 1024
SCREEN_ELEMENTS = 2**24
# Queries screened together against each database block (their float32 copy is held).
SCREEN_GROUP = 65_536
# Database rows per faiss screen call (float32 elements at most, for the cosine copy: 64 MiB).
FAISS_ELEMENTS = 2**24
# A database against itself: rows per strip of the mutual screen, products per strip (its
# products and their transpose, 64 MiB each), and the fewest rows for which it pays.
MUTUAL_BLOCK = 512
MUTUAL_ELEMENTS = 2**24
MUTUAL_MIN = 2048
# Safety factor on the textbook bound (D + 8) u |q| |x| for a float32 dot product and the
# conversions and sums around it (faiss' |q|^2 + |x|^2 - 2 q.x and sum of squared
# differences included).
SCREEN_ERROR = 2.0
# float64 elements converted at once (32 MiB; 2,048 rows of D = 2,048): few operations on small D.
CONVERT_ELEMENTS = 2**22


def convert_rows(d: int) -> int:
    """Rows of D elements converted to float64 at once."""
    return max(1, CONVERT_ELEMENTS // max(1, d))


def _settled(screened: torch.Tensor, err: torch.Tensor, scale: torch.Tensor, kth: torch.Tensor,
             metric: str) -> torch.Tensor:
    """Per query: whether every row that screened at >= ``screened`` (float64; squared for l2) is
    provably farther than the k-th distance found, ``kth``, after float32 rounding."""
    # Its true (squared, for l2) distance is at least the screen value minus the rounding bound.
    floor = (screened - err).clamp(min=0)
    # A row whose distance could still snap to 0 proves nothing (see ``SNAP``).
    floor = floor.masked_fill(floor <= (scale * SNAP if metric == "l2" else SNAP), 0.0)
    floor = floor.sqrt() if metric == "l2" else floor
    return floor > kth.double() * (1 + 2.0**-20) + 2.0**-60


def faiss_screen() -> Any:
    """The faiss module when it is installed (its flat search is then the screen), else None."""
    if importlib.util.find_spec("faiss") is None:
        return None
    import faiss

    return faiss


def _screen_faiss(faiss: Any, q32: torch.Tensor, db: RowBlocks, c: int, metric: str
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float32 distances (squared for l2) and indices of each query's ``c`` nearest by faiss' exact
    flat search, a database block at a time (no index: faiss reads the rows in place); None when
    faiss left a query short of candidates (NaN values), for the torch screen to redo."""
    # faiss' own threads, as many as torch's (a worker's share of the machine).
    faiss.omp_set_num_threads(torch.get_num_threads())
    kind = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    xq = np.ascontiguousarray(q32.numpy())
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for xs, raw in db.chunks(max(1, FAISS_ELEMENTS // db.dim)):
        xb = np.ascontiguousarray(unit32(raw, metric).numpy())
        found, idx = faiss.knn(xq, xb, min(c, len(xb)), kind)
        if (idx < 0).any():
            return None
        # Ascending: 1 - similarity for cosine (its float32 rounding is within the bound), squared l2.
        v = torch.from_numpy(1.0 - found if metric == "cosine" else found)
        i = torch.from_numpy(idx) + xs
        if best_v is not None and best_i is not None:
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
            v, pick = v.topk(min(c, v.shape[1]), dim=1, largest=False, sorted=False)
            i = i.gather(1, pick)
        best_v, best_i = v, i
    if best_v is None or best_i is None:
        return None
    return best_v, best_i


def _screen_mutual(faiss: Any, queries: torch.Tensor, db: RowBlocks, c: int, metric: str, x_sq32: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``_screen_faiss`` of a database against itself (``queries`` is its one block), from half the
    products: each block pair's float32 products ``X_I X_J^T`` (squared distances for l2, from
    ``x_sq32``) feed the heaps of the rows of I, and their transpose those of J. None when the
    queries are not the database, or faiss left a row short of candidates."""
    n = len(db)
    if (len(db.blocks) != 1 or db.blocks[0].data_ptr() != queries.data_ptr() or db.blocks[0].shape != queries.shape
            or db.blocks[0].stride() != queries.stride() or queries.dtype != torch.float32 or c > n
            or n < MUTUAL_MIN):
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    x = unit32(queries, metric).contiguous()
    values = np.empty((n, c), np.float32)
    ids = np.empty((n, c), np.int64)
    # Largest inner products (cosine), smallest squared distances (l2).
    heaps = faiss.float_minheap_array_t() if metric == "cosine" else faiss.float_maxheap_array_t()
    heaps.nh, heaps.k, heaps.val, heaps.ids = n, c, faiss.swig_ptr(values), faiss.swig_ptr(ids)
    heaps.heapify()
    # Strips of b rows x w columns from the diagonal on: few, large parallel regions (the
    # products' threads and faiss' are two pools, and each switch between them costs).
    b = min(n, MUTUAL_BLOCK)
    w = max(b, MUTUAL_ELEMENTS // b)
    buffer, flipped = torch.empty(b * min(n, w)), torch.empty(b * min(n, w))
    for i0 in range(0, n, b):
        xi = x[i0:i0 + b]
        rows = len(xi)
        for j0 in range(i0, n, w):
            xj = x[j0:j0 + w]
            v = buffer[:rows * len(xj)].view(rows, len(xj))
            if metric == "cosine":
                torch.mm(xi, xj.T, out=v)
            else:
                torch.addmm(x_sq32[None, j0:j0 + len(xj)], xi, xj.T, alpha=-2.0, out=v)
                v.add_(x_sq32[i0:i0 + rows, None])
            heaps.addn(len(xj), faiss.swig_ptr(v.numpy()), j0, i0, rows)
            # The transpose feeds the rows of the columns past the diagonal block (its pairs
            # are in the rows' own products already).
            skip = max(0, i0 + rows - j0)
            if skip < len(xj):
                t = flipped[:(len(xj) - skip) * rows].view(len(xj) - skip, rows)
                t.copy_(v[:, skip:].T)
                heaps.addn(rows, faiss.swig_ptr(t.numpy()), i0, j0 + skip, len(t))
    if (ids < 0).any():
        return None
    found = torch.from_numpy(values)
    return (1.0 - found if metric == "cosine" else found), torch.from_numpy(ids)


def _screen(q32: torch.Tensor, db: RowBlocks, x_sq: torch.Tensor, c: int, metric: str,
            qb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 distances (squared for l2) and indices of each query's ``c`` screened nearest:
    blocks of ``qb`` queries x ``SCREEN_ELEMENTS / qb`` database rows (``x_sq`` is float32)."""
    m = len(q32)
    columns = max(qb, SCREEN_ELEMENTS // qb)
    buffer = torch.empty(min(qb, m) * min(columns, len(db)), dtype=torch.float32, device=q32.device)
    best_v = torch.empty((m, c), dtype=torch.float32, device=q32.device)
    best_i = torch.empty((m, c), dtype=torch.long, device=q32.device)
    seen = 0
    for xs, raw in db.chunks(columns):
        xb = unit32(raw, metric)
        for qs in range(0, m, qb):
            q = q32[qs:qs + qb]
            v = buffer[:len(q) * len(xb)].view(len(q), len(xb))
            # One fused product per block into the one buffer, ranked without the per-query
            # constant: q.x (largest) for cosine, |x|^2 - 2 q.x for l2; the constant is added
            # to the c kept values only.
            if metric == "cosine":
                torch.mm(q, xb.T, out=v)
                top, i = v.topk(min(c, len(xb)), dim=1, sorted=False)
                top = top.neg_()
            else:
                torch.addmm(x_sq[None, xs:xs + len(xb)], q, xb.T, alpha=-2.0, out=v)
                top, i = v.topk(min(c, len(xb)), dim=1, largest=False, sorted=False)
            i = i + xs
            if seen:
                top, i = torch.cat([best_v[qs:qs + qb, :seen], top], 1), torch.cat([best_i[qs:qs + qb, :seen], i], 1)
                top, pick = top.topk(min(c, top.shape[1]), dim=1, largest=False, sorted=False)
                i = i.gather(1, pick)
            best_v[qs:qs + qb, :top.shape[1]], best_i[qs:qs + qb, :top.shape[1]] = top, i
        seen = min(c, seen + len(xb))
    if not seen:
        raise ValueError("_screen needs a non-empty database")
    q_sq = q32.double().pow(2).sum(dim=1).float() if metric == "l2" else None
    return best_v + (1.0 if q_sq is None else q_sq[:, None]), best_i


def _exact(q: torch.Tensor, db: RowBlocks, q_sq: torch.Tensor, x_sq: torch.Tensor, cand: torch.Tensor,
           metric: str, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """float32 distances of each query to its candidate rows, from float64 products (cosine:
    ``lengths``, the rows' ``row_lengths``, spares reducing every gathered row again)."""
    per = max(1, 2**22 // max(1, cand.shape[1] * db.dim))  # bounds the gathered (rows, c, D)
    out = []
    for s in range(0, len(q), per):
        ci = cand[s:s + per]
        if metric == "cosine" and lengths is not None:
            # The gathered copy is this call's own: converted and divided in place.
            rows = db.take(ci).to(torch.float64).div_(lengths[ci][..., None])
        else:
            rows = unit64(db.take(ci), metric)
        dot = torch.bmm(rows, q[s:s + per, :, None])[..., 0]
        out.append(_distance(dot, q_sq[s:s + per, None], x_sq[ci], metric))
    return torch.cat(out)


def _distance(dot: torch.Tensor, q_sq: torch.Tensor, x_sq: torch.Tensor, metric: str) -> torch.Tensor:
    """float64 products -> float32 distances, near-zero ones snapped to 0 (see ``SNAP``)."""
    if metric == "cosine":
        dist = dot.neg_().add_(1.0)
        dist.masked_fill_(dist.abs() <= SNAP, 0.0)
    else:
        scale = q_sq + x_sq
        dist = dot.mul_(-2.0).add_(scale)
        dist.masked_fill_(dist <= scale.mul_(SNAP), 0.0).sqrt_()
    return dist.float()  # rank on the values that are reported


def _best(dist: torch.Tensor, idx: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` best of each row of candidates by (distance, index)."""
    order = idx.argsort(dim=1)
    dist, idx = dist.gather(1, order), idx.gather(1, order)
    # In index order, topk_first's tie-break by position is the tie-break by index.
    pick = topk_first(dist, width, largest=False)
    return dist.gather(1, pick), idx.gather(1, pick)


def exhaustive(q: torch.Tensor, x: torch.Tensor | RowBlocks, q_sq: torch.Tensor, x_sq: torch.Tensor, width: int,
               metric: str, block: int, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` nearest by float64 distances to every database row (the screen's fallback).

    ``x`` holds ``unit64`` rows already, or, with ``raw``, database rows converted here a block at a time.
    """
    best_d: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for xs, rows in as_rows(x).chunks(block):
        xb = unit64(rows, metric) if raw else rows
        dist = _distance(q @ xb.T, q_sq[:, None], x_sq[None, xs:xs + len(xb)], metric)
        cols = topk_first(dist, min(width, dist.shape[1]), largest=False)
        cand_d, cand_i = dist.gather(1, cols), cols + xs
        if best_d is not None and best_i is not None:
            merged = torch.cat([best_d, cand_d], 1)
            cand_d, cand_i = _best(merged, torch.cat([best_i, cand_i], 1), min(width, merged.shape[1]))
        best_d, best_i = cand_d, cand_i
    if best_d is None or best_i is None:
        raise ValueError("exhaustive needs a non-empty database")
    return best_d, best_i


def drop_excluded(dist: torch.Tensor, idx: torch.Tensor, exclude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove one column per row: the excluded index where present, else the last (worst)."""
    rows, width = idx.shape
    is_self = idx == exclude[:, None]
    drop = torch.where(is_self.any(dim=1), is_self.int().argmax(dim=1), torch.full_like(exclude, width - 1))
    # Output column j reads column j, or j + 1 from the dropped one on (a gather, not a mask).
    cols = torch.arange(width - 1, device=idx.device)[None, :]
    cols = cols + (cols >= drop[:, None])
    return dist.gather(1, cols), idx.gather(1, cols)


def tensors(arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Arrays as tensors without a copy (the object store's are read-only; knn never writes to them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return [torch.from_numpy(a) for a in arrays]


def knn_database(db: RowBlocks, rows: np.ndarray, k: int, metric: str, block: int = BLOCK,
                 norms: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``knn`` of the database rows ``rows`` as queries, self excluded; queries gathered a block at a time."""
    norms = squared_norms(db, metric) if norms is None else norms
    # (For cosine the mutual screen holds a unit copy of the database: only a small one, so the
    # driver's memory stays within its plan.)
    mutual = (len(db.blocks) == 1 and db.blocks[0].dtype == torch.float32 and db.device.type == "cpu"
              and faiss_screen() is not None and (metric == "l2" or len(db) * db.dim <= FAISS_ELEMENTS))
    if mutual and len(rows) == len(db) and np.array_equal(rows, np.arange(len(db))):
        # Every row against all: the database is its own queries (no gathered copy), screened mutually.
        everything = torch.arange(len(db), device=db.device)
        dist, idx = knn(db.blocks[0], db, k, metric, exclude=everything, block=block, norms=norms)
        return dist.cpu().numpy(), idx.cpu().numpy()
    out_d, out_i = [], []
    for s in range(0, len(rows), block):
        r = torch.from_numpy(np.asarray(rows[s:s + block], dtype=np.int64)).to(db.device)
        dist, idx = knn(db.take(r), db, k, metric, exclude=r, block=block, norms=norms)
        out_d.append(dist.cpu().numpy())
        out_i.append(idx.cpu().numpy())
    if not out_d:
        k_eff = max(0, min(k, len(db) - 1))
        return np.zeros((0, k_eff), np.float32), np.zeros((0, k_eff), np.int64)
    return np.concatenate(out_d), np.concatenate(out_i)


def knn_rows(shared: tuple[list[np.ndarray], int, str, int, str], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``knn_database`` for one block of query rows (a ``parallel_map`` task).

    ``shared`` is (database blocks (rows, D) float32, k, metric, block, device): the blocks
    arrive once per task from the object store, as read-only views.
    """
    blocks, k, metric, block, device = shared
    db = RowBlocks(tensors(blocks))
    if device == "cuda" and torch.cuda.is_available():
        db = db.to(torch.device("cuda"))
    return knn_database(db, rows, k, metric, block)


def search_exact(vectors: np.ndarray | Sequence[np.ndarray], rows: np.ndarray, k: int, metric: str,
                 ctx: ReduceContext, handles: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbours of the database rows ``rows`` among all of ``vectors``, self excluded.

    ``vectors``: the (N, D) database or its row blocks. ``handles``: the same blocks as
    ``ctx.put`` handles, which the tasks read when the work is spread over the workers
    (without them, the blocks are put here).
    """
    blocks = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
    m, n = len(rows), sum(len(b) for b in blocks)
    workers = int(getattr(ctx, "workers", 1) or 1)
    if n == 0:
        return np.zeros((m, 0), np.float32), np.zeros((m, 0), np.int64)
    # One task per worker and then some (for balance), each query block against the whole
    # database; the database goes to the object store once, in its blocks, never as a copy per task.
    if workers > 1 and m * n >= PARALLEL_MIN:
        chunk = max(1, min(BLOCK * 8, -(-m // (2 * workers))))
        refs = list(handles) if handles is not None else [ctx.put(b) for b in blocks]
        parts = ctx.parallel_map(knn_rows, [rows[s:s + chunk] for s in range(0, m, chunk)],
                                 (refs, k, metric, BLOCK, ctx.device.type), gpu=True)
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])
    db = RowBlocks(tensors(blocks)).to(ctx.device)
    return knn_database(db, rows, k, metric, BLOCK)


def search_faiss(vectors: np.ndarray, rows: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Approximate neighbours from an HNSW graph (Malkov & Yashunin 2018); -1 where none was found.

    The graph is built with faiss' threads, so results may differ slightly between runs.
    """
    import faiss

    n, d = vectors.shape
    k_eff = max(0, min(k, n - 1))
    if len(rows) == 0 or k_eff == 0:
        return np.zeros((len(rows), k_eff), np.float32), np.zeros((len(rows), k_eff), np.int64)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWFlat(d, 32)
    index.hnsw.efSearch = max(64, 2 * (k_eff + 1))
    index.add(x)
    found, idx = index.search(x[rows], k_eff + 1)
    return _without_self(found, idx, rows, metric)


def _without_self(found: np.ndarray, idx: np.ndarray, rows: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """faiss' k + 1 results per query as distances and indices (-1, inf: none found), the query
    itself dropped, or the last candidate when the search did not return it."""
    k_eff = idx.shape[1] - 1
    dist = 1.0 - found if metric == "cosine" else np.sqrt(np.maximum(found, 0.0))
    dist = np.where(idx >= 0, dist, np.inf).astype(np.float32)
    is_self = idx == rows[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k_eff)
    keep = np.arange(k_eff + 1)[None, :] != drop[:, None]
    return dist[keep].reshape(len(rows), k_eff), idx[keep].reshape(len(rows), k_eff).astype(np.int64)


def ivf_lists(n: int, nlist: int | None) -> int:
    """Inverted lists for ``n`` rows: ``nlist``, or ``round(4 sqrt(n))`` at most IVF_MAX_LISTS; at most n."""
    lists = nlist if nlist is not None else min(IVF_MAX_LISTS, round(4 * math.sqrt(n)))
    return max(1, min(lists, n))


def ivf_train_rows(n: int, lists: int) -> int:
    """Database rows k-means trains the lists on: IVF_TRAIN_PER_LIST per list, at most all."""
    return min(n, IVF_TRAIN_PER_LIST * lists)


def _gather(blocks: Sequence[np.ndarray], rows: np.ndarray, metric: str) -> np.ndarray:
    """The database rows ``rows`` (float32, on the unit sphere for cosine), from its row blocks."""
    starts = np.cumsum([0] + [len(b) for b in blocks])
    which = np.searchsorted(starts, rows, side="right") - 1
    out = np.empty((len(rows), blocks[0].shape[1]), np.float32)
    for b in np.unique(which):
        hit = which == b
        out[hit] = blocks[b][rows[hit] - starts[b]]
    return _unit32(out, metric)


def _unit32(x: np.ndarray, metric: str) -> np.ndarray:
    """float32 rows as faiss takes them: divided by their norm for cosine (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric != "cosine":
        return x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def search_ivf(blocks: Sequence[np.ndarray], rows: np.ndarray, k: int, metric: str, nlist: int | None = None,
               nprobe: int = 16) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Approximate neighbours from an inverted file (``faiss.IndexIVFFlat``; Jegou et al. 2011), and the
    lists and probes used; -1 where none was found.

    k-means (seeded) on a seeded sample of ``ivf_train_rows`` rows places ``ivf_lists(n, nlist)``
    centroids; every row is stored, as it is, in its nearest centroid's list, and a query scans
    its ``nprobe`` nearest lists with exact distances: ``nprobe = nlist`` is exhaustive search.
    The database is added a block at a time; the index holds its own float32 copy.
    """
    import faiss

    blocks = [b for b in blocks if len(b)]
    n = sum(len(b) for b in blocks)
    d = blocks[0].shape[1] if blocks else 0
    k_eff = max(0, min(k, n - 1))
    lists = ivf_lists(n, nlist) if n else 1
    probe = min(nprobe, lists)
    info = {"nlist": lists, "nprobe": probe}
    if len(rows) == 0 or k_eff == 0:
        return np.zeros((len(rows), k_eff), np.float32), np.zeros((len(rows), k_eff), np.int64), info
    kind = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists, kind)
    index.cp.seed = IVF_SEED
    rng = np.random.default_rng(IVF_SEED)
    train = np.sort(rng.choice(n, ivf_train_rows(n, lists), replace=False))
    index.train(_gather(blocks, train, metric))
    for b in blocks:
        index.add(_unit32(b, metric))
    index.nprobe = probe
    out_d, out_i = [], []
    for s in range(0, len(rows), IVF_QUERY_CHUNK):
        chunk = rows[s:s + IVF_QUERY_CHUNK]
        found, idx = index.search(_gather(blocks, chunk, metric), k_eff + 1)
        dist, idx = _without_self(found, idx, chunk, metric)
        out_d.append(dist)
        out_i.append(idx)
    return np.concatenate(out_d), np.concatenate(out_i), info


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """The fraction of the exact neighbours that the approximate search found."""
    if exact.size == 0:
        return 1.0
    hits = sum(len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / exact.size


def _unknown_ids(queries: Sequence[str], known: Collection[str]) -> str | None:
    missing = [q for q in queries if q not in known]
    if not missing:
        return None
    shown = ", ".join(repr(q) for q in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"{len(missing)} query id(s) not in the dataset: {shown}{more}"


SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int64()), ("space", pa.string()),
                    ("rank", pa.int32()), ("neighbour_id", pa.string()), ("distance", pa.float32()),
                    ("key", pa.string())])


@register
class Neighbours(ReduceAnalysis):
    """The k nearest images of each query in feature space and in pixel space."""

    Params = NeighboursParams
    params: NeighboursParams

    def layers(self) -> list[tuple[tuple[str | int, ...], str]]:
        # Pixel-space neighbours alone need no hooked layer.
        return super().layers() if "feature" in self.params.spaces else []

    def check_dataset(self, image_ids: Collection[str]) -> list[tuple[tuple[str | int, ...], str]]:
        queries = self.params.queries
        if isinstance(queries, list):
            known = image_ids if isinstance(image_ids, (set, frozenset, dict)) else set(image_ids)
            message = _unknown_ids(queries, known)
            if message:
                return [(("queries",), message)]
        return []

    def schema(self) -> dict[str, pa.Schema]:
        return {"": pa.schema([IMAGE_ID, LABEL, *((space, FLOATS) for space in ("feature", "pixel")
                                                  if space in self.params.spaces)])}

    def map_batch(self, batch: MapBatch) -> Rows:
        p = self.params
        rows: dict[str, np.ndarray] = {
            "image_id": np.array(batch.image_ids, dtype=object),
            "label": batch.labels.cpu().numpy().astype(np.int64),
        }
        if "feature" in p.spaces:
            if p.layer is None:  # ruled out by the params' validator
                raise ValueError("space 'feature' needs a layer")
            rows["feature"] = pool(batch.activations[p.layer], p.pool, p.grid).float().cpu().numpy()
        if "pixel" in p.spaces:
            x = batch.images.float()
            if p.pixel_size is not None:
                # Area average: a thumbnail of the input (never enlarged past its own size).
                x = F.adaptive_avg_pool2d(x, (min(p.pixel_size, x.shape[2]), min(p.pixel_size, x.shape[3])))
            rows["pixel"] = x.flatten(1).cpu().numpy()
        return {"": rows}

    def query_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Database rows of the queries: all, a seeded sample (dataset order) or the listed ids (list order)."""
        queries, n = self.params.queries, len(ids)
        if queries == "all":
            return np.arange(n, dtype=np.int64)
        if isinstance(queries, QuerySample):
            if queries.sample >= n:
                return np.arange(n, dtype=np.int64)
            rng = np.random.default_rng(queries.seed)
            return np.sort(rng.choice(n, size=queries.sample, replace=False)).astype(np.int64)
        position = {image_id: i for i, image_id in enumerate(ids)}
        message = _unknown_ids(queries, position)
        if message:
            raise ValueError(f"queries: {message}")
        return np.array([position[q] for q in queries], dtype=np.int64)

    def strip_positions(self, queries: int) -> np.ndarray:
        """Positions (in query order) of the queries whose strips are drawn: all of them up to
        ``strips``, else a seeded sample of that many (the queries' seed), in order."""
        p = self.params
        if queries <= p.strips:
            return np.arange(queries, dtype=np.int64)
        seed = p.queries.seed if isinstance(p.queries, QuerySample) else 0
        return np.sort(np.random.default_rng(seed).choice(queries, p.strips, replace=False)).astype(np.int64)

    def memory_plan(self, inputs: ReduceInputs) -> MemoryPlan:
        """The float32 database of the widest space, one record batch of it being read, the ids,
        and the result table (k rows per query and space)."""
        p = self.params
        n = inputs.rows("")
        dims = {space: inputs.width("", space) for space in p.spaces}
        widest = max(dims, key=lambda s: dims[s])
        queries = len(p.queries) if isinstance(p.queries, list) else (
            n if p.queries == "all" else min(n, p.queries.sample))
        database = n * dims[widest] * 4
        batch = min(n, getattr(inputs, "batch_rows", 65536)) * dims[widest] * 4 * 2
        table = queries * p.k * len(p.spaces) * 160  # ids, distance, key as Arrow and numpy
        total = database + batch + n * 120 + table
        if p.index == "faiss":
            total += database * 2  # faiss' own copy and graph
        elif p.index == "faiss_ivf":
            # The index's own copy and ids, its centroids (and k-means'), the training sample and its
            # unit copy, a block being added, a chunk of queries with its results.
            lists = ivf_lists(n, p.nlist) if n else 0
            block = min(database, DATABASE_BLOCK_BYTES)
            total += database + n * 8 + 2 * (lists + ivf_train_rows(n, lists)) * dims[widest] * 4 + 2 * block + \
                min(queries, IVF_QUERY_CHUNK) * (dims[widest] * 4 * 2 + (p.k + 1) * 32)
        what = (f"the float32 database of {n:,} x {dims[widest]:,} ({widest} space) and "
                f"{queries:,} queries x k={p.k} x {len(p.spaces)} space(s) of results")
        fix = ("reduce the vectors' size (pool: avg on the layer, a smaller pixel_size) or the number of queries "
               "(queries: {sample: 1000})")
        return MemoryPlan(int(total), what, fix)

    def database(self, inputs: ReduceInputs, space: str, ctx: ReduceContext) -> tuple[list[np.ndarray], list[Any]]:
        """One space's vectors, read a record batch at a time, each batch put in the object store
        as it is read: (the blocks as arrays, their handles). The driver ends with one copy."""
        blocks: list[np.ndarray] = []
        handles: list[Any] = []
        pending: list[np.ndarray] = []

        def flush() -> None:
            if pending:
                handle = ctx.put(np.concatenate(pending) if len(pending) > 1 else pending[0])
                handles.append(handle)
                blocks.append(ctx.get(handle))  # a view of the stored block: the read copies are dropped
                pending.clear()

        for rb in inputs.batches("", columns=[space]):
            pending.append(matrix(rb.column(0)))
            # Small record batches (a run's many small part files) are joined into blocks of about
            # DATABASE_BLOCK_BYTES: few blocks make the gathers of the search cheap.
            if sum(a.nbytes for a in pending) >= DATABASE_BLOCK_BYTES:
                flush()
        flush()
        return blocks, handles

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        p = self.params
        head = inputs.read("", columns=["image_id", "label"])
        ids = np.array(head.column("image_id").to_pylist(), dtype=object)
        labels = head.column("label").fill_null(-1).to_numpy().astype(np.int64)
        del head
        rows = self.query_rows(ids.tolist())
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        recall: dict[str, float] = {}
        ivf: dict[str, dict[str, int]] = {}
        for space in p.spaces:
            blocks, handles = self.database(inputs, space, ctx)
            metric = p.metric if space == "feature" else "l2"
            if p.index != "exact":
                if p.index == "faiss":
                    found[space] = search_faiss(np.concatenate(blocks), rows, p.k, metric)
                else:
                    dist, idx, ivf[space] = search_ivf(blocks, rows, p.k, metric, p.nlist, p.nprobe)
                    found[space] = (dist, idx)
                # Recall against exact search on a seeded sample of the queries.
                pick = np.sort(np.random.default_rng(0).choice(len(rows), min(p.recall_sample, len(rows)),
                                                               replace=False))
                _, exact = search_exact(blocks, rows[pick], p.k, metric, ctx, handles)
                recall[space] = round(recall_at_k(found[space][1][pick], exact), 6)
            else:
                found[space] = search_exact(blocks, rows, p.k, metric, ctx, handles)
            del blocks, handles
            ctx.log(f"neighbours: {len(rows):,} queries in {space} space against {len(ids):,} images")
        drawn = self.strip_positions(len(rows)) if p.render else np.zeros(0, np.int64)
        table = self._table(ids, labels, rows, found, drawn)
        stats: dict[str, Any] = {"queries": int(len(rows)), "database": int(len(ids)), "strips": int(len(drawn))}
        if recall:
            stats["recall_at_k"] = recall
        if ivf:
            stats["ivf"] = ivf
        images = self._strips(ids, rows, found, drawn, ctx) if p.render else ()
        return ReduceOutput(tables={"": table}, images=images, stats=stats)

    def _table(self, ids: np.ndarray, labels: np.ndarray, rows: np.ndarray,
               found: dict[str, tuple[np.ndarray, np.ndarray]], drawn: np.ndarray) -> pa.Table:
        parts = []
        is_drawn = np.zeros(len(rows), bool)
        is_drawn[drawn] = True
        for space, (dist, idx) in found.items():
            k_eff = idx.shape[1]
            valid = (idx >= 0).reshape(-1)
            ordinal = np.repeat(np.arange(len(rows)), k_eff)[valid]
            query = rows[ordinal]
            label = labels[query]
            columns = {
                "image_id": pa.array(ids[query].tolist(), pa.string()),
                "label": pa.array(label, pa.int64(), mask=label < 0),
                "space": pa.array([space] * len(query), pa.string()),
                "rank": pa.array(np.tile(np.arange(1, k_eff + 1, dtype=np.int32), len(rows))[valid]),
                "neighbour_id": pa.array(ids[idx.reshape(-1)[valid]].tolist(), pa.string()),
                "distance": pa.array(dist.reshape(-1)[valid].astype(np.float32)),
                "key": pa.array([f"{space}-{q:06d}" if is_drawn[q] else None for q in ordinal], pa.string()),
            }
            parts.append(pa.table(columns, schema=SCHEMA))
        table = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
        return table if self.params.render else table.drop_columns(["key"])

    def _strips(self, ids: np.ndarray, rows: np.ndarray, found: dict[str, tuple[np.ndarray, np.ndarray]],
                drawn: np.ndarray, ctx: ReduceContext) -> Rendered:
        """One strip per drawn query and space, the query first: items of RENDER_CHUNK queries,
        each naming the ids it shows (the pixels are decoded where the item is drawn)."""
        items: list[tuple[str, list[tuple[int, list[str]]]]] = []
        for space, (_, idx) in found.items():
            if idx.shape[1] == 0:
                continue
            for start in range(0, len(drawn), RENDER_CHUNK):
                positions = drawn[start:start + RENDER_CHUNK]
                items.append((space, [(int(position), ids[[q, *neighbours[neighbours >= 0]]].tolist())
                                      for position, q, neighbours in zip(positions, rows[positions], idx[positions])]))
        return Rendered(draw_strips, items, self.params.thumb, ctx.images)


def draw_strips(thumb: int, item: tuple[str, list[tuple[int, list[str]]]], images: Images
                ) -> Iterator[tuple[str, Image.Image]]:
    """The strips of one item: (space, [(query position, [query id, neighbour ids...])])."""
    space, strips = item
    pixels = images(list(dict.fromkeys(i for _, members in strips for i in members)))
    for position, members in strips:
        yield f"{space}-{position:06d}", strip([pixels.get(i) for i in members], min_side=thumb)
