"""Several models fed by one decode (extract's `models:`), on the driver's side: one complete extract output per
model at `OUTPUT/NAME/`, each with its own ledger (lease, plan, fingerprint, commits, `_SUCCESS`). No Ray.

- One listing: the first model's output is planned as any output is (plan.prepare_plan: list and freeze, resume,
  or append a generation); every other model's output gets a byte copy of the same manifest parts, and a plan of
  its own fingerprint naming them, so shard i is the same images in every output.
- Exactly once per model: a shard counts for a model once that model's commit record names it. The driver
  schedules each shard some model still lacks, and the task names those models (ShardTask.models): a resume does
  only the missing (shard, model) pairs.
- The set of models is fixed when the output starts (`_models.json` names it): a run whose `models:` adds, drops or
  renames one is refused; a new model is extracted on its own (see docs/configuration.md), or everything again
  with `output.mode: overwrite`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

from pipeline.config import ExtractConfig
from pipeline.errors import ConfigError
from pipeline.extract import parts
from pipeline.extract.multi import ModelsResult
from pipeline.extract.plan import Plan, check_model_files, digest, fingerprint_inputs, prepare_plan
from pipeline.extract.rows import ShardRows, commit_record, row_schema, success_extras
from pipeline.extract.worker import ShardResult, ShardTask
from pipeline.io import redaction, storage
from pipeline.output import ledger
from pipeline.output.layout import PLAN_FILE

MODELS_FILE = "_models.json"  # in OUTPUT: the names of the models whose outputs lie in OUTPUT/NAME/
REMEDY = "Use output.mode: overwrite or another output.uri."


def model_configs(config: ExtractConfig) -> dict[str, ExtractConfig]:
    """Each entry of `models:` as the one-model config whose output is `OUTPUT/NAME/`: what a one-model run of it
    would be given (so its fingerprint is a one-model run's too)."""
    return {entry.name: dataclasses.replace(
        config, model=entry.model_config(), models=(),
        output=dataclasses.replace(config.output, uri=storage.join(config.output.uri, entry.name)))
        for entry in config.models}


class AllLeases:
    """The leases of every model output, checked together by the scheduling loop."""

    def __init__(self, ledgers: list[ledger.Ledger]):
        self.ledgers = ledgers

    def raise_if_lost(self) -> None:
        for run_ledger in self.ledgers:
            run_ledger.lease.raise_if_lost()


def check_model_set(config: ExtractConfig) -> None:
    """OUTPUT holds model outputs of this very set of models, or nothing yet."""
    names = [entry.name for entry in config.models]
    output, options = config.output.uri, config.output.storage_options
    shown = redaction.redact(output)
    if storage.exists(storage.join(output, PLAN_FILE), options):
        raise ConfigError(f"output.uri: {shown} holds a one-model extract output; models: writes one output per "
                          "model under output.uri, so give it a directory of its own")
    recorded_uri = storage.join(output, MODELS_FILE)
    if config.output.mode == "overwrite" or not storage.exists(recorded_uri, options):
        return
    recorded = ledger.read_json(recorded_uri, options)["models"]
    added = [name for name in names if name not in recorded]
    dropped = [name for name in recorded if name not in names]
    if added or dropped:
        change = "; ".join(text for text in (f"adds {', '.join(added)}" if added else "",
                                             f"drops {', '.join(dropped)}" if dropped else "") if text)
        raise ConfigError(f"models: {shown} holds the outputs of the models {', '.join(recorded)}, and this "
                          f"config {change}. The set of models is fixed when the output starts: extract a new "
                          "model on its own (model: with an output.uri of its own; its shards are the same "
                          "images), keep the models list as it was to resume or append, or use "
                          "output.mode: overwrite to extract every model again")


@contextlib.contextmanager
def held(config: ExtractConfig, started: float) -> Iterator[ModelOutputs]:
    """The ledgers of every model output, each holding its output's lease, for the duration of a `with` block."""
    check_model_set(config)  # before any lease is taken: a refused run leaves nothing behind
    configs = model_configs(config)
    with contextlib.ExitStack() as stack:
        ledgers = {name: stack.enter_context(ledger.held(own.output.uri, own.output.storage_options, "extract",
                                                         started=started))
                   for name, own in configs.items()}
        yield ModelOutputs(config, configs, ledgers, started)


class ModelOutputs:
    """The model outputs of one run, seen by the driver as one ledger: pending shards are those some model lacks,
    `commits` those every model has; a shard's results are committed to each model's own ledger."""

    def __init__(self, config: ExtractConfig, configs: dict[str, ExtractConfig], ledgers: dict[str, ledger.Ledger],
                 started: float):
        self.config, self.configs, self.ledgers = config, configs, ledgers
        self.output, self.options = config.output.uri, config.output.storage_options
        self.lease = AllLeases(list(ledgers.values()))
        self.started = started
        self.plans: dict[str, Plan] = {}
        self.shards_run = 0
        self.first_commit_at: float | None = None

    @property
    def run_tag(self) -> str:
        return next(iter(self.ledgers.values())).run_tag

    @property
    def model_run_tags(self) -> tuple[tuple[str, str], ...]:
        return tuple((name, run_ledger.run_tag) for name, run_ledger in self.ledgers.items())

    @property
    def commits(self) -> dict[int, ledger.CommitRecord]:
        """The shards every model has committed (with the first model's records)."""
        first, *others = self.ledgers.values()
        return {shard: record for shard, record in first.commits.items()
                if all(shard in other.commits for other in others)}

    def pending(self, num_shards: int) -> list[int]:
        return [shard for shard in range(num_shards) if self.models_pending(shard)]

    def models_pending(self, shard: int) -> tuple[str, ...]:
        return tuple(name for name, run_ledger in self.ledgers.items() if shard not in run_ledger.commits)

    # --- the plans --------------------------------------------------------------------------------------------

    def prepare_plan(self, say: Callable[[str], None]) -> Plan:
        """Plan every model output from one listing; returns the plan the scheduler runs (the first model's, its
        manifest parts named relative to OUTPUT, where tasks read them)."""
        (first, first_config), *others = self.configs.items()
        lead = prepare_plan(first_config, self.ledgers[first], say)
        self.plans[first] = lead
        for name, own in others:
            self.plans[name] = self.follow(name, own, first, lead)
        ledger.write_json(storage.join(self.output, MODELS_FILE), {"models": list(self.configs)}, self.options)
        return plan_under(lead, first)

    def follow(self, name: str, own: ExtractConfig, first: str, lead: Plan) -> Plan:
        """The plan of a model output that shares the first one's listing: its own fingerprint, the same parts
        (copied in for any generation it lacks)."""
        run_ledger = self.ledgers[name]
        check_model_files(own)
        storage.check_writable(own.output.uri, own.output.storage_options)
        inputs = fingerprint_inputs(own)
        frozen = run_ledger.open(own.output.mode, digest(inputs), inputs, what="features", remedy=REMEDY)
        known = Plan.from_document(frozen).generations if frozen else ()
        if [generation.all_parts() for generation in known] != [
                generation.all_parts() for generation in lead.generations[:len(known)]]:
            raise ConfigError(f"output.uri: {redaction.redact(own.output.uri)} was planned from another listing "
                              f"than {first}'s, so their shards differ; {REMEDY}")
        plan = Plan(digest(inputs), inputs, lead.shard_size, lead.generations)
        if len(known) < len(lead.generations):
            for generation in lead.generations[len(known):]:
                for part in generation.all_parts():
                    data = storage.read_bytes(self.ledgers[first].uri(part.path), self.options)
                    storage.write_bytes(run_ledger.uri(part.path), data, self.options)
            run_ledger.write_plan(plan.document())  # last: the plan names parts already there
        parts.check_parts(own.output.uri, self.options, [part for generation in lead.generations
                                                          for part in generation.all_parts()])
        return plan

    # --- shards -----------------------------------------------------------------------------------------------

    def commit_models(self, shard: int, results: list[ModelsResult]) -> None:
        """Each model's pieces of the shard, committed to that model's ledger (every piece ran the same models)."""
        for name in results[0].results:
            self.ledgers[name].commit(commit_record(shard, [result.results[name] for result in results]))
        self.shards_run += 1
        self.first_commit_at = self.first_commit_at or time.time()

    def quarantine(self, task: ShardTask, rows: ShardRows, reason: str, description: dict | None,
                   feature_dtype: str, row_group_size: int) -> ModelsResult:
        """The quarantined image's error row in every model output that lacks the shard."""
        results = {}
        for name in task.models or tuple(self.ledgers):
            model = (description or {}).get("models", {}).get(name) or {"feature_dim": 1, "provenance": {}}
            schema = row_schema(model["feature_dim"], feature_dtype, model["provenance"])
            path = self.ledgers[name].write_data(task.shard, rows.to_table(schema), row_group_size)
            results[name] = ShardResult(task.shard, task.start, task.stop, path, len(rows), 0, len(rows), {},
                                        {reason: len(rows)})
        return ModelsResult(task.shard, task.start, task.stop, results)

    # --- the end ----------------------------------------------------------------------------------------------

    def finish(self, num_shards: int, description: dict | None, max_error_rate: float) -> dict:
        """Each model output's `_SUCCESS`; returns them by name, with the run's worst error rate."""
        successes = {}
        for name, run_ledger in self.ledgers.items():
            provenance = description and description["models"][name]["provenance"]
            successes[name] = run_ledger.finish(num_shards, self.plans[name].fingerprint,
                                                success_extras(provenance, run_ledger, max_error_rate))
        return {"models": successes, "output": redaction.redact(self.output), "max_error_rate": max_error_rate,
                "error_rate": max(success["error_rate"] for success in successes.values())}


def plan_under(plan: Plan, folder: str) -> Plan:
    """The plan with its manifest parts named relative to the folder above `folder`."""
    generations = tuple(dataclasses.replace(
        generation, manifest=f"{folder}/{generation.manifest}",
        parts=tuple(dataclasses.replace(part, path=f"{folder}/{part.path}") for part in generation.all_parts()))
        for generation in plan.generations)
    return dataclasses.replace(plan, generations=generations)

