"""process_shard: one piece of the manifest -> one Parquet data file, with per-stage timings. No Ray.

Fetch and decode run a bounded window ahead of the forward pass, so the model does not wait on I/O: remote
fetches in their own threads (waiting on a store costs no CPU, so there are many), decodes (and local reads) in
as many threads as the actor has cores (more only add switches between threads and hand-overs of the interpreter
lock, which on a CPU actor cost the model's cores; docs/performance.md). The forward pass runs in a thread of its
own. Pillow, numpy, LiteRT and the storage clients release the GIL for the heavy parts. In an actor the decoding
and the model's side of a piece are two calls, so the next piece decodes while this one finishes (handoff.py).
Every input yields exactly one row: bytes that cannot be fetched or decoded become error rows with the reason.

Archive members (chained `tar://...::...` / `zip://...::...` URIs, see archives.py) are not fetched one by one:
a run of a shard's items from one archive streams that archive once, in the reading thread, and hands each
member's bytes to the decode threads as it passes; members the stream never delivered (a truncated archive,
a failed read) become error rows saying why.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import OutputConfig
from pipeline.extract import archives
from pipeline.extract.items import (
    Decoder,
    DecodeSettings,
    Item,
    decode_fetched,
    error_item,
    fetch_and_decode,
    fetch_for_decoders,
    image_decoder,
    is_fetch_failure,
)
from pipeline.extract.items import Reader as Reader  # input.reader's builders subclass it as extract.worker.Reader
from pipeline.extract.parts import ManifestSlice, read_slice
from pipeline.extract.rows import ShardRows, row_schema
from pipeline.io import faults, storage
from pipeline.output import layout, ledger


@dataclass(frozen=True)
class ShardTask:
    """A contiguous piece [start, stop) of the manifest; a whole shard unless it was bisected. A run's tasks carry
    where the piece lies in the frozen manifest (`where`) and the worker reads it there, so a task is a few dozen
    bytes whatever the shard size; `uris` and `labels` name the images directly instead (tools, tests)."""

    shard: int
    start: int
    stop: int
    uris: list[str] | None = None
    labels: list[str | None] | None = None
    attempt: int = 1
    where: ManifestSlice | None = None
    models: tuple[str, ...] | None = None  # a `models:` run: the models whose outputs lack this shard

    def piece(self, start: int, stop: int, attempt: int | None = None) -> ShardTask:
        """Rows [start, stop) of this piece, as a task of its own."""
        named = self.uris is not None
        return ShardTask(self.shard, start, stop,
                         self.uris[start - self.start:stop - self.start] if named else None,
                         self.labels[start - self.start:stop - self.start] if named else None,
                         self.attempt if attempt is None else attempt, self.where, self.models)

    def entries(self, settings: ShardSettings | None = None) -> list[tuple[str, str | None]]:
        """(uri, label) of every image of the piece, read from the frozen manifest when the task carries none."""
        if self.uris is not None:
            return list(zip(self.uris, self.labels))
        table = read_slice(settings.output_uri, settings.output_storage_options, self.where, self.start, self.stop)
        return list(zip(table.column("uri").to_pylist(), table.column("label").to_pylist()))


@dataclass(frozen=True)
class ShardSettings:
    """What a worker needs of the job's config; defaults are the config's own (one place to change them)."""

    output_uri: str
    output_storage_options: dict
    decode: DecodeSettings = field(default_factory=lambda: DecodeSettings({}))  # how each image is read and decoded
    feature_dtype: str = OutputConfig.feature_dtype
    row_group_size: int = OutputConfig.row_group_size
    decode_threads: int = 4  # a count: the driver resolves run.decode_threads 0 (auto) before it sends these
    fetch_threads: int = 16  # remote reads, ahead of the decode threads; run.fetch_threads 0 resolves to this
    run_tag: str = ""  # the run's lease tag, in the names of the data files it writes
    model_run_tags: tuple[tuple[str, str], ...] = ()  # a `models:` run: (name, its output's lease tag)
    writer: dict = field(default_factory=dict)  # the actor that writes: node_id, accelerator_ids (file metadata)


@dataclass
class ShardResult:
    shard: int
    start: int
    stop: int
    file: str
    rows: int
    ok: int
    error: int
    timings: dict = field(default_factory=dict)
    errors_by_reason: dict = field(default_factory=dict)
    writer: dict = field(default_factory=dict)  # settings.writer of the actor that wrote the file
    seconds: float = 0.0  # wall time of the piece on its actor


class NonFiniteShard(RuntimeError):
    """Every image of a piece gave NaN or inf features: a broken model or accelerator, not bad input."""


def decoded_items(task: ShardTask, decode: Decoder, settings: ShardSettings, executor: ThreadPoolExecutor,
                  window: int, fetchers: ThreadPoolExecutor | None = None) -> Iterator[Item]:
    """Items in manifest order (an archive's members in its stream order), decoded in `executor` at most `window`
    ahead of the consumer (bounded memory); loose files fetched in `fetchers` first, or in `executor` too."""
    pending: collections.deque[Future] = collections.deque()
    for future in item_futures(task, decode, settings, executor, fetchers):
        pending.append(future)
        if len(pending) >= window:
            yield finished_item(pending.popleft())
    while pending:
        yield finished_item(pending.popleft())


def reads_locally(uri: str, settings: DecodeSettings) -> bool:
    """A local file through the default reader: a read of microseconds, done in the decode thread itself (a fetch
    thread would only add a hand-over of the interpreter lock)."""
    return settings.reader is None and storage.protocol_family(storage.protocol_of(uri)) == "file"


def finished_item(future: Future) -> Item:
    """The item of a decode's future, or of a fetch's future (whose result is the decode's future, or an error)."""
    outcome = future.result()
    return outcome.result() if isinstance(outcome, Future) else outcome


def item_futures(task: ShardTask, decode: Decoder, settings: ShardSettings, executor: ThreadPoolExecutor,
                 fetchers: ThreadPoolExecutor | None = None) -> Iterator[Future]:
    """One future an item: loose files fetched (remote ones in `fetchers`, when given) and decoded in the threads;
    each run of members of one archive from one stream of it."""
    entries = task.entries(settings)
    for archive_uri, run in itertools.groupby(entries, key=lambda entry: archives.archive_of(entry[0])):
        if archive_uri is None:
            for uri, label in run:
                if fetchers is None or reads_locally(uri, settings.decode):
                    yield executor.submit(fetch_and_decode, uri, label, decode, settings.decode)
                else:
                    yield fetchers.submit(fetch_for_decoders, uri, label, decode, settings.decode, executor)
        else:
            yield from archive_member_futures(archive_uri, list(run), decode, settings, executor)


def archive_member_futures(archive_uri: str, entries: list[tuple[str, str | None]], decode: Decoder,
                           settings: ShardSettings, executor: ThreadPoolExecutor) -> Iterator[Future]:
    """Stream one archive, decode the members `entries` name as they pass, stop once all are found; what the
    stream never delivered is an error row with the reason (where the archive broke, or why the read failed)."""
    needed = {archives.split_member_uri(uri)[1]: (uri, label) for uri, label in entries}
    kind = archives.split_member_uri(entries[0][0])[0]
    reason = "not found in the archive (was it changed after the listing?)"
    started = time.perf_counter()
    try:
        members = archives.read_members(archive_uri, kind, settings.decode.input_storage_options, needed.__contains__,
                                        settings.decode.reader_part.open_stream)
        with contextlib.closing(members):
            for member in members:
                if isinstance(member, archives.ArchiveBreak):
                    reason = member.describe()
                    break
                if member.name not in needed:
                    continue
                uri, label = needed.pop(member.name)
                fetch_seconds, started = time.perf_counter() - started, time.perf_counter()
                if member.error is not None:
                    yield error_item(uri, label, member.error, fetch_seconds)
                else:
                    yield executor.submit(decode_fetched, uri, label, member.data, fetch_seconds, decode,
                                          settings.decode.content_hashes)
                if not needed:
                    break  # the rest of the archive belongs to other shards: stop reading it
    except Exception as error:  # noqa: BLE001 - classified just below
        if not is_fetch_failure(error):
            raise
        reason = f"fetch failed: {faults.describe_error(error)}"
    for uri, label in needed.values():
        yield error_item(uri, label, reason)


def batches(items: Iterator[Item], batch_size: int) -> Iterator[list[Item]]:
    """Groups of items holding at most `batch_size` decodable images (error items ride along)."""
    group: list[Item] = []
    num_images = 0
    for item in items:
        group.append(item)
        num_images += item.image.error is None
        if num_images == batch_size:
            yield group
            group, num_images = [], 0
    if group:
        yield group


def process_shard(task: ShardTask, extractor, settings: ShardSettings, decoded: Iterator[list[Item]] | None = None,
                  timings: collections.Counter | None = None,
                  model_turn: contextlib.AbstractContextManager | None = None) -> ShardResult:
    """Fetch, decode, embed and write one piece; returns where its rows are and what it cost. The batch size is
    the extractor's own (it halves it after running out of accelerator memory). `decoded`: the piece's batches as
    another call decodes them (`piece_batches`, through handoff.Handoff), with its seconds in `timings`; None:
    decoded here. `model_turn` is held while the model runs, not while the file is written (an actor's next piece
    then starts on the model meanwhile)."""
    piece_started = time.perf_counter()
    timings = collections.Counter() if timings is None else timings
    with model_turn or contextlib.nullcontext():
        if decoded is None:
            decoded = piece_batches(task, extractor, settings, timings)
        rows = ShardRows()
        for group, output in forwarded(waited(decoded, timings), extractor, timings):
            add_rows(rows, group, output, extractor.class_names, settings.feature_dtype)
    check_finite_rows(task, rows)
    return write_shard(task, rows, extractor, settings, timings, piece_started)


def forwarded(groups: Iterator[list[Item]], extractor,
              timings: collections.Counter) -> Iterator[tuple[list[Item], Any]]:
    """Each group with the model's outputs for its images. A group's forward pass runs in a thread of its own
    while the caller builds the rows of the one before (the forward releases the GIL): on a CPU the model's
    threads then never wait on that Python work with a core idle."""
    with ThreadPoolExecutor(1, thread_name_prefix="forward") as forward_thread:
        previous = None
        for group in groups:
            running = forward_thread.submit(timed_forward, group, extractor, timings)
            if previous is not None:
                yield previous[0], previous[1].result()
            previous = (group, running)
        if previous is not None:
            yield previous[0], previous[1].result()


def timed_forward(group: list[Item], extractor, timings: collections.Counter):
    started = time.perf_counter()
    output = forward(group, extractor)
    timings["forward"] += time.perf_counter() - started  # this thread's key alone: no other thread adds to it
    return output


def forward(group: list[Item], extractor):
    """The model's outputs (features, top-k indices, top-k scores) for the group's decoded images; None if none."""
    images = [item.image.pixels for item in group if item.image.error is None]
    return extractor(np.stack(images)) if images else None


WINDOW_BATCHES = 4  # images decoded ahead of the model: this many batches (2 left decode idle at times), plus
# one waiting in an actor's handoff, and at a piece boundary the next piece's as well


def piece_batches(task: ShardTask, extractor, settings: ShardSettings,
                  timings: collections.Counter) -> Iterator[list[Item]]:
    """The piece's images decoded for one model, in batches of its size."""
    decode = image_decoder(extractor.input_size, settings.decode)
    return decoded_batches(task, decode, extractor.batch_size, settings, timings)


def decoded_batches(task: ShardTask, decode: Decoder, batch_size: int, settings: ShardSettings,
                    timings: collections.Counter) -> Iterator[list[Item]]:
    """The piece's items in batches, fetched and decoded in threads ahead of the consumer; adds the seconds spent
    fetching and decoding to `timings`."""
    # leaving the block shuts the fetchers down first: a fetch still running hands its decode to open decoders
    with (ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode") as decoders,
          ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="fetch") as fetchers):
        window = WINDOW_BATCHES * batch_size
        for group in batches(decoded_items(task, decode, settings, decoders, window, fetchers), batch_size):
            timings["fetch"] += sum(item.fetch_seconds for item in group)
            timings["decode"] += sum(item.decode_seconds for item in group)
            yield group


def waited(groups: Iterator[list[Item]], timings: collections.Counter) -> Iterator[list[Item]]:
    """The groups, adding the seconds the model's side waited for each to `timings`."""
    while True:
        started = time.perf_counter()
        group = next(groups, None)
        timings["wait"] += time.perf_counter() - started
        if group is None:
            return
        yield group


def write_shard(task: ShardTask, rows: ShardRows, extractor, settings: ShardSettings,
                timings: collections.Counter, piece_started: float) -> ShardResult:
    """The piece's rows as a new data file in `settings.output_uri`, and the result that names it; the writing
    actor (settings.writer) goes in the file's metadata."""
    started = time.perf_counter()
    relative_path = layout.new_data_file_name(task.shard, settings.run_tag)
    metadata = {**extractor.provenance, **{key: json.dumps(value) if isinstance(value, list) else value
                                           for key, value in settings.writer.items()}}
    schema = row_schema(extractor.feature_dim, settings.feature_dtype, metadata)
    ledger.write_data_file(settings.output_uri, relative_path, rows.to_table(schema), settings.row_group_size,
                           settings.output_storage_options)
    timings["write"] += time.perf_counter() - started
    reasons = collections.Counter(reason_category(error) for error in rows.error if error is not None)
    num_errors = sum(reasons.values())
    return ShardResult(task.shard, task.start, task.stop, relative_path, len(rows), len(rows) - num_errors,
                       num_errors, dict(timings), dict(reasons), dict(settings.writer),
                       time.perf_counter() - piece_started)


NON_FINITE = "non-finite features"
FLOAT16_MAX = float(np.finfo(np.float16).max)


def non_finite_reason(features: np.ndarray, feature_dtype: str) -> str | None:
    """Why a feature vector cannot be an ok row: NaN or inf from the model, or values float16 cannot hold."""
    if not np.isfinite(features).all():
        return f"{NON_FINITE} (NaN or inf from the model: a broken model or accelerator?)"
    if feature_dtype == "float16" and np.abs(features).max(initial=0.0) > FLOAT16_MAX:
        return f"{NON_FINITE} (beyond float16's range of +-{FLOAT16_MAX:g}: use output.feature_dtype float32)"
    return None


def check_finite_rows(task: ShardTask, rows: ShardRows, model: str | None = None) -> None:
    """A piece whose every decoded image gave non-finite features points at the model or the accelerator, not at
    the images: it fails like a bug (retried, then the run stops). `model`: which one, in a `models:` run."""
    decoded = [error for error in rows.error if error is None or error.startswith(NON_FINITE)]
    if decoded and all(error is not None for error in decoded):
        of_model = f" for model {model}" if model else ""
        raise NonFiniteShard(f"every one of the {len(decoded)} decoded images of shard {task.shard} "
                             f"[{task.start}:{task.stop}]{of_model} gave non-finite features: {decoded[0]}")


def add_rows(rows: ShardRows, group: list[Item], output, class_names: list[str] | None,
             feature_dtype: str = OutputConfig.feature_dtype) -> None:
    """The group's rows, given the model's `output` for its decoded images (forward)."""
    position = 0
    for item in group:
        image = item.image
        if image.error is not None:
            rows.add_error(item.uri, item.label, image.error, image.width, image.height)
            continue
        reason = non_finite_reason(output.features[position], feature_dtype)
        if reason is not None:
            rows.add_error(item.uri, item.label, reason, image.width, image.height)
            position += 1
            continue
        indices = output.top_k_indices[position]
        labels = [class_names[index] if class_names else str(index) for index in indices]
        rows.add_ok(item.uri, item.label, image.width, image.height, output.features[position], labels,
                    output.top_k_scores[position].tolist(), item.sha256, image.phash)
        position += 1


def reason_category(error: str) -> str:
    """The stable part of a reason for grouping: what comes before the first ':' or ' (' (the details)
    ("truncated image: ..." -> "truncated image", "format EPS not allowed (allowed: ...)" ->
    "format EPS not allowed", "empty file (0 bytes)" -> "empty file")."""
    return error.split(":", 1)[0].split(" (", 1)[0].strip()


def quarantine_rows(task: ShardTask, attempts: int, settings: ShardSettings | None = None) -> ShardRows:
    """Error rows for images that killed their worker every time they were tried."""
    rows = ShardRows()
    for uri, label in task.entries(settings):
        rows.add_error(uri, label, f"quarantined: the worker process crashed on this image {attempts} times")
    return rows
