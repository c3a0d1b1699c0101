"""The sha256 and phash columns: sha256 is hashlib's of the bytes as fetched (an archive member's own bytes), equal
only for equal bytes; phash agrees with imagehash.phash of the same file. Through process_shard without Ray (a
stand-in model: the hashes are the worker's part), and decode_image over a few hundred photos and scans."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps
from rich.console import Console

from pipeline.cli import main
from pipeline.extract.archives import member_uri
from pipeline.extract.decode import decode_image
from pipeline.extract.hashes import dct_hash
from pipeline.extract.items import DecodeSettings
from pipeline.extract.worker import ShardSettings, ShardTask, process_shard
from pipeline.tools.report import inspect_output
from tests.extract.test_worker import StandInExtractor
from tests.helpers import read_rows, write_extract_config, write_labelled_images
from tests.images import EXIF_ORIENTATION_TAG, encode, photo_bytes, photo_like_image


def reference_phash(data: bytes) -> imagehash.ImageHash:
    """imagehash's phash of the file, upright (imagehash itself ignores EXIF orientation)."""
    return imagehash.phash(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))


def shard_rows(tmp_path, uris: list[str], content_hashes: bool = True) -> dict[str, dict]:
    settings = ShardSettings(output_uri=str(tmp_path / "out"), output_storage_options={},
                             decode=DecodeSettings({}, content_hashes=content_hashes), decode_threads=2)
    result = process_shard(ShardTask(0, 0, len(uris), uris=uris, labels=[None] * len(uris)), StandInExtractor(4),
                           settings)
    return {row["uri"]: row for row in pq.read_table(tmp_path / "out" / result.file).to_pylist()}


def test_sha256_is_the_bytes_hash_and_phash_imagehashs_for_files_and_archive_members(tmp_path):
    rotated = photo_like_image(60, 90, seed=3)
    exif = rotated.getexif()
    exif[EXIF_ORIENTATION_TAG] = 6
    contents = {"photo.jpg": photo_bytes(height=120, width=160, seed=1),
                "re-encoded.jpg": encode(Image.open(io.BytesIO(photo_bytes(height=120, width=160, seed=1))),
                                         "JPEG", quality=60),  # the same picture, other bytes
                "other.png": photo_bytes("PNG", height=90, width=70, seed=2),
                "rotated.jpg": encode(rotated, "JPEG", exif=exif)}
    contents["copy-of-photo.jpg"] = contents["photo.jpg"]
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with tarfile.open(folder / "shard.tar", "w") as archive:
        for name in ("photo.jpg", "other.png"):
            archive.add(folder / name, arcname=f"sample/{name}")
    members = {member_uri("tar", f"sample/{name}", str(folder / "shard.tar")): contents[name]
               for name in ("photo.jpg", "other.png")}
    loose = {str(folder / name): data for name, data in contents.items()}
    rows = shard_rows(tmp_path, [*loose, str(folder / "broken.jpg"), *members])

    expected = {**loose, **members}
    for uri, data in expected.items():
        row = rows[uri]
        assert row["status"] == "ok" and row["sha256"] == hashlib.sha256(data).hexdigest(), uri
        assert row["phash"] == str(reference_phash(data)), uri
    digests = {uri: rows[uri]["sha256"] for uri in expected}
    for first in expected:
        for second in expected:
            assert (digests[first] == digests[second]) == (expected[first] == expected[second])
    def bits(first: str, second: str) -> int:
        return imagehash.hex_to_hash(rows[str(folder / first)]["phash"]) - imagehash.hex_to_hash(
            rows[str(folder / second)]["phash"])

    assert bits("re-encoded.jpg", "photo.jpg") <= 4 < 16 <= bits("other.png", "photo.jpg")  # same picture: close
    broken = rows[str(folder / "broken.jpg")]
    assert broken["status"] == "error" and broken["sha256"] is None and broken["phash"] is None

    without = shard_rows(tmp_path / "off", list(loose), content_hashes=False)
    assert all(row["sha256"] is None and row["phash"] is None for row in without.values())


