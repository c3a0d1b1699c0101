"""The fine-tune on Ray: a training worker (a Ray actor that runs pipeline/finetune/training.py), its resources
(GPUs when the cluster has them, else CPU threads, as extract decides), and what the driver does when the worker
is lost (start another, which resumes after the last finished epoch) or the run is interrupted (stop it: the
checkpoints stay, the same command resumes).

With `run.workers` > 1 the first worker runs the same loop (validation, checkpoints, early stopping) and trains
each epoch data-parallel with the others by model averaging (pipeline/finetune/parallel.py): each round it puts
the averaged state in the object store once, every worker trains its share from it, and it averages what comes
back. A lost peer is replaced and its share of the round trained again from the same averaged state; a lost
first worker restarts them all after the last finished epoch, as with one worker.

Why actors and not Ray Train's TensorflowTrainer: see docs/finetune.md ("Why Ray actors").
"""

from __future__ import annotations

import logging
import os

import ray

from pipeline.errors import USER_ERRORS, ConfigError
from pipeline.extract.signals import Interrupted, stop_on_signals
from pipeline.finetune import parallel
from pipeline.finetune.checkpoints import Checkpoints
from pipeline.finetune.data import Part, Stream
from pipeline.finetune.training import Job, Outcome, describe_epoch, new_training_model, run_training
from pipeline.io import redaction
from pipeline.ray_cluster import connect, forwarded_environment

log = logging.getLogger(__name__)


class TrainingWorker:
    """One training process: TensorFlow threads sized to the CPUs Ray gave it; checkpoints go to the output."""

    def __init__(self, num_cpus: int):
        self.peer: tuple | None = None  # as a peer: (its training model, its stream, the phase it is compiled for)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if num_cpus:
            tf.config.threading.set_intra_op_parallelism_threads(num_cpus)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, num_cpus)))

    def train(self, job: Job, decode_threads: int, peers: list | None = None, resources: tuple = (1, 0.0)) -> Outcome:
        """The whole run; with `peers` (the other workers' actors), each epoch data-parallel with them."""
        logging.getLogger("pipeline").setLevel(logging.INFO)
        checkpoints = Checkpoints(job.config.output.uri, job.config.output.storage_options)
        if not peers:
            return run_training(job, checkpoints, decode_threads)
        return run_training(job, checkpoints, decode_threads, ParallelEpochs(job, decode_threads, peers, resources))

    def train_share(self, job: Job, decode_threads: int, phase: str, learning_rate: float, state: tuple,
                    uris: list[str], targets) -> tuple[parallel.Share, tuple]:
        """As a peer: one round from the averaged `state` on these images; what it trained and its new state."""
        from pipeline.finetune import network

        config = job.config
        if self.peer is None:
            base = network.load_base(config.model, config.input.storage_options)
            stream = Stream(config.input.storage_options, config.model, base.core.input_size, decode_threads)
            self.peer = (new_training_model(base, job.splits, config), stream, "")
        training_model, stream, compiled = self.peer
        if compiled != (phase, learning_rate):
            parallel.prepare_phase(training_model, phase, learning_rate, config.finetune)
            self.peer = (training_model, stream, (phase, learning_rate))
        parallel.set_model_state(training_model, state)
        batch_size = parallel.worker_batch_size(config.finetune.batch_size, config.run.workers)
        share = parallel.train_share(training_model, stream, Part(uris, targets), batch_size)
        return share, parallel.model_state(training_model)


class ParallelEpochs:
    """The first worker's epoch over all workers (training.fit_epoch's contract): rounds of `finetune.sync_every`
    steps, each worker on its own slice of the split, the states averaged after each round."""

    def __init__(self, job: Job, decode_threads: int, peers: list, resources: tuple[int, float]):
        self.job, self.decode_threads, self.peers, self.resources = job, decode_threads, list(peers), resources
        self.job_ref = ray.put(job)
        self.replaced = 0

    def __call__(self, training_model, stream: Stream, part: Part, options, seed: int, phase: str,
                 learning_rate: float) -> dict:
        workers, replaced_before = len(self.peers) + 1, self.replaced
        totals = [parallel.Share() for _ in range(workers)]
        batch_size = parallel.worker_batch_size(options.batch_size, workers)
        for shares in parallel.epoch_rounds(part, options.batch_size, seed, workers, options.sync_every):
            state = ray.put(parallel.model_state(training_model))  # once a round, read by every peer
            call = (self.decode_threads, phase, learning_rate, state)
            pending = {rank: self.peers[rank - 1].train_share.remote(self.job_ref, *call, shares[rank].uris,
                                                                      shares[rank].targets)
                       for rank in range(1, workers) if len(shares[rank])}
            results = []
            if len(shares[0]):
                results.append((0, parallel.train_share(training_model, stream, shares[0], batch_size),
                                parallel.model_state(training_model)))
            for rank, reference in pending.items():
                share, trained = self.collect(rank, reference, call, shares[rank])
                results.append((rank, share, trained))
            for rank, share, _ in results:
                totals[rank].add(share)
                stream.left_out.update(share.left_out)
            weights = parallel.average([trained[0] for _, _, trained in results])
            optimizer_values = parallel.average([trained[1] for _, _, trained in results])
            parallel.set_model_state(training_model, (weights, optimizer_values))
        return {**parallel.epoch_record(totals), "workers_replaced": self.replaced - replaced_before}

    def collect(self, rank: int, reference, call: tuple, part: Part) -> tuple:
        """A peer's round; a lost peer is replaced and the round's share trained again from the same state."""
        while True:
            try:
                return ray.get(reference)
            except ray.exceptions.RayActorError as error:
                self.replaced += 1
                if self.replaced >= self.job.config.run.max_attempts:
                    raise RuntimeError(f"training workers were lost {self.replaced} times") from error
                log.warning("training worker %d was lost (%s); a new one trains its share of the round again from "
                            "the last averaged weights", rank, redaction.redact(str(error))[:300])
                ray.kill(self.peers[rank - 1], no_restart=True)
                self.peers[rank - 1] = worker_class(*self.resources).remote(self.resources[0])
                reference = self.peers[rank - 1].train_share.remote(self.job_ref, *call, part.uris, part.targets)


