"""Summaries for people: the table after a run, and `featurize inspect` for any existing output."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from pipeline.charts import key_value_table
from pipeline.errors import ConfigError
from pipeline.extract.plan import Plan
from pipeline.extract.rows import WRITER_KEYS
from pipeline.io import redaction, storage
from pipeline.output import layout, lease, ledger
from pipeline.output.features import shared_bytes


def print_extract_summary(success: dict, console: Console) -> None:
    rows, shards, seconds = success["rows"], success["shards"], success["seconds"]
    console.print(key_value_table("featurize extract", [
        ("output", success["output"]),
        ("rows", f"{rows['total']} ({rows['ok']} ok, {rows['error']} error)"),
        ("shards", f"{shards['committed']}/{shards['total']} committed, {shards['run']} run now"),
        ("throughput", f"{success.get('images_per_second', 0):.1f} images/s"),
        ("time", f"{seconds['total']:.1f} s total, {seconds['startup']:.1f} s to first commit"),
        *stage_split(success.get("timings", {})),
        *error_lines(sorted(success.get("errors_by_reason", {}).items()))]))


def stage_split(timings: dict) -> list[tuple[str, str]]:
    """Per-stage seconds as shares (fetch/decode run in threads, so shares can overlap wall time): one line,
    none without timings."""
    if not timings:
        return []
    total = sum(timings.values()) or 1.0
    return [("stage split", ", ".join(f"{stage} {seconds:.1f}s ({seconds / total:.0%})"
                                      for stage, seconds in sorted(timings.items())))]


def error_lines(counts: Iterable[tuple[str, int]]) -> list[tuple[str, str]]:
    """One line per error reason with its count of rows."""
    return [("error", f"{count} x {reason}") for reason, count in counts]


# The analyse stages name themselves in their `_SUCCESS` (pipeline/analyse/output.py); they write no plan file.
ANALYSE_STAGES = ("index", "search", "dedup")
WHAT_TO_GIVE = "give the output.uri of a featurize extract, train, predict, index, search or dedup run"


def inspect_output(output_uri: str, console: Console, storage_options: dict | None = None) -> dict:
    """A summary of whatever featurize output lies at `output_uri`: extract, predict, train, index, search, dedup."""
    kind = output_kind(output_uri, storage_options)
    inspect = {"train": inspect_train_output, "predict": inspect_predict_output,
               **dict.fromkeys(ANALYSE_STAGES, inspect_analyse_output)}.get(kind, inspect_extract_output)
    summary = inspect(output_uri, console, storage_options)
    summary["lease"] = lease.state(output_uri, storage_options)
    if summary["lease"]:
        console.print(f"lease: {summary['lease']}", highlight=False)
    return summary


def output_kind(output_uri: str, storage_options: dict | None = None) -> str:
    """extract | predict | train | index | search | dedup, from the files each stage writes; a ConfigError when it
    is none of them."""
    shown = redaction.redact(output_uri)
    stage = (ledger.success_if_finished(output_uri, storage_options) or {}).get("stage")
    if stage in ANALYSE_STAGES:
        return stage
    plan_uri = storage.join(output_uri, layout.PLAN_FILE)
    if storage.exists(plan_uri, storage_options):
        return "extract" if "num_images" in ledger.read_json(plan_uri, storage_options) else "predict"
    if storage.exists(storage.join(output_uri, layout.METRICS_FILE), storage_options):
        return "train"
    if not storage.exists(output_uri, storage_options):
        raise ConfigError(f"{shown} does not exist; {WHAT_TO_GIVE}")
    raise ConfigError(f"{shown} is not a featurize output (it has no {layout.PLAN_FILE}, no {layout.METRICS_FILE} "
                      f"and no finished {layout.SUCCESS_FILE}); {WHAT_TO_GIVE}")


def inspect_train_output(output_uri: str, console: Console, storage_options: dict | None = None) -> dict:
    metrics = ledger.read_json(storage.join(output_uri, layout.METRICS_FILE), storage_options)
    scores = [(key, f"{metrics[key]:.3f}") for key in ("accuracy", "balanced_accuracy", "macro_f1") if key in metrics]
    counts = [(key, str(metrics[key])) for key in ("num_train", "num_test") if key in metrics]
    console.print(key_value_table(f"featurize inspect {redaction.redact(output_uri)} (classifier)", [
        *scores, *counts, ("classes", ", ".join(map(str, metrics.get("classes", []))))]))
    return {"kind": "train", **metrics}


def inspect_analyse_output(output_uri: str, console: Console, storage_options: dict | None = None) -> dict:
    """A finished index, search or dedup output: its files, rows, the stage's own figures and the provenance of
    the features it was built from."""
    success = ledger.read_json(storage.join(output_uri, layout.SUCCESS_FILE), storage_options)
    stage, rows = success["stage"], success.get("rows", {})
    lines = [("status", "finished (_SUCCESS present)"), ("files", ", ".join(success.get("files", []))),
             ("rows", ", ".join(f"{count} {name}" for name, count in rows.items())),
             ("time", f"{success.get('seconds', {}).get('total', 0):.1f} s"),
             *[(key, str(success[key])) for key in ANALYSE_FIGURES[stage] if key in success],
             ("fingerprint", success.get("fingerprint", "-")),
             *[(f"provenance.{key}", value) for key, value in sorted(success.get("provenance", {}).items())]]
    console.print(key_value_table(f"featurize inspect {redaction.redact(output_uri)} ({stage})", lines))
    return {"kind": stage, **success}


# What each analyse stage's `_SUCCESS` says about its result, in the order people read it.
ANALYSE_FIGURES = {"index": ("kind", "factory", "metric", "feature_dim", "index_bytes", "sources"),
                   "search": ("k", "metric", "kind", "index", "query_errors"),
                   "dedup": ("threshold", "counts", "kind")}


def ledger_summary(output_uri: str, num_shards: int, storage_options: dict | None) -> tuple[dict, dict]:
    """Committed and pending shards of an extract or predict output with the rows they hold; and the commits."""
    commits = ledger.read_commits(output_uri, storage_options)
    summary = {"shards_total": num_shards, "shards_committed": len(commits),
               "shards_pending": num_shards - len(commits),
               "finished": storage.exists(storage.join(output_uri, layout.SUCCESS_FILE), storage_options),
               "rows_ok": sum(record.ok for record in commits.values()),
               "rows_error": sum(record.error for record in commits.values())}
    return summary, commits


def status_line(summary: dict, unfinished_hint: str) -> tuple[str, str]:
    return "status", "finished (_SUCCESS present)" if summary["finished"] else f"incomplete: {unfinished_hint}"


def ledger_lines(summary: dict) -> list[tuple[str, str]]:
    return [("rows", f"{summary['rows_ok']} ok, {summary['rows_error']} error"),
            ("shards", f"{summary['shards_committed']} committed, {summary['shards_pending']} pending of "
                       f"{summary['shards_total']}")]


def inspect_predict_output(output_uri: str, console: Console, storage_options: dict | None = None) -> dict:
    plan = ledger.read_json(storage.join(output_uri, layout.PLAN_FILE), storage_options)
    summary, _ = ledger_summary(output_uri, len(plan.get("files", [])), storage_options)
    summary = {"kind": "predict", **summary, "model_uri": plan.get("model_uri"),
               "features_uri": plan.get("features_uri"), "fingerprint": plan.get("fingerprint")}
    console.print(key_value_table(f"featurize inspect {redaction.redact(output_uri)} (predictions)", [
        status_line(summary, "rerun predict to finish"), *ledger_lines(summary),
        ("classifier", redaction.redact(str(summary["model_uri"]))),
        ("features", redaction.redact(str(summary["features_uri"])))]))
    return summary


def inspect_extract_output(output_uri: str, console: Console, storage_options: dict | None = None) -> dict:
    """Rows, error rows by reason, schema, provenance, committed vs pending shards of an extract output."""
    plan = Plan.from_document(ledger.read_json(storage.join(output_uri, layout.PLAN_FILE), storage_options))
    summary, commits = ledger_summary(output_uri, plan.num_shards, storage_options)
    reasons = collections.Counter()
    for record in commits.values():
        reasons.update(record.errors_by_reason)
    summary = {"images": plan.num_images, **summary, "errors_by_reason": dict(reasons),
               "fingerprint": plan.fingerprint, "generations": generation_rows(plan, commits)}
    lines = [status_line(summary, "resume to finish"), ("images", str(summary["images"])), *ledger_lines(summary),
             *generation_lines(summary["generations"]), ("fingerprint", plan.fingerprint),
             *error_lines(reasons.most_common())]
    first_file = next((record.files[0] for record in commits.values() if record.files), None)
    if first_file:
        schema = ledger.read_file_schema(output_uri, first_file, storage_options)
        summary["schema"] = str(schema.remove_metadata())
        metadata = ledger.read_file_metadata(output_uri, first_file, storage_options)
        summary["provenance"] = {key: value for key, value in metadata.items() if key not in WRITER_KEYS}
        lines.append(("schema", summary["schema"]))
        lines += [(f"provenance.{key}", value) for key, value in sorted(summary["provenance"].items())]
    summary["shared_bytes"] = shared_bytes(output_uri, [file for record in commits.values() for file in record.files],
                                           storage_options)
    lines.append(("same bytes", shared_bytes_text(summary["shared_bytes"])))
    console.print(key_value_table(f"featurize inspect {redaction.redact(output_uri)}", lines))
    summary["actors"] = ledger.actors_table(commits.values())
    if summary["actors"]:
        console.print(actors_rich_table(summary["actors"]))
    return summary


def actors_rich_table(actors: list[dict]) -> Table:
    """The actors that wrote the committed rows: where they ran (node, GPUs) and what they did."""
    table = Table(title="actors", show_header=True)
    for name in ("actor", "node_id", "accelerator_ids", "shards", "pieces", "images", "seconds"):
        table.add_column(name)
    for actor in actors:
        table.add_row(actor["actor"][:12], actor["node_id"][:12], ",".join(actor["accelerator_ids"]) or "-",
                      str(actor["shards"]), str(actor["pieces"]), str(actor["images"]), f"{actor['seconds']:.1f}")
    return table


def shared_bytes_text(shared: dict | None) -> str:
    if shared is None:
        return "unknown: no sha256 column (written before content hashes, or with output.content_hashes: false)"
    return (f"{shared['images']} images share their bytes with another ({shared['contents']} contents); "
            "`featurize dedup` groups them")


def generation_rows(plan: Plan, commits: dict) -> list[dict]:
    """Per generation (the first run, then each `output.mode: append` that found new images): images, shards, and
    how many of its shards are committed."""
    rows = []
    for number, generation in enumerate(plan.generations):
        shards = range(generation.shard_offset, generation.shard_offset + generation.num_shards(plan.shard_size))
        rows.append({"generation": number, "images": generation.num_images, "shards": len(shards),
                     "shards_committed": sum(index in commits for index in shards), "created": generation.created})
    return rows


def generation_lines(generations: list[dict]) -> list[tuple[str, str]]:
    """One line with the count, then one per generation."""
    lines = [("generations", f"{len(generations)} (" + ", ".join(f"{row['images']}" for row in generations)
              + " images)")]
    for row in generations:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"])) if row["created"] else "-"
        lines.append((f"generation {row['generation']}", f"{row['images']} images, {row['shards_committed']}/"
                                                        f"{row['shards']} shards committed, created {created}"))
    return lines
