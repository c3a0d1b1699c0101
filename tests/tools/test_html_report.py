"""`featurize report`: HTML pages of an extract, dedup and search output, opened in a real headless browser
(Debian's chromium driven by Selenium): no console errors, every picture rendered, the key text on the page.

The extract output comes from a real `featurize extract` (the tiny Keras model, a corrupt file among real images);
the dedup and search outputs are written directly in their stages' layout (groups.parquet, neighbours.parquet).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests.helpers import read_rows, unfinished_output, write_extract_config, write_labelled_images

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SECRET = "SECRETVALUE1234"


@pytest.fixture(scope="module")
def browser():
    """Headless chromium with its console log kept; skipped only where Debian's chromium is not installed."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,2400"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def card(path) -> str:
    """How a picture's card names its image: the last two parts of the path."""
    return "…/" + "/".join(Path(path).parts[-2:])


def open_page(browser, index: Path) -> dict:
    """Load a page; its SEVERE console entries, every <img> (src prefix, loaded, natural width), and its text."""
    browser.get_log("browser")  # drop what an earlier page left
    browser.get(index.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    images = browser.execute_script("return Array.from(document.images).map(image => "
                                    "[image.getAttribute('src').slice(0, 40), image.complete, image.naturalWidth])")
    return {"severe": [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"],
            "images": images, "text": browser.find_element("tag name", "body").text, "html": browser.page_source}


def assert_renders(page: dict, num_images: int) -> None:
    assert page["severe"] == []
    assert len(page["images"]) == num_images
    assert all(complete and width > 0 for _, complete, width in page["images"]), page["images"]


@pytest.mark.ray
def test_extract_report_shows_progress_errors_a_gallery_and_a_map(tmp_path, ray_local, tiny_model, browser):
    images = tmp_path / "images"
    write_labelled_images(images, num_classes=2, per_class=10)
    (images / "class_0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    config = write_extract_config(tmp_path / "extract.json", images, tiny_model, tmp_path / "out",
                                  input={"labels": "from_dirs"}, model={"runtime": "keras"},
                                  run={"shard_size": 6, "max_error_rate": 0.5})
    assert main(["extract", "--config", str(config)]) == 0
    rows, success = read_rows(tmp_path / "out")
    missing = images / "class_1" / "image_003.png"
    missing.unlink()  # deleted since: its gallery card says why there is no picture

    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 0
    page = open_page(browser, tmp_path / "report" / "index.html")
    browser.set_window_size(1400, browser.execute_script("return document.body.scrollHeight") + 200)
    browser.save_screenshot(str(tmp_path / "extract-report.png"))  # the whole page, for a person to look at

    assert_renders(page, num_images=19 + 3)  # 20 ok rows less the deleted one, progress, stage split, map
    text = page["text"]
    assert "21 (20 ok, 1 error)" in text and "4 of 4 committed" in text
    for heading in ("Throughput over time", "Stage split", "Errors by reason", "Sample rows", "Embedding map"):
        assert heading in text
    error = rows[rows["status"] == "error"].iloc[0]
    assert error["error"] in text and str(images / "class_0" / "corrupt.jpg") in text
    assert f"no picture: fetch failed: not found\n{card(missing)}" in text
    assert "t-SNE of 20 sampled feature vectors (cosine geometry), coloured by label" in text
    assert text.count("label: class_0") == text.count("label: class_1") == 10  # the deleted image keeps its row
    assert f"throughput {success['images_per_second']:.1f} images/s" in text
    # every ok row (20: fewer than the gallery holds) on one card with its label and top-k as written
    expected = [("no picture: fetch failed: not found\n" if uri == str(missing) else "") + card(uri)
                + f"\nlabel: {label}\n" + "\n".join(f"{name} {score:.3f}" for name, score in zip(names, scores))
                for uri, label, names, scores in rows[rows["status"] == "ok"][
                    ["uri", "label", "top_k_labels", "top_k_scores"]].itertuples(index=False)]
    cards = [element.text for element in browser.find_elements("css selector", ".card")]
    assert sorted(cards) == sorted(expected)
    assert len(list((tmp_path / "report" / "thumbnails").iterdir())) == 19


def write_analysis_output(output: Path, stage: str, file_name: str, table: pa.Table) -> Path:
    output.mkdir(parents=True)
    pq.write_table(table, output / file_name)
    (output / "_SUCCESS").write_text(json.dumps({"stage": stage, "files": [file_name]}))
    return output


def test_dedup_report_draws_the_largest_groups_kept_image_first(tmp_path, browser):
    paths = [str(path) for path in write_labelled_images(tmp_path / "images", num_classes=2, per_class=4)]
    hostile = tmp_path / "images" / "<b>bold.png"  # a file name that would be markup if it were not escaped
    shutil.copy(paths[0], hostile)
    secret = tmp_path / "images" / f"photo_token={SECRET}.png"  # redacted wherever the page shows it
    shutil.copy(paths[1], secret)
    missing = str(tmp_path / "images" / "gone.jpg")
    # group 7: 4 images, the third kept; group 3: 3 images, one missing; groups 1 and 2: singletons
    uris = [paths[2], paths[3], paths[4], str(hostile), paths[5], missing, str(secret), paths[6], paths[7]]
    groups = [7, 7, 7, 7, 3, 3, 3, 1, 2]
    keep = [False, False, True, False, True, False, False, True, True]
    similarity = [0.97, 0.95, 1.0, 0.99, 1.0, 0.93, 0.96, 1.0, 1.0]
    table = pa.table({"uri": uris, "group": pa.array(groups, pa.int64()),
                      "similarity": pa.array(similarity, pa.float32()), "keep": keep})
    output = write_analysis_output(tmp_path / "dedup", "dedup", "groups.parquet", table)

    assert main(["report", str(output), "--out", str(tmp_path / "report")]) == 0
    page = open_page(browser, tmp_path / "report" / "index.html")
    browser.save_screenshot(str(tmp_path / "dedup-report.png"))

    assert_renders(page, num_images=6)  # the two groups' 7 members less the missing one; no singletons
    text = page["text"]
    assert "groups with near-duplicates 2" in text and "images not kept 5" in text
    assert text.index("group 7: 4 images") < text.index("group 3: 3 images")
    sheet = text[text.index("group 7"):text.index("group 3")]
    assert sheet.index(card(paths[4])) < sheet.index(card(hostile)) < sheet.index(card(paths[2])) \
        < sheet.index(card(paths[3]))
    assert "kept" in sheet and "similarity 0.990" in sheet
    assert "<b>bold.png" in text and "<b>bold" not in page["html"]  # shown as text, escaped in the source
    assert SECRET not in page["html"] and "photo_token=***" in text
    assert f"no picture: fetch failed: not found\n{card(missing)}" in text
    assert card(paths[6]) not in text  # singletons are not drawn


def test_dedup_report_says_why_each_image_joined_its_group(tmp_path, browser):
    """A verified dedup's groups.parquet: each member shows its reason, cosine and phash bits to the kept image."""
    paths = [str(path) for path in write_labelled_images(tmp_path / "images", num_classes=1, per_class=5)]
    copy = tmp_path / "images" / "copy-of-first.png"
    shutil.copy(paths[0], copy)
    uris = [paths[0], str(copy), paths[1], paths[2], paths[3]]
    table = pa.table({"uri": uris, "group": pa.array([4, 4, 4, 9, 9], pa.int64()),
                      "similarity": pa.array([1.0, 1.0, 0.912, 1.0, 0.634], pa.float32()),
                      "keep": [True, False, False, True, False], "reason": [None, "exact", "near", None, "near"],
                      "hamming": pa.array([0, 0, 14, 0, 6], pa.int32())})
    output = write_analysis_output(tmp_path / "dedup", "dedup", "groups.parquet", table)
    success = json.loads((output / "_SUCCESS").read_text())
    (output / "_SUCCESS").write_text(json.dumps({**success, "verify": "phash", "threshold": 0.5, "max_hamming": 20}))

    assert main(["report", str(output), "--out", str(tmp_path / "report")]) == 0
    page = open_page(browser, tmp_path / "report" / "index.html")
    browser.save_screenshot(str(tmp_path / "dedup-verified-report.png"))

    assert_renders(page, num_images=5)
    text = page["text"]
    assert "exact copies (the same bytes) 1" in text and "verify phash" in text and "max_hamming 20" in text
    first = text[text.index("group 4: 3 images"):text.index("group 9: 2 images")]
    assert f"{card(paths[0])}" in first and "kept" in first
    assert f"exact copy\n{card(copy)}" in first or f"{card(copy)}\nexact copy" in first, first
    assert "near: similarity 0.912, 14 bits" in first
    assert "near: similarity 0.634, 6 bits" in text[text.index("group 9: 2 images"):]


def test_search_report_puts_each_query_beside_its_neighbours(tmp_path, browser):
    paths = [str(path) for path in write_labelled_images(tmp_path / "images", num_classes=2, per_class=3)]
    queries = [paths[0], paths[3]]
    rows = [(query, rank, neighbour, score) for query, neighbours in zip(queries, [paths[1:4], paths[4:6] + [paths[0]]])
            for rank, (neighbour, score) in enumerate(zip(neighbours, [0.987, 0.912, 0.5]), start=1)]
    rows = rows[2::-1] + rows[:2:-1]  # each query's neighbours written worst first: the report sorts by rank
    query_uri, rank, uri, score = map(list, zip(*rows))
    table = pa.table({"query_uri": query_uri, "rank": pa.array(rank, pa.int32()), "uri": uri,
                      "score": pa.array(score, pa.float32())})
    output = write_analysis_output(tmp_path / "search", "search", "neighbours.parquet", table)

    assert main(["report", str(output), "--out", str(tmp_path / "report"), "--self-contained"]) == 0
    page = open_page(browser, tmp_path / "report" / "index.html")

    assert_renders(page, num_images=8)  # 2 queries beside 3 neighbours each
    assert [path.name for path in (tmp_path / "report").iterdir()] == ["index.html"]
    assert all(source.startswith("data:image/jpeg;base64,") for source, _, _ in page["images"])
    text = page["text"]
    assert "queries 2" in text and "neighbours per query 3" in text
    first = text[text.index(f"{card(paths[0])}\nquery"):text.index(f"{card(paths[3])}\nquery")]
    assert [line for line in first.splitlines() if "score" in line or "/" in line] == [
        card(paths[0]), card(paths[1]), "#1 score 0.987", card(paths[2]), "#2 score 0.912", card(paths[3]),
        "#3 score 0.500"]


def test_an_unfinished_extract_gets_its_report_and_a_train_output_or_nothing_a_clear_error(tmp_path, capsys):
    output = unfinished_output(tmp_path)  # shard 0 of 3 committed: 2 ok rows whose files do not exist, 1 error
    assert main(["report", str(output), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "incomplete: rerun the same `featurize extract` to finish" in page and "1 of 3 committed" in page
    assert page.count("no picture: fetch failed: not found") == 2 and "Too few ok rows for a map" in page
    assert "truncated image: cut short" in page

    assert main(["report", str(tmp_path / "nothing")]) == 2
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "metrics.json").write_text("{}")
    assert main(["report", str(tmp_path / "trained")]) == 2
    errors = capsys.readouterr().err
    assert "nothing does not exist" in errors and "draws extract, search and dedup outputs" in errors


@pytest.mark.s3
def test_a_search_output_and_its_images_on_s3_are_reached_through_the_configs_storage_options(
        tmp_path, browser, s3, bucket, moto_endpoint, capsys):
    """`featurize report` and `featurize inspect` take `--config`: output.storage_options reach the output,
    input.storage_options the images (here the loopback S3 server's endpoint, in no environment variable)."""
    paths = write_labelled_images(tmp_path / "images", num_classes=1, per_class=3)
    images = [f"s3://{bucket}/images/{path.name}" for path in paths]
    s3.pipe({uri[len("s3://"):]: path.read_bytes() for uri, path in zip(images, paths)})
    local = write_analysis_output(tmp_path / "search", "search", "neighbours.parquet", pa.table({
        "query_uri": [images[0]] * 2, "rank": pa.array([1, 2], pa.int32()), "uri": images[1:],
        "score": pa.array([0.9, 0.8], pa.float32())}))
    output = f"s3://{bucket}/search"
    s3.put(str(local), output.removeprefix("s3://"), recursive=True)
    options = {"client_kwargs": {"endpoint_url": moto_endpoint}}
    config = tmp_path / "store.yaml"
    config.write_text(json.dumps({"output": {"storage_options": options}, "input": {"storage_options": options}}))

    assert main(["inspect", output, "--config", str(config)]) == 0
    assert "(search)" in capsys.readouterr().out
    assert main(["report", output, "--config", str(config), "--out", str(tmp_path / "report"),
                 "--self-contained"]) == 0
    page = open_page(browser, tmp_path / "report" / "index.html")
    assert_renders(page, num_images=3)  # the query and its two neighbours, read from the store
    assert "no picture" not in page["text"]
