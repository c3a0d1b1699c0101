"""Verified dedup on real photos: planted copies (half size, JPEG q25, 5% crop, all three, the same bytes under
another name) must join their photo's group, and the photo's four quadrant crops, distinct images that pooled
features put as close as a 5% crop, must not."""

from __future__ import annotations

import itertools

import imagehash
import pyarrow.parquet as pq
import pytest

from pipeline.analyse.dedup import dedup
from pipeline.config import DedupConfig, load_config
from tests.analyse.conftest import write_features_output


def pair_scores(groups, shows: dict[str, str]) -> tuple[float, float]:
    """(precision, recall) over image pairs: a pair is true when both files show the same image."""
    group = dict(zip(groups["uri"], groups["group"]))
    pairs = list(itertools.combinations(sorted(group), 2))
    truth = {pair for pair in pairs if shows[pair[0]] == shows[pair[1]]}
    found = {pair for pair in pairs if group[pair[0]] == group[pair[1]]}
    return len(found & truth) / max(len(found), 1), len(found & truth) / len(truth)


def run_dedup(features: str, output, *settings: str, say=print):
    success = dedup(load_config(DedupConfig, None, [f"features.uri={features}", f"output.uri={output}",
                                                    *settings]), say=say)
    return success, pq.read_table(output / "groups.parquet").to_pandas()


def test_defaults_keep_crops_apart_and_put_exact_copies_with_their_original(planted_with_crops, tmp_path):
    crops = planted_with_crops
    warnings = []
    success, groups = run_dedup(crops.output, tmp_path / "verified", say=warnings.append)
    assert warnings == [] and success["verify"] == "phash"
    precision, recall = pair_scores(groups, crops.shows)
    assert precision >= 0.95 and recall >= 0.90, (precision, recall)
    assert success["counts"]["rejected"] > 0  # the hash turned candidates away

    by_uri = groups.set_index("uri")
    copies = [uri for uri in crops.ok_uris if "/copy-of-" in uri]
    assert len(copies) == 19
    for copy in copies:
        original = copy.replace("copy-of-", "").replace(".png", "-original.png")
        pair = by_uri.loc[[copy, original]]
        assert pair["group"].nunique() == 1  # the same bytes: always in one group
        if pair["keep"].any():  # one of the two represents the group: the other is its exact copy
            other = pair[~pair["keep"]].iloc[0]
            assert (other["reason"], other["similarity"], other["hamming"]) == ("exact", 1.0, 0), other
        else:  # both joined a third image: the same distances to it
            assert pair["hamming"].nunique() == 1 and pair["similarity"].nunique() == 1
    assert groups.loc[groups["keep"], "reason"].isna().all()
    assert set(groups.loc[~groups["keep"], "reason"]) <= {"exact", "near"}

    # hamming to the representative, recomputed with imagehash from the rows' phash
    keeper = groups[groups["keep"]].set_index("group")["uri"]
    for _, row in groups[~groups["keep"]].iterrows():
        expected = (imagehash.hex_to_hash(crops.hashes[row["uri"]][1])
                    - imagehash.hex_to_hash(crops.hashes[keeper[row["group"]]][1]))
        assert row["hamming"] == expected
        assert row["reason"] == "near" or row["hamming"] == 0


def test_cosine_alone_joins_the_crops_the_hash_keeps_apart(planted_with_crops, tmp_path):
    """The measurement behind the defaults: verify none is the cosine-only dedup, and on these photos it cannot
    reach the precision bar at its own default."""
    success, groups = run_dedup(planted_with_crops.output, tmp_path / "cosine", "dedup.verify=none")
    assert success["verify"] == "none" and success["threshold"] == 0.78
    precision, _ = pair_scores(groups, planted_with_crops.shows)
    assert precision < 0.95, precision


def test_an_output_without_hashes_falls_back_to_cosine_with_one_warning(planted_with_crops, tmp_path):
    crops = planted_with_crops
    old = write_features_output(str(tmp_path / "old"), crops.uris, crops.ok_uris, crops.features, crops.provenance)
    warnings = []
    success, groups = run_dedup(old, tmp_path / "fallback", say=warnings.append)
    assert len(warnings) == 1 and f"{len(crops.ok_uris)} of {len(crops.ok_uris)} images have no sha256/phash" \
        in warnings[0] and "dedup.verify: none" in warnings[0]
    assert success["verify"] == "none" and success["threshold"] == 0.78 and "exact_pairs" not in success["counts"]
    assert groups["hamming"].isna().all()
    assert set(groups.loc[~groups["keep"], "reason"]) == {"near"}
    _, cosine = run_dedup(crops.output, tmp_path / "cosine", "dedup.verify=none")
    assert cosine.set_index("uri")["group"].equals(groups.set_index("uri")["group"])  # the same groups as none

    silent = []
    run_dedup(old, tmp_path / "asked", "dedup.verify=none", say=silent.append)
    assert silent == []  # asked for cosine alone: nothing to warn about


@pytest.mark.parametrize("setting, named", [("dedup.verify=dhash", "dedup.verify"),
                                            ("dedup.max_hamming=65", "dedup.max_hamming")])
def test_bad_verify_keys_are_refused_naming_the_key(tmp_path, setting, named):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=named):
        load_config(DedupConfig, None, ["features.uri=x", f"output.uri={tmp_path}", setting])
