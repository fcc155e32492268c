"""Atomic writes: a temporary file (or directory) beside the target, renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` on a temporary file renamed into place.

    Parent directories are created; on any error the temporary file is removed and an
    existing file at ``path`` is left untouched. The file gets the mode a plain ``open``
    would give it (the umask applies), not the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


@contextmanager
def staged_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary directory beside ``target`` that becomes ``target`` when the block ends without error.

    An existing ``target`` is swapped out and removed only once the new one is complete; on any error the
    temporary directory is removed and ``target`` is left as it was. Checking whether ``target`` may be
    replaced is the caller's business.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
