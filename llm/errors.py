"""Errors that describe bad input rather than a bug.

The CLI prints a `UserError` as one line (`llm: error: ...`) and exits with
status 2, never a traceback; anything else is a bug and keeps its traceback.
Each message names the file, field or rank it is about.
"""


class UserError(Exception):
    """Bad input: a config value, a file, a shard, a checkpoint, a rank."""
