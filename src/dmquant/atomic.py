"""Crash-safe outputs: single files and whole directories written aside and swapped into place.

* :func:`write_atomically` writes one file through a temporary sibling renamed over it.
* A directory output (a checkpoint) is filled in a staging sibling ``.NAME.tmp-*`` made by
  :func:`staging_directory`, then :func:`swap_into_place` puts it at ``NAME``: where the system
  can exchange two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``) ``NAME`` holds
  the old or the new directory at every instant; elsewhere the old one is first retired to
  ``.NAME.old-*`` and :func:`recover` puts it back if the process died in between.
* :func:`output_lock` serialises the processes writing one output: the second fails at once.
* :func:`check_output` refuses an output path before any work is done: below a file, in a
  directory that cannot be written, or existing without ``overwrite`` (or holding files that
  dmquant did not write); :func:`check_writable` checks the place of single-file outputs.
* A directory whose files are not all named in advance (a pipeline directory, where diffusers'
  ``save_pretrained`` writes the other components) carries a record of the files written into it
  (:func:`record_files`), so that :func:`only_recorded_files` can tell them from anything else.

Every output gets the permissions a plain ``open``/``mkdir`` would give it (the umask applies).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError

logger = logging.getLogger(__name__)

_STAGING, _RETIRED = "tmp", "old"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def check_writable(directory: Path) -> None:
    """``directory`` is, or can be made, a directory that can be written: no component of it is a file."""
    existing = next((path for path in (directory, *directory.parents) if path.exists()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"{directory}: {existing} is a file, so nothing can be created below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{directory}: cannot write in {existing} (permission denied)")


def check_output(target: Path, *, overwrite: bool, replaceable: Callable[[Path], bool], what: str) -> Path:
    """``target`` if it can become the output ``what`` (e.g. "a dmquant checkpoint"), else an OutputError.

    Checked before any work: its place can be written (:func:`check_writable`), and an existing
    ``target`` is replaced only with ``overwrite`` and only when it is an empty directory or
    ``replaceable(target)`` (every entry in it is one dmquant writes).
    """
    target = Path(target)
    if target.is_symlink():
        raise OutputError(f"{target} is a symbolic link; it is left as it is: give the directory it points to")
    if target.exists():
        if not overwrite:
            raise OutputError(f"{target} exists; choose another directory or pass overwrite=True (--overwrite)")
        if not target.is_dir():
            raise OutputError(f"{target} is a file, not {what}; it is left as it is")
        if any(target.iterdir()) and not replaceable(target):
            raise OutputError(f"{target} holds files dmquant did not write (it is not {what}); not overwriting it")
    check_writable(target.parent)
    return target


def staging_directory(target: Path) -> Path:
    """A new empty ``.NAME.tmp-*`` directory beside ``target`` (parents created), with umask permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_STAGING}-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def fsync_directory(directory: Path) -> None:
    """Flush every entry below ``directory`` (files and subdirectories, at any depth) and the directory itself."""
    for path in (*_entries_below(directory), directory):
        if path.is_symlink():
            continue
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _entries_below(directory: Path) -> list[Path]:
    """Every file and directory below ``directory``, deepest first (a directory after what it holds)."""
    found = []
    for root, directories, files in os.walk(directory, topdown=False):
        found += [Path(root, name) for name in (*files, *directories)]
    return found


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories atomically; False where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _retire_and_rename(staging: Path, target: Path) -> None:
    """The portable swap: the old directory is renamed aside first (:func:`recover` undoes a crash here)."""
    retired = target.parent / f".{target.name}.{_RETIRED}-{os.getpid()}"
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired)


def swap_into_place(staging: Path, target: Path) -> None:
    """Make the complete directory ``staging`` the one at ``target``; the old ``target`` is removed."""
    if not target.exists():
        staging.rename(target)
    elif _exchange(staging, target):
        shutil.rmtree(staging)  # it holds the old directory now
    else:
        _retire_and_rename(staging, target)


