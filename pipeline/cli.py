"""`featurize` subcommands. Thin: parse, load config, call the stage, print a summary, set the exit code.

Exit codes (the README's table): 0 done; 1 error rate above `run.max_error_rate` (good rows committed);
2 a problem the user can fix (config, paths, credentials, a refused model), reported without a traceback;
130/143 interrupted by SIGINT/SIGTERM (commits kept, the same command resumes); 3 anything else: a bug in
featurize or a run the cluster could not finish, with its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from rich.console import Console
from rich.table import Table

from pipeline.config import CompareConfig, ExtractConfig, TrainConfig, load_config
from pipeline.errors import USER_ERRORS

console = Console(stderr=False)  # results; progress, logs and errors go to stderr
error_console = Console(stderr=True)

EXIT_ERROR_RATE = 1
EXIT_USER_ERROR = 2
EXIT_FAILED = 3


def main(argv: list[str] | None = None) -> int:
    from pipeline.extract.progress import configure_logging

    parser = build_parser()
    arguments = parser.parse_args(argv)
    configure_logging(getattr(arguments, "verbose", False))
    try:
        return arguments.handler(arguments)
    except USER_ERRORS as error:  # what the user can fix: config, paths, credentials, a refused model
        error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True, markup=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as interruption:  # SIGINT, or SIGTERM during a run (pipeline.extract.driver.Interrupted)
        message = getattr(interruption, "message", "") or "interrupted; run the same command to resume"
        error_console.print(f"[bold yellow]{message}[/]", highlight=False, soft_wrap=True)
        return getattr(interruption, "exit_code", 130)
    except Exception:  # noqa: BLE001 - a bug or a run that could not finish: loud, with its traceback
        traceback.print_exc(file=sys.stderr)
        error_console.print("[bold red]failed:[/] see the traceback above (committed shards are kept; a rerun "
                            "resumes)", highlight=False)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurize", description="Distributed image feature extraction.")
    common = argparse.ArgumentParser(add_help=False)  # options every command takes, after its name
    common.add_argument("--verbose", action="store_true",
                        help="show library and Ray worker logs (TensorFlow, Ray) on the terminal too")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    extract = commands.add_parser("extract", parents=[common], help="extract features and top-k predictions to Parquet")
    add_config_arguments(extract)
    extract.set_defaults(handler=command_extract)

    train = commands.add_parser("train", parents=[common], help="train and evaluate a classifier on extracted features")
    add_config_arguments(train)
    train.set_defaults(handler=command_train)

    compare = commands.add_parser("compare", parents=[common],
                                  help="compare backbones (and random-init baselines) with one probe")
    add_config_arguments(compare)
    compare.set_defaults(handler=command_compare)

    finetune = commands.add_parser("finetune", parents=[common],
                                   help="fine-tune a network with a new head on labelled images -> model.keras")
    add_config_arguments(finetune)
    finetune.set_defaults(handler=command_finetune)

    predict = commands.add_parser("predict", parents=[common], help="apply a trained classifier to extracted features")
    predict.add_argument("--model", required=True, help="output directory of `featurize train`")
    predict.add_argument("--features", required=True, help="output directory of `featurize extract`")
    predict.add_argument("--output", required=True, help="where to write the predictions (any fsspec URI)")
    predict.set_defaults(handler=command_predict)

    models = commands.add_parser("models", parents=[common], help="list the backbone zoo")
    models.set_defaults(handler=command_models)

    inspect = commands.add_parser("inspect", parents=[common],
                                  help="summarise an output of extract, predict, train, index, search or dedup: "
                                       "rows, errors, schema, shards, metrics")
    inspect.add_argument("output", help="output directory of `featurize extract`, `predict`, `train`, `index`, "
                                        "`search` or `dedup`")
    add_config_arguments(inspect, required=False, config_help=STORE_CONFIG_HELP)
    inspect.set_defaults(handler=command_inspect)

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

    weights = commands.add_parser("weights", help="manage weights files")
    weights_commands = weights.add_subparsers(required=True, metavar="ACTION")
    pull = weights_commands.add_parser("pull", parents=[common],
                                       help="copy a zoo backbone's ImageNet weights to any URI")
    pull.add_argument("name", help="zoo backbone name, e.g. resnet50")
    pull.add_argument("--to", required=True, dest="destination", help="file URI, e.g. s3://bucket/resnet50.weights.h5")
    pull.set_defaults(handler=command_weights_pull)

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

    # --- analyse: index, search, dedup (pipeline/analyse/) ---
    for name, handler, help_text in (
            ("index", command_index, "build a similarity index (faiss) over extracted features"),
            ("search", command_search, "nearest neighbours of images or indexed uris in an index"),
            ("dedup", command_dedup, "near-duplicate groups and a keep-list from extracted features")):
        analyse = commands.add_parser(name, parents=[common], help=help_text)
        add_config_arguments(analyse)
        analyse.set_defaults(handler=handler)

    demo = commands.add_parser("demo", parents=[common],
                               help="offline end-to-end run: sample data, extract, HTML report, train, summary")
    demo.add_argument("--workdir", default="results/demo", help="where sample data and results go")
    demo.set_defaults(handler=command_demo)
    return parser


STORE_CONFIG_HELP = ("a config whose output.storage_options reach the output (endpoint, profile); without it the "
                     "store's defaults")


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True,
                         config_help: str = "YAML config file") -> None:
    parser.add_argument("--config", required=required, help=config_help)
    # nargs="+" so that `--set run.batch_size 64` reaches load_config, which names the fix, instead of
    # argparse's top-level usage and "unrecognized arguments: 64"
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set run.batch_size=64 (repeatable)")


def command_extract(arguments) -> int:
    config = load_config(ExtractConfig, arguments.config, arguments.set)
    return run_extract_and_report(config, arguments.verbose)


def run_extract_and_report(config: ExtractConfig, verbose: bool = False) -> int:
    from pipeline.extract.driver import run_extract
    from pipeline.tools.report import print_extract_summary

    success = run_extract(config, verbose=verbose)
    print_extract_summary(success, console)
    if success["error_rate"] > success["max_error_rate"]:
        error_console.print(f"[bold red]failed:[/] error rate {success['error_rate']:.1%} is above "
                            f"run.max_error_rate {success['max_error_rate']:.1%}; good rows are committed")
        return EXIT_ERROR_RATE
    return 0


def command_train(arguments) -> int:
    from pipeline.train.fit import train
    from pipeline.train.metrics import print_summary

    config = load_config(TrainConfig, arguments.config, arguments.set)
    metrics = train(config)
    print_summary(metrics, console)
    console.print(f"classifier and metrics written to {config.output.uri}")
    return 0


def command_compare(arguments) -> int:
    from pipeline.tools.compare import compare

    config = load_config(CompareConfig, arguments.config, arguments.set)
    compare(config, console)
    console.print(f"comparison written to {config.output.uri} (compare.json, compare.png)")
    return 0


def command_finetune(arguments) -> int:
    from pipeline.config import load_finetune_config
    from pipeline.finetune.report import print_finetune_summary
    from pipeline.finetune.stage import finetune

    config = load_finetune_config(arguments.config, arguments.set)
    print_finetune_summary(finetune(config, arguments.verbose), config.output.uri, console)
    return 0


def command_predict(arguments) -> int:
    from pipeline.train.predict import predict

    success = predict(arguments.model, arguments.features, arguments.output)
    console.print(f"{success['rows']['total']} predictions written to {arguments.output}")
    return 0


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
                             runtime=arguments.runtime, manifest_entries=arguments.manifest_entries)
    run_bench(settings, Path(arguments.output), console)
    return 0


def command_index(arguments) -> int:
    from pipeline.analyse.index import build_index
    from pipeline.config import IndexConfig

    config = load_config(IndexConfig, arguments.config, arguments.set)
    success = build_index(config)
    state = "already built" if success.get("already_done") else "built"
    console.print(f"index {state}: {success['rows']['ok']} vectors, {success['kind']} ({success['factory']}, "
                  f"{success['metric']}), {success['index_bytes'] / 2**20:.1f} MiB, in {config.output.uri}")
    return 0


def command_search(arguments) -> int:
    from pipeline.analyse.search import print_neighbours, search
    from pipeline.config import SearchConfig

    config = load_config(SearchConfig, arguments.config, arguments.set)
    success, table = search(config)
    if success.get("already_done"):
        console.print(f"{config.output.uri} already holds this search (same index, queries and settings)")
    print_neighbours(table, console, config.search.show)
    for uri, reason in success.get("query_errors", {}).items():
        error_console.print(f"[yellow]query skipped:[/] {uri}: {reason}", highlight=False, soft_wrap=True)
    console.print(f"{success['rows']['total']} neighbours of {success['rows']['queries']} queries written to "
                  f"{config.output.uri}")
    return 0


def command_dedup(arguments) -> int:
    from pipeline.analyse.dedup import chaining_warning, dedup
    from pipeline.config import DedupConfig

    config = load_config(DedupConfig, arguments.config, arguments.set)
    counts = dedup(config)["counts"]
    console.print(f"{counts['rows']} images in {counts['groups']} groups: {counts['duplicates']} near-duplicates "
                  f"in {counts['groups_with_duplicates']} groups (keep the rest); groups.parquet in "
                  f"{config.output.uri}")
    warning = chaining_warning(counts, config.dedup.threshold)
    if warning:
        console.print(warning, style="yellow", highlight=False)
    return 0


def command_demo(arguments) -> int:
    from pipeline.tools.demo import run_demo

    return run_demo(arguments.workdir, console, arguments.verbose)


if __name__ == "__main__":
    sys.exit(main())
