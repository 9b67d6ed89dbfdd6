"""The one exception type the command line turns into a clear message and a non-zero exit."""


class UsageError(Exception):
    """Bad input from the user: a missing model, a malformed file, models that cannot be paired."""
