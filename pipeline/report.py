"""Summaries for people: the table after a run, and `featurize inspect` for any existing output."""

from __future__ import annotations

import collections

from rich.console import Console
from rich.table import Table

from pipeline import storage, writer


def print_extract_summary(success: dict, console: Console) -> None:
    rows, shards, seconds = success["rows"], success["shards"], success["seconds"]
    table = Table(title="featurize extract", show_header=False)
    table.add_row("output", success["output"])
    table.add_row("rows", f"{rows['total']} ({rows['ok']} ok, {rows['error']} error)")
    table.add_row("shards", f"{shards['committed']}/{shards['total']} committed, {shards['run']} run now")
    table.add_row("throughput", f"{success.get('images_per_second', 0):.1f} images/s")
    table.add_row("time", f"{seconds['total']:.1f} s total, {seconds['startup']:.1f} s to first commit")
    add_stage_split(table, success.get("timings", {}))
    for reason, count in sorted(success.get("errors_by_reason", {}).items()):
        table.add_row("error", f"{count} x {reason}")
    console.print(table)


def add_stage_split(table: Table, timings: dict) -> None:
    """Per-stage seconds as shares (fetch/decode run in threads, so shares can overlap wall time)."""
    if timings:
        total = sum(timings.values()) or 1.0
        table.add_row("stage split", ", ".join(f"{stage} {seconds:.1f}s ({seconds / total:.0%})"
                                               for stage, seconds in sorted(timings.items())))


def inspect_output(output_uri: str, console: Console, storage_options: dict | None = None) -> dict:
    """Rows, error rows by reason, schema, provenance, committed vs pending shards of any output."""
    plan = writer.read_json(storage.join(output_uri, writer.PLAN_FILE), storage_options)
    commits = writer.read_commits(output_uri, storage_options)
    num_shards = -(-plan["num_images"] // plan["shard_size"])
    finished = storage.exists(storage.join(output_uri, writer.SUCCESS_FILE), storage_options)
    reasons = collections.Counter()
    for record in commits.values():
        reasons.update(record.errors_by_reason)
    summary = {
        "images": plan["num_images"], "shards_total": num_shards, "shards_committed": len(commits),
        "shards_pending": num_shards - len(commits), "finished": finished,
        "rows_ok": sum(record.ok for record in commits.values()),
        "rows_error": sum(record.error for record in commits.values()),
        "errors_by_reason": dict(reasons), "fingerprint": plan["fingerprint"],
    }
    table = Table(title=f"featurize inspect {storage.redact(output_uri)}", show_header=False)
    table.add_row("status", "finished (_SUCCESS present)" if finished else "incomplete: resume to finish")
    table.add_row("images", str(summary["images"]))
    table.add_row("rows", f"{summary['rows_ok']} ok, {summary['rows_error']} error")
    table.add_row("shards", f"{len(commits)} committed, {summary['shards_pending']} pending of {num_shards}")
    table.add_row("fingerprint", plan["fingerprint"])
    for reason, count in reasons.most_common():
        table.add_row("error", f"{count} x {reason}")
    first_file = next((record.files[0] for record in commits.values() if record.files), None)
    if first_file:
        schema = writer.read_file_schema(output_uri, first_file, storage_options)
        summary["schema"] = str(schema.remove_metadata())
        summary["provenance"] = writer.read_file_metadata(output_uri, first_file, storage_options)
        table.add_row("schema", summary["schema"])
        for key, value in sorted(summary["provenance"].items()):
            table.add_row(f"provenance.{key}", value)
    console.print(table)
    return summary