def varied_images(count: int) -> list[tuple[str, bytes]]:
    """(format, bytes): real photos and scans (scikit-image, scikit-learn) at sizes from 40 to 700 pixels a side
    (every thirtieth a JPEG large enough to be draft-decoded), some cropped to other aspect ratios, in six formats
    at varied quality; every tenth a generated one."""
    from tests.analyse.conftest import real_photos

    photos = list(real_photos().values())
    generator = np.random.default_rng(0)
    images = []
    for number in range(count):
        if number % 10 == 9:
            image = photo_like_image(int(generator.integers(40, 400)), int(generator.integers(40, 400)), number)
        else:
            image = Image.fromarray(photos[number % len(photos)])
            drafted = number % 30 == 0  # a JPEG whose shorter side reaches 2 x draft margin 4 x 224: drafted
            scale = 1850 / min(image.size) if drafted else int(generator.integers(40, 700)) / max(image.size)
            image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
            if number % 3 == 0 and not drafted:
                image = image.crop((0, 0, image.width * 3 // 4, image.height))
        format = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")[number % 6]
        options = {"quality": int(generator.integers(30, 96))} if format in ("JPEG", "WEBP") else {}
        images.append((format, encode(image, format, **options)))
    return images


def test_phash_agrees_with_imagehash_over_hundreds_of_photos_sizes_and_formats():
    """The worker's call, draft on by default: with a `stretch` resize (the default) the phash is taken from the
    model's input when that is a scaled-down copy of the picture; with `center_crop` from the decoded picture."""
    differences = {"stretch": [], "center_crop": []}
    drafted = []
    for format, data in varied_images(300):
        reference = reference_phash(data)
        for resize, found in differences.items():
            decoded = decode_image(data, (224, 224), resize=resize, perceptual_hash=True)
            found.append(imagehash.hex_to_hash(decoded.phash) - reference)
        if format == "JPEG" and min(decoded.width, decoded.height) >= 2 * 4 * 224:
            drafted += [found[-1] for found in differences.values()]
        small = Image.open(io.BytesIO(data)).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
        assert dct_hash(small) == str(imagehash.phash(small))  # the library's DCT and median, bit for bit
    for resize, found in differences.items():
        assert np.mean(found) <= 1.0 and max(found) <= 4, (resize, np.mean(found), max(found))
        print(f"phash vs imagehash, {resize}: mean {np.mean(found):.3f}, max {max(found)} bits over {len(found)}")
    assert drafted and max(drafted) <= 4, drafted  # draft-decoded JPEGs: the pixels differ a little
    print(f"{len(drafted) // 2} drafted JPEGs: {drafted}")


@pytest.mark.ray
def test_a_run_writes_the_hashes_inspect_counts_shared_bytes_and_an_older_output_is_not_mixed(
        tmp_path, ray_local, tiny_model, capsys):
    images = tmp_path / "images"
    paths = write_labelled_images(images, num_classes=2, per_class=6)
    shutil.copy(paths[0], images / "class_0" / "copy-a.png")
    shutil.copy(paths[0], images / "class_1" / "copy-b.png")
    shutil.copy(paths[1], images / "class_1" / "copy-c.png")
    output = tmp_path / "out"
    config = write_extract_config(tmp_path / "extract.json", images, tiny_model, output, model={"runtime": "keras"},
                                  run={"shard_size": 5})
    assert main(["extract", "--config", str(config)]) == 0
    rows, _ = read_rows(output)
    for uri, sha256 in zip(rows["uri"], rows["sha256"]):
        assert sha256 == hashlib.sha256(Path(uri).read_bytes()).hexdigest()
    assert rows["phash"].str.fullmatch("[0-9a-f]{16}").all()

    capsys.readouterr()
    summary = inspect_output(str(output), Console(width=300))
    assert summary["shared_bytes"] == {"images": 5, "contents": 2}  # paths[0] three times, paths[1] twice
    assert "5 images share their bytes with another (2 contents)" in capsys.readouterr().out

    # The same output as a featurize older than the columns left it: its plan has no `content_hashes` input.
    plan_file = output / "_plan.json"
    plan = json.loads(plan_file.read_text())
    del plan["fingerprint_inputs"]["content_hashes"]
    plan_file.write_text(json.dumps(plan))
    assert main(["extract", "--config", str(config)]) == 0  # finished: a resume writes nothing, nothing to mix
    (output / "_commits" / "shard-00001.json").unlink()  # a shard left to run
    capsys.readouterr()
    assert main(["extract", "--config", str(config)]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "older than the sha256 and phash columns" in message and "output.mode: overwrite" in message
    assert main(["extract", "--config", str(config), "--set", "output.mode=overwrite"]) == 0
    rows, _ = read_rows(output)
    assert rows["sha256"].notna().all() and len(rows) == 15
