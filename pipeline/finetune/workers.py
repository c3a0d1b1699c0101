"""The fine-tune on Ray: a training worker (a Ray actor that runs pipeline/finetune/training.py), its resources
(GPUs when the cluster has them, else CPU threads, as extract decides), and what the driver does when the worker
is lost (start another, which resumes after the last finished epoch) or the run is interrupted (stop it: the
checkpoints stay, the same command resumes).

Why actors and not Ray Train's TensorflowTrainer: see docs/finetune.md ("Why Ray actors").
"""

from __future__ import annotations

import logging
import os

import ray

from pipeline.errors import USER_ERRORS, ConfigError
from pipeline.extract.driver import forwarded_environment
from pipeline.extract.signals import Interrupted, stop_on_signals
from pipeline.finetune.checkpoints import Checkpoints
from pipeline.finetune.training import Job, Outcome, describe_epoch, run_training
from pipeline.io import redaction
from pipeline.ray_cluster import connect

log = logging.getLogger(__name__)


class TrainingWorker:
    """One training process: TensorFlow threads sized to the CPUs Ray gave it; checkpoints go to the output."""

    def __init__(self, num_cpus: int):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if num_cpus:
            tf.config.threading.set_intra_op_parallelism_threads(num_cpus)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, num_cpus)))

    def train(self, job: Job, decode_threads: int) -> Outcome:
        logging.getLogger("pipeline").setLevel(logging.INFO)
        checkpoints = Checkpoints(job.config.output.uri, job.config.output.storage_options)
        return run_training(job, checkpoints, decode_threads)


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
        raise ConfigError(f"run.cpus_per_worker: {run.workers} worker(s) x {cpus} CPUs need {cpus * run.workers}, "
                          f"the cluster has {cluster_cpus}; lower run.cpus_per_worker (0 = share them)")
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
    worker_class = ray.remote(TrainingWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0,
                                                      runtime_env=forwarded_environment() or None)
    for attempt in range(1, run.max_attempts + 1):
        worker = worker_class.remote(cpus)
        try:
            with stop_on_signals() as received:
                try:
                    return wait_reporting_epochs(worker.train.remote(job, run.decode_threads), job)
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
            ray.kill(worker, no_restart=True)
    raise AssertionError("unreachable: every attempt returns or raises")
