"""What every command module of the CLI shares: the consoles and the --config/--set arguments."""

from __future__ import annotations

import argparse

from rich.console import Console

console = Console(stderr=False)  # results; progress, logs and errors go to stderr
error_console = Console(stderr=True)


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True,
                         config_help: str = "YAML config file") -> None:
    parser.add_argument("--config", required=required, help=config_help)
    # nargs="+" so that `--set run.batch_size 64` reaches load_config, which names the fix, instead of
    # argparse's top-level usage and "unrecognized arguments: 64"
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set run.batch_size=64 (repeatable)")
