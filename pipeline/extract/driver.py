"""The driver of an extract run: actor pool, pull-based scheduling, retries, commits (Ray only here and in actor.py).

The driver keeps a queue of shard pieces and gives each actor at most `run.shards_in_flight_per_actor`
at a time. Actors write uniquely named data files; the driver alone commits (pipeline/output/ledger.py), once all
pieces of a shard are back, so a shard is visible exactly once whatever dies along the way:
- an actor that dies (crash, OOM, lost node) is replaced; the piece it was decoding counts an attempt (a piece
  is two calls, decode then process, and decodes run one at a time: actor.py), the other pieces go back unharmed;
- a piece that used up `run.max_attempts` is bisected; a single image that still kills its worker is
  quarantined as an error row, so one poison image cannot fail a job.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError, RayTaskError

from pipeline.config import ExtractConfig
from pipeline.errors import USER_ERRORS, ConfigError
from pipeline.extract import model_outputs, pool
from pipeline.extract.actor import remote_class
from pipeline.extract.items import DecodeSettings
from pipeline.extract.plan import Plan, prepare_plan
from pipeline.extract.pool import PlacementWatch, PoolPlan
from pipeline.extract.progress import ProgressReporter
from pipeline.extract.rows import commit_record, row_schema, success_extras
from pipeline.extract.signals import Interrupted, interrupted_message, stop_on_signals
from pipeline.extract.worker import ShardResult, ShardSettings, ShardTask, quarantine_rows, reason_category
from pipeline.io import redaction
from pipeline.output import ledger
from pipeline.ray_cluster import connect, forwarded_environment

log = logging.getLogger("featurize")

ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
MAX_FAILED_STARTS_PER_ACTOR = 3
LOST_CALL_SECONDS = 30.0  # for a killed actor's calls to end as lost (it takes milliseconds)


@dataclass
class ShardState:
    """Pieces of one shard still out, and the results already back."""

    outstanding: int = 1
    results: list[ShardResult] = field(default_factory=list)


@dataclass
class ActorSlot:
    handle: ray.actor.ActorHandle
    ready: ray.ObjectRef
    is_ready: bool = False
    in_flight: list = field(default_factory=list)  # the pieces' process refs, in submission order
    decodes: dict = field(default_factory=dict)  # a piece's process ref -> its decode ref
    turns: int = 0  # pieces given to this actor: the next piece's turn (actor.ExtractorActor runs them in turn order)


class Driver:
    """One extract run: plan, the scheduling of its pending shards (ShardScheduler), `_SUCCESS`."""

    def __init__(self, config: ExtractConfig, reporter: ProgressReporter):
        self.config = config
        self.reporter = reporter
        self.started = time.time()
        self.output = config.output.uri
        self.options = config.output.storage_options
        # What every task carries; the scheduler adds the run's lease tag and the resolved thread counts.
        decode = DecodeSettings(redaction.public_options(config.input.storage_options), config.model.resize,
                                config.model.draft_margin, config.output.content_hashes, config.input.reader,
                                config.input.reader_options)
        self.settings = ShardSettings(
            output_uri=self.output, output_storage_options=redaction.public_options(self.options), decode=decode,
            feature_dtype=config.output.feature_dtype, row_group_size=config.output.row_group_size)

    def run(self, verbose: bool = False) -> dict:
        """Every check that needs no cluster (config, model files, output mode, fingerprint, listing) runs in
        `prepare`, before Ray starts; Ray starts only when there is work left. The output's lease is taken first
        (a second run on the output stops here, in about a second) and held to the end."""
        self.reporter.phase(f"planning {redaction.redact(self.output)}")
        models = self.config.models  # several models: one output each, one decode (pipeline/extract/model_outputs.py)
        with (model_outputs.held(self.config, self.started) if models else
              ledger.held(self.output, self.options, "extract", started=self.started)) as run_ledger:
            plan = (run_ledger.prepare_plan(self.reporter.phase) if models else
                    prepare_plan(self.config, run_ledger, say=self.reporter.phase))
            commits = run_ledger.commits
            todo = run_ledger.pending(plan.num_shards)  # in shard order: an earlier generation's shards go first
            generations = f" ({len(plan.generations)} generations)" if len(plan.generations) > 1 else ""
            self.reporter.phase(f"{plan.num_images} images in {plan.num_shards} shards{generations}, {len(commits)} "
                                "already committed")
            description = self.run_shards(plan, todo, run_ledger, verbose) if todo else None
            if models:
                return run_ledger.finish(plan.num_shards, description, self.config.run.max_error_rate)
            extras = success_extras(description and description["provenance"], run_ledger,
                                    self.config.run.max_error_rate)
            return run_ledger.finish(plan.num_shards, plan.fingerprint, extras)

    def run_shards(self, plan: Plan, todo: list[int], run_ledger: ledger.Ledger,
                   verbose: bool) -> dict | None:
        """Start Ray, run the pending shards; returns an actor's description (None when none got ready)."""
        self.reporter.phase("starting Ray")
        connection = connect(self.config.run.address, verbose)
        self.reporter.phase(connection.description)
        commits = run_ledger.commits
        with stop_on_signals() as received:
            try:
                self.reporter.start(plan.num_images, plan.num_shards, done_shards=len(commits),
                                    done_images=sum(record.rows for record in commits.values()),
                                    done_errors=sum(record.error for record in commits.values()))
                pool_plan, lines = pool.plan_pool(self.config, len(todo), connection.private)
                for line in lines:
                    self.reporter.phase(line)
                watch = PlacementWatch(pool_plan, self.config, connection.private, self.reporter.phase)
                scheduler = ShardScheduler(self.config, self.settings, run_ledger, self.reporter, plan, todo,
                                           pool_plan, watch)
                scheduler.run()
                return scheduler.actor_description
            except KeyboardInterrupt:
                raise Interrupted(received.number, interrupted_message(received.number, plan.num_shards,
                                                                       len(commits))) from None
            finally:
                self.reporter.stop()


