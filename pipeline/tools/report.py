"""Summaries for people: the table after a run, and `featurize inspect` for any existing output."""

from __future__ import annotations

import collections

from rich.console import Console
from rich.table import Table

from pipeline.errors import ConfigError
from pipeline.io import redaction, storage
from pipeline.output import layout, lease, ledger


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
    """A summary of whatever featurize output lies at `output_uri`: extract, predict or train."""
    kind = output_kind(output_uri, storage_options)
    inspect = {"train": inspect_train_output, "predict": inspect_predict_output}.get(kind, inspect_extract_output)
    summary = inspect(output_uri, console, storage_options)
    summary["lease"] = lease.state(output_uri, storage_options)
    if summary["lease"]:
        console.print(f"lease: {summary['lease']}", highlight=False)
    return summary


def output_kind(output_uri: str, storage_options: dict | None = None) -> str:
    """extract | predict | train, from the files each stage writes; a ConfigError when it is none of them."""
    shown = redaction.redact(output_uri)
    plan_uri = storage.join(output_uri, layout.PLAN_FILE)
    if storage.exists(plan_uri, storage_options):
        return "extract" if "num_images" in ledger.read_json(plan_uri, storage_options) else "predict"
    if storage.exists(storage.join(output_uri, layout.METRICS_FILE), storage_options):
        return "train"
    if not storage.exists(output_uri, storage_options):
        raise ConfigError(f"{shown} does not exist; give the output.uri of a featurize extract, train or predict run")
    raise ConfigError(f"{shown} is not a featurize output (it has no {layout.PLAN_FILE} and no "
                      f"{layout.METRICS_FILE}); give the output.uri of a featurize extract, train or predict run")


def inspect_train_output(output_uri: str, console: Console, storage_options: dict | None = None) -> dict:
    metrics = ledger.read_json(storage.join(output_uri, layout.METRICS_FILE), storage_options)
    table = Table(title=f"featurize inspect {redaction.redact(output_uri)} (classifier)", show_header=False)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.3f}")
    for key in ("num_train", "num_test"):
        if key in metrics:
            table.add_row(key, str(metrics[key]))
    table.add_row("classes", ", ".join(map(str, metrics.get("classes", []))))
    console.print(table)
    return {"kind": "train", **metrics}


def inspect_predict_output(output_uri: str, console: Console, storage_options: dict | None = None) -> dict:
    plan = ledger.read_json(storage.join(output_uri, layout.PLAN_FILE), storage_options)
    commits = ledger.read_commits(output_uri, storage_options)
    finished = storage.exists(storage.join(output_uri, layout.SUCCESS_FILE), storage_options)
    num_shards = len(plan.get("files", []))
    summary = {"kind": "predict", "shards_total": num_shards, "shards_committed": len(commits),
               "shards_pending": num_shards - len(commits), "finished": finished,
               "rows_ok": sum(record.ok for record in commits.values()),
               "rows_error": sum(record.error for record in commits.values()),
               "model_uri": plan.get("model_uri"), "features_uri": plan.get("features_uri"),
               "fingerprint": plan.get("fingerprint")}
    table = Table(title=f"featurize inspect {redaction.redact(output_uri)} (predictions)", show_header=False)
    table.add_row("status", "finished (_SUCCESS present)" if finished else "incomplete: rerun predict to finish")
    table.add_row("rows", f"{summary['rows_ok']} ok, {summary['rows_error']} error")
    table.add_row("shards", f"{len(commits)} committed, {summary['shards_pending']} pending of {num_shards}")
    table.add_row("classifier", redaction.redact(str(summary["model_uri"])))
    table.add_row("features", redaction.redact(str(summary["features_uri"])))
    console.print(table)
    return summary


def inspect_extract_output(output_uri: str, console: Console, storage_options: dict | None = None) -> dict:
    """Rows, error rows by reason, schema, provenance, committed vs pending shards of an extract output."""
    plan = ledger.read_json(storage.join(output_uri, layout.PLAN_FILE), storage_options)
    commits = ledger.read_commits(output_uri, storage_options)
    num_shards = -(-plan["num_images"] // plan["shard_size"])
    finished = storage.exists(storage.join(output_uri, layout.SUCCESS_FILE), storage_options)
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
    table = Table(title=f"featurize inspect {redaction.redact(output_uri)}", show_header=False)
    table.add_row("status", "finished (_SUCCESS present)" if finished else "incomplete: resume to finish")
    table.add_row("images", str(summary["images"]))
    table.add_row("rows", f"{summary['rows_ok']} ok, {summary['rows_error']} error")
    table.add_row("shards", f"{len(commits)} committed, {summary['shards_pending']} pending of {num_shards}")
    table.add_row("fingerprint", plan["fingerprint"])
    for reason, count in reasons.most_common():
        table.add_row("error", f"{count} x {reason}")
    first_file = next((record.files[0] for record in commits.values() if record.files), None)
    if first_file:
        schema = ledger.read_file_schema(output_uri, first_file, storage_options)
        summary["schema"] = str(schema.remove_metadata())
        summary["provenance"] = ledger.read_file_metadata(output_uri, first_file, storage_options)
        table.add_row("schema", summary["schema"])
        for key, value in sorted(summary["provenance"].items()):
            table.add_row(f"provenance.{key}", value)
    console.print(table)
    return summary

