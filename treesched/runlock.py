"""An exclusive lock on a run folder, for every command that writes it.

``treesched train`` (fresh or ``--resume``) and ``treesched eval`` (which
writes ``metrics.json``) hold the lock for as long as they write; a second
writer is refused at once with a message naming the holder: its PID, host,
start time and command.

How: the lock is ``fcntl.flock`` on ``FOLDER/.treesched.lock``, taken
without waiting.  The kernel releases a ``flock`` when its holder exits in
any way (SIGKILL, out-of-memory kill, power loss of the process), so a lock
file left behind by a killed process is not held by anyone: the next writer
takes it over and is told whose it was.  The holder writes who it is into
the file after locking; the file is removed on release.  Because the file
can be removed and re-created between one process opening it and locking
it, a process that got the lock checks the path still names the file it
locked, and tries again otherwise: two holders never coexist.

(flock needs a POSIX system; on a network file system that does not
support it the lock fails loudly instead of silently not locking.)
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from pathlib import Path

from .errors import TreeschedError

LOCK_FILE = ".treesched.lock"


class RunFolderBusy(TreeschedError):
    """Another process holds the run folder's lock."""


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has just taken the lock and not yet said who it is)"
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')} ({holder.get('command', 'treesched')})")


def _read_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """The exclusive write lock of one run folder (a context manager).

    Args:
      folder: an existing folder.
      command: what the holder does, shown to a refused second writer
        (e.g. ``"treesched train"``).

    Attributes after :meth:`acquire`:
      taken_over: the holder description of a lock file a killed process
        left behind (None if there was none).
    """

    def __init__(self, folder, command: str = "treesched"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.taken_over: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock now, or raise :class:`RunFolderBusy` naming the holder."""
        import fcntl

        if self._fd is not None:
            raise TreeschedError(f"the lock on {self.folder} is already held by this object")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as error:
                raise TreeschedError(f"cannot lock run folder {self.folder}: "
                                     f"{error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunFolderBusy(
                        f"run folder {self.folder} is in use by "
                        f"{_describe(_read_holder(self.path))}; wait for it to finish or "
                        f"stop it (treesched never writes one run from two processes)") \
                        from None
                raise TreeschedError(f"cannot lock run folder {self.folder}: "
                                     f"{error.strerror or error}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # released and removed by its holder between our open and flock:
            # this inode is no longer the lock; lock the current file instead
            os.close(fd)
        previous = _read_holder(self.path)
        self.taken_over = previous or None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)   # while still locked: nobody can hold this inode
        except OSError:
            pass
        os.close(fd)               # closing releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def command_line() -> str:
    """``treesched ARGS`` of this process, for the holder record (short)."""
    words = ["treesched", *sys.argv[1:]] if sys.argv and "treesched" in sys.argv[0] \
        else sys.argv[:]
    text = " ".join(words) or "python"
    return text if len(text) <= 200 else text[:197] + "..."


__all__ = ["RunLock", "RunFolderBusy", "LOCK_FILE", "command_line"]
