"""The tool commands: models, inspect, report, lease, weights, bench, demo (their parsers and handlers)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from pipeline.cli.common import add_config_arguments, console

STORE_CONFIG_HELP = ("a config whose output.storage_options reach the output (endpoint, profile); without it the "
                     "store's defaults")


def add_models_command(commands, common: argparse.ArgumentParser) -> None:
    models = commands.add_parser("models", parents=[common], help="list the backbone zoo")
    models.set_defaults(handler=command_models)


def add_inspect_command(commands, common: argparse.ArgumentParser) -> None:
    inspect = commands.add_parser("inspect", parents=[common],
                                  help="summarise an output of extract, predict, train, index, search or dedup: "
                                       "rows, errors, schema, shards, metrics")
    inspect.add_argument("output", help="output directory of `featurize extract`, `predict`, `train`, `index`, "
                                        "`search` or `dedup`")
    add_config_arguments(inspect, required=False, config_help=STORE_CONFIG_HELP)
    inspect.set_defaults(handler=command_inspect)


def add_report_command(commands, common: argparse.ArgumentParser) -> None:
    report = commands.add_parser("report", parents=[common],
                                 help="an HTML report with pictures of an extract, search or dedup output",
                                 description="Write an HTML page to open in a browser: for extract, throughput "
                                             "over time, stage split, errors by reason, sample rows with their "
                                             "predictions and a 2-D map of the features; for dedup, the largest "
                                             "groups; for search, each query beside its neighbours.")
    report.add_argument("output", help="output directory of `featurize extract`, `search` or `dedup`")
    report.add_argument("--out", metavar="FOLDER",
                        help="folder to write index.html (and thumbnails/, charts/) into; default "
                             "OUTPUTNAME-report in the working directory")
    report.add_argument("--self-contained", action="store_true",
                        help="write only index.html, every picture inside it as a data: URI")
    add_config_arguments(report, required=False,
                         config_help=STORE_CONFIG_HELP + "; its input.storage_options reach the images (default: "
                                                         "the output's)")
    report.set_defaults(handler=command_report)


def add_lease_command(commands, common: argparse.ArgumentParser) -> None:
    lease = commands.add_parser("lease", help="the lease that keeps two runs off one output")
    lease_commands = lease.add_subparsers(required=True, metavar="ACTION")
    break_ = lease_commands.add_parser("break", parents=[common],
                                       help="delete an output's lease left by a run that is dead",
                                       description="Delete the lease (OUTPUT/_LEASE) a dead run left on an output, "
                                                   "so that the next run need not wait for its expiry. A run still "
                                                   "alive that loses its lease stops without writing (exit 2).")
    break_.add_argument("output", help="the output directory (output.uri of extract, --output of predict)")
    add_config_arguments(break_, required=False, config_help=STORE_CONFIG_HELP)
    break_.set_defaults(handler=command_lease_break)


def add_weights_command(commands, common: argparse.ArgumentParser) -> None:
    weights = commands.add_parser("weights", help="manage weights files")
    weights_commands = weights.add_subparsers(required=True, metavar="ACTION")
    pull = weights_commands.add_parser("pull", parents=[common],
                                       help="copy a zoo backbone's ImageNet weights to any URI")
    pull.add_argument("name", help="zoo backbone name, e.g. resnet50")
    pull.add_argument("--to", required=True, dest="destination", help="file URI, e.g. s3://bucket/resnet50.weights.h5")
    pull.set_defaults(handler=command_weights_pull)


def add_bench_command(commands, common: argparse.ArgumentParser) -> None:
    bench = commands.add_parser("bench", parents=[common],
                                help="throughput: bare model vs pipeline vs the Keras-docs loop",
                                description="Measure (a) the bare model, (b) the whole pipeline and (c) the "
                                            "Keras-docs loop on generated JPEGs; writes bench.json and bench.png.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--backbone", default="mobilenetv2", help="zoo backbone (`featurize models`)")
    bench.add_argument("--input-size", type=int, default=224, help="square input side of the model")
    bench.add_argument("--batch-size", type=int, default=32, help="images per forward pass for (a) and (b)")
    bench.add_argument("--images", type=int, default=1024, help="JPEGs of 500x375 for the pipeline (b)")
    bench.add_argument("--loop-images", type=int, default=48, help="images for the slow one-at-a-time loop (c)")
    bench.add_argument("--camera-images", type=int, default=16, help="4000x3000 JPEGs for the draft-mode figures")
    bench.add_argument("--runtime", default="auto", choices=("auto", "keras", "litert"),
                       help="model.runtime for (a) and (b); (c) is always the Keras loop users write")
    bench.add_argument("--hash-pairs", type=int, default=8,
                       help="shards without and with the content hashes (sha256, phash), this many pairs; 0 skips")
    bench.add_argument("--manifest-entries", type=int, default=1_000_000,
                       help="driver memory to plan a manifest this long; 0 skips it")
    bench.add_argument("--output", default="results/bench", help="where bench.json and bench.png go")
    bench.add_argument("--scale", action="store_true",
                       help="instead: driver memory and time to first commit for 1M and 10M-entry manifests, and "
                            "tar shards vs loose files on local disk and loopback S3 (bench-scale.json)")
    bench.add_argument("--s3", metavar="PREFIX", help="with --scale: also measure on this S3 prefix "
                                                      "(s3://bucket/path; it writes there)")
    add_config_arguments(bench, required=False, config_help="with --s3: a config whose input.storage_options "
                                                            "reach the prefix (endpoint_url, profile)")
    bench.add_argument("--index", action="store_true",
                       help="instead: the similarity index kinds (flat, HNSW, IVF-PQ) on clustered vectors: recall@10, "
                            "speed vs exact search, bytes per vector, and what 10M vectors need (bench-index.json)")
    bench.add_argument("--index-vectors", type=int, default=200_000, help="vectors of 1,280 dims for --index")
    bench.add_argument("--index-queries", type=int, default=500, help="queries for --index")
    bench.set_defaults(handler=command_bench)


def add_demo_command(commands, common: argparse.ArgumentParser) -> None:
    demo = commands.add_parser("demo", parents=[common],
                               help="offline end-to-end run: sample data, extract, HTML report, train, summary")
    demo.add_argument("--workdir", default="results/demo", help="where sample data and results go")
    demo.set_defaults(handler=command_demo)


def command_models(arguments) -> int:
    from pipeline.models.zoo import model_table

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


def store_options(arguments, section: str = "output") -> dict | None:
    """`SECTION.storage_options` of the optional --config (with --set), for commands that take an output path;
    None when the config does not give them."""
    from pipeline.sections import read_settings

    settings = read_settings(arguments.config, arguments.set).get(section) or {}
    options = settings.get("storage_options") if isinstance(settings, dict) else None
    return dict(options) if options is not None else None


def command_inspect(arguments) -> int:
    from pipeline.tools.report import inspect_output

    inspect_output(arguments.output, console, store_options(arguments))
    return 0


def command_report(arguments) -> int:
    from pipeline.tools.html_report import write_report

    index = write_report(arguments.output, arguments.out, arguments.self_contained, store_options(arguments),
                         store_options(arguments, "input"))
    console.print(f"report written: {index}", highlight=False, soft_wrap=True)
    return 0


def command_lease_break(arguments) -> int:
    from pipeline.io import faults, redaction
    from pipeline.output import lease

    options = store_options(arguments) or {}
    try:
        holder = lease.break_lease(arguments.output, options)
    except Exception as error:  # noqa: BLE001 - a storage failure gets a clear message, the rest goes on up
        if not faults.is_storage_failure(error):
            raise
        raise faults.access_error("OUTPUT", arguments.output, "write to", error) from None
    shown = redaction.redact(arguments.output)
    if holder is None:
        console.print(f"{shown} has no lease: nothing to break")
    else:
        console.print(f"broke the lease on {shown} held by {holder.describe()}; if that run is still alive it "
                      "stops at its next commit without writing")
    return 0


def command_weights_pull(arguments) -> int:
    from pipeline.models.loading import pull_weights

    checksum = pull_weights(arguments.name, arguments.destination)
    console.print(f"wrote {arguments.destination} (sha256 {checksum}); use it with model.weights: "
                  f"{arguments.destination}")
    return 0


def command_bench(arguments) -> int:
    from pathlib import Path

    if arguments.scale:
        from pipeline.tools.bench_scale import S3Target, ScaleSettings, run_scale_bench

        s3 = S3Target(arguments.s3, store_options(arguments, "input") or {}) if arguments.s3 else None
        run_scale_bench(ScaleSettings(), Path(arguments.output), console, s3)
        return 0
    if arguments.index:
        from pipeline.analyse.bench import run

        run(arguments.index_vectors, 1280, arguments.index_queries, Path(arguments.output))  # prints its table
        return 0
    from pipeline.tools.bench import BenchSettings, run_bench

    settings = BenchSettings(backbone=arguments.backbone, input_size=arguments.input_size,
                             batch_size=arguments.batch_size, num_images=arguments.images,
                             loop_images=arguments.loop_images, camera_images=arguments.camera_images,
                             runtime=arguments.runtime, manifest_entries=arguments.manifest_entries,
                             hash_pairs=arguments.hash_pairs)
    run_bench(settings, Path(arguments.output), console)
    return 0


def command_demo(arguments) -> int:
    from pipeline.tools.demo import run_demo

    return run_demo(arguments.workdir, console, arguments.verbose)