def worker_class(cpus: int, gpus: float):
    return ray.remote(TrainingWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0,
                                              runtime_env=forwarded_environment() or None)


def worker_resources(run, cluster: dict) -> tuple[int, float]:
    """(CPUs, GPUs) of one worker: `run.gpus_per_worker` or 1 GPU on GPU clusters, 0 on CPU ones; the CPUs of
    the cluster divided among the workers unless `run.cpus_per_worker` says. A request the cluster can never
    meet is the user's to fix."""
    cluster_gpus, cluster_cpus = cluster.get("GPU", 0.0), int(cluster.get("CPU", 1))
    gpus = run.gpus_per_worker if run.gpus_per_worker is not None else (1.0 if cluster_gpus else 0.0)
    cpus = run.cpus_per_worker or max(1, cluster_cpus // run.workers)
    if gpus * run.workers > cluster_gpus:
        raise ConfigError(f"run.gpus_per_worker: {run.workers} worker(s) x {gpus:g} GPU need "
                          f"{gpus * run.workers:g} GPUs, the cluster has {cluster_gpus:g}; lower run.workers or "
                          "run.gpus_per_worker (0 trains on CPUs)")
    if cpus * run.workers > cluster_cpus:
        key, fix = (("run.cpus_per_worker", "lower run.cpus_per_worker (0 = share them)") if run.cpus_per_worker
                    else ("run.workers", f"lower run.workers to at most {cluster_cpus}"))
        raise ConfigError(f"{key}: {run.workers} worker(s) x {cpus} CPUs need {cpus * run.workers}, the cluster "
                          f"has {cluster_cpus}; {fix}")
    return cpus, gpus


def wait_reporting_epochs(result: ray.ObjectRef, job: Job, interval: float = 5.0) -> Outcome:
    """The worker's outcome; meanwhile each finished epoch is logged from the state it checkpoints."""
    checkpoints = Checkpoints(job.config.output.uri, job.config.output.storage_options)
    reported = None
    while not ray.wait([result], timeout=interval)[0]:
        state = checkpoints.peek_state()
        if state is not None and state.history and state.epoch != reported:
            reported = state.epoch
            log.info(describe_epoch(state.history[-1]))
    return ray.get(result)


def train_on_ray(job: Job, verbose: bool = False) -> Outcome:
    """Run the training worker to the end, starting another after a lost one (up to `run.max_attempts` starts)."""
    run = job.config.run
    log.info(connect(run.address, verbose).description)
    cpus, gpus = worker_resources(run, ray.cluster_resources())
    for attempt in range(1, run.max_attempts + 1):
        worker, *peers = [worker_class(cpus, gpus).remote(cpus) for _ in range(run.workers)]
        try:
            with stop_on_signals() as received:
                try:
                    return wait_reporting_epochs(worker.train.remote(job, run.decode_threads, peers, (cpus, gpus)),
                                                 job)
                except KeyboardInterrupt:
                    raise Interrupted(received.number, "interrupted: the checkpoint of the last finished epoch is "
                                                       "kept; run the same command to resume") from None
        except ray.exceptions.RayActorError as error:  # the worker died: its node, the OOM killer, a crash
            if attempt == run.max_attempts:
                raise RuntimeError(f"the training worker was lost {attempt} times; the last finished epoch is "
                                   "kept: run the same command to resume") from error
            log.warning("the training worker was lost (%s); starting another (attempt %d of %d), which resumes "
                        "after the last finished epoch", redaction.redact(str(error))[:300], attempt + 1,
                        run.max_attempts)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, USER_ERRORS):  # a refused model, a bad layer name, images that cannot split
                raise ConfigError(redaction.redact(str(error.cause))) from None
            raise
        finally:
            for actor in (worker, *peers):
                ray.kill(actor, no_restart=True)
    raise AssertionError("unreachable: every attempt returns or raises")
