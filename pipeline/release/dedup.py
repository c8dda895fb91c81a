"""Duplicate detection for dataset releases: exact (by content hash) and near (by cosine of
image embeddings in faiss), plus decontamination against an evaluation set.

Everything here works on plain numpy arrays, so it is independent of the model that made the
embeddings (the release uses CLIP; the tests plant vectors directly).

* **Index choice.** ``plan_index`` picks faiss ``IndexFlatIP`` (exact) for small sets and an
  approximate index for large ones: IVF (``IndexIVFFlat``) by default, HNSW on request. On a
  machine with faiss-gpu and a visible GPU, flat and IVF indexes are moved to the GPU; GPU
  indexes have no range search, so there the neighbours come from k-NN search with ``k``
  doubled until no row has all ``k`` neighbours above the threshold.
* **Pairs → clusters.** Near-duplicate pairs are joined transitively with a small union-find:
  faiss returns pairs, not clusters, and a dozen lines of union-find keeps the dependency list
  to faiss and numpy. A chain a~b~c with a !~ c is therefore one cluster.
* **Which duplicate is kept.** Per cluster, the row with the highest ``rank`` vector
  (compared left to right, e.g. best selected-caption CLIP score, then ITM), ties broken by
  the smallest key. This never depends on input order, batch size or thread count.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX_ROWS = 50_000  # above this, exact all-pairs search costs minutes on a small CPU
QUERY_BATCH = 8192  # rows per range search call: bounds the memory of one result set
GPU_MAX_K = 2048  # the largest k faiss GPU k-NN search accepts
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class IndexPlan:
    """How to index a set of vectors. ``nlist``/``nprobe``/``train_*`` apply to IVF,
    ``hnsw_m``/``ef_search`` to HNSW; ``seed`` makes IVF's k-means training reproducible."""

    kind: str
    use_gpu: bool = False
    nlist: int = 0
    nprobe: int = 0
    train_per_list: int = 0  # IVF k-means sample: this many points per list
    train_iters: int = 0
    hnsw_m: int = 0
    ef_search: int = 0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def plan_index(n: int, kind: str = "auto", *, use_gpu: bool | None = None,
               flat_max: int = FLAT_MAX_ROWS, seed: int = 0) -> IndexPlan:
    """Choose the index for ``n`` vectors. ``use_gpu=None`` detects faiss-gpu at run time."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    if kind == "auto":
        kind = "flat" if n <= flat_max else "ivf"
    if kind == "ivf" and n < 64:
        kind = "flat"  # k-means needs points to train on; a tiny set is searched exactly
    gpu = gpu_available() if use_gpu is None else bool(use_gpu)
    if kind == "hnsw":
        gpu = False  # faiss has no GPU HNSW
    if kind == "ivf":
        # ~4 sqrt(n) lists keeps them short. Probing 1/64 of them (at least 16) found every
        # planted duplicate at cosine ~0.96 (docs/benchmarks/dedup.md). k-means on 64 points
        # per list for 10 rounds places the lists well enough and costs a fraction of faiss's
        # default (256 points, 25 rounds), which otherwise dominates the whole dedup.
        nlist = int(min(max(4 * np.sqrt(n), 16), n // 8))
        return IndexPlan("ivf", gpu, nlist=nlist, nprobe=min(nlist, max(16, nlist // 64)),
                         train_per_list=64, train_iters=10, seed=seed)
    if kind == "hnsw":
        # On 100k random 256-d vectors, efSearch 16 / 64 / 128 found 79% / 95% / 99% of the
        # planted duplicates (docs/benchmarks/dedup.md): graph search needs a wide beam here.
        return IndexPlan("hnsw", False, hnsw_m=16, ef_search=128, seed=seed)
    return IndexPlan("flat", gpu, seed=seed)


def _as_matrix(vectors: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"{name} row {bad} has non-finite values")
    return x


def build_index(vectors: np.ndarray, plan: IndexPlan) -> faiss.Index:
    """An inner-product index over ``vectors`` (N, D), already trained and filled."""
    x = _as_matrix(vectors, "vectors")
    d = x.shape[1]
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif plan.kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = plan.seed
        index.cp.max_points_per_centroid = plan.train_per_list or 256
        index.cp.niter = plan.train_iters or 25
        index.train(x)
        index.nprobe = plan.nprobe
    elif plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, plan.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = plan.ef_search
    else:
        raise ValueError(f"unknown index kind {plan.kind!r}")
    if plan.use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def _range_neighbours(index, x: np.ndarray, threshold: float, plan: IndexPlan):
    """(query, neighbour, cosine) triples with cosine >= threshold, in query batches.

    faiss range search is used where it works: GPU indexes lack it, and HNSW's aborts the
    process in faiss 1.15 when run on several threads, so those two use k-NN instead."""
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps sim > r
    for start in range(0, len(x), QUERY_BATCH):
        q = x[start:start + QUERY_BATCH]
        if plan.use_gpu or plan.kind == "hnsw":
            yield from _knn_neighbours(index, q, start, threshold)
            continue
        lims, sims, ids = index.range_search(q, radius)
        rows = np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims).astype(np.int64)) + start
        ok = sims >= threshold
        yield rows[ok], ids[ok].astype(np.int64), sims[ok]


def _knn_neighbours(index, q: np.ndarray, start: int, threshold: float, k: int = 16):
    """k-NN stand-in for range search: rows whose k-th neighbour still reaches the threshold
    are searched again with 2k, until none is saturated or k reaches GPU_MAX_K."""
    rows = np.arange(len(q))
    while len(rows):
        k = min(k, GPU_MAX_K, index.ntotal)
        sims, ids = index.search(q[rows], k)  # (R, k)
        saturated = sims[:, -1] >= threshold
        last = k >= min(GPU_MAX_K, index.ntotal)
        done = ~saturated | last
        if last and saturated.any():
            log.warning("k-NN search saturated at k=%d: clusters larger than k may be split", k)
        d_sims, d_ids = sims[done], ids[done]
        hit_row, hit_col = np.nonzero((d_sims >= threshold) & (d_ids >= 0))
        yield rows[done][hit_row] + start, d_ids[hit_row, hit_col].astype(np.int64), d_sims[hit_row, hit_col]
        rows = rows[~done]
        k *= 2


def similar_pairs(vectors: np.ndarray, threshold: float, plan: IndexPlan) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with cosine(v_i, v_j) >= threshold.

    Returns ``pairs`` (P, 2) int64 and ``sims`` (P,) float32, sorted by (i, j). With an
    approximate plan some pairs may be missed (see the recall figures in the docs).
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"cosine threshold must be in [-1, 1], got {threshold}")
    x = _as_matrix(vectors, "vectors")
    if len(x) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    t0 = last = time.time()
    index = build_index(x, plan)
    found_i, found_j, found_s = [], [], []
    for rows, ids, sims in _range_neighbours(index, x, threshold, plan):
        # Drop self-matches and orient every pair (i < j): an approximate index may report a
        # pair from one end only, so neither end can be dropped; duplicates go below.
        keep = rows != ids
        found_i.append(np.minimum(rows, ids)[keep]), found_j.append(np.maximum(rows, ids)[keep])
        found_s.append(sims[keep])
        if time.time() - last >= PROGRESS_EVERY_S and len(rows):
            last = time.time()
            log.info("near-dup search (%s): %d/%d rows, %.0f s", plan.kind, rows.max() + 1, len(x), last - t0)
    pairs = np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1)  # (P', 2)
    pairs, first = np.unique(pairs, axis=0, return_index=True)  # sorted by (i, j)
    return pairs, np.concatenate(found_s).astype(np.float32)[first]


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return int(a)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def labels(self) -> np.ndarray:
        """(n,) int64: the root of every element."""
        return np.array([self.find(a) for a in range(len(self.parent))], dtype=np.int64)


def cluster_labels(n: int, pairs: np.ndarray) -> np.ndarray:
    """(n,) int64 cluster label per element after joining every pair (P, 2)."""
    uf = UnionFind(n)
    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2):
        uf.union(int(a), int(b))
    return uf.labels()


def _check_rank(rank: np.ndarray, keys, n: int) -> np.ndarray:
    r = np.asarray(rank, dtype=np.float64)
    if r.ndim == 1:
        r = r[:, None]  # (N,) -> (N, 1)
    if r.ndim != 2 or r.shape[0] != n or len(keys) != n:
        raise ValueError(f"rank has shape {r.shape} and keys {len(keys)} entries; expected {n} rows")
    return np.where(np.isfinite(r), r, -np.inf)  # a missing score never wins


def rank_order(rank: np.ndarray, keys) -> np.ndarray:
    """(N,) int64: row indices best first — highest ``rank`` (N, R) left to right, then the
    smallest key, then input order (which copy of a duplicate the release keeps)."""
    r = _check_rank(rank, keys, len(keys))
    key_arr = np.asarray(keys, dtype=object).astype(str)
    return np.lexsort((key_arr, *[-r[:, c] for c in range(r.shape[1] - 1, -1, -1)])).astype(np.int64)


@dataclass
class Contamination:
    """Best eval match of each of N rows.

    match: (N,) int64 — index of the most similar eval vector (-1 when the eval set is empty).
    similarity: (N,) float32 — its cosine (-inf when the eval set is empty).
    """

    match: np.ndarray
    similarity: np.ndarray

    def contaminated(self, threshold: float) -> np.ndarray:
        """(N,) bool: rows whose best eval match reaches ``threshold``."""
        return (self.match >= 0) & (self.similarity >= threshold)


def nearest_eval(vectors: np.ndarray, eval_vectors: np.ndarray, plan: IndexPlan | None = None) -> Contamination:
    """For every row of ``vectors`` (N, D), its nearest neighbour in ``eval_vectors`` (M, D)."""
    x = _as_matrix(vectors, "vectors")
    n = len(x)
    if len(eval_vectors) == 0 or n == 0:
        return Contamination(np.full(n, -1, np.int64), np.full(n, -np.inf, np.float32))
    e = _as_matrix(eval_vectors, "eval vectors")
    if e.shape[1] != x.shape[1]:
        raise ValueError(f"eval vectors have dimension {e.shape[1]}, release vectors {x.shape[1]}")
    index = build_index(e, plan or plan_index(len(e)))
    sims, ids = index.search(x, 1)  # (N, 1)
    return Contamination(ids[:, 0].astype(np.int64), sims[:, 0].astype(np.float32))
