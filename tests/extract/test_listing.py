import os
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.errors import ConfigError
from pipeline.extract.listing import list_images
from tests import images
from tests.helpers import write_labelled_images


def test_directory_listing_is_sorted_filtered_and_labelled_from_dirs(tmp_path):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=3)
    (tmp_path / "images" / "class_0" / "notes.txt").write_text("not an image")
    listing = list_images(InputConfig(uri=(str(tmp_path / "images"),), labels="from_dirs"))
    assert listing.column("uri").to_pylist() == sorted(str(path) for path in paths)
    assert listing.column("label").to_pylist() == ["class_0"] * 3 + ["class_1"] * 3


def test_glob_and_list_of_sources_drop_repeats_keep_order(tmp_path):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=2)
    first = str(tmp_path / "images" / "class_1")
    listing = list_images(InputConfig(uri=(first, str(tmp_path / "images" / "*" / "*.png"))))
    uris = listing.column("uri").to_pylist()
    assert len(uris) == len(set(uris))
    assert uris[:2] == sorted(str(p) for p in paths if "class_1" in str(p))
    assert set(uris) == {str(p) for p in paths if "class_1" in str(p) or p.suffix == ".png"}


@pytest.mark.parametrize("kind", ["csv", "parquet", "txt"])
def test_manifests_with_relative_paths_and_label_column(tmp_path, kind):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=2)
    relative = [str(path.relative_to(tmp_path)) for path in paths]
    labels = [path.parent.name.upper() for path in paths]
    manifest = tmp_path / f"manifest.{kind}"
    if kind == "csv":
        manifest.write_text("uri,breed\n" + "".join(f"{u},{b}\n" for u, b in zip(relative, labels)))
    elif kind == "parquet":
        pq.write_table(pa.table({"uri": relative, "breed": labels}), manifest)
    else:
        manifest.write_text("# one uri a line\n" + "\n".join(relative) + "\n")
    listing = list_images(InputConfig(uri=(str(manifest),), labels="none" if kind == "txt" else "breed"))
    assert listing.column("uri").to_pylist() == sorted(str(tmp_path / r) for r in relative)
    if kind != "txt":
        by_uri = dict(zip(listing.column("uri").to_pylist(), listing.column("label").to_pylist()))
        assert by_uri[str(paths[0])] == "CLASS_0"


def test_missing_label_column_and_missing_input_are_config_errors(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\na.jpg\n")
    with pytest.raises(ConfigError, match="column 'breed' is not in manifest"):
        list_images(InputConfig(uri=(str(manifest),), labels="breed"))
    with pytest.raises(ConfigError, match="neither a directory"):
        list_images(InputConfig(uri=(str(tmp_path / "nowhere"),)))


def test_odd_file_names_are_listed(tmp_path):
    folder = tmp_path / "odd"
    write_labelled_images(folder, num_classes=1, per_class=1)
    source = next(folder.rglob("*.jpg"))
    for name in ["with space.jpg", "ünïcödé.jpg", "hash#tag.jpg", "question?.jpg"]:
        (source.parent / name).write_bytes(source.read_bytes())
    listing = list_images(InputConfig(uri=(str(folder),)))
    assert listing.num_rows == 5


# --------------------------------------------------------------------------------------------------
# hidden files: skipped below the listed root, kept when named explicitly
# --------------------------------------------------------------------------------------------------


def write_hidden_files(root, image_bytes):
    """What editors, notebooks, git and macOS leave next to images; none of it is an image to process."""
    hidden = [".cover.jpg", "class_0/._image_000.jpg", "class_0/.ipynb_checkpoints/image_000-checkpoint.jpg",
              ".git/objects/blob.png", "__MACOSX/class_0/._image_000.jpg", "__MACOSX/class_0/image_000.jpg"]
    for name in hidden:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes)
    return [root / name for name in hidden]


def test_hidden_files_and_directories_are_skipped_in_a_directory_listing(tmp_path):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=2)
    write_hidden_files(tmp_path / "images", paths[0].read_bytes())
    listing = list_images(InputConfig(uri=(str(tmp_path / "images"),), labels="from_dirs"))
    assert listing.column("uri").to_pylist() == sorted(str(path) for path in paths)
    assert listing.column("label").to_pylist() == ["class_0"] * 2 + ["class_1"] * 2


def test_hidden_files_are_skipped_in_a_glob_unless_the_glob_names_them(tmp_path):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=2)
    hidden = write_hidden_files(tmp_path / "images", paths[0].read_bytes())
    for pattern in ["**/*.jpg", "*/*", "class_0/*.jpg"]:
        listing = list_images(InputConfig(uri=(str(tmp_path / "images" / pattern),)))
        uris = listing.column("uri").to_pylist()
        assert uris and not set(uris) & {str(path) for path in hidden}, pattern
    named = list_images(InputConfig(uri=(str(tmp_path / "images" / "*" / ".ipynb_checkpoints" / "*.jpg"),)))
    assert named.column("uri").to_pylist() == [str(hidden[2])]


def test_a_root_inside_a_hidden_directory_still_lists_its_images(tmp_path):
    root = tmp_path / ".cache" / "images"
    paths = write_labelled_images(root, num_classes=2, per_class=2)
    write_hidden_files(root, paths[0].read_bytes())
    expected = sorted(str(path) for path in paths)
    for uri in [str(root), str(root) + "/", f"file://{root}", str(root / "*" / "*")]:
        listing = list_images(InputConfig(uri=(uri,), labels="from_dirs"))
        assert [value.removeprefix("file://") for value in listing.column("uri").to_pylist()] == expected, uri
        assert set(listing.column("label").to_pylist()) == {"class_0", "class_1"}


