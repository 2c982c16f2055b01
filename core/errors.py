"""The studio's error types. Front ends show their message as one line; anything else is a bug."""


class StudioError(Exception):
    """A problem the user can fix (bad input, missing file or cache); the message says how."""


class UsageError(StudioError, ValueError):
    """A request that is invalid as asked (bad argument value, prompt, or file content)."""


class JobError(StudioError):
    """A job request that cannot be done (unknown job, deleting a running job, no POSIX signals)."""
