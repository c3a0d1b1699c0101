"""`featurize compare`: does transfer learning pay on this data? Several backbones, one probe, one split.

Every candidate extracts the same labelled sample in one extract over `models:` (`run_extract`: one fetch and one
decode of each image feed every candidate), the same probe is trained on each set of features with the same split
(`train`), and the results come back as a table, a plot (accuracy vs
throughput) and `compare.json`, with a recommended backbone. Nothing here extracts or trains by itself.

Candidates are `model.*` entries (zoo names or saved-model paths/URIs, each with its weights) plus a name.
`random_init: true` makes the no-transfer baseline: the same architecture with freshly initialised weights.
It is built here, in the driver, seeded (`seed`), and saved as OUTPUT/models/<name>.keras, which is then
extracted like any saved model; so a rerun with the same seed gets the same weights, features and metrics
(an unseeded `weights: none` zoo model, initialised inside a Ray actor, would differ on every run):
- zoo backbone: `keras.applications.<Name>(weights=None, include_top=False, pooling=<model.pooling>)` at the
  candidate's input size (pooled inside, so the feature cut is the zoo's default one);
- saved model: `keras.models.clone_model` of it (every layer rebuilt from its config, so every weight,
  nested sub-models included, takes its initialiser's value; BatchNormalization statistics restart at 0/1).
Preprocessing stays the candidate's own (`auto` resolves to the zoo family's mode for zoo backbones).

Recommendation rule: the most accurate candidate (holdout accuracy; equal accuracies: the faster) is
recommended, unless a candidate within `probe.tie_tolerance` of its accuracy is at least `probe.min_speedup`
times faster (model images/s): then the fastest such candidate is. The speed-up threshold keeps measurement
noise from deciding (on shared CPUs the same network measures tens of percent apart from run to run).
Random-init baselines take part: when one is recommended, the pretrained weights do not pay on this data.

Throughput: two numbers per candidate. `images_per_second` is `_SUCCESS`'s end-to-end figure (actor start,
TensorFlow import and model build included: at sample sizes that is mostly start-up), the one run's that fed every
candidate. `model_images_per_second`
is ok rows / seconds in the forward pass (per actor), what the backbone costs at scale; the plot, and the
tie-break, use it.

Output (any fsspec URI):
    OUTPUT/sample.parquet        the labelled sample every candidate extracted (uri, label)
    OUTPUT/models/<name>.keras   random-init baselines
    OUTPUT/features/<name>/      extract outputs (Parquet + _SUCCESS) of one `models:` extract into OUTPUT/features,
                                 rewritten on every run (mode overwrite)
    OUTPUT/probes/<name>/        train outputs (classifier, metrics.json, plots)
    OUTPUT/compare.json          rows, recommendation, rule, config
    OUTPUT/compare.png           accuracy vs throughput
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.charts import figure_png
from pipeline.config import (
    CandidateConfig,
    CompareConfig,
    ExtractConfig,
    FeaturesConfig,
    InputConfig,
    ModelConfig,
    NamedModelConfig,
    OutputConfig,
    TrainConfig,
    TrainOutputConfig,
    is_saved_model_path,
    is_weights_file,
    to_dict,
)
from pipeline.errors import ConfigError
from pipeline.io import storage
from pipeline.output import ledger

COMPARE_FILE = "compare.json"
PLOT_FILE = "compare.png"
SAMPLE_FILE = "sample.parquet"


# ------------------------------------------------------------------------------------------------ sample


def labelled_sample(config: CompareConfig) -> pa.Table:
    """(uri, label) of every labelled listed image, or at most `sample.max_per_class` per label (seeded)."""
    from pipeline.extract.listing import list_images

    listing = list_images(config.input)
    labels = listing.column("label").to_pylist()
    keep = np.array([label is not None for label in labels], dtype=bool)
    if config.sample.max_per_class:
        rng = np.random.default_rng(config.sample.seed)
        keep[:] = False
        by_label: dict[str, list[int]] = {}
        for position, label in enumerate(labels):
            if label is not None:
                by_label.setdefault(label, []).append(position)
        for label in sorted(by_label):
            positions = np.asarray(by_label[label])
            if len(positions) > config.sample.max_per_class:
                positions = rng.choice(positions, config.sample.max_per_class, replace=False)
            keep[positions] = True
    sample = listing.filter(pa.array(keep))
    classes = set(sample.column("label").to_pylist())
    if len(classes) < 2:
        raise ConfigError(f"input.uri {list(config.input.uri)} holds {sample.num_rows} labelled images in "
                         f"{len(classes)} class(es); comparing backbones needs at least 2 classes "
                         "(check input.labels)")
    return sample


# --------------------------------------------------------------------------------------------- candidates


def random_init_model(candidate: CandidateConfig, storage_options: dict | None = None):
    """The candidate's architecture with freshly initialised weights, seeded by `candidate.seed`."""
    import keras

    from pipeline.models.zoo import get_backbone

    if is_saved_model_path(candidate.backbone):
        with storage.local_copy(candidate.backbone, storage_options) as path:
            original = keras.models.load_model(path, compile=False, safe_mode=not candidate.trust)
        keras.utils.set_random_seed(candidate.seed)
        model = keras.models.clone_model(original)
        del original
        return model
    backbone = get_backbone(candidate.backbone)
    side = candidate.input_size or backbone.input_size
    keras.utils.set_random_seed(candidate.seed)
    # Pooled inside the model, so the saved model's default cut is the zoo's: the last feature map after its
    # activation, pooled (a bare map would be cut before a trailing ReLU/Activation, which reads as a head).
    pooling = candidate.pooling if candidate.layer is None else None
    return backbone.constructor(include_top=False, weights=None, input_shape=(side, side, 3), pooling=pooling)


