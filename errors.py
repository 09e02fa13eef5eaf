"""The one kind of failure a user is told about in one line: bad input (a constant, a data file, a model
source, an output directory), found before expensive work where it can be. Everything else is a bug
and keeps its traceback."""

class UserError(ValueError):
    """An expected failure caused by the user's input; its message is one line, fit to print as `error: ...`."""
