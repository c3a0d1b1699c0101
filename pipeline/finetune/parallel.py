"""Data-parallel training by model averaging (local SGD), the parts without Ray: which images each worker trains
on in each round, a worker's round (`sync_every` steps from the averaged state), and the average. The driver's
side, which sends the rounds to the Ray actors, is pipeline/finetune/workers.py.

An epoch's shuffled train split (the same order one worker would see) is cut into batches of
`batch_size // workers` images, dealt round-robin: batch i goes to worker i % workers, so the workers' slices are
disjoint and together are the whole split. A round is the next `sync_every` batches of every worker; after it the
weights and the Adam state (moments and step count) of the workers that trained are averaged, and the next round
starts from that average on every worker. The optimizer state is averaged rather than kept per worker so that the
whole state lives in one model: a replaced worker, a checkpoint and a resume need nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.config import FinetuneOptions
from pipeline.finetune import network
from pipeline.finetune.data import Part, Stream, shuffled


@dataclass
class Share:
    """What one worker trained in one round (or an epoch, summed): for the history and the checks."""

    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0  # per-batch loss times the batch's images
    correct: float = 0.0
    left_out: dict[str, str] = field(default_factory=dict)

    def add(self, other: Share) -> None:
        self.steps += other.steps
        self.images += other.images
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.left_out.update(other.left_out)


def worker_batch_size(batch_size: int, workers: int) -> int:
    """`finetune.batch_size` is the images of one step over all workers."""
    return max(1, batch_size // workers)


def epoch_rounds(part: Part, batch_size: int, seed: int, workers: int, sync_every: int) -> list[list[Part]]:
    """rounds[j][rank]: the images worker `rank` trains on in round j, in order (an empty Part when its slice
    is used up before the others')."""
    order = shuffled(part.uris, seed)
    size = worker_batch_size(batch_size, workers)
    batches = [order[start:start + size] for start in range(0, len(order), size)]
    slices = [batches[rank::workers] for rank in range(workers)]
    rounds = []
    for first in range(0, len(slices[0]), sync_every):
        shares = []
        for rank in range(workers):
            chosen = slices[rank][first:first + sync_every]
            indices = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
            shares.append(Part([part.uris[index] for index in indices], part.targets[indices]))
        rounds.append(shares)
    return rounds


def average(states: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The element-wise mean of several lists of arrays (weights, optimizer variables), each in its own dtype;
    computed in float64, so identical inputs come back unchanged; integers (the step count) rounded."""
    averaged = []
    for values in zip(*states, strict=True):
        dtype = np.asarray(values[0]).dtype
        mean = np.mean([np.asarray(value, dtype=np.float64) for value in values], axis=0)
        averaged.append(np.rint(mean).astype(dtype) if np.issubdtype(dtype, np.integer) else mean.astype(dtype))
    return averaged


def prepare_phase(training_model, phase: str, learning_rate: float, options: FinetuneOptions) -> None:
    """The trainable set and a fresh optimizer of `phase` (what the single-worker loop does at a phase's start),
    its variables built now so that every worker's state has the same variables."""
    network.set_phase(network.classifier_of(training_model), phase, options)
    network.compile_for(training_model, learning_rate)
    built_optimizer(training_model)


def built_optimizer(training_model):
    optimizer = training_model.optimizer
    if not optimizer.built:
        optimizer.build(training_model.trainable_variables)
    return optimizer


def model_state(training_model) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(every weight, trainable or not, in the model's order; the optimizer's variables)."""
    optimizer = built_optimizer(training_model)
    return training_model.get_weights(), [np.asarray(variable.numpy()) for variable in optimizer.variables]


def set_model_state(training_model, state: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
    weights, optimizer_values = state
    training_model.set_weights(weights)
    optimizer = built_optimizer(training_model)
    for variable, value in zip(optimizer.variables, optimizer_values, strict=True):
        variable.assign(value)


def train_share(training_model, stream: Stream, part: Part, batch_size: int) -> Share:
    """One worker's round: a step on each batch of its share, in order."""
    share = Share()
    before = set(stream.left_out)
    for pixels, targets in stream.batches(part, batch_size):
        result = training_model.train_on_batch(pixels, targets, return_dict=True)
        share.steps += 1
        share.images += len(targets)
        share.loss_sum += float(result["loss"]) * len(targets)
        share.correct += float(result["accuracy"]) * len(targets)
    share.left_out = {uri: reason for uri, reason in stream.left_out.items() if uri not in before}
    return share


def epoch_record(shares: list[Share]) -> dict:
    """The epoch's training loss and accuracy over all workers (per image), and what each worker trained."""
    images = sum(share.images for share in shares)
    return {"loss": sum(share.loss_sum for share in shares) / max(1, images),
            "accuracy": sum(share.correct for share in shares) / max(1, images),
            "workers": [{"rank": rank, "steps": share.steps, "images": share.images}
                        for rank, share in enumerate(shares)]}
