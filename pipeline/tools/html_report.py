"""`featurize report OUTPUT`: an HTML page people open in a browser, for an extract, search or dedup output.

Extract: progress and throughput over time (commit records), the stage split (timings), errors by reason with
example files, a gallery of sample rows with their top-k predictions, and a 2-D map of a sample of the features.
Dedup: contact sheets of the largest near-duplicate groups, the kept image marked. Search: each query beside its
neighbours with their scores. The page is a folder (index.html, thumbnails/, charts/) or one self-contained file
with data: URIs. Every string from the data is HTML-escaped (Jinja2 autoescape) and every URI redacted; an image
that cannot be read or decoded is a placeholder that says why.
"""

from __future__ import annotations

import collections
import re
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.extract.plan import Plan
from pipeline.extract.worker import reason_category
from pipeline.io import redaction, storage
from pipeline.output import layout, ledger
from pipeline.tools import html_charts
from pipeline.tools.html_assets import Assets, thumbnails
from pipeline.tools.report import output_kind

GALLERY_SIZE = 24  # sample rows shown with their thumbnails and predictions
MAP_SAMPLE_SIZE = 2000  # feature vectors projected for the embedding map
ERROR_EXAMPLES = 3  # example files per error reason
MAX_ERROR_FILES = 50  # data files read for error examples: enough for every reason in practice, bounded for huge runs
DEDUP_GROUPS = 12  # largest groups drawn as contact sheets
GROUP_IMAGES = 16  # images per contact sheet; the rest counted
SEARCH_QUERIES = 20  # queries drawn beside their neighbours
ANALYSIS_FILES = {"dedup": "groups.parquet", "search": "neighbours.parquet"}  # what each stage writes
PROVENANCE_SHOWN = ("backbone", "weights", "layer", "pooling", "input_size", "preprocess", "resize", "feature_dim",
                    "runtime")


def write_report(output_uri: str, out: str | None = None, self_contained: bool = False,
                 storage_options: dict | None = None, input_options: dict | None = None) -> str:
    """Write the report of the output at `output_uri` (read with `storage_options`) into the folder `out`;
    returns the index.html URI. Images are read with `input_options`, else `storage_options` (the store's own
    credentials when both are None)."""
    kind = report_kind(output_uri, storage_options)
    out = out or default_folder(output_uri)
    assets = Assets(out, self_contained, input_options=storage_options if input_options is None else input_options)
    context = CONTEXTS[kind](output_uri, assets, storage_options)
    page = render({"kind": kind, "output": redaction.redact(output_uri), **context})
    index = storage.join(out, "index.html")
    storage.write_bytes(index, page.encode())
    return index


def report_kind(output_uri: str, storage_options: dict | None = None) -> str:
    """dedup | search (their files, finished or not) | extract; a ConfigError for anything else."""
    for kind, name in ANALYSIS_FILES.items():
        if storage.exists(storage.join(output_uri, name), storage_options):
            return kind
    kind = output_kind(output_uri, storage_options)  # says what is wrong with a path that is no featurize output
    if kind != "extract":
        raise ConfigError(f"{redaction.redact(output_uri)} is a `featurize {kind}` output; `featurize report` draws "
                          f"extract, search and dedup outputs (see `featurize inspect` for {kind})")
    return kind


def default_folder(output_uri: str) -> str:
    """`<output's last path part>-report` in the working directory."""
    name = redaction.redact(output_uri).rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name or "featurize") + "-report"


def render(context: dict) -> str:
    import jinja2

    template = resources.files("pipeline.tools").joinpath("templates/report.html.j2").read_text()
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True)
    return environment.from_string(template).render(**context)