@contextlib.contextmanager
def directory_written_atomically(
    target: Path, *, overwrite: bool, ours: Callable[[Path], bool], complete: Callable[[Path], bool], what: str
) -> Iterator[Path]:
    """Yield a staging directory to fill; on a normal exit it becomes ``target`` (see :func:`swap_into_place`).

    Under ``target``'s lock: leftovers of an interrupted write are recovered first, ``target`` is
    checked (:func:`check_output`; ``ours(directory)``: every entry is one dmquant writes there),
    and on any error the staging directory is removed and ``target`` is left as it was.
    """
    check_output(target, overwrite=overwrite, replaceable=ours, what=what)
    with output_lock(target):
        recover(target, ours=ours, complete=complete)
        check_output(target, overwrite=overwrite, replaceable=ours, what=what)
        staging = staging_directory(target)
        try:
            yield staging
            for path in _entries_below(staging):  # as open()/mkdir would make them (some writers make files 0600)
                if path.is_symlink():
                    continue
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
            fsync_directory(staging)
            swap_into_place(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def files_below(directory: Path) -> list[str]:
    """The paths, relative to ``directory`` and with ``/`` between parts, of every entry below it that is not
    a directory (files, links, anything else), sorted."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in _entries_below(directory)
        if path.is_symlink() or not path.is_dir()
    )


def record_files(directory: Path, record: str, *, writing: str | None = None) -> None:
    """Write ``directory/record``: every file below ``directory`` now, as written by dmquant.

    ``writing`` names a subdirectory still being filled (by a writer that does not say what it writes,
    e.g. diffusers' ``save_pretrained``): everything below it, and its own staging, retired and lock
    entries (``.NAME.tmp-*``, ``.NAME.old-*``, ``.NAME.lock``), counts as dmquant's until the next record.
    """
    files = [name for name in files_below(directory) if name != record]
    (directory / record).write_text(json.dumps({"files": files, "writing": writing}, indent=2))


def _read_record(directory: Path, record: str) -> dict | None:
    path = directory / record
    if path.is_symlink() or not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    files, writing = (content.get("files"), content.get("writing")) if isinstance(content, dict) else (None, None)
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    if writing is not None and (not isinstance(writing, str) or not writing or "/" in writing or writing[0] == "."):
        return None
    return {"files": set(files), "writing": writing}


def only_recorded_files(directory: Path, record: str) -> bool:
    """Every entry below ``directory`` is one that ``directory/record`` (see :func:`record_files`) names as
    written by dmquant; False without a readable record."""
    content = _read_record(directory, record)
    if content is None:
        return False
    writing = content["writing"]

    def being_written(name: str) -> bool:
        return writing is not None and (name.startswith(f"{writing}/") or name.startswith(f".{writing}."))

    return all(name == record or name in content["files"] or being_written(name) for name in files_below(directory))


def recorded_complete(directory: Path, record: str) -> bool:
    """``directory`` holds a finished record (nothing still being written) and every file it names."""
    content = _read_record(directory, record)
    return (
        content is not None
        and content["writing"] is None
        and only_recorded_files(directory, record)
        and all((directory / name).is_file() for name in content["files"])
    )


def leftovers(target: Path) -> list[Path]:
    """Staging and retired directories of ``target`` that an interrupted write left behind."""
    pattern = f".{glob.escape(target.name)}.%s-*"
    found = [*target.parent.glob(pattern % _STAGING), *target.parent.glob(pattern % _RETIRED)]
    return sorted(path for path in found if path.is_dir() and not path.is_symlink())


def recover(target: Path, *, ours: Callable[[Path], bool], complete: Callable[[Path], bool]) -> None:
    """Clean up after an interrupted write of ``target`` (call it holding :func:`output_lock`).

    If ``target`` is missing, a complete retired directory (the old output) goes back in place.
    Other leftovers are removed when ``ours(path)`` (every entry one dmquant writes) and left
    alone otherwise; each action is logged.
    """
    found = leftovers(target)
    if not target.exists():
        retired = [path for path in found if path.name.startswith(f".{target.name}.{_RETIRED}-") and complete(path)]
        if retired:
            retired[-1].rename(target)
            found.remove(retired[-1])
            logger.warning("%s: put back from %s, left by an interrupted save", target, retired[-1].name)
    for path in found:
        if ours(path):
            shutil.rmtree(path)
            logger.warning("%s: removed %s, left by an interrupted save", target, path.name)
        else:
            logger.warning("%s: left %s alone: it holds files dmquant did not write", target, path.name)


#: Lock files this process holds: a job that holds its output's lock from the start writes it at the end.
_held: set[Path] = set()


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold the lock of output ``target`` (``.NAME.lock`` beside it) or fail at once with an OutputError.

    Within one process the lock is reentrant: holding it again (the save at the end of a job that
    took it at the start) is a no-op.
    """
    path = (target.parent / f".{target.name}.lock").absolute()
    if path in _held:
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(descriptor).st_ino != os.stat(path).st_ino:  # the holder removed it as we opened it
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(descriptor)
        raise OutputError(f"{target}: another process is writing it; try again when it has finished") from None
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(descriptor)


def recover_when_free(target: Path, *, ours: Callable[[Path], bool], complete: Callable[[Path], bool]) -> None:
    """:func:`recover` for a reader: only when there is something to recover and no writer holds the lock."""
    if not leftovers(target):
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_lock(target))
        except (OutputError, OSError):
            return  # a save is under way (its staging directory is no leftover), or the place is read-only
        recover(target, ours=ours, complete=complete)