def test_a_manifest_or_an_image_file_naming_a_hidden_file_keeps_it(tmp_path):
    paths = write_labelled_images(tmp_path / "images", num_classes=1, per_class=1)
    hidden = write_hidden_files(tmp_path / "images", paths[0].read_bytes())
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("uri\n" + "".join(f"{path}\n" for path in hidden))
    listing = list_images(InputConfig(uri=(str(manifest),)))
    assert sorted(listing.column("uri").to_pylist()) == sorted(str(path) for path in hidden)
    single = list_images(InputConfig(uri=(str(hidden[1]),)))
    assert single.column("uri").to_pylist() == [str(hidden[1])]


# --------------------------------------------------------------------------------------------------
# a single image file as input.uri
# --------------------------------------------------------------------------------------------------


def test_a_single_image_file_lists_as_one_image_labelled_by_its_directory(tmp_path):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=2)
    image = paths[-1]
    labelled = list_images(InputConfig(uri=(str(image),), labels="from_dirs"))
    assert labelled.to_pylist() == [{"uri": str(image), "label": "class_1"}]
    unlabelled = list_images(InputConfig(uri=(str(image),)))
    assert unlabelled.to_pylist() == [{"uri": str(image), "label": None}]
    upper = image.with_name("PHOTO.JPG")
    upper.write_bytes(image.read_bytes())
    assert list_images(InputConfig(uri=(str(upper),))).num_rows == 1
    together = list_images(InputConfig(uri=(str(image), str(tmp_path / "images"))))
    assert together.num_rows == 5 and together.column("uri")[0].as_py() == str(image)


def test_a_file_of_another_kind_is_a_config_error_naming_its_extension_and_what_is_allowed(tmp_path):
    other = tmp_path / "holiday.heic"
    other.write_bytes(b"not listed")
    with pytest.raises(ConfigError) as raised:
        list_images(InputConfig(uri=(str(other),)))
    message = str(raised.value)
    assert message.startswith(f"input.uri: {other} is a file with the extension '.heic'")
    assert "input.extensions (jpg, jpeg, png" in message and "(.csv, .parquet, .txt)" in message
    assert "add 'heic' to input.extensions" in message
    bare = tmp_path / "README"
    bare.write_text("no extension")
    with pytest.raises(ConfigError, match="is a file with no extension, which is neither an image extension"):
        list_images(InputConfig(uri=(str(bare),)))
    with pytest.raises(ConfigError, match="input.labels: 'breed' names a manifest column, but .* is an image file"):
        list_images(InputConfig(uri=(str(write_labelled_images(tmp_path / "one", 1, 1)[0]),), labels="breed"))


# --------------------------------------------------------------------------------------------------
# an input with no images stops before any work, saying what to check
# --------------------------------------------------------------------------------------------------


def test_an_input_without_images_is_a_config_error_saying_where_it_looked_and_what_to_check(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    only_hidden = tmp_path / "only_hidden"
    only_hidden.mkdir()
    write_hidden_files(only_hidden, b"\xff\xd8\xff")
    (only_hidden / "notes.txt").write_text("not an image")
    for uris in [(str(empty),), (str(only_hidden),), (str(tmp_path / "*" / "*.png"),), (str(empty), str(only_hidden))]:
        with pytest.raises(ConfigError) as raised:
            list_images(InputConfig(uri=uris, extensions=("jpg", ".PNG")))
        assert str(raised.value) == (
            f"input.uri: no images under {', '.join(uris)} with extensions jpg, png (hidden files are skipped); "
            "check the path, input.extensions and input.storage_options")


@pytest.mark.parametrize("kind", ["csv header", "csv zero bytes", "parquet", "txt comments"])
def test_an_empty_manifest_is_a_config_error_that_says_so(tmp_path, kind):
    manifest = tmp_path / f"manifest.{kind.split()[0]}"
    if kind == "csv header":
        manifest.write_text("uri,breed\n")
    elif kind == "csv zero bytes":
        manifest.write_bytes(b"")
    elif kind == "parquet":
        pq.write_table(pa.table({"uri": pa.array([], pa.string())}), manifest)
    else:
        manifest.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError) as raised:
        list_images(InputConfig(uri=(str(manifest),)))
    assert str(raised.value) == (f"input.uri: the manifest {manifest} is empty (no rows); add the images' URIs "
                                 "to it, or point input.uri at the images' directory")


def test_an_empty_manifest_next_to_an_empty_directory_names_both(tmp_path):
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no images under .*empty with extensions .*; the manifest .* is empty"):
        list_images(InputConfig(uri=(str(tmp_path / "empty"), str(manifest))))


def test_listing_a_directory_with_symlink_loops_terminates(tmp_path):
    root = tmp_path / "archive"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "image.png").write_bytes(images.photo_bytes("PNG", 8, 8))
    os.symlink("../..", root / "a" / "b" / "to_root")
    os.symlink(root / "a", root / "a" / "b" / "to_a_absolute")
    os.symlink("self.png", root / "a" / "self.png")
    with ThreadPoolExecutor(1) as pool:
        listing = pool.submit(list_images, InputConfig(uri=(str(root),))).result(timeout=60)
    uris = listing.column("uri").to_pylist()
    assert uris == [str(root / "a" / "b" / "image.png"), str(root / "a" / "self.png")]
