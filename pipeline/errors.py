"""The errors a user can fix (exit 2), in one place for the CLI and the driver."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message says how to fix it."""


class StorageError(ValueError):
    """A storage problem the user has to fix (missing bucket, bad or no credentials): the job stops at once.

    A ValueError, so the CLI reports it as a configuration error (exit 2). Its message is redacted."""


USER_ERRORS = (ConfigError, StorageError)  # exit 2: config, paths, credentials, a refused model
