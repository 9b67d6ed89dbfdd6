"""The exception types the command line turns into a clear message and a non-zero exit."""


class UsageError(Exception):
    """Bad input from the user: a missing model, a malformed file, models that cannot be paired."""


class RunStopped(Exception):
    """The run cannot go on (its served teacher failed); its last step done is checkpointed."""