def read_table(output_uri: str, relative_path: str, storage_options: dict | None,
               columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.filesystem(storage.join(output_uri, relative_path), storage_options)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def score_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# --- extract ------------------------------------------------------------------------------------------------


def extract_context(output_uri: str, assets: Assets, storage_options: dict | None) -> dict:
    success = ledger.success_if_finished(output_uri, storage_options)
    commits = [record for _, record in sorted(ledger.read_commits(output_uri, storage_options).items())]
    files = success["files"] if success else [path for record in commits for path in record.files]
    plan = Plan.from_document(ledger.read_json(storage.join(output_uri, layout.PLAN_FILE), storage_options))
    provenance = ledger.read_file_metadata(output_uri, files[0], storage_options) if files else {}
    reasons = collections.Counter()
    for record in commits:
        reasons.update(record.errors_by_reason)
    timings = success.get("timings", {}) if success else summed_timings(commits)
    startup = success["seconds"]["startup"] if success else 0.0
    charts = {"throughput": html_charts.throughput_png([record.committed_at for record in commits],
                                                       [record.rows for record in commits], startup),
              "stage_split": html_charts.stage_split_png(timings)}
    sample = sample_ok_rows(output_uri, files, storage_options)
    return {
        "summary": extract_summary(success, commits, plan, provenance),
        "charts": {name: assets.chart(name, png) for name, png in charts.items() if png is not None},
        "errors": error_sections(output_uri, commits, reasons, storage_options),
        "gallery": gallery(sample, assets),
        "embedding_map": embedding_map(sample, assets),
    }


def summed_timings(commits: list[ledger.CommitRecord]) -> dict[str, float]:
    timings = collections.Counter()
    for record in commits:
        timings.update(record.timings)
    return dict(timings)


def extract_summary(success: dict | None, commits: list, plan: Plan, provenance: dict) -> list[tuple[str, str]]:
    ok, error = sum(record.ok for record in commits), sum(record.error for record in commits)
    num_shards = success["shards"]["total"] if success else plan.num_shards
    lines = [("status", "finished" if success else "incomplete: rerun the same `featurize extract` to finish"),
             ("rows", f"{ok + error} ({ok} ok, {error} error)"),
             ("shards", f"{len(commits)} of {num_shards} committed")]
    if success:
        lines.append(("time", f"{success['seconds']['total']:.1f} s, {success['seconds']['startup']:.1f} s to the "
                              "first commit"))
    if success and "images_per_second" in success:
        lines.append(("throughput", f"{success['images_per_second']:.1f} images/s"))
    return lines + [(key, redaction.redact(provenance[key])) for key in PROVENANCE_SHOWN if key in provenance]


def error_sections(output_uri: str, commits: list, reasons: collections.Counter,
                   storage_options: dict | None) -> list[dict]:
    """Per reason, most common first: its count and up to ERROR_EXAMPLES files with their full reasons. Commit
    records without reasons (written by other tools) get theirs counted from the rows of the files read."""
    examples: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    counted = collections.Counter()
    files_with_errors = [path for record in commits if record.error for path in record.files][:MAX_ERROR_FILES]
    for path in files_with_errors:
        if reasons and all(len(examples[reason]) >= ERROR_EXAMPLES for reason in reasons):
            break
        table = read_table(output_uri, path, storage_options, ["uri", "status", "error"])
        table = table.filter(pc.equal(table["status"], "error"))
        for uri, error in zip(table["uri"].to_pylist(), table["error"].to_pylist()):
            category = reason_category(error or "")
            counted[category] += 1
            if len(examples[category]) < ERROR_EXAMPLES:
                examples[category].append((redaction.redact(uri), redaction.redact(error or "")))
    return [{"reason": reason, "count": count, "examples": examples.get(reason, [])}
            for reason, count in (reasons or counted).most_common()]


def sample_ok_rows(output_uri: str, files: list[str], storage_options: dict | None, seed: int = 0) -> pa.Table:
    """Up to MAP_SAMPLE_SIZE ok rows from data files taken in a seeded random order (a few files, never all of a
    large output)."""
    columns = ["uri", "label", "status", "features", "top_k_labels", "top_k_scores"]
    generator = np.random.default_rng(seed)
    tables, num_rows = [], 0
    for index in generator.permutation(len(files)):
        table = read_table(output_uri, files[index], storage_options, columns)
        table = table.filter(pc.equal(table["status"], "ok"))
        tables.append(table)
        num_rows += table.num_rows
        if num_rows >= MAP_SAMPLE_SIZE:
            break
    if not tables:
        return pa.table({name: pa.array([], pa.string()) for name in columns})
    sample = pa.concat_tables(tables)
    if sample.num_rows > MAP_SAMPLE_SIZE:
        sample = sample.take(np.sort(generator.choice(sample.num_rows, MAP_SAMPLE_SIZE, replace=False)))
    return sample


def gallery(sample: pa.Table, assets: Assets, seed: int = 0) -> list[dict]:
    chosen = np.random.default_rng(seed).permutation(sample.num_rows)[:GALLERY_SIZE]
    rows = sample.take(np.sort(chosen)).to_pylist()
    pictures = thumbnails([row["uri"] for row in rows], assets)
    return [{"picture": pictures[row["uri"]], "label": row["label"],
             "predictions": [(name, score_text(score)) for name, score in
                             zip(row["top_k_labels"] or [], row["top_k_scores"] or [])]} for row in rows]


def embedding_map(sample: pa.Table, assets: Assets) -> dict | None:
    """The projected sample coloured by label, else by top-1 prediction; None under 3 rows."""
    if sample.num_rows < 3:
        return None
    features = np.stack(sample["features"].to_numpy(zero_copy_only=False)).astype(np.float32)
    labels = sample["label"].to_pylist()
    if any(label is not None for label in labels):
        categories, colour_name = [label or "(none)" for label in labels], "label"
    else:
        top_labels = sample["top_k_labels"].to_pylist()
        categories = [names[0] if names else "(none)" for names in top_labels]
        colour_name = "top-1 prediction" if any(top_labels) else "all"
    png, method = html_charts.embedding_map_png(features, categories, colour_name)
    return {"source": assets.chart("embedding_map", png), "method": method, "num_points": sample.num_rows,
            "colour_name": colour_name}


# --- dedup and search ---------------------------------------------------------------------------------------


def analysis_table(output_uri: str, kind: str, success: dict | None, storage_options: dict | None) -> pa.Table:
    """The stage's Parquet: the files its `_SUCCESS` names, else its one file by name."""
    names = [name for name in (success or {}).get("files", []) if name.endswith(".parquet")]
    return pa.concat_tables([read_table(output_uri, name, storage_options)
                             for name in names or [ANALYSIS_FILES[kind]]])


def dedup_context(output_uri: str, assets: Assets, storage_options: dict | None) -> dict:
    success = ledger.success_if_finished(output_uri, storage_options)
    table = analysis_table(output_uri, "dedup", success, storage_options)
    groups = table["group"].to_numpy()
    group_ids, sizes = np.unique(groups, return_counts=True)
    duplicated = sorted(((size, group) for group, size in zip(group_ids, sizes) if size > 1),
                        key=lambda pair: (-pair[0], pair[1]))
    sheets = []
    for size, group in duplicated[:DEDUP_GROUPS]:
        members = table.filter(pc.equal(table["group"], group)).to_pylist()
        members.sort(key=lambda row: (not row["keep"], -(row["similarity"] or 0.0)))
        sheets.append({"group": int(group), "size": int(size), "members": members[:GROUP_IMAGES],
                       "more": int(size) - min(int(size), GROUP_IMAGES)})
    pictures = thumbnails([row["uri"] for sheet in sheets for row in sheet["members"]], assets)
    for sheet in sheets:
        sheet["members"] = [{"picture": pictures[row["uri"]], "keep": bool(row["keep"]),
                             "similarity": score_text(row["similarity"]), "reason": row.get("reason"),
                             "hamming": row.get("hamming")} for row in sheet["members"]]
    num_dropped = table.num_rows - int(pc.sum(table["keep"].cast(pa.int64())).as_py() or 0)
    summary = [("images", str(table.num_rows)), ("groups", str(len(group_ids))),
               ("groups with near-duplicates", str(len(duplicated))), ("images not kept", str(num_dropped))]
    if "reason" in table.column_names:  # written before reasons: cosine alone, nothing more to say
        num_exact = int(pc.sum(pc.equal(table["reason"], "exact").cast(pa.int64())).as_py() or 0)
        summary.append(("exact copies (the same bytes)", str(num_exact)))
    summary += [(key, redaction.redact(str(value))) for key, value in (success or {}).items()
                if key in ("verify", "threshold", "max_hamming", "features", "metric")
                and not isinstance(value, (dict, list))]
    return {"summary": summary, "sheets": sheets}


def search_context(output_uri: str, assets: Assets, storage_options: dict | None) -> dict:
    success = ledger.success_if_finished(output_uri, storage_options)
    table = analysis_table(output_uri, "search", success, storage_options)
    queries = pc.unique(table["query_uri"])  # in the order search wrote them
    shown = queries[:SEARCH_QUERIES].to_pylist()
    by_query = collections.defaultdict(list)
    for row in table.filter(pc.is_in(table["query_uri"], pa.array(shown, pa.string()))).sort_by("rank").to_pylist():
        by_query[row["query_uri"]].append(row)
    pictures = thumbnails(shown + [row["uri"] for rows in by_query.values() for row in rows], assets)
    results = [{"query": pictures[query],
                "neighbours": [{"picture": pictures[row["uri"]], "rank": row["rank"],
                                "score": score_text(row["score"])} for row in by_query[query]]} for query in shown]
    hidden = f" (the first {len(shown)} shown)" if len(shown) < len(queries) else ""
    summary = [("queries", f"{len(queries)}{hidden}"),
               ("neighbours per query", str(max(map(len, by_query.values()), default=0)))]
    return {"summary": summary, "results": results}


CONTEXTS = {"extract": extract_context, "dedup": dedup_context, "search": search_context}
