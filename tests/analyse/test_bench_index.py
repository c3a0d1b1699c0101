"""`featurize bench --index` (pipeline/analyse/bench.py), on a collection small enough for the suite."""

from __future__ import annotations

import json

import numpy as np

from pipeline.analyse.bench import recall_at, run


def test_recall_counts_the_true_neighbours_each_query_found():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])  # half of the first query's, all of the second's
    assert recall_at(found, exact) == 0.75


def test_index_bench_measures_each_kind_against_exact_search_and_writes_what_it_prints(tmp_path, capsys):
    report = run(3000, 64, 30, tmp_path, pq_sizes=(8,), kinds=("hnsw", "ivf_pq"))
    assert json.loads((tmp_path / "bench-index.json").read_text()) == report
    flat, *others = report["rows"]
    assert (flat["index"], flat["recall_at_10"], flat["bytes_per_vector"]) == ("flat", 1.0, 64 * 4)
    assert {row["index"] for row in others} == {"hnsw", "ivf_pq"}
    assert max(row["recall_at_10"] for row in others if row["index"] == "hnsw") >= 0.95
    assert all(0 <= row["recall_at_10"] <= 1 and row["speedup_vs_flat"] > 0 for row in others)
    assert report["ten_million"]["flat"] == round(10_000_000 * 64 * 4 / 2**30, 1)
    printed = capsys.readouterr().out
    assert "| flat |" in printed and "10M x dim on one node" in printed
