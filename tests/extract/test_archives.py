"""Archive inputs: tar shards written by webdataset's TarWriter, zips, truncated archives, brace ranges, labels
from sidecar members, the rows' chained URIs read back with fsspec, and one stream per archive on S3.

The model is real (the tiny Keras classifier); the worker tests run process_shard in-process, the end-to-end test
runs `featurize extract` on a real local Ray and compares with the same images extracted from a folder.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from pipeline.cli import main
from pipeline.config import InputConfig, ModelConfig
from pipeline.extract.archives import ArchiveBreak, expand_braces, read_members
from pipeline.extract.items import DecodeSettings
from pipeline.extract.listing import list_images
from pipeline.extract.worker import ShardSettings, ShardTask, process_shard
from tests.helpers import write_extract_config
from tests.io.faulty_proxy import FaultyProxy

CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG after all"


def image_bytes(seed: int, image_format: str = "JPEG") -> bytes:
    """A small real image whose colour depends on the seed (features differ from sample to sample)."""
    generator = np.random.default_rng(seed)
    base = generator.integers(0, 256, 3)
    pixels = np.clip(base + generator.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format)
    return buffer.getvalue()


def write_tar_shard(path: Path, shard: int, num_images: int = 4) -> dict[str, bytes]:
    """A WebDataset shard: `.jpg` + `.cls` per sample, plus one sample whose `.jpg` is corrupt. Returns the good
    images by key."""
    good = {}
    with webdataset.TarWriter(str(path)) as writer:
        for index in range(num_images + 1):
            key = f"part{shard}/sample_{index:03d}"
            data = image_bytes(100 * shard + index) if index != 2 else CORRUPT
            writer.write({"__key__": key, "jpg": data, "cls": index % 3})
            if index != 2:
                good[key] = data
    return good


@pytest.fixture(scope="module")
def extractor(tiny_model):
    from pipeline.models.extractor import FeatureExtractor

    return FeatureExtractor(ModelConfig(backbone=str(tiny_model), weights="none", runtime="keras"), batch_size=4,
                            num_threads=1)


def extract_listing(tmp_path: Path, input_config: InputConfig, extractor) -> pd.DataFrame:
    """List the input, run it as one shard through the worker with the real model, return the rows."""
    listing = list_images(input_config)
    settings = ShardSettings(output_uri=str(tmp_path / "out"), output_storage_options={},
                             decode=DecodeSettings(input_config.storage_options), decode_threads=2, run_tag="t")
    task = ShardTask(0, 0, listing.num_rows, listing.column("uri").to_pylist(), listing.column("label").to_pylist())
    result = process_shard(task, extractor, settings)
    return pq.read_table(tmp_path / "out" / result.file).to_pandas()


def test_brace_ranges_and_lists_expand_in_order():
    assert expand_braces("s3://b/shards/{00008..00011}.tar") == [f"s3://b/shards/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("d/{a,b}/x{1..2}.zip") == ["d/a/x1.zip", "d/a/x2.zip", "d/b/x1.zip", "d/b/x2.zip"]
    assert expand_braces("plain/*.tar") == ["plain/*.tar"]


@pytest.mark.ray
def test_tar_shards_through_ray_give_one_row_per_member_and_the_folders_features(tmp_path, ray_local, tiny_model,
                                                                                 extractor):
    (tmp_path / "shards").mkdir()
    good = {}
    for shard in range(2):
        good.update(write_tar_shard(tmp_path / "shards" / f"{shard:05d}.tar", shard))
    folder = tmp_path / "folder"  # the same bytes as loose files: the reference
    for key, data in good.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.jpg").write_bytes(data)
    archive_config = write_extract_config(
        tmp_path / "archives.json", Path(f"{tmp_path}/shards/{{00000..00001}}.tar"), tiny_model,
        tmp_path / "from_archives", input={"labels": "member:cls"}, model={"runtime": "keras"},
        run={"shard_size": 4, "max_error_rate": 0.5})  # 4-member shards: shard boundaries fall inside archives

    assert main(["extract", "--config", str(archive_config)]) == 0

    rows = read_output(tmp_path / "from_archives")
    assert len(rows) == 10 and rows["uri"].is_unique and rows["key"].is_unique
    errors = rows[rows["status"] == "error"]
    assert sorted(errors["key"]) == ["part0/sample_002", "part1/sample_002"]
    assert errors["error"].str.contains("not an image|cannot identify|truncated|decode", regex=True).all()
    ok = rows[rows["status"] == "ok"].set_index("key")
    assert sorted(ok.index) == sorted(good)
    assert all(ok.loc[key, "label"] == str(int(key[-3:]) % 3) for key in good)
    for key, row in ok.iterrows():
        assert row["uri"] == f"tar://{key}.jpg::file://{tmp_path}/shards/0000{key[4]}.tar"
        with fsspec.open(row["uri"]) as handle:
            assert handle.read() == good[key]

    reference = extract_listing(tmp_path, InputConfig(uri=(str(folder),)), extractor)  # the same Keras model
    assert reference["key"].isna().all()  # loose files have no key
    reference = reference.assign(key=reference["uri"].str.removeprefix(f"{folder}/").str.removesuffix(".jpg"))
    reference = reference.set_index("key").loc[ok.index]
    ours, theirs = np.stack(ok["features"]), np.stack(reference["features"])
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.9999


def read_output(output: Path) -> pd.DataFrame:
    success = json.loads((output / "_SUCCESS").read_text())
    return pd.concat([pq.read_table(output / name).to_pandas() for name in success["files"]], ignore_index=True)


@pytest.mark.parametrize("where", ["inside an image", "at a header"])
def test_a_truncated_tar_gives_its_good_members_and_one_error_row_where_it_broke(tmp_path, extractor, where):
    whole_path = tmp_path / "whole.tar"
    write_tar_shard(whole_path, 0, num_images=5)  # samples 0..5, 2 corrupt
    with tarfile.open(whole_path) as archive:
        offsets = {info.name: (info.offset, info.offset_data) for info in archive.getmembers()}
    cut_member = "part0/sample_004.jpg"
    header, data_start = offsets[cut_member]
    cut = data_start + 100 if where == "inside an image" else header
    (tmp_path / "cut.tar").write_bytes(whole_path.read_bytes()[:cut])

    rows = extract_listing(tmp_path, InputConfig(uri=(str(tmp_path / "cut.tar"),), labels="member:cls"), extractor)

    ok = rows[rows["status"] == "ok"]
    assert sorted(ok["key"]) == ["part0/sample_000", "part0/sample_001", "part0/sample_003"]
    # (fsspec's TarFileSystem indexes the whole tar first, so it cannot read members of a cut one back)
    broken = rows[rows["error"].fillna("").str.contains("truncated or corrupt archive")]
    assert len(broken) == 1 and len(rows) == 5  # 3 good, the corrupt sample_002, the break
    reason = broken["error"].iloc[0]
    if where == "inside an image":
        assert broken["key"].iloc[0] == "part0/sample_004" and f"'{cut_member}' at byte {header}" in reason
    else:
        assert broken["key"].isna().iloc[0] and f"at byte {header}" in reason
        assert broken["uri"].iloc[0].startswith(f"tar://#broken-at-byte-{header}::")


def test_a_zip_with_json_labels_gives_one_row_per_image_member(tmp_path, extractor):
    good = {f"set/item_{index}": image_bytes(index, "PNG") for index in range(4)}
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for key, data in good.items():
            archive.writestr(f"{key}.png", data)
            archive.writestr(f"{key}.json", json.dumps({"meta": {"species": f"kind_{key[-1]}"}}))
        archive.writestr("set/broken.png", CORRUPT)
        archive.writestr("__MACOSX/set/._item_0.png", b"resource fork")  # hidden: no row

    rows = extract_listing(tmp_path, InputConfig(uri=(str(tmp_path / "images.zip"),), labels="json:meta.species"),
                           extractor)

    assert len(rows) == 5 and rows["uri"].is_unique
    broken = rows[rows["status"] == "error"]
    assert broken["key"].tolist() == ["set/broken"] and broken["label"].isna().all()
    ok = rows[rows["status"] == "ok"].set_index("key")
    assert sorted(ok.index) == sorted(good)
    assert [ok.loc[key, "label"] for key in good] == [f"kind_{key[-1]}" for key in good]
    for key, uri in ok["uri"].items():
        assert uri == f"zip://{key}.png::file://{tmp_path}/images.zip"
        with fsspec.open(uri) as handle:
            assert handle.read() == good[key]


def test_bad_label_values_fail_at_config_load_naming_the_key(tmp_path, tiny_model, capsys):
    for value in ("member:", "json:", "member:.cls"):
        config = write_extract_config(tmp_path / "c.json", tmp_path / "x.tar", tiny_model, tmp_path / "out",
                                      input={"labels": value})
        assert main(["extract", "--config", str(config)]) == 2
        message = capsys.readouterr().err
        assert "input.labels" in message and ("member:cls" in message or "json:class" in message)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(image_bytes(0, "PNG"))
    folder = write_extract_config(tmp_path / "f.json", tmp_path / "images", tiny_model, tmp_path / "out2",
                                  input={"labels": "member:cls"})
    assert main(["extract", "--config", str(folder)]) == 2
    assert "reads labels from archive members" in capsys.readouterr().err


@pytest.mark.s3
def test_archives_on_s3_are_read_as_one_stream_each(tmp_path, s3, bucket, moto_endpoint, extractor):
    num_tars = 3
    good = {}
    for shard in range(num_tars):
        path = tmp_path / f"{shard:05d}.tar"
        good.update(write_tar_shard(path, shard))
        s3.put_file(str(path), f"{bucket}/shards/{shard:05d}.tar")
    with FaultyProxy(moto_endpoint) as proxy:
        options = proxy.options()
        rows = extract_listing(tmp_path, InputConfig(uri=(f"s3://{bucket}/shards/{{00000..00002}}.tar",),
                                                     labels="member:cls", storage_options=options), extractor)
        gets = sum(count for request, count in proxy.requests.items()
                   if request.startswith(f"GET /{bucket}/shards/"))
    assert len(rows) == 5 * num_tars and rows["uri"].is_unique and (rows["status"] == "ok").sum() == len(good)
    assert gets <= 2 * num_tars + 2  # the listing's stream and the worker's, not one request per member
    ok = rows[rows["status"] == "ok"].set_index("key")
    uri = ok.loc["part1/sample_003", "uri"]
    assert uri == f"tar://part1/sample_003.jpg::s3://{bucket}/shards/00001.tar"
    with fsspec.open(uri, s3={"client_kwargs": {"endpoint_url": moto_endpoint}, "skip_instance_cache": True}) as handle:
        assert handle.read() == good["part1/sample_003"]


def test_a_gzipped_tar_lists_like_the_plain_one_and_a_cut_gzip_stream_names_its_break(tmp_path):
    write_tar_shard(tmp_path / "plain.tar", 0)
    compressed = gzip.compress((tmp_path / "plain.tar").read_bytes())
    (tmp_path / "shard.tgz").write_bytes(compressed)
    (tmp_path / "cut.tar.gz").write_bytes(compressed[: len(compressed) // 2])

    plain = list_images(InputConfig(uri=(str(tmp_path / "plain.tar"),), labels="member:cls")).to_pylist()
    packed = list_images(InputConfig(uri=(str(tmp_path / "shard.tgz"),), labels="member:cls")).to_pylist()
    assert [(row["uri"].replace("shard.tgz", "plain.tar"), row["label"]) for row in packed] == [
        (row["uri"], row["label"]) for row in plain]

    cut = list_images(InputConfig(uri=(str(tmp_path / "cut.tar.gz"),))).column("uri").to_pylist()
    assert 0 < len(cut) <= len(plain) + 1 and len(set(cut)) == len(cut)
    members = list(read_members(str(tmp_path / "cut.tar.gz"), "tar", {}, lambda name: name.endswith(".jpg")))
    assert isinstance(members[-1], ArchiveBreak) and "truncated or corrupt archive" in members[-1].describe()
