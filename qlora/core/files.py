"""Small file helpers shared by every layer: where the repository lies, durable writes."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qlora.core.errors import ConfigError, UserError
from qlora.core.memory import format_size


# The repository checkout this package is installed from (editable install): shipped samples, model configs.
REPO_ROOT = Path(__file__).resolve().parents[2]


def fsync_path(path: Path) -> None:
    """Make a file's content, or a directory's entries, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_file(file: Path, what: str = "") -> Any:
    """A JSON file's content, or a one-line UserError naming the file (not UTF-8, malformed, unreadable)."""
    try:
        return json.loads(Path(file).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 text (byte {err.start}){what}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON ({err}){what}") from None
    except OSError as err:
        raise UserError(f"{file} cannot be read: {err.strerror}") from None


def non_finite_values(value: Any, where: str = "") -> list[str]:
    """`key.path=value` of every nan / inf float inside a JSON-like value."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where or 'the value'}={value}"]
    if isinstance(value, dict):
        return [hit for key, item in value.items()
                for hit in non_finite_values(item, f"{where}.{key}" if where else str(key))]
    if isinstance(value, (list, tuple)):
        return [hit for i, item in enumerate(value) for hit in non_finite_values(item, f"{where}[{i}]")]
    return []


def non_finite_as_null(value: Any) -> Any:
    """A JSON-like value with every nan / inf float replaced by None (for a record that lists them apart)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: non_finite_as_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [non_finite_as_null(item) for item in value]
    return value


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as strict JSON (no NaN/Infinity, which other readers reject), atomically and durably: a
    temporary file beside it, fsynced, renamed over `path`, the directory fsynced. A reader sees the old
    file or the whole new one, never a part. A nan or inf is refused naming where it is."""
    path = Path(path)
    bad = non_finite_values(obj)
    if bad:
        raise ValueError(f"refusing to write {path}: not a finite number: {', '.join(bad[:3])} (JSON has no nan or inf)")
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def existing_ancestor(path: Path) -> Path:
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    return probe


def check_free_disk(path: Path, needed: int, what: str) -> None:
    """ConfigError when the filesystem holding `path` has less than `needed` bytes free."""
    free = shutil.disk_usage(existing_ancestor(path)).free
    if free < needed:
        raise ConfigError(f"not enough free disk under {path} for {what}: need ~{format_size(needed)}, "
                          f"{format_size(free)} free")


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded")  # safetensors' Rust I/O errors


TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter")  # torch.save's zip writer, errno not kept


def explain_disk_full(err: BaseException, needed_bytes: int, directory: Path) -> UserError | None:
    """The one-line error for a save that failed because the disk filled up, or None when `err` is something else.

    ENOSPC / EDQUOT (Python's OSError, safetensors' message) count always. torch.save reports a full disk
    only as a failed write of its zip stream ('[enforce fail at inline_container.cc] . unexpected pos'):
    that counts when the filesystem now has less than `needed_bytes` free.
    """
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    free = shutil.disk_usage(existing_ancestor(directory)).free
    full = any(getattr(e, "errno", None) in DISK_FULL_ERRNOS or any(t in str(e) for t in DISK_FULL_TEXTS) for e in chain)
    torch_write = any(t in str(e) for e in chain for t in TORCH_WRITE_FAILED)
    if not (full or (torch_write and free < needed_bytes)):
        return None
    return UserError(f"the disk under {directory} is full: saving needs ~{format_size(needed_bytes)} free there, "
                     f"{format_size(free)} is; free some space, then rerun the same command: it resumes from the "
                     "last complete checkpoint")


@contextmanager
def disk_full_is_a_user_error(needed_bytes: int, directory: Path):
    """A write inside the block that fails because the disk filled up becomes one UserError line saying how much
    the run needs and that a rerun resumes; any other failure passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        full = explain_disk_full(err, needed_bytes, Path(directory))
        if full is None:
            raise
        raise full from None


def absolute_if_local(name_or_path: str | None) -> str | None:
    """A path that exists here, made absolute (metadata is read from other directories); a hub id or None as is."""
    if name_or_path is None or not Path(name_or_path).exists():
        return name_or_path
    return str(Path(name_or_path).resolve())
