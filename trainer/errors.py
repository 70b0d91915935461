"""The errors a user can act on; train.py prints them as one line, without a traceback."""


class UsageError(ValueError):
    """A problem the user can fix by changing flags or files."""


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, out of memory, a full disk); the message says what was saved and what to
    do."""
