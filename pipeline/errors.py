"""Error classes whose messages say what is wrong and how to fix it.

Each carries the process exit code a scheduler can act on:

==== ==========================================================
code meaning
==== ==========================================================
0    success
1    the job ran and failed (data, Spark, Horovod); retry may help
2    bad arguments or configuration; fix the call, do not retry
3    the output already exists; pass ``--mode overwrite``/``resume``
==== ==========================================================
"""
from __future__ import annotations


class PixelmillError(Exception):
    """Base class: a failure the CLI reports as one line."""

    exit_code = 1


class ConfigError(PixelmillError, ValueError):
    """A configuration key or CLI flag has a bad value."""

    exit_code = 2


class OutputExistsError(PixelmillError):
    """The output location already holds a committed result."""

    exit_code = 3


class DataError(PixelmillError):
    """Input data does not satisfy what a stage needs (schema, splits, row groups)."""

    exit_code = 1


class InvariantError(PixelmillError):
    """A bookkeeping invariant failed (for example files_seen != accepted + rejected)."""

    exit_code = 1


class TrainingError(PixelmillError):
    """Distributed training failed or timed out."""

    exit_code = 1
