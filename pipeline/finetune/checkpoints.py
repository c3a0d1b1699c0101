"""What a fine-tune leaves in its output while it runs, so that the same command resumes it: after every finished
epoch the training model with its optimizer state (`_finetune/last.keras`), the classifier of the best epoch so
far (`_finetune/best.keras`), then `_finetune/state.json` (epoch count, history, best, the linear probe, the
settings' fingerprint), last: a state names only files already written. No Ray.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field

from pipeline.errors import ConfigError
from pipeline.io import storage
from pipeline.output import ledger

CHECKPOINT_DIR = "_finetune"
STATE_FILE = "state.json"
LAST_FILE = "last.keras"
BEST_FILE = "best.keras"


@dataclass
class State:
    fingerprint: str  # of every setting that changes the result, and of the listing
    epoch: int = 0  # epochs finished (over both phases)
    compiled_phase: str = ""  # the phase last.keras was compiled for ("" before the first epoch)
    phase_done: list[str] = field(default_factory=list)  # phases ended early by their patience
    best_val_loss: float | None = None
    best_epoch: int = 0
    epochs_since_best: int = 0  # within the current phase
    history: list[dict] = field(default_factory=list)  # one entry an epoch: epoch, phase, loss, accuracy, val_*
    starts: list[int] = field(default_factory=list)  # the epoch each run started from (0, then resumes)
    probe: dict | None = None  # the linear probe's test metrics, computed once


class Checkpoints:
    """The `_finetune/` folder of an output."""

    def __init__(self, output_uri: str, storage_options: dict):
        self.folder = storage.join(output_uri, CHECKPOINT_DIR)
        self.options = storage_options

    def uri(self, name: str) -> str:
        return storage.join(self.folder, name)

    def read_state(self, fingerprint: str) -> State:
        """The state of an earlier run with these settings, or a new one; other settings are refused."""
        uri = self.uri(STATE_FILE)
        if not storage.exists(uri, self.options):
            return State(fingerprint)
        state = State(**ledger.read_json(uri, self.options))
        if state.fingerprint != fingerprint:
            raise ConfigError(f"output.uri holds an unfinished fine-tune with other settings or images "
                              f"({CHECKPOINT_DIR}/{STATE_FILE}); use another output.uri, or set output.mode: "
                              "overwrite to start again")
        return state

    def peek_state(self) -> State | None:
        """The state as it is now, for progress (None before the first is written, or while it is replaced)."""
        try:
            return State(**ledger.read_json(self.uri(STATE_FILE), self.options))
        except (OSError, ValueError):
            return None

    def write_state(self, state: State) -> None:
        ledger.write_json(self.uri(STATE_FILE), asdict(state), self.options)

    def save_model(self, model, name: str) -> None:
        """Keras writes a local file; it is copied to the output (any fsspec URI)."""
        with tempfile.TemporaryDirectory(prefix="featurize-finetune-") as folder:
            path = os.path.join(folder, name)
            model.save(path)
            storage.make_dirs(self.folder, self.options)
            storage.upload_file(path, self.uri(name), self.options)

    def load_model(self, name: str, compile: bool):
        """A model this stage saved: built from Keras's own layers only, loaded in safe mode."""
        import keras

        with storage.local_copy(self.uri(name), self.options) as path:
            return keras.models.load_model(path, compile=compile, safe_mode=True)

    def has(self, name: str) -> bool:
        return storage.exists(self.uri(name), self.options)

    def clear(self) -> None:
        if storage.exists(self.folder, self.options):
            storage.remove(self.folder, self.options, recursive=True)
