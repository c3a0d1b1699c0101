"""`featurize` subcommands. Thin: parse, load config, call the stage, print a summary, set the exit code."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, ExtractConfig, TrainConfig, load_config

console = Console(stderr=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return arguments.handler(arguments)
    except (ConfigError, FileNotFoundError, ValueError) as error:  # what the user can fix: config, paths
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    except RuntimeError as error:  # the run could not finish (committed shards are kept)
        console.print(f"[bold red]failed:[/] {error}", highlight=False, soft_wrap=True)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurize", description="Distributed image feature extraction.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    extract = commands.add_parser("extract", help="extract features and top-k predictions to Parquet")
    add_config_arguments(extract)
    extract.set_defaults(handler=command_extract)

    train = commands.add_parser("train", help="train and evaluate a classifier on extracted features")
    add_config_arguments(train)
    train.set_defaults(handler=command_train)

    compare = commands.add_parser("compare", help="compare backbones (and random-init baselines) with one probe")
    add_config_arguments(compare)
    compare.set_defaults(handler=command_compare)

    predict = commands.add_parser("predict", help="apply a trained classifier to extracted features")
    predict.add_argument("--model", required=True, help="output directory of `featurize train`")
    predict.add_argument("--features", required=True, help="output directory of `featurize extract`")
    predict.add_argument("--output", required=True, help="where to write the predictions (any fsspec URI)")
    predict.set_defaults(handler=command_predict)

    models = commands.add_parser("models", help="list the backbone zoo")
    models.set_defaults(handler=command_models)

    inspect = commands.add_parser("inspect", help="summarise an extract output: rows, errors, schema, shards")
    inspect.add_argument("output", help="output directory of `featurize extract`")
    inspect.set_defaults(handler=command_inspect)

    weights = commands.add_parser("weights", help="manage weights files")
    weights_commands = weights.add_subparsers(required=True, metavar="ACTION")
    pull = weights_commands.add_parser("pull", help="copy a zoo backbone's ImageNet weights to any URI")
    pull.add_argument("name", help="zoo backbone name, e.g. resnet50")
    pull.add_argument("--to", required=True, dest="destination", help="file URI, e.g. s3://bucket/resnet50.weights.h5")
    pull.set_defaults(handler=command_weights_pull)

    bench = commands.add_parser("bench", help="throughput: bare model vs pipeline vs the Keras-docs loop")
    bench.add_argument("--backbone", default="mobilenetv2")
    bench.add_argument("--input-size", type=int, default=224)
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--images", type=int, default=1024, help="JPEGs of 500x375 for the pipeline (b)")
    bench.add_argument("--loop-images", type=int, default=48, help="images for the slow one-at-a-time loop (c)")
    bench.add_argument("--camera-images", type=int, default=16, help="4000x3000 JPEGs for the draft-mode figures")
    bench.add_argument("--runtime", default="auto", choices=("auto", "keras", "litert"),
                       help="model.runtime for (a) and (b); (c) is always the Keras loop users write")
    bench.add_argument("--manifest-entries", type=int, default=1_000_000,
                       help="driver memory to plan a manifest this long; 0 skips it")
    bench.add_argument("--output", default="results/bench", help="where bench.json and bench.png go")
    bench.set_defaults(handler=command_bench)

    demo = commands.add_parser("demo", help="offline end-to-end run: sample data, extract, train, summary")
    demo.add_argument("--workdir", default="results/demo", help="where sample data and results go")
    demo.set_defaults(handler=command_demo)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set run.batch_size=64 (repeatable)")


def command_extract(arguments) -> int:
    config = load_config(ExtractConfig, arguments.config, arguments.set)
    return run_extract_and_report(config)


def run_extract_and_report(config: ExtractConfig) -> int:
    from pipeline.distributed import run_extract
    from pipeline.report import print_extract_summary

    success = run_extract(config)
    print_extract_summary(success, console)
    if success["error_rate"] > success["max_error_rate"]:
        console.print(f"[bold red]failed:[/] error rate {success['error_rate']:.1%} is above "
                      f"run.max_error_rate {success['max_error_rate']:.1%}; good rows are committed")
        return 1
    return 0


def command_train(arguments) -> int:
    from pipeline.train import print_summary, train

    config = load_config(TrainConfig, arguments.config, arguments.set)
    metrics = train(config)
    print_summary(metrics, console)
    console.print(f"classifier and metrics written to {config.output.uri}")
    return 0


def command_compare(arguments) -> int:
    from pipeline.compare import compare, load_compare_config

    config = load_compare_config(arguments.config, arguments.set)
    compare(config, console)
    console.print(f"comparison written to {config.output.uri} (compare.json, compare.png)")
    return 0


def command_predict(arguments) -> int:
    from pipeline.train import predict

    success = predict(arguments.model, arguments.features, arguments.output)
    console.print(f"{success['rows']['total']} predictions written to {arguments.output}")
    return 0


def command_models(arguments) -> int:
    from pipeline.backbones import model_table

    table = Table(title="featurize backbone zoo (Keras applications)")
    for column in ("name", "Keras name", "size (MB)", "top-1", "top-5", "params (M)", "depth", "input",
                   "feature dim", "preprocess"):
        table.add_column(column, no_wrap=True)
    for row in model_table():
        table.add_row(row["name"], row["keras_name"], str(row["size_mb"]), format_accuracy(row["top1"]),
                      format_accuracy(row["top5"]), f"{row['parameters_millions']:.1f}", str(row["depth"] or "-"),
                      str(row["input_size"]), str(row["feature_dim"]), row["preprocess"])
    Console(width=max(console.width, 130)).print(table)  # the whole table, even when piped
    return 0


def format_accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def command_inspect(arguments) -> int:
    from pipeline.report import inspect_output

    inspect_output(arguments.output, console)
    return 0


def command_weights_pull(arguments) -> int:
    from pipeline.extractor import pull_weights

    checksum = pull_weights(arguments.name, arguments.destination)
    console.print(f"wrote {arguments.destination} (sha256 {checksum}); use it with model.weights: "
                  f"{arguments.destination}")
    return 0


def command_bench(arguments) -> int:
    from pathlib import Path

    from pipeline.bench import BenchSettings, run_bench

    settings = BenchSettings(backbone=arguments.backbone, input_size=arguments.input_size,
                             batch_size=arguments.batch_size, num_images=arguments.images,
                             loop_images=arguments.loop_images, camera_images=arguments.camera_images,
                             runtime=arguments.runtime, manifest_entries=arguments.manifest_entries)
    run_bench(settings, Path(arguments.output), console)
    return 0


def command_demo(arguments) -> int:
    from pipeline.demo import run_demo

    return run_demo(arguments.workdir, console)


if __name__ == "__main__":
    sys.exit(main())
