"""batchrun's own exceptions for library callers: each says, in a sentence, what is wrong and
what to do. The file errors (JobFileError, OutputFileError) and a bad option (OptionsError, a
ValueError) keep their classes; these are the rest."""

from __future__ import annotations


class BatchrunError(Exception):
    """Something batchrun refuses to do, said as a sentence."""


class ApiKeyMissing(BatchrunError):
    """No API key for a real server."""


class RequestsError(BatchrunError, ValueError):
    """The requests given to ``batchrun.run`` cannot be sent (not dicts, a custom_id twice)."""


class RunInProgress(BatchrunError):
    """No longer raised: runs in one process each have their own workers, settings and stop (several
    may go at once). Kept so that code which catches it still imports."""
