"""The errors a user can fix (exit 2), in one place for the CLI and the driver."""

from __future__ import annotations

from pipeline.io.faults import StorageError


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message says how to fix it."""


USER_ERRORS = (ConfigError, StorageError)  # exit 2: config, paths, credentials, a refused model
