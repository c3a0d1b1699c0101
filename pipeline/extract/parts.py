"""The frozen manifest in parts: written while the listing streams, read back one shard's slice at a time.

A listing of any size is frozen into the output as Parquet parts of whole shards (PART_TARGET_ROWS images, one
row group a shard), each recorded in `_plan.json` with its row count, size and checksum. A shard is a row range of
one part, so a task carries the part's name and the range (a few dozen bytes whatever the shard size) and the
worker reads just that row group: neither the driver nor a task ever holds the whole listing or a shard's URIs.

A uri listed twice is kept once within a part (every listing of up to PART_TARGET_ROWS images, across sources);
telling repeats apart across parts would cost memory per image, so a repeat further apart is a row of its own.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.extract.listing import LISTING_SCHEMA, drop_repeated_uris
from pipeline.io import storage

# About 20 MB of listing in memory while a part is written, and a few dozen parts for ten million images.
PART_TARGET_ROWS = 262_144


@dataclass(frozen=True)
class Part:
    path: str  # relative to the output
    num_images: int
    bytes: int | None = None  # None for a manifest written before parts existed
    sha256: str | None = None


@dataclass(frozen=True)
class ManifestSlice:
    """Where a task's images are: rows of one frozen part; `first_row` is the part's row 0 in plan row numbers."""

    part: str
    first_row: int


def rows_per_part(shard_size: int) -> int:
    """Whole shards only, so that no shard spans two parts."""
    return max(1, PART_TARGET_ROWS // shard_size) * shard_size


class PartWriter:
    """Takes the listing chunk by chunk, writes a part each time a part's worth of images is in; `close` writes the
    rest and returns every part. Memory: at most one part plus one chunk."""

    def __init__(self, output: str, options: dict, shard_size: int, name_of: Callable[[int], str]):
        self.output, self.options, self.shard_size, self.name_of = output, options, shard_size, name_of
        self.limit = rows_per_part(shard_size)
        self.pending: list[pa.Table] = []
        self.num_pending = 0
        self.parts: list[Part] = []

    @property
    def num_images(self) -> int:
        return sum(part.num_images for part in self.parts) + self.num_pending

    def add(self, chunk: pa.Table) -> None:
        self.pending.append(chunk.select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA))
        self.num_pending += chunk.num_rows
        if self.num_pending >= self.limit:
            self.write_full_parts()

    def write_full_parts(self) -> None:
        table = drop_repeated_uris(pa.concat_tables(self.pending))
        while table.num_rows >= self.limit:
            self.write(table.slice(0, self.limit))
            table = table.slice(self.limit)
        self.pending, self.num_pending = [table], table.num_rows

    def close(self) -> list[Part]:
        self.write_full_parts()
        if self.num_pending or not self.parts:
            self.write(self.pending[0] if self.pending else LISTING_SCHEMA.empty_table())
        self.pending, self.num_pending = [], 0
        return self.parts

    def write(self, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=self.shard_size)
        data = buffer.getvalue()
        name = self.name_of(len(self.parts))
        storage.write_bytes(storage.join(self.output, name), data, self.options)
        self.parts.append(Part(name, table.num_rows, len(data), hashlib.sha256(data).hexdigest()))


def read_slice(output: str, options: dict | None, where: ManifestSlice, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) (plan row numbers) of a frozen part, reading only the row groups that hold them."""
    local_start, local_stop = start - where.first_row, stop - where.first_row
    with storage.open_input(storage.join(output, where.part), options) as handle:
        parquet = pq.ParquetFile(handle)
        groups, group_start, skip = [], 0, None
        for index in range(parquet.metadata.num_row_groups):
            group_stop = group_start + parquet.metadata.row_group(index).num_rows
            if group_start < local_stop and group_stop > local_start:
                groups.append(index)
                skip = group_start if skip is None else skip
            group_start = group_stop
        table = parquet.read_row_groups(groups, columns=LISTING_SCHEMA.names) if groups else LISTING_SCHEMA.empty_table()
    return table.slice(local_start - (skip or 0), local_stop - local_start)


def check_parts(output: str, options: dict | None, frozen: list[Part]) -> None:
    """Every frozen part is there with the size the plan recorded (a HEAD each): a resume never reads shards out of
    a manifest that changed under it."""
    for part in frozen:
        found = storage.size_of(storage.join(output, part.path), options)
        if found is None or (part.bytes is not None and found != part.bytes):
            state = "is missing" if found is None else f"holds {found} bytes, the plan recorded {part.bytes}"
            raise ConfigError(f"output.uri: the frozen manifest part {part.path} {state}, so the shards it holds "
                              f"cannot be resumed exactly; use output.mode: overwrite to list the input again")


def read_part(output: str, options: dict | None, part: Part) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, part.path), options)))
