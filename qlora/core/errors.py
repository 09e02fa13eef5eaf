"""The one kind of failure a user is told about in one line: bad input (a constant, a data file, a model
source, an output directory), found before expensive work where it can be. Everything else is a bug
and keeps its traceback."""

from contextlib import contextmanager
from pathlib import Path


class UserError(ValueError):
    """An expected failure caused by the user's input; its message is one line, fit to print as `error: ...`."""


def root_message(err: BaseException) -> str:
    """The first line of the innermost explicit cause's message: libraries wrap the specific cause (`datasets`:
    'An error occurred while generating the dataset' raised from the parser's 'JSON parse error ...'). An
    implicit context (an error raised while handling another) is followed only from an empty message."""
    message, seen = "", set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).strip()
        message = text.splitlines()[0] if text else message
        err = err.__cause__ or (err.__context__ if not text else None)
    return message or "unreadable"


@contextmanager
def reading_user_file(path, what: str):
    """Turn a library's failure to read the user's file `path` (malformed, wrong encoding, empty) into one
    UserError line naming the file. Plain ValueErrors pass unchanged: they are this project's own one-line
    checks, which name the file themselves."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if type(err) is ValueError:
            raise
        empty = Path(path).is_file() and Path(path).stat().st_size == 0
        raise UserError(f"{what} {path} cannot be read: {'it is empty' if empty else root_message(err)}") from err


class ConfigError(UserError):
    """A bad configuration value; its message is one line, fit to print as the run's only error."""


@contextmanager
def one_line_errors():
    """The entry point's error boundary: a UserError leaves the process as its one `error: ...` line."""
    try:
        yield
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
