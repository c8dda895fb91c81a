"""pipeline.dedup on planted vectors: every planted duplicate found, nothing extra, a
deterministic kept choice, clusters through chains, index selection (GPU via mocks) and
decontamination."""
import itertools

import faiss
import numpy as np
import pytest

from pipeline import dedup

DIM = 32


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def copy_of(rng, v, cos):
    """A unit vector at exactly cosine `cos` to unit vector v."""
    g = rng.standard_normal(v.shape).astype(np.float32)
    g -= (g @ v) * v
    g /= np.linalg.norm(g)
    return (cos * v + np.sqrt(1 - cos**2) * g).astype(np.float32)


def brute_pairs(x, t):
    sims = x @ x.T
    i, j = np.nonzero(np.triu(sims >= t, k=1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.fixture
def planted():
    """400 random vectors; rows 400.. are planted: pairs, a triple and a chain a~b~c (a !~ c)."""
    rng = np.random.default_rng(0)
    x = list(unit(rng, 400))
    groups = []
    for src in (3, 50, 120):  # pairs
        x.append(copy_of(rng, x[src], 0.97))
        groups.append({src, len(x) - 1})
    x.append(copy_of(rng, x[200], 0.96)), x.append(copy_of(rng, x[200], 0.99))  # triple
    groups.append({200, len(x) - 2, len(x) - 1})
    # chain: b at 0.93 to a, c at 0.93 to b in the orthogonal direction, so cos(a, c) ~ 0.86
    a = x[300]
    g = rng.standard_normal(DIM).astype(np.float32)
    g -= (g @ a) * a
    g /= np.linalg.norm(g)
    ang = np.arccos(0.93)
    b = (np.cos(ang) * a + np.sin(ang) * g).astype(np.float32)
    c = (np.cos(2 * ang) * a + np.sin(2 * ang) * g).astype(np.float32)
    x += [b, c]
    groups.append({300, len(x) - 2, len(x) - 1})
    return np.stack(x), groups


def test_flat_finds_exactly_the_planted_pairs(planted):
    x, groups = planted
    pairs, sims = dedup.similar_pairs(x, 0.9, dedup.plan_index(len(x), "flat"))
    found = set(map(tuple, pairs.tolist()))
    assert found == brute_pairs(x, 0.9)
    expected = {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}
    expected.discard((300, len(x) - 1))  # the chain's ends are below the threshold
    assert found == expected
    assert np.all(sims >= 0.9) and np.allclose(sims, [x[i] @ x[j] for i, j in pairs], atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_planted_pairs_and_nothing_false(kind):
    rng = np.random.default_rng(1)
    x = unit(rng, 3000)
    src = rng.choice(3000, 60, replace=False)
    copies = np.stack([copy_of(rng, x[s], 0.95) for s in src])
    x = np.concatenate([x, copies])
    plan = dedup.plan_index(len(x), kind)
    assert plan.kind == kind
    pairs, _ = dedup.similar_pairs(x, 0.9, plan)
    found = set(map(tuple, pairs.tolist()))
    planted_pairs = {(int(s), 3000 + i) for i, s in enumerate(src)}
    assert found <= brute_pairs(x, 0.9)  # nothing that is not a true pair
    assert planted_pairs <= found  # recall 1 on planted copies at cosine 0.95


def test_clusters_join_chains_and_keep_one_per_cluster(planted):
    x, groups = planted
    n = len(x)
    keys = [f"k{i:04d}" for i in range(n)]
    rank = np.zeros((n, 2))
    rank[n - 1, 0] = 5.0  # the chain's far end (c) has the best CLIP score
    res = dedup.near_dedup(x, 0.9, rank, keys, dedup.plan_index(n, "flat"))
    assert res.removed == sum(len(g) - 1 for g in groups)
    for g in groups:
        members = sorted(g)
        kept = [m for m in members if res.keep[m]]
        assert len(kept) == 1
        assert all(res.kept_index[m] == kept[0] for m in members)
    assert res.keep[n - 1] and not res.keep[300] and not res.keep[n - 2]  # chain: c wins
    # ties (all rank 0 in the pair groups) go to the smallest key, i.e. the original row
    assert res.keep[3] and not res.keep[400]
    assert res.similarity[400] == pytest.approx(float(x[400] @ x[3]), abs=1e-5)


def test_kept_choice_is_independent_of_input_order(planted):
    x, _ = planted
    n = len(x)
    rng = np.random.default_rng(5)
    keys = np.array([f"k{i:04d}" for i in range(n)])
    rank = np.stack([rng.integers(0, 3, n), rng.random(n)], axis=1)  # (N, 2), many CLIP ties
    base = dedup.near_dedup(x, 0.9, rank, keys)
    perm = rng.permutation(n)
    shuffled = dedup.near_dedup(x[perm], 0.9, rank[perm], keys[perm])
    assert set(keys[base.keep]) == set(keys[perm][shuffled.keep])


def test_rank_order_then_key_breaks_ties():
    labels = np.array([0, 0, 0, 1, 1])
    keys = ["c", "a", "b", "e", "d"]
    rank = np.array([[0.9, 0.1], [0.9, 0.5], [0.9, 0.5], [np.nan, 0.0], [0.1, 0.0]])
    keep, kept_index = dedup.choose_kept(labels, rank, keys)
    # cluster 0: CLIP ties, ITM ties between a and b, key "a" wins; cluster 1: NaN never wins
    assert keep.tolist() == [False, True, False, False, True]
    assert kept_index.tolist() == [1, 1, 1, 4, 4]


def test_rank_order_is_best_first_then_key_then_input_order():
    keys = ["c", "a", "b", "e", "a"]
    rank = np.array([[0.9, 0.1], [0.9, 0.5], [0.9, 0.5], [np.nan, 0.0], [0.9, 0.5]])
    # a (row 1) and a (row 4) tie completely: input order; the NaN row comes last
    assert dedup.rank_order(rank, keys).tolist() == [1, 4, 2, 0, 3]
    with pytest.raises(ValueError, match="expected 5 rows"):
        dedup.rank_order(rank[:4], keys)


def test_exact_dedup_by_hash_labels():
    hashes = np.array(["h1", "h2", "h1", "h3", "h1"])
    labels = np.unique(hashes, return_inverse=True)[1]
    res = dedup.dedup_by_labels(labels, np.array([0.1, 0.2, 0.3, 0.0, 0.3]), ["a", "b", "c", "d", "e"])
    assert res.keep.tolist() == [False, True, True, True, False]
    assert res.kept_index.tolist() == [2, 1, 2, 3, 2]


def test_union_find_labels():
    labels = dedup.cluster_labels(6, np.array([[0, 1], [2, 3], [1, 3], [4, 4]]))
    assert len({labels[0], labels[1], labels[2], labels[3]}) == 1
    assert len(set(labels.tolist())) == 3


def test_plan_index_choice():
    assert dedup.plan_index(1000, use_gpu=False).kind == "flat"
    big = dedup.plan_index(dedup.FLAT_MAX_ROWS + 1, use_gpu=False, seed=3)
    assert big.kind == "ivf" and big.nlist > 0 and 0 < big.nprobe <= big.nlist and big.seed == 3
    assert dedup.plan_index(10, "ivf", use_gpu=False).kind == "flat"  # too few points to train
    assert dedup.plan_index(10**6, "hnsw", use_gpu=True).use_gpu is False
    with pytest.raises(ValueError, match="unknown index kind 'annoy'"):
        dedup.plan_index(10, "annoy")


class FakeGpuIndex:
    """Stands in for a faiss GPU index: k-NN search only, no range search."""

    def __init__(self, cpu_index):
        self.cpu = cpu_index

    @property
    def ntotal(self):
        return self.cpu.ntotal

    def add(self, x):
        self.cpu.add(x)

    def search(self, x, k):
        return self.cpu.search(x, k)

    def range_search(self, *a):
        raise AssertionError("GPU indexes have no range_search")


def test_gpu_absent_on_faiss_cpu():
    assert dedup.gpu_available() is (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
    assert dedup.plan_index(10, use_gpu=None).use_gpu is dedup.gpu_available()


def test_gpu_is_detected_and_used_when_available(monkeypatch, fake_gpu, planted):
    x, _ = planted
    moved = fake_gpu
    assert dedup.gpu_available() is True
    plan = dedup.plan_index(len(x))
    assert plan.use_gpu and plan.kind == "flat"
    pairs, _ = dedup.similar_pairs(x, 0.9, plan)
    assert len(moved) == 1 and isinstance(moved[0], faiss.IndexFlatIP)
    assert set(map(tuple, pairs.tolist())) == brute_pairs(x, 0.9)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert dedup.plan_index(len(x)).use_gpu is False


@pytest.fixture
def fake_gpu(monkeypatch):
    """faiss as faiss-gpu with one GPU would look: index_cpu_to_all_gpus records its input."""
    moved = []
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda idx: moved.append(idx) or FakeGpuIndex(idx))
    return moved


def big_cluster():
    rng = np.random.default_rng(2)
    x = unit(rng, 200)
    big = np.stack([copy_of(rng, x[0], 0.99) for _ in range(40)])  # 41 mutual near-dups
    return np.concatenate([x, big])


def test_knn_path_grows_k_for_big_clusters(fake_gpu):
    # Exact k-NN (a flat index behind the GPU stand-in) starts at k=16 and must grow to 64.
    x = big_cluster()
    pairs, _ = dedup.similar_pairs(x, 0.9, dedup.plan_index(len(x), "flat"))
    assert set(map(tuple, pairs.tolist())) == brute_pairs(x, 0.9)
    assert len(pairs) == 41 * 40 // 2


def test_hnsw_keeps_big_clusters_whole():
    x = big_cluster()
    pairs, _ = dedup.similar_pairs(x, 0.9, dedup.plan_index(len(x), "hnsw"))
    assert set(map(tuple, pairs.tolist())) <= brute_pairs(x, 0.9)
    labels = dedup.cluster_labels(len(x), pairs)
    assert len(set(labels[[0] + list(range(200, 240))].tolist())) == 1
    assert len(set(labels.tolist())) == 200  # rows 1..199 alone, one cluster of 41


def test_nearest_eval_flags_planted_eval_copies():
    rng = np.random.default_rng(3)
    train = unit(rng, 300)
    eval_set = np.concatenate([unit(rng, 50), np.stack([copy_of(rng, train[i], 0.96) for i in (7, 99)])])
    res = dedup.nearest_eval(train, eval_set)
    hit = res.contaminated(0.9)
    assert np.flatnonzero(hit).tolist() == [7, 99]
    assert res.match[7] == 50 and res.match[99] == 51
    empty = dedup.nearest_eval(train, np.zeros((0, DIM), np.float32))
    assert not empty.contaminated(0.9).any() and (empty.match == -1).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="row 1 has non-finite"):
        dedup.similar_pairs(np.array([[1, 0], [np.nan, 0]], np.float32), 0.9, dedup.IndexPlan("flat"))
    with pytest.raises(ValueError, match="threshold must be in"):
        dedup.similar_pairs(np.eye(3, dtype=np.float32), 1.5, dedup.IndexPlan("flat"))
    with pytest.raises(ValueError, match="dimension 3, release vectors 2"):
        dedup.nearest_eval(np.eye(2, dtype=np.float32), np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        dedup.near_dedup(np.ones(4, np.float32), 0.9, np.zeros(4), list("abcd"))


class OneSidedIndex(FakeGpuIndex):
    """Reports every pair from its larger end only, as an approximate index may."""

    def search(self, x, k):
        sims, ids = self.cpu.search(x, k)
        hidden = ids > ids[:, :1]  # column 0 is the query itself
        return np.where(hidden, -1.0, sims).astype(np.float32), np.where(hidden, -1, ids)


def test_pairs_seen_from_one_end_only_are_kept(monkeypatch, planted):
    x, _ = planted
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", OneSidedIndex)
    pairs, sims = dedup.similar_pairs(x, 0.9, dedup.plan_index(len(x), "flat"))
    assert set(map(tuple, pairs.tolist())) == brute_pairs(x, 0.9)
    assert len(pairs) == len(set(map(tuple, pairs.tolist())))  # each pair once
