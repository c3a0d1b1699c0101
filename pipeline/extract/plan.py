"""The plan: a frozen manifest, deterministic shards, and a fingerprint of everything that changes features.

The first run lists the input and freezes it into the output (`_manifest.parquet`, `_plan.json`); every
later run in `resume` mode reuses that manifest, so shard i always means the same images. A run whose
fingerprint differs from the frozen one is refused with the keys that differ.

The listing is frozen as it streams, into parts of whole shards (pipeline/extract/parts.py) that `_plan.json` names
with their sizes and checksums; a shard is a row range of one part, and the driver keeps only the plan.

`output.mode: append` lists the input again and freezes only the images no earlier generation holds (a pyarrow
anti-join on uri) as a new generation, whose shards are numbered after the existing ones (layout in
pipeline/output/layout.py). The pending shards of earlier generations run first, in the same run. A resume of a
small plan lists the input again only to say, in one line, that append would find new images.

An output planned before rows had `sha256` and `phash` (its frozen inputs lack `content_hashes`) is finished as it
is by a resume with nothing left to run, but a resume with shards pending or an append with new images is refused:
its files would mix two row schemas. `output.mode: overwrite` extracts it again with the hashes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.config import ExtractConfig, is_saved_model_path, is_weights_file
from pipeline.contract import FINGERPRINT_EXCLUDED, FINGERPRINT_NAMES
from pipeline.errors import USER_ERRORS, ConfigError
from pipeline.extract import parts
from pipeline.extract.listing import LISTING_SCHEMA, iterate_listing, list_images
from pipeline.extract.parts import ManifestSlice, Part
from pipeline.io import faults, redaction, storage
from pipeline.output import layout, ledger

log = logging.getLogger("featurize")

# A resume lists the input again (to say whether append would find new images) only for plans this small: about
# one directory walk or ten object-store list pages, never the millions of objects a large archive holds.
HINT_RELIST_LIMIT = 10_000


@dataclass(frozen=True)
class Generation:
    """One frozen listing: generation 0 is the first run's, each append that found new images adds one."""

    manifest: str  # its manifest file, relative to the output
    num_images: int
    shard_offset: int  # the number of its first shard: shard numbers continue across generations
    created: float | None = None  # epoch seconds; None for generation 0 of an output older than generations
    parts: tuple[Part, ...] = ()  # its frozen parts, the first being `manifest`; () before parts existed

    def num_shards(self, shard_size: int) -> int:
        return -(-self.num_images // shard_size)

    def all_parts(self) -> tuple[Part, ...]:
        return self.parts or (Part(self.manifest, self.num_images),)


@dataclass(frozen=True)
class Plan:
    fingerprint: str
    fingerprint_inputs: dict
    shard_size: int
    generations: tuple[Generation, ...]

    @property
    def num_images(self) -> int:
        return sum(generation.num_images for generation in self.generations)

    @property
    def num_shards(self) -> int:
        last = self.generations[-1]
        return last.shard_offset + last.num_shards(self.shard_size)

    def shard_bounds(self, shard_index: int) -> tuple[int, int]:
        """Rows [start, stop) of the shard in the manifests of every generation concatenated in order."""
        first_row = 0
        for generation in self.generations:
            local_index = shard_index - generation.shard_offset
            if 0 <= local_index < generation.num_shards(self.shard_size):
                start = local_index * self.shard_size
                return first_row + start, first_row + min(start + self.shard_size, generation.num_images)
            first_row += generation.num_images
        raise IndexError(f"shard {shard_index} is not in the plan (it has {self.num_shards} shards)")

    def shard_slice(self, shard_index: int) -> tuple[int, int, ManifestSlice]:
        """The shard's rows [start, stop) (as shard_bounds) and the frozen part that holds them."""
        start, stop = self.shard_bounds(shard_index)
        first_row = 0
        for generation in self.generations:
            for part in generation.all_parts():
                if first_row <= start < first_row + part.num_images:
                    if stop > first_row + part.num_images:
                        raise AssertionError(f"shard {shard_index} spans two manifest parts")  # parts hold whole shards
                    return start, stop, ManifestSlice(part.path, first_row)
                first_row += part.num_images
        raise IndexError(f"shard {shard_index} is not in the plan's manifest parts")

    def with_generation(self, parts: list[Part]) -> Plan:
        """The plan grown by one generation of these parts, numbered after every existing shard."""
        generation = Generation(parts[0].path, sum(part.num_images for part in parts), self.num_shards, time.time(),
                                tuple(parts))
        return dataclasses.replace(self, generations=(*self.generations, generation))

    def document(self) -> dict:
        """What `_plan.json` holds; top-level `num_images` stays generation 0's (see pipeline/output/layout.py)."""
        return {"fingerprint": self.fingerprint, "fingerprint_inputs": self.fingerprint_inputs,
                "shard_size": self.shard_size, "num_images": self.generations[0].num_images,
                "generations": [dataclasses.asdict(generation) for generation in self.generations]}

    @classmethod
    def from_document(cls, document: dict) -> Plan:
        """A `_plan.json`; one written before generations existed is generation 0 alone."""
        recorded = document.get("generations") or [
            {"manifest": layout.MANIFEST_FILE, "num_images": document["num_images"], "shard_offset": 0}]
        generations = tuple(Generation(**{**generation, "parts": tuple(Part(**part) for part in generation.get(
            "parts", ()))}) for generation in recorded)
        return cls(fingerprint=document["fingerprint"], fingerprint_inputs=document.get("fingerprint_inputs", {}),
                   shard_size=document["shard_size"], generations=generations)


def model_files(config: ExtractConfig) -> list[tuple[str, str]]:
    """(config key, URI) of every file the model is built from."""
    model = config.model
    candidates = (("model.backbone", model.backbone, is_saved_model_path(model.backbone)),
                  ("model.weights", model.weights, is_weights_file(model.weights)),
                  ("model.class_names", model.class_names, model.class_names is not None))
    return [(key, uri) for key, uri, is_file in candidates if is_file]


def check_model_files(config: ExtractConfig) -> None:
    """Every model file exists and is readable, checked on the driver before Ray starts, so a typo costs a
    second and names its key instead of surfacing from an actor after start-up."""
    options = config.input.storage_options
    for key, uri in model_files(config):
        try:
            found = storage.exists(uri, options)
        except Exception as error:  # noqa: BLE001 - storage failures get a clear message, the rest goes on up
            if not faults.is_storage_failure(error):
                raise
            raise faults.access_error(key, uri, "read", error) from None
        if not found:
            raise ConfigError(f"{key}: {redaction.redact(uri)} does not exist; check the path (for a cloud URI also "
                              "input.storage_options, which model files are read with)")


def fingerprint_inputs(config: ExtractConfig) -> dict:
    """Everything that changes the rows: every config key but FINGERPRINT_EXCLUDED, texts redacted (_plan.json
    holds no signature), and the checksum of each model file (`backbone_sha256`: None when not a file)."""
    inputs = {}
    for section in dataclasses.fields(config):
        if section.name in FINGERPRINT_EXCLUDED:
            continue  # `models`: each model's output has a fingerprint of its own (pipeline/extract/model_outputs.py)
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            key = f"{section.name}.{item.name}"
            if key not in FINGERPRINT_EXCLUDED:
                inputs[FINGERPRINT_NAMES.get(key, item.name)] = fingerprint_value(getattr(values, item.name))
    checksums = {key: storage.sha256_of_uri(uri, config.input.storage_options) for key, uri in model_files(config)}
    for key in ("model.backbone", "model.weights", "model.class_names"):  # the names land in top_k_labels
        inputs[f"{key.split('.')[1]}_sha256"] = checksums.get(key)
    return inputs


def fingerprint_value(value):
    if isinstance(value, tuple):
        return [fingerprint_value(item) for item in value]
    return redaction.redact(value) if isinstance(value, str) else value


def digest(document: dict) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def prepare(config: ExtractConfig, run_ledger: ledger.Ledger | None = None,
            say: Callable[[str], None] = log.info) -> tuple[Plan, pa.Table]:
    """`prepare_plan`, and the frozen manifest of every generation as one table (tests and tools: memory per
    image; a run reads one shard's slice at a time instead)."""
    run_ledger = run_ledger or ledger.Ledger(config.output.uri, config.output.storage_options)
    plan = prepare_plan(config, run_ledger, say)
    return plan, read_manifests(plan, config.output.uri, config.output.storage_options)


def prepare_plan(config: ExtractConfig, run_ledger: ledger.Ledger, say: Callable[[str], None] = log.info) -> Plan:
    """Honour output.mode, then return the plan. The run's ledger (holding the output's lease) reads the commits as
    it opens. `say` gets the one-line notes: listing progress, no new image to append, new images a resume leaves
    out."""
    output, options = config.output.uri, config.output.storage_options
    check_model_files(config)
    storage.check_writable(output, options)  # a missing bucket or bad credentials stop here, not after listing
    inputs = fingerprint_inputs(config)
    frozen = run_ledger.open(config.output.mode, digest(inputs), inputs, what="features",
                             remedy="Use output.mode: overwrite or another output.uri.")
    if frozen is None:
        return new_plan(config, inputs, run_ledger, say)
    plan = Plan.from_document(frozen)
    parts.check_parts(output, options, [part for generation in plan.generations for part in generation.all_parts()])
    if len(run_ledger.commits) < plan.num_shards:
        refuse_older_row_schema(config, plan, "resuming it")
    if config.output.mode == "append":
        return append_generation(config, plan, run_ledger, say)
    say_if_input_grew(config, plan, say)
    return plan


def new_plan(config: ExtractConfig, inputs: dict, run_ledger: ledger.Ledger, say: Callable[[str], None]) -> Plan:
    """List the input straight into frozen parts, then write the plan that names them."""
    storage.make_dirs(config.output.uri, config.output.storage_options)
    writer = parts.PartWriter(config.output.uri, config.output.storage_options, config.run.shard_size,
                              functools.partial(layout.manifest_part_file, 0))
    for chunk in iterate_listing(config.input, ListingProgress(say)):
        writer.add(chunk)
    frozen = writer.close()
    generation = Generation(frozen[0].path, writer.num_images, shard_offset=0, created=time.time(),
                            parts=tuple(frozen))
    plan = Plan(fingerprint=digest(inputs), fingerprint_inputs=inputs, shard_size=config.run.shard_size,
                generations=(generation,))
    run_ledger.write_plan(plan.document())  # last: its presence means the parts are complete
    return plan


def refuse_older_row_schema(config: ExtractConfig, plan: Plan, action: str) -> None:
    """Exit 2 when the output was planned before the `sha256` and `phash` columns and this run would write rows."""
    if "content_hashes" in plan.fingerprint_inputs:
        return
    raise ConfigError(f"output.uri: {redaction.redact(config.output.uri)} was written by a featurize older than the "
                      f"sha256 and phash columns, so {action} would mix two row schemas in one output. Use "
                      "output.mode: overwrite to extract it again with them, or another output.uri.")


class ListingProgress:
    """The number of images listed so far, said every few seconds while a long listing runs."""

    def __init__(self, say: Callable[[str], None], every_seconds: float = 5.0):
        self.say, self.every_seconds = say, every_seconds
        self.last = time.monotonic()

    def __call__(self, num_listed: int) -> None:
        if time.monotonic() - self.last >= self.every_seconds:
            self.last = time.monotonic()
            self.say(f"listing: {num_listed:,} images so far")


def append_generation(config: ExtractConfig, plan: Plan, run_ledger: ledger.Ledger,
                      say: Callable[[str], None]) -> Plan:
    """Freeze the listed images no generation holds yet as a new generation; with none, the plan as it is (its
    pending shards, if any, still run: append implies resume). The anti-join holds the whole listing and every
    frozen uri at once: append alone costs driver memory per image (about 100 bytes each)."""
    output, options = config.output.uri, config.output.storage_options
    listing = list_images(config.input)
    added = images_not_in(listing, read_manifests(plan, output, options))
    if added.num_rows == 0:
        say(f"append: no new image ({listing.num_rows} listed, every one already in the output); nothing to add")
        return plan
    refuse_older_row_schema(config, plan, "appending to it")
    writer = parts.PartWriter(output, options, plan.shard_size,
                              functools.partial(layout.manifest_part_file, len(plan.generations)))
    writer.add(added)
    grown = plan.with_generation(writer.close())
    generation = grown.generations[-1]
    run_ledger.write_plan(grown.document())  # last: the generation exists once the plan names it
    say(f"append: {added.num_rows} new images as generation {len(plan.generations)} (shards "
        f"{generation.shard_offset}-{grown.num_shards - 1})")
    return grown


def images_not_in(listing: pa.Table, known: pa.Table) -> pa.Table:
    """The rows of `listing` whose uri `known` lacks, in listing order: an Arrow anti-join (hash join in C++),
    never a Python set of every uri."""
    position = "__position"  # Arrow's joins do not keep row order: restore it with the listing's positions
    numbered = listing.append_column(position, pa.array(np.arange(listing.num_rows, dtype=np.int64)))
    kept = numbered.join(known.select(["uri"]), keys="uri", join_type="left anti", use_threads=False)
    return kept.sort_by(position).select(listing.column_names)


def say_if_input_grew(config: ExtractConfig, plan: Plan, say: Callable[[str], None]) -> None:
    """A resume stays exact (the frozen plan); for a small plan, one line when the input now holds images the plan
    does not. A large one would have to list everything again: nothing is said. A listing that fails (the input
    moved, credentials for the input gone) says nothing either: the resume needs only the frozen manifest."""
    if plan.num_images > HINT_RELIST_LIMIT:
        return
    try:
        listing = list_images(config.input)
    except USER_ERRORS:
        return
    num_new = images_not_in(listing, read_manifests(plan, config.output.uri, config.output.storage_options)).num_rows
    if num_new:
        say(f"the input now holds {num_new} images the frozen plan does not (this resume leaves them out); "
            "output.mode: append processes them")


def read_manifests(plan: Plan, output: str, options: dict) -> pa.Table:
    """Every part of every generation, concatenated in order (memory per image: tests, tools, append)."""
    tables = [parts.read_part(output, options, part) for generation in plan.generations
              for part in generation.all_parts()]
    return pa.concat_tables([table.cast(LISTING_SCHEMA) for table in tables])