def baseline_model_config(candidate: CandidateConfig, model_uri: str) -> ModelConfig:
    """How the saved baseline is extracted: as a saved model, with the candidate's own preprocessing."""
    from pipeline.models.zoo import get_backbone

    preprocess = candidate.preprocess
    if preprocess == "auto" and not is_saved_model_path(candidate.backbone):
        preprocess = get_backbone(candidate.backbone).preprocess  # the zoo family's own mode
    return candidate.model_config(backbone=model_uri, weights="none", weights_sha256=None, input_size=None,
                                  preprocess=preprocess, top_k=0)


def save_random_init_model(candidate: CandidateConfig, model_uri: str, input_options: dict,
                           output_options: dict) -> None:
    model = random_init_model(candidate, input_options)
    with tempfile.TemporaryDirectory(prefix="featurize-compare-") as directory:
        path = os.path.join(directory, f"{candidate.name}.keras")
        model.save(path)
        storage.upload_file(path, model_uri, output_options)


def throughput(success: dict) -> tuple[float, float]:
    """(end-to-end images/s from `_SUCCESS`, ok rows per second of forward pass)."""
    rows = success.get("rows", {})
    end_to_end = success.get("images_per_second")
    if not end_to_end:
        seconds = success.get("seconds", {}).get("total") or 0.0
        end_to_end = rows.get("total", 0) / seconds if seconds else 0.0
    forward = success.get("timings", {}).get("forward") or 0.0
    model_rate = rows.get("ok", 0) / forward if forward else float(end_to_end)
    return float(end_to_end), float(model_rate)


def weights_label(candidate: CandidateConfig) -> str:
    if candidate.random_init:
        return f"random (seed {candidate.seed})"
    if is_weights_file(candidate.weights):
        return shorten(candidate.weights, 24)
    return "pretrained" if is_saved_model_path(candidate.backbone) else candidate.weights


def candidate_model(config: CompareConfig, candidate: CandidateConfig, console) -> NamedModelConfig:
    """The candidate as an entry of extract's `models:` (a random-init baseline built and saved first)."""
    model_config = candidate.model_config()
    if candidate.random_init:
        model_uri = storage.join(config.output.uri, "models", f"{candidate.name}.keras")
        say(console, f"{candidate.name}: building {candidate.backbone} with random weights (seed {candidate.seed})")
        save_random_init_model(candidate, model_uri, config.input.storage_options, config.output.storage_options)
        model_config = baseline_model_config(candidate, model_uri)
    return NamedModelConfig(**dataclasses.asdict(model_config), name=candidate.name)


def extract_candidates(config: CompareConfig, input_config: InputConfig, console) -> dict[str, dict]:
    """Every candidate from one extract over `models:` (one decode of each sample image feeds them all), into
    OUTPUT/features/NAME/; each candidate's `_SUCCESS` by name."""
    from pipeline.extract.driver import run_extract

    models = tuple(candidate_model(config, candidate, console) for candidate in config.candidates)
    features_uri = storage.join(config.output.uri, "features")
    extract_config = ExtractConfig(input=input_config, models=models, run=config.run,
                                   output=OutputConfig(uri=features_uri, mode="overwrite",
                                                       storage_options=config.output.storage_options))
    say(console, f"extracting features with {len(models)} candidates from one decode of the sample")
    successes = run_extract(extract_config)["models"]
    for name, success in successes.items():
        if success["error_rate"] > success["max_error_rate"]:
            raise ConfigError(f"candidate {name}: error rate {success['error_rate']:.1%} is above run.max_error_rate "
                              f"{success['max_error_rate']:.1%}; see `featurize inspect {success['output']}`")
    return successes


