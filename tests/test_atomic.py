"""Crash-safe outputs: directory swaps, recovery of interrupted writes, the lock, checks before work."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import dmquant.atomic as atomic
from dmquant.atomic import (
    check_output,
    directory_written_atomically,
    leftovers,
    output_lock,
    recover,
    staging_directory,
    swap_into_place,
)
from dmquant.errors import OutputError


def _only(names: set[str]):
    """An ``ours`` test: every entry is one of ``names``."""
    return lambda directory: all(path.name in names for path in directory.iterdir())


def _complete(directory: Path) -> bool:
    return (directory / "b").exists()


def _write(directory: Path, value: str) -> None:
    (directory / "a").write_text(value)
    (directory / "b").write_text(value)


def _written(target: Path, value: str, **options) -> None:
    options = {"overwrite": True, "ours": _only({"a", "b"}), "complete": _complete, "what": "a test output"} | options
    with directory_written_atomically(target, **options) as staging:
        _write(staging, value)


def test_a_write_replaces_the_old_directory_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "out"
    _written(target, "old")
    _written(target, "new")
    assert (target / "a").read_text() == "new" and (target / "b").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "retire-and-rename"])
def test_at_every_step_of_a_swap_the_target_holds_the_old_or_the_new_directory(tmp_path, monkeypatch, exchange):
    """Each rename the swap makes is a point where the process may die: record the target there."""
    target = tmp_path / "out"
    _written(target, "old")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    seen = []
    rename = Path.rename

    def observed_rename(self, destination):
        result = rename(self, destination)
        seen.append((target / "a").read_text() if target.exists() else None)
        return result

    monkeypatch.setattr(Path, "rename", observed_rename)
    _written(target, "new")
    if exchange:
        assert seen == []  # one atomic exchange, no rename
    else:
        assert seen == [None, "new"]  # the window the recovery covers: the target retired
    assert (target / "a").read_text() == "new"


def test_a_save_killed_between_retiring_and_renaming_is_recovered_from_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _written(target, "old")
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    rename = Path.rename

    def dies_after_retiring(self, destination):
        result = rename(self, destination)
        if ".old-" in Path(destination).name:
            raise KeyboardInterrupt  # as if killed: nothing after this runs
        return result

    monkeypatch.setattr(Path, "rename", dies_after_retiring)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda path, ignore_errors=False: None)  # a kill cleans nothing
    with pytest.raises(KeyboardInterrupt):
        _written(target, "new")
    monkeypatch.undo()
    assert not target.exists() and len(leftovers(target)) == 2  # the old one retired, the new one staged

    recover(target, ours=_only({"a", "b"}), complete=_complete)
    assert (target / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_holding_foreign_files_are_left_alone(tmp_path, caplog):
    target = tmp_path / "out"
    staging = staging_directory(target)
    (staging / "a").write_text("partial")
    foreign = staging_directory(target)
    (foreign / "notes.txt").write_text("mine")
    recover(target, ours=_only({"a", "b"}), complete=_complete)
    assert not staging.exists() and (foreign / "notes.txt").read_text() == "mine"
    assert "left" in caplog.text and "removed" in caplog.text


def test_outputs_get_the_permissions_of_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        _written(tmp_path / "out", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "a").stat().st_mode) == 0o640


def test_a_second_writer_fails_cleanly_while_the_first_holds_the_lock(tmp_path):
    target = tmp_path / "out"
    other = subprocess.Popen(  # another process holding the lock
        [sys.executable, "-c", HOLD_LOCK, str(target)], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline() == "held\n"
        with pytest.raises(OutputError, match="another process is writing it"):
            _written(target, "second")
    finally:
        other.communicate("")  # lets it release the lock and end
    _written(target, "third")  # the lock is free again, and its file gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


HOLD_LOCK = """
import sys
from pathlib import Path
from dmquant.atomic import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    target = tmp_path / "out"
    with output_lock(target):
        _written(target, "inner")  # a job holding its output's lock saves at the end
        assert (tmp_path / ".out.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("prepare", "overwrite", "message"),
    [
        (lambda t: t.mkdir(), False, "exists"),
        (lambda t: t.write_text("x"), True, "is a file"),
        (lambda t: t.parent.joinpath("file").write_text("x"), False, "nothing can be created below it"),
        (lambda t: (t.mkdir(), (t / "notes.txt").write_text("mine")), True, "dmquant did not write"),
        (lambda t: (t.parent.joinpath("real").mkdir(), t.symlink_to("real")), True, "is a symbolic link"),
    ],
    ids=["exists", "is-a-file", "below-a-file", "foreign-files", "symlink"],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, prepare, overwrite, message):
    target = tmp_path / "out"
    prepare(target)
    if "below" in message:
        target = tmp_path / "file" / "out"
    with pytest.raises(OutputError, match=message):
        check_output(target, overwrite=overwrite, replaceable=_only({"a"}), what="a test output")


def test_an_output_in_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    # what os.access says for a directory without write permission (root would be allowed anyway)
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(OutputError, match="permission denied"):
        check_output(tmp_path / "out", overwrite=False, replaceable=_only(set()), what="a test output")
    with pytest.raises(OutputError, match="permission denied"):  # nor can a directory be made in it
        check_output(tmp_path / "sub" / "out", overwrite=False, replaceable=_only(set()), what="a test output")
    (tmp_path / "sub").mkdir()  # one that can be written
    check_output(tmp_path / "sub" / "out", overwrite=False, replaceable=_only(set()), what="a test output")


def test_swap_into_a_missing_target_is_a_rename(tmp_path):
    staging = staging_directory(tmp_path / "out")
    _write(staging, "x")
    swap_into_place(staging, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
