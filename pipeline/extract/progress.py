"""What a person sees while a job runs: phase lines, then a live bar on a terminal, or plain log lines
elsewhere (cluster jobs, CI). Everything goes to stderr through one rich console, so log records print
above the bar instead of gluing onto it."""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("featurize")

LOG_EVERY_SECONDS = 10.0
CONSOLE = Console(stderr=True)  # the bar, phases, logs and errors; results go to stdout
HANDLER: RichHandler | None = None
QUIET_LIBRARIES = ("ray", "tensorflow", "absl", "h5py", "urllib3", "botocore", "s3fs", "fsspec", "PIL", "matplotlib")


def configure_logging(verbose: bool = False) -> None:
    """featurize's own records at INFO; libraries only at WARNING (ERROR for Ray), unless `verbose`. One handler
    on the root logger, added once (other handlers, e.g. a test harness's, are left alone)."""
    global HANDLER
    root = logging.getLogger()
    if HANDLER is None:
        HANDLER = new_handler(CONSOLE.is_terminal)
        root.addHandler(HANDLER)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in ("featurize", "pipeline"):
        logging.getLogger(name).setLevel(logging.INFO)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)  # e.g. its token-auth notice on every local start
        # gcsfs logs every request it gives up on with a traceback at ERROR, then raises: featurize reports the
        # raised error itself, as one line naming the key (or as an error row)
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


class StandardErrorHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a harness may swap it), one plain line a record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always answers
        pass


def new_handler(interactive: bool) -> logging.Handler:
    """On a terminal, records go through the bar's console (printed above the bar, never glued onto it);
    elsewhere (cluster jobs, CI, pipes) as plain timestamped lines."""
    if interactive:
        handler: logging.Handler = RichHandler(console=CONSOLE, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = StandardErrorHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    return handler


class ProgressReporter:
    """Counts images, error rows, committed shards and live actors; shows them as fits the output."""

    def __init__(self, interactive: bool, console: Console | None = None):
        self.interactive = interactive
        self.console = console or CONSOLE
        self.progress: Progress | None = None
        self.images = self.errors = self.shards = 0
        self.total_images = self.total_shards = 0
        self.actors_alive = 0
        self.started = time.time()
        self.images_at_start = 0
        self.last_log = 0.0
        self.last_logged_images: int | None = None

    def phase(self, message: str) -> None:
        """One line per start-up step (planning, starting Ray, loading the model, first commit)."""
        if self.interactive:
            self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}", highlight=False)
        else:
            log.info("%s", message)

    def start(self, total_images: int, total_shards: int, done_shards: int, done_images: int,
              done_errors: int) -> None:
        self.total_images, self.total_shards = total_images, total_shards
        self.images, self.errors, self.shards = done_images, done_errors, done_shards
        self.images_at_start = done_images
        self.last_logged_images = done_images  # no progress line until something moved
        self.started = time.time()
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} img/s"), TimeRemainingColumn(),
                TextColumn("errors {task.fields[errors]}  shards {task.fields[shards]}  actors {task.fields[actors]}"),
                console=self.console)
            self.progress.start()
            self.task = self.progress.add_task("extract", total=total_images, completed=done_images,
                                               **self.fields())

    def fields(self) -> dict:
        elapsed = max(time.time() - self.started, 1e-9)
        return {"rate": (self.images - self.images_at_start) / elapsed, "errors": self.errors,
                "shards": f"{self.shards}/{self.total_shards}", "actors": self.actors_alive}

    def advance(self, images: int, errors: int) -> None:
        self.images += images
        self.errors += errors
        self.refresh()

    def shard_committed(self) -> None:
        self.shards += 1
        self.refresh()

    def update(self, actors_alive: int) -> None:
        self.actors_alive = actors_alive
        self.refresh()

    def refresh(self) -> None:
        fields = self.fields()
        if self.progress is not None:
            self.progress.update(self.task, completed=self.images, **fields)
        elif time.time() - self.last_log >= LOG_EVERY_SECONDS and self.images != self.last_logged_images:
            self.last_log = time.time()
            self.last_logged_images = self.images
            log.info("progress images=%d/%d rate=%.1f/s errors=%d shards=%s actors=%d", self.images,
                     self.total_images, fields["rate"], self.errors, fields["shards"], fields["actors"])

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
