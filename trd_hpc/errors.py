"""The project's own error classes.

``trd-hpc`` prints these as one line (they name the file, key or field at
fault and say what to do); anything else keeps its traceback, because on a
compute node the log is all a user has (CUDA out of memory, NCCL, DeepSpeed).
"""

from __future__ import annotations


class TrdError(Exception):
    """Base of every error that is the user's input, not a bug or a crash."""

    exit_code = 1


class ConfigError(TrdError, ValueError):
    exit_code = 2


class CohortError(TrdError, RuntimeError):
    pass


class TrainingError(TrdError, RuntimeError):
    pass


class RunDirError(TrdError, RuntimeError):
    """A run directory's files are missing, truncated or from another run."""


class WriteError(TrdError, OSError):
    """A file could not be written (read-only directory, full disk, ...); nothing was replaced."""


class LockedError(TrdError, RuntimeError):
    """Another live process holds the directory's lock."""


class IngestError(TrdError, ValueError):
    """An ingest spec's sources (table, images, genotypes) do not give a cohort; the
    message names the file, the column and the rows or subjects."""

    exit_code = 2
