"""Writing a file so that a crash leaves either the old file or the complete new one.

Every writer of a finished file (dataset files, manifests, the run directory's files, exports,
sbatch scripts, ...) goes through :func:`atomic_output`. `data_prep` is the bottom layer:
`trainer` and `jobs` import this, it imports nothing of theirs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A folder fsync these file systems cannot do: the rename is then as durable as they make it.
_NO_FOLDER_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: `<name>.tmp` beside it."""
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary name in the folder of `path` to write it under; when the block ends the
    file is fsynced, renamed over `path` (os.replace) and the folder fsynced, so the new
    content is on disk before and after the rename is.

    Close what you wrote before the block ends (`with atomic_output(p) as tmp, open(tmp, "w")
    as f:` does). If the block fails the temporary file is removed: `path` keeps its old
    content (or stays absent), never a half-written one.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text`, atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Replace `path` with `payload` as indented JSON (sorted keys), atomically."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")


def fsync_file(path: str | Path) -> None:
    """Flush a written (and closed) file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it, a new file) to the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_FOLDER_FSYNC:
            raise
    finally:
        os.close(fd)
