"""Atomic file writes: a reader never sees a half-written file.

Data goes to a temporary file in the destination's folder (named
``.NAME.XXXXXXXX.tmp``), is flushed to disk, then renamed over the
destination (``os.replace`` is atomic on POSIX and Windows).  On any failure
the temporary file is removed and the destination is left as it was; a
process killed mid-write (SIGKILL) leaves its temporary file behind, which
:func:`remove_orphan_temporaries` deletes on the next start.

A destination that is a symbolic link, a FIFO, a device or any other
non-regular file, or a file this process may not write (a read-only
``chmod 444`` output), is refused unless ``replace=True``: renaming over it
would silently replace the node itself.  An existing regular file keeps its
permission bits.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from .errors import TreeschedError

TEMPORARY_PREFIX = "."
TEMPORARY_SUFFIX = ".tmp"
# mkstemp's random part: 8 characters of [a-z0-9_]
_TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_replaceable(path, replace: bool = False) -> int | None:
    """The permission bits of the regular file at ``path`` (None if there is
    none), or TreeschedError if ``path`` is a symbolic link, a FIFO, a device,
    a folder or a file this process may not write, unless ``replace``."""
    path = Path(path)
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise TreeschedError(f"cannot write {path}: {error.strerror or error}") from None
    mode = found.st_mode
    if stat.S_ISDIR(mode):
        raise TreeschedError(f"cannot write {path}: it is a folder")
    if not replace:
        if stat.S_ISLNK(mode):
            raise TreeschedError(f"refusing to write {path}: it is a symbolic link (writing "
                                 f"would replace the link itself); remove it or pass --force")
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode)
                    or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "not a regular file")
            raise TreeschedError(f"refusing to write {path}: it is {kind}; choose a regular "
                                 f"file or pass --force")
        # no write bit at all (chmod 444) counts as read-only even for root,
        # whom os.access lets write anything
        if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) \
                or not os.access(path, os.W_OK):
            raise TreeschedError(f"refusing to write {path}: the file is read-only; make it "
                                 f"writable or pass --force")
    return stat.S_IMODE(mode) if stat.S_ISREG(mode) else None


def remove_orphan_temporaries(folder) -> list[str]:
    """Delete the temporary files (``.NAME.XXXXXXXX.tmp``) a killed write left
    in ``folder``; returns their names.  Call it only while no other process
    writes the folder (under its run lock): a live write's temporary file has
    the same form."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if _TEMPORARY_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise TreeschedError(f"cannot remove the leftover temporary file "
                                     f"{entry.path}: {error.strerror or error}") from None
    return sorted(removed)


@contextmanager
def atomic_open(path, mode: str = "wb", replace: bool = False):
    """Open a temporary sibling of ``path`` for writing; rename it on success.

    ``replace``: also write over a symbolic link (replacing the link), a
    non-regular or a read-only file; without it those are refused
    (:func:`check_replaceable`).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise TreeschedError(f"cannot write {path}: folder {folder} does not exist")
    existing_mode = check_replaceable(path, replace)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{path.name}.",
                                             suffix=TEMPORARY_SUFFIX, dir=folder)
    except OSError as error:
        raise TreeschedError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        # mkstemp creates 0600 files; the rename keeps them, so give the
        # result the bits of the file it replaces, or those a plain open()
        # would (0666 less the umask).
        os.chmod(temporary, existing_mode if existing_mode is not None
                 else 0o666 & ~_umask())
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise TreeschedError(f"cannot write {path}: {error.strerror or error}") from None
        raise


def write_text(path, text: str, replace: bool = False) -> None:
    """``text`` (UTF-8) to ``path`` atomically; ``replace`` as :func:`atomic_open`."""
    with atomic_open(path, "w", replace=replace) as stream:
        stream.write(text)


def write_bytes(path, data: bytes, replace: bool = False) -> None:
    """``data`` to ``path`` atomically; ``replace`` as :func:`atomic_open`."""
    with atomic_open(path, "wb", replace=replace) as stream:
        stream.write(data)


def read_json(path, what: str = "", missing: str | None = None):
    """The parsed JSON of the UTF-8 file ``path``, or a TreeschedError
    ``"<what> <path> is unreadable or corrupt: <why>"``; with ``missing``, a
    file that does not exist raises TreeschedError(``missing``) instead."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        if missing is not None:
            raise TreeschedError(missing) from None
        raise TreeschedError(f"{what + ' ' if what else ''}{path} is unreadable or corrupt: "
                             f"{error}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TreeschedError(f"{what + ' ' if what else ''}{path} is unreadable or corrupt: "
                             f"{error}") from None


def read_npz(path, what: str) -> dict:
    """Every array of an ``.npz`` (no pickles), or a TreeschedError naming
    ``what`` (e.g. "checkpoint") and why it cannot be read."""
    import numpy as np

    try:
        # our own handle: np.load leaves the file it opened unclosed when the
        # archive turns out to be corrupt
        with open(path, "rb") as stream:
            loaded = np.load(stream, allow_pickle=False)
            if not hasattr(loaded, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            with loaded as archive:
                return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise TreeschedError(f"{what} {path} does not exist") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
        raise TreeschedError(f"{what} {path} is corrupt or not a treesched .npz: {error}") from None
