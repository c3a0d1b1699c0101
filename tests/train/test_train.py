"""The train stage on real data: sklearn's digits (1797 images, 10 classes) as the feature vectors.

Extract outputs are written in the exact layout `featurize extract` produces (row schema, shard data files,
commit records, `_SUCCESS` with files and provenance), with error rows mixed in, without running a backbone.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.config import TrainOutputConfig
from pipeline.io import storage
from pipeline.output import ledger
from pipeline.train import fit, predict
from pipeline.train.metrics import print_summary
from tests.helpers import ERROR_REASON, PROVENANCE, train_config, write_extract_output

FAST_MLP = {"kind": "mlp", "hidden_units": 64, "dropout": 0.2, "epochs": 10, "patience": 5, "batch_size": 32}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, extract_output) -> tuple[str, dict]:
    output = str(tmp_path_factory.mktemp("mlp"))
    return output, fit.train(train_config(extract_output, output, **FAST_MLP))


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_logistic_metrics_contract_and_accuracy(logistic_run, digits):
    output, metrics = logistic_run
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix", "classes",
                "num_train", "num_test", "skipped_error_rows", "skipped_unlabelled_rows", "classifier", "split",
                "provenance", "feature_dim"):
        assert key in metrics, key
    assert json.loads((Path(output) / "metrics.json").read_text()) == metrics
    classes = [str(digit) for digit in range(10)]
    assert metrics["classes"] == classes  # the orphan file's "orphan" class was never read
    num_ok = int(digits.ok.sum())
    assert metrics["skipped_error_rows"] == len(digits.error_rows)
    assert metrics["skipped_unlabelled_rows"] == 0
    assert metrics["num_train"] + metrics["num_test"] == num_ok
    assert metrics["num_test"] == pytest.approx(0.2 * num_ok, abs=1)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == metrics["num_test"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["accuracy"])
    assert np.mean(np.diag(matrix) / matrix.sum(axis=1)) == pytest.approx(metrics["balanced_accuracy"])
    assert np.mean([values["f1"] for values in metrics["per_class"].values()]) == pytest.approx(metrics["macro_f1"])
    assert [metrics["per_class"][name]["support"] for name in classes] == matrix.sum(axis=1).tolist()
    for values in metrics["per_class"].values():
        assert all(0.0 <= values[key] <= 1.0 for key in ("precision", "recall", "f1"))
    assert metrics["classifier"]["kind"] == "logistic" and metrics["classifier"]["mode"] == "in_memory"
    assert metrics["split"]["method"] == "stratified"
    assert metrics["provenance"] == PROVENANCE and metrics["feature_dim"] == 64

    # The same pipeline, cross-validated by sklearn on the same ok rows.
    reference = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                                digits.features[digits.ok], np.array(digits.labels)[digits.ok],
                                cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean()
    assert metrics["accuracy"] >= 0.9
    assert abs(metrics["accuracy"] - reference) <= 0.03

    for name in ("confusion_matrix.png", "per_class_f1.png"):
        assert_valid_png(Path(output) / name)
    document = json.loads((Path(output) / "classifier.json").read_text())
    assert document["kind"] == "logistic" and document["classes"] == classes
    assert document["provenance"] == PROVENANCE and document["feature_dim"] == 64
    with np.load(Path(output) / "classifier.npz", allow_pickle=False) as arrays:
        assert arrays["coef"].shape == (10, 64) and arrays["mean"].shape == (64,)


def test_same_seed_gives_identical_logistic_metrics(logistic_run, extract_output, tmp_path):
    assert fit.train(train_config(extract_output, str(tmp_path / "again"))) == logistic_run[1]
    other_seed = fit.train(train_config(extract_output, str(tmp_path / "seed"), split={"seed": 7}))
    assert other_seed["confusion_matrix"] != logistic_run[1]["confusion_matrix"]


def test_mlp_trains_deterministically_and_predicts_like_keras(mlp_run, extract_output, digits, tmp_path):
    import keras

    output, metrics = mlp_run
    assert metrics["classifier"]["kind"] == "mlp"
    assert metrics["accuracy"] >= 0.9
    assert 0 < metrics["num_validation"] < metrics["num_train"]
    assert fit.train(train_config(extract_output, str(tmp_path / "again"), **FAST_MLP)) == metrics

    model = keras.saving.load_model(Path(output) / "classifier.keras", safe_mode=True, compile=False)
    success = predict.predict(output, extract_output, str(tmp_path / "predictions"))
    table = read_predictions(str(tmp_path / "predictions"), success).filter(pa.compute.equal(
        pa.compute.field("status"), "ok"))
    index_of = {uri: index for index, uri in enumerate(digits.uris)}
    expected = model.predict(digits.features[[index_of[uri] for uri in table["uri"].to_pylist()]], verbose=0)
    np.testing.assert_allclose(np.array(table["scores"].to_pylist()), expected, rtol=1e-4, atol=1e-6)


def test_balanced_class_weights_on_imbalanced_labels(tmp_path, digits):
    # Class "0" keeps only 20 of its rows.
    zeros = [index for index, label in enumerate(digits.labels) if label == "0"]
    rows = [index for index in range(len(digits.uris)) if digits.labels[index] != "0" or index in zeros[:20]]
    features = write_extract_output(str(tmp_path / "imbalanced"), digits, rows=rows)
    metrics = fit.train(train_config(features, str(tmp_path / "model"), class_weight="balanced"))
    assert metrics["classifier"]["class_weight"] == "balanced"
    assert metrics["per_class"]["0"]["support"] == 4
    assert metrics["balanced_accuracy"] >= 0.85


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_labels_file_joined_on_uri(tmp_path, digits, file_format):
    features = write_extract_output(str(tmp_path / "unlabelled"), digits, with_labels=False)
    unlisted = [index for index in range(0, 400, 8) if index not in digits.error_rows]  # no label for these
    listed = [index for index in range(len(digits.uris)) if index not in unlisted]
    table = pa.table({"uri": [digits.uris[index] for index in listed],
                      "digit": [int(digits.labels[index]) for index in listed]})  # integers: read as text
    labels_file = tmp_path / f"labels.{file_format}"
    if file_format == "csv":
        pa_csv.write_csv(table, labels_file)
    else:
        pq.write_table(table, labels_file)
    with pytest.raises(ValueError, match="features.label_column 'digit' is not a column"):
        fit.train(train_config(features, str(tmp_path / "model"), features={"label_column": "digit"}))
    metrics = fit.train(train_config(features, str(tmp_path / "model"),
                                       features={"label_column": "digit", "labels_file": str(labels_file)}))
    assert metrics["skipped_unlabelled_rows"] == len(unlisted)
    assert metrics["skipped_error_rows"] == len(digits.error_rows)
    assert metrics["num_train"] + metrics["num_test"] == int(digits.ok.sum()) - len(unlisted)
    assert metrics["classes"] == [str(digit) for digit in range(10)]
    assert metrics["accuracy"] >= 0.9


def test_split_column_from_labels_file(tmp_path, extract_output, digits):
    labels_file = tmp_path / "labels.csv"
    splits = ["train" if index < 1400 else "test" for index in range(len(digits.uris))]
    pa_csv.write_csv(pa.table({"uri": digits.uris, "label": digits.labels, "fold": splits}), labels_file)
    metrics = fit.train(train_config(extract_output, str(tmp_path / "model"), split={"column": "fold"},
                                       features={"labels_file": str(labels_file)}))
    assert metrics["split"]["method"] == "column"
    assert metrics["num_test"] == int(digits.ok[1400:].sum())
    assert metrics["num_train"] == int(digits.ok[:1400].sum())
    assert metrics["accuracy"] >= 0.85

    splits[3] = "holdout"
    pa_csv.write_csv(pa.table({"uri": digits.uris, "label": digits.labels, "fold": splits}), labels_file)
    with pytest.raises(ValueError, match="holdout"):
        fit.train(train_config(extract_output, str(tmp_path / "bad"), split={"column": "fold"},
                                 features={"labels_file": str(labels_file)}))


def test_streaming_logistic_matches_in_memory(logistic_run, extract_output, digits, tmp_path):
    config = train_config(extract_output, str(tmp_path / "streaming"), max_in_memory_rows=500)
    metrics = fit.train(config)
    assert metrics["classifier"]["mode"] == "streaming" and metrics["split"]["method"] == "uri_hash"
    expected_test = sum(1 for index, uri in enumerate(digits.uris)
                        if index not in digits.error_rows and zlib.crc32(uri.encode()) % 1000 < 200)
    assert metrics["num_test"] == expected_test
    assert metrics["num_train"] + metrics["num_test"] == int(digits.ok.sum())
    assert metrics["skipped_error_rows"] == len(digits.error_rows)
    assert metrics["accuracy"] >= 0.9
    # One-vs-rest SGD on a hash split vs multinomial lbfgs on a stratified one: a few points apart on digits.
    assert metrics["accuracy"] >= logistic_run[1]["accuracy"] - 0.05
    assert fit.train(dataclasses.replace(config, output=TrainOutputConfig(uri=str(tmp_path / "again")))) == metrics
    for name in ("classifier.npz", "classifier.json", "confusion_matrix.png", "per_class_f1.png"):
        assert (tmp_path / "streaming" / name).exists()


def test_streaming_mlp(extract_output, tmp_path):
    metrics = fit.train(train_config(extract_output, str(tmp_path / "streaming"), max_in_memory_rows=500,
                                       class_weight="balanced", **FAST_MLP))
    assert metrics["classifier"]["mode"] == "streaming" and metrics["classifier"]["kind"] == "mlp"
    assert metrics["accuracy"] >= 0.85
    assert (tmp_path / "streaming" / "classifier.keras").exists()


def read_predictions(output_uri: str, success: dict) -> pa.Table:
    return pa.concat_tables([pq.read_table(storage.join(output_uri, path)) for path in success["files"]])


def test_predict_matches_numpy_and_carries_errors(logistic_run, extract_output, digits, tmp_path):
    model_uri, metrics = logistic_run
    output = str(tmp_path / "predictions")
    success = predict.predict(model_uri, extract_output, output, batch_rows=100)
    assert json.loads((tmp_path / "predictions" / "_SUCCESS").read_text()) == success
    assert success["rows"] == {"total": len(digits.uris), "ok": int(digits.ok.sum()),
                               "error": len(digits.error_rows)}
    assert success["shards"] == {"total": 5, "run": 5, "committed": 5}
    assert success["classes"] == metrics["classes"] and len(success["fingerprint"]) == 64
    assert set(success["seconds"]) >= {"total", "startup"}
    assert sorted(ledger.read_commits(output)) == [0, 1, 2, 3, 4]

    table = read_predictions(output, success)
    assert table.num_rows == len(digits.uris)
    assert sorted(table["uri"].to_pylist()) == sorted(digits.uris)  # one row per input row, no duplicates
    assert table.schema.field("predicted_score").type == pa.float32()
    assert table.schema.field("scores").type == pa.list_(pa.float32())
    rows = table.to_pylist()
    index_of = {uri: index for index, uri in enumerate(digits.uris)}
    errors = [row for row in rows if row["status"] == "error"]
    assert {index_of[row["uri"]] for row in errors} == set(digits.error_rows)
    assert all(row["error"] == ERROR_REASON and row["predicted_label"] is None and row["scores"] is None
               and row["predicted_score"] is None for row in errors)

    # The same classifier computed another way: the saved arrays and plain numpy.
    ok_rows = [row for row in rows if row["status"] == "ok"]
    with np.load(Path(model_uri) / "classifier.npz", allow_pickle=False) as arrays:
        features = digits.features[[index_of[row["uri"]] for row in ok_rows]].astype(np.float64)
        logits = (features - arrays["mean"]) / arrays["scale"] @ arrays["coef"].T + arrays["intercept"]
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    classes = np.array(metrics["classes"])
    assert [row["predicted_label"] for row in ok_rows] == classes[expected.argmax(axis=1)].tolist()
    np.testing.assert_allclose([row["scores"] for row in ok_rows], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([row["predicted_score"] for row in ok_rows], expected.max(axis=1), rtol=1e-5)
    assert np.mean([row["predicted_label"] == row["label"] for row in ok_rows]) >= 0.95  # mostly train rows

    again = predict.predict(model_uri, extract_output, output)
    assert again["shards"]["run"] == 0 and again["files"] == success["files"]


def test_predict_refuses_features_of_another_backbone(logistic_run, digits, tmp_path):
    other = write_extract_output(str(tmp_path / "resnet"), digits, rows=range(50),
                                 provenance={**PROVENANCE, "backbone": "resnet50", "input_size": "256"})
    with pytest.raises(ValueError, match="backbone") as caught:
        predict.predict(logistic_run[0], other, str(tmp_path / "predictions"))
    message = str(caught.value)
    assert "'mobilenetv2'" in message and "'resnet50'" in message and "input_size" in message
    assert "pooling" not in message
    assert not (tmp_path / "predictions").exists()


def test_several_outputs_concatenate_only_with_one_provenance(tmp_path, digits):
    first = write_extract_output(str(tmp_path / "first"), digits, rows=range(900))
    second = write_extract_output(str(tmp_path / "second"), digits, rows=range(900, len(digits.uris)),
                                  feature_dtype="float16")
    metrics = fit.train(train_config([first, second], str(tmp_path / "model")))
    assert metrics["num_train"] + metrics["num_test"] == int(digits.ok.sum())
    assert metrics["features_uri"] == [first, second]
    assert metrics["accuracy"] >= 0.9

    other = write_extract_output(str(tmp_path / "max"), digits, rows=range(900, len(digits.uris)),
                                 provenance={**PROVENANCE, "pooling": "max"})
    with pytest.raises(ValueError, match="pooling: 'avg'.*'max'"):
        fit.train(train_config([first, other], str(tmp_path / "mixed")))


def test_too_few_classes_or_rows_are_clear_errors(tmp_path, digits):
    ones = [index for index, label in enumerate(digits.labels) if label == "1" and index not in digits.error_rows]
    one_class = write_extract_output(str(tmp_path / "one"), digits, rows=ones)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit.train(train_config(one_class, str(tmp_path / "model")))
    sevens = [index for index, label in enumerate(digits.labels) if label == "7" and index not in digits.error_rows]
    lonely = write_extract_output(str(tmp_path / "lonely"), digits, rows=ones + sevens[:1])
    with pytest.raises(ValueError, match=r"at least 2 labelled rows per class.*'7': 1"):
        fit.train(train_config(lonely, str(tmp_path / "model")))


def test_output_to_an_fsspec_uri(extract_output, tmp_path, capsys):
    from pipeline.cli import main

    output = "memory://featurize-train-test/model"
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"features": {"uri": extract_output}, "output": {"uri": output}}))
    assert main(["train", "--config", str(config), "--set", "classifier.regularization=0.5"]) == 0
    captured = capsys.readouterr()
    printed, logged = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert "rows (in_memory)" in logged and f"wrote classifier and metrics to {output}" in logged
    metrics = json.loads(storage.read_bytes(f"{output}/metrics.json"))
    assert metrics["classifier"]["regularization"] == 0.5
    assert "(in_memory)" in printed and "Per class" in printed and f"{metrics['accuracy']:.4f}" in printed
    assert f"classifier and metrics written to {output}" in printed
    assert storage.read_bytes(f"{output}/per_class_f1.png").startswith(PNG_SIGNATURE)
    success = predict.predict(output, extract_output, "memory://featurize-train-test/predictions")
    assert success["rows"]["total"] == 1797
    storage.remove("memory://featurize-train-test", recursive=True)


def test_print_summary_shows_overall_and_per_class_metrics(logistic_run):
    from rich.console import Console

    metrics = logistic_run[1]
    console = Console(record=True, width=120)
    print_summary(metrics, console)
    cells = {row[0]: row[1:] for row in ([cell.strip() for cell in line.strip().strip("│").split("│")]
                                         for line in console.export_text().splitlines() if line.startswith("│"))}
    assert cells["accuracy"] == [f"{metrics['accuracy']:.4f}"]
    assert cells["macro_f1"] == [f"{metrics['macro_f1']:.4f}"]
    assert cells["skipped_error_rows"] == [str(metrics["skipped_error_rows"])]
    for name, values in metrics["per_class"].items():
        assert cells[name] == [f"{values['precision']:.3f}", f"{values['recall']:.3f}", f"{values['f1']:.3f}",
                               str(values["support"])]


def test_binary_classes_match_sklearn_and_stream(tmp_path, digits):
    rows = [index for index, label in enumerate(digits.labels) if label in ("0", "1")]
    features = write_extract_output(str(tmp_path / "binary"), digits, rows=rows)
    train_rows = set(rows[:250])
    labels_file = tmp_path / "labels.csv"
    pa_csv.write_csv(pa.table({"uri": [digits.uris[index] for index in rows],
                               "label": [digits.labels[index] for index in rows],
                               "fold": ["train" if index in train_rows else "test" for index in rows]}), labels_file)
    model_uri = str(tmp_path / "model")
    metrics = fit.train(train_config(features, model_uri, split={"column": "fold"},
                                       features={"labels_file": str(labels_file)}))
    assert metrics["classes"] == ["0", "1"] and metrics["accuracy"] >= 0.95

    # sklearn's own pipeline on the same train rows gives the same probabilities.
    fit_rows = [index for index in rows if index in train_rows and index not in digits.error_rows]
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(
        digits.features[fit_rows], [digits.labels[index] for index in fit_rows])
    success = predict.predict(model_uri, features, str(tmp_path / "predictions"))
    table = read_predictions(str(tmp_path / "predictions"), success).filter(pa.compute.equal(
        pa.compute.field("status"), "ok"))
    index_of = {uri: index for index, uri in enumerate(digits.uris)}
    expected = reference.predict_proba(digits.features[[index_of[uri] for uri in table["uri"].to_pylist()]])
    np.testing.assert_allclose(np.array(table["scores"].to_pylist()), expected, atol=1e-4)

    streaming = fit.train(train_config(features, str(tmp_path / "streaming"), max_in_memory_rows=100))
    assert streaming["classifier"]["mode"] == "streaming" and streaming["accuracy"] >= 0.95


def test_inspect_summarises_train_and_predict_outputs(logistic_run, extract_output, digits, tmp_path, capsys):
    from rich.console import Console

    from pipeline.cli import main
    from pipeline.tools.report import inspect_output

    model_uri, metrics = logistic_run
    output = str(tmp_path / "predictions")
    predict.predict(model_uri, extract_output, output)
    summary = inspect_output(output, Console(width=200))
    assert summary["kind"] == "predict" and summary["finished"]
    assert summary["shards_committed"] == summary["shards_total"] == 5 and summary["shards_pending"] == 0
    assert (summary["rows_ok"], summary["rows_error"]) == (int(digits.ok.sum()), len(digits.error_rows))
    assert main(["inspect", output]) == 0
    assert main(["inspect", model_uri]) == 0
    printed = capsys.readouterr().out
    assert f"{metrics['accuracy']:.3f}" in printed and f"{metrics['macro_f1']:.3f}" in printed