class ShardScheduler:
    """The actor pool and the pull-based scheduling loop of one run, until every pending shard is committed. A
    pending shard becomes a task only when an actor has room for it: the driver holds tasks in flight, retries and
    pieces of bisected shards, never one per pending shard."""

    def __init__(self, config: ExtractConfig, settings: ShardSettings, run_ledger: ledger.Ledger,
                 reporter: ProgressReporter, plan: Plan, todo: list[int], pool_plan: PoolPlan, watch: PlacementWatch):
        self.config = config
        self.ledger = run_ledger
        self.reporter = reporter
        self.pool = pool_plan
        self.watch = watch
        decode_threads = config.run.decode_threads or max(1, int(pool_plan.num_cpus))  # a decode thread a core
        self.settings = dataclasses.replace(settings, run_tag=run_ledger.run_tag, decode_threads=decode_threads,
                                            fetch_threads=config.run.fetch_threads or ShardSettings.fetch_threads,
                                            model_run_tags=run_ledger.model_run_tags if config.models else ())
        self.actor_class = remote_class(pool_plan.num_cpus, pool_plan.num_gpus, config.run.shards_in_flight_per_actor)
        self.plan = plan
        self.fresh = collections.deque(todo)  # shard numbers not started yet
        self.queue: collections.deque[ShardTask] = collections.deque()  # retries and bisected pieces, first
        self.states: dict[int, ShardState] = {}  # shards started and not yet committed
        self.owner: dict[ray.ObjectRef, tuple[ActorSlot, ShardTask]] = {}
        self.slots: list[ActorSlot] = []
        self.actor_description: dict | None = None
        self.failed_starts = 0  # actor deaths before the model was ready, since the last good start
        self.working = False  # becomes True once pool.minimum actors are ready, and stays

    def run(self) -> None:
        if self.pool.elastic:  # pending actors are demand too; the request also reaches a scaled-to-zero group
            pool.request_capacity(self.pool, self.pool.maximum)
        self.slots = [self.start_actor() for _ in range(self.pool.maximum)]
        self.reporter.phase(f"loading the model on {len(self.slots)} actor(s) ({pool.shape_text(self.pool)} each)")
        try:
            while self.states or self.fresh:
                self.ledger.lease.raise_if_lost()  # the heartbeat found the lease gone: stop before more work
                num_ready = sum(slot.is_ready for slot in self.slots)
                self.working = self.working or num_ready >= self.pool.minimum
                self.watch.check(num_ready, 1 if self.working else self.pool.minimum)
                if self.working:
                    self.assign()
                    self.retire_idle()
                refs = list(self.owner) + [slot.ready for slot in self.slots if not slot.is_ready]
                done, _ = ray.wait(refs, num_returns=1, timeout=1.0)
                self.reporter.update(actors_alive=sum(slot.is_ready for slot in self.slots))
                for ref in done:
                    if ref in self.owner:
                        self.collect(ref)
                    elif any(slot.ready == ref for slot in self.slots):  # not an actor retired meanwhile
                        self.mark_ready(ref)
        finally:
            for slot in self.slots:
                with contextlib.suppress(Exception):  # on an interrupt Ray itself may be going down
                    ray.kill(slot.handle, no_restart=True)
            if self.pool.elastic:
                pool.request_capacity(self.pool, 0)  # the autoscaler may scale down

    def retire_idle(self) -> None:
        """At the tail (nothing left to hand out) an actor with nothing in flight is given back, and so is one
        still waiting for its node, so its resources return to the cluster while the last pieces finish."""
        if self.queue or self.fresh:
            return
        for slot in [slot for slot in self.slots if not slot.in_flight]:
            self.slots.remove(slot)
            with contextlib.suppress(Exception):
                ray.kill(slot.handle, no_restart=True)
        if self.pool.elastic:
            pool.request_capacity(self.pool, len(self.slots))

    def start_actor(self) -> ActorSlot:
        num_threads = max(1, int(self.pool.num_cpus))
        handle = self.actor_class.options(scheduling_strategy="SPREAD", runtime_env=forwarded_environment()).remote(
            self.config.models or self.config.model, self.config.run.batch_size, num_threads,
            self.config.input.storage_options, self.ledger.options)
        return ActorSlot(handle=handle, ready=handle.describe.remote())

    def mark_ready(self, ref: ray.ObjectRef) -> None:
        slot = next(slot for slot in self.slots if slot.ready == ref)
        try:
            description = ray.get(ref)
        except ACTOR_LOST:
            self.failed_starts += 1
            if self.failed_starts > MAX_FAILED_STARTS_PER_ACTOR * len(self.slots):
                raise RuntimeError(f"actors died {self.failed_starts} times while loading the model; check the "
                                   "worker logs (out of memory? a GPU fault?). Committed shards are kept: "
                                   "run again to resume") from None
            self.replace(slot)
            return
        except RayTaskError as error:
            if isinstance(error.cause, USER_ERRORS):  # a refused or mismatched model: the user can fix it
                raise ConfigError(f"the model could not be built: {redaction.redact(str(error.cause))}") from None
            raise  # a bug: the RayTaskError carries the actor's traceback
        slot.is_ready = True
        self.failed_starts = 0
        if self.actor_description is None:
            for warning in description["warnings"]:
                log.warning("%s", warning)
        self.actor_description = self.actor_description or description
        self.reporter.phase(f"model ready on an actor in {description['load_seconds']:.1f} s "
                            f"(runtime {description['runtime']}"
                            + (", converted for LiteRT once a node, cached for next time)"
                               if description["runtime"] == "litert" else ")"))

    def assign(self) -> None:
        """Pull model: each ready actor gets pieces until it holds its bounded share."""
        limit = self.config.run.shards_in_flight_per_actor
        for slot in self.slots:
            while slot.is_ready and (self.queue or self.fresh) and len(slot.in_flight) < limit:
                task = self.queue.popleft() if self.queue else self.start_shard(self.fresh.popleft())
                decode_ref = slot.handle.decode.remote(task, self.settings, slot.turns)
                ref = slot.handle.process.remote(task, self.settings, slot.turns)
                slot.turns += 1
                slot.in_flight.append(ref)
                slot.decodes[ref] = decode_ref
                self.owner[ref] = (slot, task)

    def start_shard(self, shard: int) -> ShardTask:
        start, stop, where = self.plan.shard_slice(shard)
        self.states[shard] = ShardState()
        models = self.ledger.models_pending(shard) if self.config.models else None
        return ShardTask(shard, start, stop, where=where, models=models)

    def collect(self, ref: ray.ObjectRef) -> None:
        slot, task = self.owner[ref]
        try:
            result: ShardResult = ray.get(ref)
        except ACTOR_LOST:
            self.on_actor_lost(slot)
            return
        except RayTaskError as error:
            self.forget(ref)
            self.retry_or_fail(task, error)
            return
        self.forget(ref)
        self.add_result(task.shard, result)

    def forget(self, ref: ray.ObjectRef) -> None:
        slot, _ = self.owner.pop(ref)
        slot.in_flight.remove(ref)
        del slot.decodes[ref]

    def add_result(self, shard: int, result: ShardResult) -> None:
        self.reporter.advance(images=result.rows, errors=result.error)
        state = self.states[shard]
        state.results.append(result)
        state.outstanding -= 1
        if state.outstanding == 0:
            self.commit(shard, self.states.pop(shard).results)

    def on_actor_lost(self, slot: ActorSlot) -> None:
        """One piece counts an attempt: the one being decoded when the actor died (decodes run one at a time, in
        order: the first whose decode call did not return), or, when every decode had returned, the oldest (the
        model's side). The other pieces go back as they were. Every attempt makes progress: retry, then bisect,
        then quarantine one image."""
        pieces = [(self.owner.pop(ref)[1], slot.decodes.pop(ref)) for ref in slot.in_flight]
        slot.in_flight.clear()
        self.replace(slot)  # killed first: every call it still had ends now, as finished or as lost
        suspect = next((index for index, (_, decode_ref) in enumerate(pieces) if not returned(decode_ref)), 0)
        running = pieces[suspect][0]
        log.warning("actor lost while processing shard %d [%d:%d] (attempt %d)",
                    running.shard, running.start, running.stop, running.attempt)
        self.queue.extendleft(reversed([task for index, (task, _) in enumerate(pieces) if index != suspect]))
        if running.attempt < self.config.run.max_attempts:
            self.queue.appendleft(running.piece(running.start, running.stop, running.attempt + 1))
        elif running.stop - running.start > 1:
            self.bisect(running)
        else:
            self.quarantine(running)

    def bisect(self, task: ShardTask) -> None:
        """Split a piece that keeps killing workers, so the poison image ends up alone."""
        middle = (task.start + task.stop) // 2
        halves = [task.piece(task.start, middle, 1), task.piece(middle, task.stop, 1)]
        self.states[task.shard].outstanding += 1
        self.queue.extendleft(reversed(halves))

    def quarantine(self, task: ShardTask) -> None:
        """Record the image that kept killing workers as an error row, written by the driver itself."""
        own_settings = dataclasses.replace(self.settings, output_storage_options=self.ledger.options)
        rows = quarantine_rows(task, task.attempt, own_settings)  # the driver reads the piece with its own options
        log.warning("quarantined %s after %d crashes", redaction.redact(rows.uri[0]), task.attempt)
        reason = reason_category(rows.error[0])
        if self.config.models:
            self.add_result(task.shard, self.ledger.quarantine(
                task, rows, reason, self.actor_description, self.settings.feature_dtype, self.settings.row_group_size))
            return
        description = self.actor_description or {"feature_dim": 1, "provenance": {}}
        schema = row_schema(description["feature_dim"], self.settings.feature_dtype, description["provenance"])
        relative_path = self.ledger.write_data(task.shard, rows.to_table(schema), self.settings.row_group_size)
        self.add_result(task.shard, ShardResult(task.shard, task.start, task.stop, relative_path, len(rows), 0,
                                                len(rows), {}, {reason: len(rows)}))

    def retry_or_fail(self, task: ShardTask, error: RayTaskError) -> None:
        """An exception inside a worker is featurize's own (bad input never raises: it becomes an error row).
        Loud: its traceback is logged, the piece retried, and the run fails if it persists."""
        if task.attempt >= self.config.run.max_attempts:
            raise RuntimeError(f"shard {task.shard} [{task.start}:{task.stop}] failed {task.attempt} times with an "
                               f"error in featurize itself (committed shards are kept); the worker's traceback:\n"
                               f"{redaction.redact(str(error))}") from None
        log.warning("shard %d failed (attempt %d of %d), retrying; the worker's traceback:\n%s", task.shard,
                    task.attempt, self.config.run.max_attempts, redaction.redact(str(error)))
        self.queue.append(task.piece(task.start, task.stop, task.attempt + 1))

    def replace(self, slot: ActorSlot) -> None:
        ray.kill(slot.handle, no_restart=True)
        fresh = self.start_actor()
        slot.handle, slot.ready, slot.is_ready, slot.turns = fresh.handle, fresh.ready, False, 0

    def commit(self, shard: int, results: list[ShardResult]) -> None:
        if self.config.models:
            self.ledger.commit_models(shard, results)
        else:
            self.ledger.commit(commit_record(shard, results))
        if self.ledger.shards_run == 1:
            self.reporter.phase(f"first shard committed {self.ledger.first_commit_at - self.ledger.started:.1f} s "
                                "after start")
        self.reporter.shard_committed()


def returned(ref: ray.ObjectRef) -> bool:
    """Whether the call behind `ref`, on an actor killed since, had returned before it died."""
    try:
        ray.get(ref, timeout=LOST_CALL_SECONDS)
    except RayError:  # lost with the actor, or not ended (a timeout)
        return False
    return True


def run_extract(config: ExtractConfig, reporter: ProgressReporter | None = None, verbose: bool = False) -> dict:
    """Run (or resume) an extract job; returns the `_SUCCESS` document."""
    reporter = reporter or ProgressReporter(sys.stderr.isatty())
    try:
        return Driver(config, reporter).run(verbose)
    finally:
        reporter.stop()
