"""Driver progress: a live rich bar on a terminal, plain structured log lines elsewhere (cluster jobs)."""

from __future__ import annotations

import logging
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("featurize")

LOG_EVERY_SECONDS = 10.0


class ProgressReporter:
    """Counts images, error rows, committed shards and live actors; shows them as fits the output."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.progress: Progress | None = None
        self.images = self.errors = self.shards = 0
        self.total_images = self.total_shards = 0
        self.actors_alive = 0
        self.started = time.time()
        self.images_at_start = 0
        self.last_log = 0.0

    def start(self, total_images: int, total_shards: int, done_shards: int, done_images: int,
              done_errors: int) -> None:
        self.total_images, self.total_shards = total_images, total_shards
        self.images, self.errors, self.shards = done_images, done_errors, done_shards
        self.images_at_start = done_images
        self.started = time.time()
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} img/s"), TimeRemainingColumn(),
                TextColumn("errors {task.fields[errors]}  shards {task.fields[shards]}  actors {task.fields[actors]}"))
            self.progress.start()
            self.task = self.progress.add_task("extract", total=total_images, completed=done_images,
                                               **self.fields())
        log.info("plan: %d images in %d shards, %d shards already committed",
                 total_images, total_shards, done_shards)

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
        elif time.time() - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = time.time()
            log.info("progress images=%d/%d rate=%.1f/s errors=%d shards=%s actors=%d", self.images,
                     self.total_images, fields["rate"], self.errors, fields["shards"], fields["actors"])

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
