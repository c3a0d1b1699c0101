"""Index trade-offs on synthetic-but-clustered features: recall@10 against exact search, speed, memory.

    python -m pipeline.analyse.bench --vectors 200000 --dim 1280 --output results/bench-index

Vectors are drawn as CNN features behave (clusters, a low-dimensional spread within each, small noise), so that
nearest neighbours are well defined. Every kind `featurize index` builds is timed on the same data and queries;
recall@10 is the share of the exact top 10 (faiss flat search) that each approximate index finds. Writes
bench-index.json and prints the table the README quotes, plus what 10M vectors need at each code size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.analyse.index import (
    HNSW_NEIGHBOURS,
    IndexPlan,
    code_sizes,
    hnsw_bytes,
    ivf_pq_bytes,
    new_index,
    number_of_lists,
    serialize,
)
from pipeline.analyse.neighbours import set_search_knobs
from pipeline.analyse.vectors import as_metric_space
from pipeline.config import IndexOptions


def clustered_vectors(num_vectors: int, dim: int, seed: int, num_clusters: int = 1000, spread_dims: int = 32
                      ) -> np.ndarray:
    """Cluster centres plus a low-rank spread and a little isotropic noise, non-negative as pooled ReLU maps."""
    generator = np.random.default_rng(seed)
    centres = np.random.default_rng(1).gamma(1.0, 1.0, (num_clusters, dim)).astype(np.float32)
    directions = np.random.default_rng(2).normal(0, 0.05, (spread_dims, dim)).astype(np.float32)
    out = np.empty((num_vectors, dim), np.float32)
    for start in range(0, num_vectors, 50_000):
        count = min(50_000, num_vectors - start)
        latent = generator.normal(0, 1, (count, spread_dims)).astype(np.float32)
        noise = generator.normal(0, 0.1, (count, dim)).astype(np.float32)
        out[start:start + count] = np.maximum(centres[generator.integers(0, num_clusters, count)]
                                              + latent @ directions + noise, 0)
    return out


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(row) & set(truth)) / len(truth) for row, truth in zip(found, exact)]))


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, time.perf_counter() - started


def run(num_vectors: int, dim: int, num_queries: int, output: Path, k: int = 10, train_sample: int = 65_536,
        pq_sizes: tuple[int, ...] = (64, 128), kinds: tuple[str, ...] = ("hnsw", "ivf_pq", "ivf_pq_refine")) -> dict:
    options = IndexOptions(train_sample=train_sample)
    vectors = as_metric_space(clustered_vectors(num_vectors, dim, seed=0), "cosine")
    queries = as_metric_space(clustered_vectors(num_queries, dim, seed=7), "cosine")
    rows: list[dict] = []
    report = {"vectors": num_vectors, "dim": dim, "queries": num_queries, "k": k, "rows": rows}

    def measure(name: str, plan: IndexPlan, knobs: list[tuple[str, int]]):
        started = time.perf_counter()
        index = new_index(plan, "cosine")
        if not index.is_trained:
            sample = vectors[np.random.default_rng(0).choice(num_vectors, min(num_vectors, options.train_sample),
                                                                replace=False)]
            index.train(sample)
        index.add(vectors)
        build = time.perf_counter() - started
        size = len(serialize(index))
        for knob, value in knobs or [("", 0)]:
            settings = {"nprobe": 32, "ef_search": 0, "refine_factor": 1, knob: value}
            set_search_knobs(index, plan.kind, settings["nprobe"], settings["ef_search"], settings["refine_factor"])
            ids, seconds = timed_search(index, queries, k)
            row = {"index": name, "factory": plan.factory(), "knob": f"{knob}={value}" if knob else "",
                   "build_s": round(build, 1), "bytes_per_vector": round(size / num_vectors, 1),
                   "query_ms": round(1000 * seconds / num_queries, 3)}
            exact = rows[0]["ids"] if rows else ids
            row["recall_at_10"] = round(recall_at(ids, exact), 4)
            speedup = (rows[0]["query_ms"] if rows else row["query_ms"]) / row["query_ms"]
            row["speedup_vs_flat"] = float(f"{speedup:.2g}")  # two significant digits: 0.04x is not 0.0x
            print(row, flush=True)
            rows.append({**row, "ids": ids} if not rows else row)
        del index

    measure("flat", IndexPlan("flat", num_vectors, dim, 0), [])  # the exact top 10 every other row is scored on
    if "hnsw" in kinds:
        measure("hnsw", IndexPlan("hnsw", num_vectors, dim, hnsw_bytes(num_vectors, dim), hnsw_m=HNSW_NEIGHBOURS),
                [("ef_search", 64), ("ef_search", 128), ("ef_search", 256)])
    nlist = number_of_lists(num_vectors, options.train_sample)
    for pq_m in pq_sizes if "ivf_pq" in kinds else ():
        measure("ivf_pq", IndexPlan("ivf_pq", num_vectors, dim, ivf_pq_bytes(num_vectors, dim, nlist, pq_m),
                                    nlist=nlist, pq_m=pq_m), [("nprobe", 16), ("nprobe", 64)])
    if "ivf_pq_refine" in kinds:  # a PQ64 shortlist of refine_factor x k, re-ranked with 8-bit vectors
        measure("ivf_pq", IndexPlan("ivf_pq", num_vectors, dim, ivf_pq_bytes(num_vectors, dim, nlist, 64, True),
                                    nlist=nlist, pq_m=64, refine=True),
                [("refine_factor", factor) for factor in (4, 16, 32, 64)])
    rows[0].pop("ids")
    lists = number_of_lists(10_000_000)
    report["ten_million"] = {f"ivf_pq m={m}": round(ivf_pq_bytes(10_000_000, dim, lists, m) / 2**30, 2)
                             for m in code_sizes(dim) if m in (32, 64, 128, 160)}
    report["ten_million"]["ivf_pq m=64 + SQ8 re-rank"] = round(ivf_pq_bytes(10_000_000, dim, lists, 64, True) / 2**30, 1)
    report["ten_million"]["flat"] = round(10_000_000 * dim * 4 / 2**30, 1)
    report["ten_million"]["hnsw"] = round(hnsw_bytes(10_000_000, dim) / 2**30, 1)
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench-index.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['vectors']} vectors x {report['dim']} dims, {report['queries']} queries, recall@{report['k']}")
    print("| index | parameters | build (s) | bytes/vector | ms/query | speedup vs flat | recall@10 |")
    print("|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        print(f"| {row['index']} | {row['factory']} {row['knob']} | {row['build_s']} | {row['bytes_per_vector']} | "
              f"{row['query_ms']} | {row['speedup_vs_flat']}x | {row['recall_at_10']} |")
    print("10M x dim on one node (GiB):", report["ten_million"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--train-sample", type=int, default=65_536, help="vectors IVF-PQ trains on")
    parser.add_argument("--pq-sizes", default="64,128", help="IVF-PQ code sizes (bytes per vector) to measure")
    parser.add_argument("--kinds", default="hnsw,ivf_pq,ivf_pq_refine", help="indexes measured besides flat")
    parser.add_argument("--output", default="results/bench-index")
    arguments = parser.parse_args()
    run(arguments.vectors, arguments.dim, arguments.queries, Path(arguments.output),
        train_sample=arguments.train_sample, pq_sizes=tuple(int(size) for size in arguments.pq_sizes.split(",")),
        kinds=tuple(arguments.kinds.split(",")))


if __name__ == "__main__":
    main()
