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

from pipeline.cli.common import add_config_arguments, console, error_console
from pipeline.cli.tools import (add_bench_command, add_demo_command, add_inspect_command, add_lease_command,
                                add_models_command, add_report_command, add_weights_command)
from pipeline.config import CompareConfig, ExtractConfig, TrainConfig, load_config
from pipeline.errors import USER_ERRORS

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
    except KeyboardInterrupt as interruption:  # SIGINT, or SIGTERM during a run (pipeline.extract.signals.Interrupted)
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
    for add_command in COMMANDS:
        add_command(commands, common)
    return parser


def config_command(name: str, handler, help_text: str):
    """The parser of a command that runs on a config: `featurize NAME --config FILE [--set ...]`."""
    def add_command(commands, common: argparse.ArgumentParser) -> None:
        command = commands.add_parser(name, parents=[common], help=help_text)
        add_config_arguments(command)
        command.set_defaults(handler=handler)
    return add_command


def add_predict_command(commands, common: argparse.ArgumentParser) -> None:
    predict = commands.add_parser("predict", parents=[common], help="apply a trained classifier to extracted features")
    predict.add_argument("--model", required=True, help="output directory of `featurize train`")
    predict.add_argument("--features", required=True, help="output directory of `featurize extract`")
    predict.add_argument("--output", required=True, help="where to write the predictions (any fsspec URI)")
    predict.set_defaults(handler=command_predict)


def command_extract(arguments) -> int:
    config = load_config(ExtractConfig, arguments.config, arguments.set)
    return run_extract_and_report(config, arguments.verbose)


def run_extract_and_report(config: ExtractConfig, verbose: bool = False) -> int:
    from pipeline.extract.driver import run_extract
    from pipeline.tools.report import print_extract_summary

    success = run_extract(config, verbose=verbose)
    for name, model_success in success.get("models", {}).items():  # models: one output per model
        console.print(f"[bold]{name}[/] ({model_success['output']})")
        print_extract_summary(model_success, console)
    if "models" not in success:
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
    success = dedup(config, say=lambda line: console.print(line, style="yellow", highlight=False))
    counts = success["counts"]
    exact = f", {counts['exact_pairs']} of them exact copies" if "exact_pairs" in counts else ""
    console.print(f"{counts['rows']} images in {counts['groups']} groups: {counts['duplicates']} duplicates{exact} "
                  f"in {counts['groups_with_duplicates']} groups (keep the rest; verify: {success.get('verify')}); "
                  f"groups.parquet in {config.output.uri}")
    warning = chaining_warning(counts, success["threshold"])
    if warning:
        console.print(warning, style="yellow", highlight=False)
    return 0


COMMANDS = (  # in the order of `featurize --help`
    config_command("extract", command_extract, "extract features and top-k predictions to Parquet"),
    config_command("train", command_train, "train and evaluate a classifier on extracted features"),
    config_command("compare", command_compare, "compare backbones (and random-init baselines) with one probe"),
    config_command("finetune", command_finetune, "fine-tune a network with a new head on labelled images"),
    add_predict_command, add_models_command, add_inspect_command, add_report_command, add_lease_command,
    add_weights_command, add_bench_command,
    config_command("index", command_index, "build a similarity index (faiss) over extracted features"),
    config_command("search", command_search, "nearest neighbours of images or indexed uris in an index"),
    config_command("dedup", command_dedup, "near-duplicate groups and a keep-list from extracted features"),
    add_demo_command,
)
