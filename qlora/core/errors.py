"""The failures a user is told about in one line: bad input (a constant, a data file, a model source, an
output directory), found before expensive work where it can be; a path the system refuses; Ctrl-C.
Everything else is a bug and keeps its traceback."""

import errno
import sys
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
    """The entry point's error boundary: a UserError, a path the system refuses (too long, a file where a directory
    should be, no permission) and Ctrl-C each leave the process as one `error: ...` line."""
    try:
        yield
    except UserError as err:
        _close_progress_bars()
        raise SystemExit(f"error: {err}") from None
    except OSError as err:
        if err.errno not in PATH_ERRNOS:
            raise
        _close_progress_bars()
        raise SystemExit(f"error: {err.strerror}: {_shortened(err.filename)}; give a path the system accepts") from None
    except KeyboardInterrupt:
        _close_progress_bars()
        sys.stderr.write("\nerror: interrupted (Ctrl-C); nothing was published, and a run that had started training "
                         "resumes from its last checkpoint when the same command runs again\n")
        raise SystemExit(130) from None


def _close_progress_bars() -> None:
    """End every unfinished tqdm bar with its line, so that the error is a line of its own, not the bar's tail."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)  # only bars that exist: tqdm imported means there may be some
    for bar in list(getattr(tqdm, "_instances", None) or []):
        bar.close()


# Errors the system gives for a path itself, whatever it is for: each one line naming the path.
PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EACCES, errno.EROFS, errno.ELOOP}


def _shortened(name, limit: int = 120) -> str:
    text = str(name)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(text)} characters)"
