"""capfilt.pipeline.release.dedup on planted vectors: every planted duplicate found, nothing extra, a
deterministic kept choice, clusters through chains, index selection (GPU via mocks) and
decontamination."""
import itertools

import faiss
import numpy as np
import pytest

from capfilt.pipeline.release import dedup

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


def test_rank_order_is_best_first_then_key_then_input_order():
    keys = ["c", "a", "b", "e", "a"]
    rank = np.array([[0.9, 0.1], [0.9, 0.5], [0.9, 0.5], [np.nan, 0.0], [0.9, 0.5]])
    # a (row 1) and a (row 4) tie completely: input order; the NaN row comes last
    assert dedup.rank_order(rank, keys).tolist() == [1, 4, 2, 0, 3]
    with pytest.raises(ValueError, match="expected 5 rows"):
        dedup.rank_order(rank[:4], keys)


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
        dedup.similar_pairs(np.ones(4, np.float32), 0.9, dedup.IndexPlan("flat"))


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