def probe_candidate(config: CompareConfig, candidate: CandidateConfig, success: dict, console) -> dict:
    """The same probe trained on the candidate's features; its row of the comparison."""
    from pipeline.train.fit import train

    output_uri, options = config.output.uri, config.output.storage_options
    features_uri = storage.join(output_uri, "features", candidate.name)
    probe_uri = storage.join(output_uri, "probes", candidate.name)
    train_config = TrainConfig(features=FeaturesConfig(uri=(features_uri,), storage_options=options),
                               classifier=config.probe.classifier, split=config.probe.split,
                               output=TrainOutputConfig(uri=probe_uri, storage_options=options))
    say(console, f"{candidate.name}: training the {config.probe.classifier.kind} probe")
    metrics = train(train_config)
    end_to_end, model_rate = throughput(success)
    return {
        "name": candidate.name,
        "backbone": candidate.backbone,
        "weights": weights_label(candidate),
        "random_init": candidate.random_init,
        "feature_dim": int(metrics["feature_dim"]),
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"],
        "num_train": metrics["num_train"],
        "num_test": metrics["num_test"],
        "images_per_second": round(end_to_end, 2),
        "model_images_per_second": round(model_rate, 2),
        "seconds": success.get("seconds", {}),
        "rows": success.get("rows", {}),
        "features_uri": features_uri,
        "probe_uri": probe_uri,
        "provenance": metrics.get("provenance", {}),
    }


def say(console, message: str) -> None:
    if console is not None:
        console.log(message)


# ------------------------------------------------------------------------------------------------ verdict


def recommend(rows: list[dict], tie_tolerance: float, min_speedup: float) -> tuple[str, list[str]]:
    """(recommended name, names tied with the most accurate), by the rule in the module docstring."""
    def speed(row: dict) -> float:
        return row["model_images_per_second"]

    best = max(rows, key=lambda row: (row["accuracy"], speed(row)))
    tied = [row for row in rows if row["accuracy"] >= best["accuracy"] - tie_tolerance - 1e-12]
    fastest = max(tied, key=lambda row: (speed(row), row["accuracy"]))
    winner = fastest if speed(fastest) >= min_speedup * speed(best) else best
    return winner["name"], [row["name"] for row in tied]


def transfer_gains(rows: list[dict]) -> None:
    """On each pretrained row with a random-init row of the same backbone: accuracy minus the baseline's."""
    baselines = {row["backbone"]: row for row in rows if row["random_init"]}
    for row in rows:
        baseline = baselines.get(row["backbone"])
        if not row["random_init"] and baseline is not None:
            row["baseline"] = baseline["name"]
            row["transfer_gain"] = row["accuracy"] - baseline["accuracy"]


def compare(config: CompareConfig, console=None) -> dict:
    """Extract the sample with every candidate, train the same probe on each, write compare.json + plot."""
    started = time.perf_counter()
    output_uri, options = config.output.uri, config.output.storage_options
    storage.make_dirs(output_uri, options)
    sample = labelled_sample(config)
    buffer = io.BytesIO()
    pq.write_table(sample, buffer)
    storage.write_bytes(storage.join(output_uri, SAMPLE_FILE), buffer.getvalue(), options)
    if console is not None:
        console.log(f"sample: {sample.num_rows} labelled images in {len(set(sample.column('label').to_pylist()))} "
                    f"classes; {len(config.candidates)} candidates")
    with tempfile.TemporaryDirectory(prefix="featurize-compare-") as directory:
        manifest = os.path.join(directory, SAMPLE_FILE)  # read by the driver's planner: a local file is enough
        pq.write_table(sample, manifest)
        input_config = InputConfig(uri=(manifest,), labels="label", storage_options=config.input.storage_options)
        successes = extract_candidates(config, input_config, console)
    rows = [probe_candidate(config, candidate, successes[candidate.name], console) for candidate in config.candidates]
    transfer_gains(rows)
    probe = config.probe
    recommended, tied = recommend(rows, probe.tie_tolerance, probe.min_speedup)
    result = {
        "rows": rows,
        "recommended": recommended,
        "tied_with_best": tied,
        "rule": (f"the most accurate, unless a candidate within {probe.tie_tolerance:g} of its accuracy is "
                 f"at least {probe.min_speedup:g}x faster (model images/s): then the fastest such"),
        "num_images": sample.num_rows,
        "classes": sorted(set(sample.column("label").to_pylist())),
        "seconds": round(time.perf_counter() - started, 3),
        "config": to_dict(config),
        "plot": PLOT_FILE,
    }
    storage.write_bytes(storage.join(output_uri, PLOT_FILE), comparison_png(rows, recommended), options)
    ledger.write_json(storage.join(output_uri, COMPARE_FILE), result, options)
    if console is not None:
        print_comparison(result, console)
    return result


