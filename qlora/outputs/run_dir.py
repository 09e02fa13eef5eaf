"""Output directories: one lock per name, a hidden staging directory, and one atomic publish.

Every writer of an output directory (Fine-tuning/01_Train.py, tools/quantize.py, tools/make_base_model.py)
claims its name under the root before any expensive work, and holds the claim until it publishes:
  - ROOT/.NAME.lock is locked with flock(2). The kernel drops the lock when its holder dies, so a crashed
    run never blocks the next one; a clean release deletes the file, so a lock file found unlocked but
    not empty was left by a process that died, and is taken over with a log line.
  - Everything is written into ROOT/.NAME.partial; nothing under NAME exists until it is complete.
  - `mark_staged` flushes every file to disk and then writes a marker; `publish` renames the staging
    directory to NAME in one os.replace. A run killed between the two is published by the next run of
    the same command without redoing its work (`staged_complete`).
Two runs never share a staging directory: the second one with the same name stops at once naming the
holder, or (if_exists="suffix") takes the next free name, NAME-2, NAME-3, ..., staging included.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qlora.core.errors import UserError
from qlora.core.files import fsync_path
from qlora.core.logs import step
from qlora.train.distributed import from_main


STAGED_MARKER = ".staged_complete"
IF_EXISTS_POLICIES = ("refuse", "suffix")

class OutputDirError(UserError):
    """The output directory cannot be claimed: it exists, another run holds it, or the root is unusable."""

def check_output_root(root: Path) -> None:
    """The root is a writable directory, or one that can be created: checked before anything loads."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"OUTPUT_ROOT={str(root)!r}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"OUTPUT_ROOT={str(root)!r}: {probe} is not writable by this user")

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

def apply_umask(directory: Path) -> None:
    """Give `directory` and everything in it the modes the umask allows (safetensors writes 0600, mkdtemp 0700)."""
    mask = _umask()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)

@dataclass
class RunDir:
    """A claimed output name: where to stage, where it will be published, and the held lock."""

    final: Path
    staging: Path
    lock_path: Path
    lock_fd: int | None
    replaces: bool = False  # publish swaps out an existing final directory (a deliberate rebuild)
    created: Path | None = None  # the outermost directory the claim created for the root: removed again if left empty

    @property
    def staged_complete(self) -> bool:
        """The staging directory holds a finished output waiting only for its rename."""
        return (self.staging / STAGED_MARKER).is_file()

    def mark_staged(self) -> None:
        """Flush every staged file to disk, then mark the staging complete (the marker is written last)."""
        for path in sorted(self.staging.rglob("*")):
            if path.is_file():
                fsync_path(path)
        (self.staging / STAGED_MARKER).write_text(json.dumps({"pid": os.getpid(), "time": int(time.time())}))
        fsync_path(self.staging)

    def publish(self) -> Path:
        """Give the staged files the modes the umask allows (safetensors writes 0600), and rename the staging
        directory to its final name. Returns the final path."""
        if not self.staged_complete:
            raise RuntimeError(f"{self.staging} is not marked complete; call mark_staged() first")
        apply_umask(self.staging)
        replaced = self.final.with_name(f".{self.final.name}.replaced")
        if self.final.exists():
            if not self.replaces:
                raise OutputDirError(f"{self.final} appeared while this run held its lock; the staged output is kept "
                                     f"in {self.staging}")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(self.final, replaced)
        (self.staging / STAGED_MARKER).unlink()
        os.replace(self.staging, self.final)
        fsync_path(self.final.parent)
        shutil.rmtree(replaced, ignore_errors=True)
        return self.final

    def release(self) -> None:
        """Give the name back: the lock file goes (a clean release leaves nothing that looks stale)."""
        if self.lock_fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self.lock_fd)
            self.lock_fd = None
        self._remove_created_if_empty()

    def _remove_created_if_empty(self) -> None:
        """A run refused after its claim leaves no empty OUTPUT_ROOT behind (the directories the claim made)."""
        if self.created is None:
            return
        directory = self.lock_path.parent
        while True:
            try:
                directory.rmdir()  # only an empty directory goes
            except OSError:
                return
            if directory == self.created:
                return
            directory = directory.parent

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"pid": "?", "raw": text[:80]}

def _try_lock(lock_path: Path, staging: Path) -> tuple[int | None, dict]:
    """(fd, previous holder) with the lock held, or (None, live holder) when another process holds it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return None, holder
        try:  # the holder we waited on may have released (deleted) the file we opened: lock the current one
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read_holder(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "staging": str(staging),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return fd, previous

def claim(root: Path, name: str, if_exists: str = "refuse", log: Callable[[str], None] = print) -> RunDir:
    """Claim ROOT/NAME (or, with if_exists="suffix", the first free NAME-k) for this process.

    A name is free when neither its final directory exists nor a live process holds its lock. "refuse"
    stops at once on a taken name with one line saying why and what to do; "replace" (tools that rebuild
    on request) claims an existing final directory and swaps it out only when the new one is published.
    """
    if if_exists not in IF_EXISTS_POLICIES + ("replace",):
        raise OutputDirError(f"if_output_exists={if_exists!r} is unknown; allowed: {', '.join(IF_EXISTS_POLICIES)}")
    check_output_root(root)
    created = next((d for d in reversed([root, *root.parents]) if not d.exists()), None)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        candidate = name if k == 1 else f"{name}-{k}"
        final, staging, lock_path = root / candidate, root / f".{candidate}.partial", root / f".{candidate}.lock"
        if final.exists() and if_exists != "replace":
            if if_exists == "refuse":
                raise OutputDirError(f"output directory {final} exists; remove it or set --if_output_exists=suffix")
            continue
        fd, holder = _try_lock(lock_path, staging)
        if fd is None:
            if if_exists == "refuse":
                raise OutputDirError(f"output {final} is being written by PID {holder.get('pid', '?')} on "
                                     f"{holder.get('host', '?')} since {holder.get('since', '?')} (staging "
                                     f"{holder.get('staging', staging)}); wait for it, or set --if_output_exists=suffix")
            continue
        if holder:
            log(f"taking over the lock of {candidate} left by PID {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, which is no longer running")
        return RunDir(final, staging, lock_path, fd, replaces=if_exists == "replace", created=created)
    raise OutputDirError(f"no free name {name}-k under {root}")

def discard_staging(run: RunDir) -> None:
    """Remove a staging directory this process holds the claim on (a fresh start)."""
    shutil.rmtree(run.staging, ignore_errors=True)


def claim_on_main(is_main: bool, root, name: str, if_exists: str, dry_run: bool = False):
    """Rank 0 claims the output directory (run_dir.claim: the lock is held until publish); every rank gets its
    paths. A dry run claims nothing and writes nothing: a context holding None."""
    if dry_run:
        return nullcontext(None)
    run = claim(root, name, if_exists, log=lambda line: step("plan", "%s", line)) if is_main else None
    final, staging = from_main((run.final, run.staging) if run else None)
    return run or RunDir(final, staging, lock_path=final.parent / f".{final.name}.lock", lock_fd=None)


def publish_staged(run: RunDir) -> Path:
    """Publish a staging directory that a killed run had finished all but renaming: no training again."""
    step("publish", "the staged run had finished all but its rename: publishing it without training")
    return run.publish()
