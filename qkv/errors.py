"""The project's error types for bad input.

A message names where the problem is: ``path:line`` (1-based) for a file, or the argument's
name for a value passed in, so that a user can go straight to it (STYLE.md rule 12).
"""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used: a bad file, line, column, tokenizer file or argument."""


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the file."""


class CheckpointError(ValueError):
    """A run directory or checkpoint is missing, corrupt or of another model family."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN/Inf loss); the last good checkpoint is kept."""


class WriteError(OSError):
    """A file could not be written (a full disk, a read-only folder, ...); the message names the file.

    An ``OSError`` (so ``errno`` tells ENOSPC from EACCES) whose text is one line without the
    ``[Errno N]`` prefix: ``cannot write runs/a/model.safetensors: No space left on device``.
    """

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()