# ------------------------------------------------------------------------------------------------ report


def comparison_png(rows: list[dict], recommended: str) -> bytes:
    from matplotlib.figure import Figure  # Figure without pyplot renders with Agg: no GUI, no global state
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure = Figure(figsize=(8.0, 5.0))
    axes = figure.add_subplot()
    styles = {"pretrained": {"marker": "o", "color": "tab:blue", "s": 70},
              "random": {"marker": "X", "color": "tab:gray", "s": 70},
              "recommended": {"marker": "*", "color": "tab:orange", "s": 260}}
    speeds = [max(row["model_images_per_second"], 1e-3) for row in rows]
    for row, speed in zip(rows, speeds):
        kind = "recommended" if row["name"] == recommended else ("random" if row["random_init"] else "pretrained")
        axes.scatter([speed], [row["accuracy"]], zorder=3, **styles[kind])
        axes.annotate(row["name"], (speed, row["accuracy"]), textcoords="offset points", xytext=(8, 4), fontsize=9)
    if max(speeds) / min(speeds) > 3:
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlim(min(speeds) / 1.6, max(speeds) * 4.0)  # room for the labels on the right
    else:
        axes.set_xlim(0.0, max(speeds) * 1.6)
    low = min(row["accuracy"] for row in rows)
    axes.set_ylim(max(0.0, low - 0.08), min(1.0, max(row["accuracy"] for row in rows) + 0.05) + 0.005)
    axes.set_xlabel("throughput: images/s per actor, model forward pass")
    axes.set_ylabel("holdout accuracy (same probe, same split)")
    axes.set_title("Backbones compared: accuracy vs throughput")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(handles=[Line2D([], [], linestyle="", markersize=9 if kind != "recommended" else 14,
                                marker=style["marker"], color=style["color"], label=label)
                         for kind, style, label in (("pretrained", styles["pretrained"], "given weights"),
                                                    ("random", styles["random"], "random-init baseline"),
                                                    ("recommended", styles["recommended"], "recommended"))],
                loc="lower right", fontsize=9)
    figure.tight_layout()
    return figure_png(figure)


def print_comparison(result: dict, console) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"featurize compare: {result['num_images']} images, {len(result['classes'])} classes",
                  box=box.SIMPLE_HEAD)
    table.add_column("candidate", overflow="fold")
    table.add_column("weights", overflow="fold")
    for name in ("dim", "acc", "bal acc", "gain", "img/s fwd", "img/s e2e"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in result["rows"]:
        gain = row.get("transfer_gain")
        marker = " *" if row["name"] == result["recommended"] else ""
        table.add_row(escape(f"{row['name']}{marker}"), escape(row["weights"]), str(row["feature_dim"]),
                      f"{row['accuracy']:.3f}", f"{row['balanced_accuracy']:.3f}",
                      "-" if gain is None else f"{gain * 100:+.1f}", f"{row['model_images_per_second']:.1f}",
                      f"{row['images_per_second']:.1f}")
    Console(width=max(console.width, 120)).print(table)  # the whole table, even when piped
    console.print("acc = holdout accuracy of the same probe on the same split; gain = points over the random-init "
                  "baseline of the same backbone; img/s fwd = forward pass, per actor; img/s e2e = end to end, "
                  "start-up included; * = recommended", highlight=False)
    winner = next(row for row in result["rows"] if row["name"] == result["recommended"])
    verdict = f"recommended: [bold]{escape(winner['name'])}[/] ({escape(result['rule'])})"
    if winner["random_init"]:
        verdict += ("; a random-init baseline wins here, so the pretrained weights do not help on this data "
                    "with this probe")
    console.print(verdict)


def shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
