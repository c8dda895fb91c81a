"""Near-duplicate search time, memory and recall: exact (IndexFlatIP) against approximate
(IVF, HNSW) faiss indexes, on random 256-d unit vectors with planted near-duplicates.

Each (size, index) runs in its own child process so that peak RSS belongs to that index alone:
the child reports its RSS after the data is made, the peak RSS at the end (``ru_maxrss``) and
tracemalloc's peak (numpy buffers; faiss's C++ allocations are only in RSS).

Planted duplicates: ``--dup-frac`` of the rows are copies of other rows plus Gaussian noise at
cosine ~``1/sqrt(1+noise^2)`` (0.958 for noise 0.3). Unrelated random 256-d unit vectors have
cosine ~N(0, 1/16), so at ``--threshold 0.9`` every true pair is a planted one, and recall is
the fraction of planted pairs whose two rows end in the same cluster.

Exact search over 1M rows is ~2.6e14 multiply-adds; with ``--flat-sample Q`` the child times Q
queries against the full index and extrapolates linearly (marked in the output).

    .venv/bin/python benchmarks/bench_dedup.py --sizes 100000 1000000 --out bench_dedup.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np


def make_data(n: int, dim: int, dup_frac: float, noise: float, seed: int):
    """(n, dim) float32 unit rows and the planted pairs (P, 2): row j is a noisy copy of row i."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    n_dup = int(n * dup_frac)
    dst = rng.choice(n, size=n_dup, replace=False)
    pool = np.setdiff1d(np.arange(n), dst)
    src = rng.choice(pool, size=n_dup, replace=False)
    x[dst] = x[src] / np.linalg.norm(x[src], axis=1, keepdims=True) * np.sqrt(dim) \
        + noise * rng.standard_normal((n_dup, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.stack([src, dst], axis=1)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(args) -> dict:
    """Child: one index kind on one size."""
    import faiss

    from capfilt.pipeline.release import dedup

    faiss.omp_set_num_threads(args.threads)
    x, planted = make_data(args.n, args.dim, args.dup_frac, args.noise, args.seed)
    base_rss = rss_mb()
    cpu0 = cpu_seconds()
    tracemalloc.start()
    plan = dedup.plan_index(args.n, args.kind, use_gpu=False, seed=args.seed)
    result = {"n": args.n, "dim": args.dim, "kind": args.kind, "plan": plan.to_dict(),
              "planted_pairs": int(len(planted)), "threads": args.threads}
    if args.kind == "flat" and args.flat_sample and args.flat_sample < args.n:
        # Time a sample of queries against the full index; extrapolate the search linearly.
        t0 = time.perf_counter()
        index = dedup.build_index(x, plan)
        t_build, c_build = time.perf_counter() - t0, cpu_seconds() - cpu0
        q = x[: args.flat_sample]
        t0, c0 = time.perf_counter(), cpu_seconds()
        index.range_search(q, args.threshold)
        t_q, c_q = time.perf_counter() - t0, cpu_seconds() - c0
        scale = args.n / args.flat_sample
        result.update(extrapolated=True, queries_timed=args.flat_sample, build_s=t_build,
                      seconds=t_build + t_q * scale, cpu_s=c_build + c_q * scale, recall=1.0)
    else:
        t0 = time.perf_counter()
        pairs, _ = dedup.similar_pairs(x, args.threshold, plan)
        t_pairs = time.perf_counter() - t0
        labels = dedup.cluster_labels(args.n, pairs)
        seconds = time.perf_counter() - t0
        found = labels[planted[:, 0]] == labels[planted[:, 1]]
        planted_set = {(min(a, b), max(a, b)) for a, b in planted.tolist()}
        extra = sum((int(a), int(b)) not in planted_set for a, b in pairs.tolist())
        result.update(extrapolated=False, seconds=seconds, pair_search_s=t_pairs, pairs_found=int(len(pairs)),
                      recall=float(found.mean()) if len(found) else 1.0, extra_pairs=int(extra),
                      cpu_s=cpu_seconds() - cpu0)
    _, peak = tracemalloc.get_traced_memory()
    result.update(tracemalloc_peak_mb=peak / 2**20, data_rss_mb=base_rss,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["index_rss_mb"] = result["peak_rss_mb"] - base_rss
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dup-frac", type=float, default=0.01, help="fraction of rows that are planted copies")
    p.add_argument("--noise", type=float, default=0.3, help="noise of a copy (cosine ~ 1/sqrt(1+noise^2))")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flat-sample", type=int, default=20_000,
                   help="above --flat-full-max rows, time this many exact queries and extrapolate")
    p.add_argument("--flat-full-max", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return
    results = []
    for n in args.sizes:
        for kind in args.kinds:
            sample = args.flat_sample if (kind == "flat" and n > args.flat_full_max) else 0
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--kind", kind, "--dim", str(args.dim),
                   "--dup-frac", str(args.dup_frac), "--noise", str(args.noise), "--threshold", str(args.threshold),
                   "--threads", str(args.threads), "--flat-sample", str(sample), "--seed", str(args.seed)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{kind} n={n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(res)
            print(f"n={n:>8} {kind:5s} {res['seconds']:9.1f} s wall {res['cpu_s']:9.1f} s CPU"
                  f"{' (extrapolated)' if res['extrapolated'] else ''}"
                  f"  recall {res['recall']:.4f}  index RSS {res['index_rss_mb']:7.0f} MB"
                  f"  tracemalloc peak {res['tracemalloc_peak_mb']:7.0f} MB", flush=True)
        flat = next((r for r in results if r["n"] == n and r["kind"] == "flat"), None)
        for r in results:
            if flat and r["n"] == n and r["kind"] != "flat":
                print(f"n={n:>8} {r['kind']}: {flat['seconds'] / r['seconds']:.1f}x less wall time, "
                      f"{flat['cpu_s'] / r['cpu_s']:.1f}x less CPU than exact", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
