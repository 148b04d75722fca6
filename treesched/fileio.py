"""Atomic file writes: a reader never sees a half-written file.

Data goes to a temporary file in the destination's folder, is flushed to
disk, then renamed over the destination (``os.replace`` is atomic on POSIX
and Windows).  On any failure the temporary file is removed and the
destination is left as it was.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from .errors import TreeschedError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temporary sibling of ``path`` for writing; rename it on success."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise TreeschedError(f"cannot write {path}: folder {folder} does not exist")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=folder)
    except OSError as error:
        raise TreeschedError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain
        # open() would (0666 less the umask), since the rename keeps them.
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(handle, mode) as stream:
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


def write_text(path, text: str) -> None:
    with atomic_open(path, "w") as stream:
        stream.write(text)


def write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as stream:
        stream.write(data)


def read_npz(path, what: str) -> dict:
    """Every array of an ``.npz`` (no pickles), or a TreeschedError naming
    ``what`` (e.g. "checkpoint") and why it cannot be read."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise TreeschedError(f"{what} {path} does not exist") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
        raise TreeschedError(f"{what} {path} is corrupt or not a treesched .npz: {error}") from None
