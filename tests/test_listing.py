import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, InputConfig
from pipeline.listing import list_images
from tests.conftest import write_labelled_images


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
