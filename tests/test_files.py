"""data_prep.files: a file is replaced whole or not at all, and is on disk (fsync) when it is."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from data_prep import files
from data_prep.files import atomic_output, write_json_atomic, write_text_atomic


@pytest.mark.parametrize("existing", [True, False], ids=["old-file", "no-file"])
def test_an_error_inside_leaves_the_old_file_and_no_temporary_file(tmp_path, existing):
    path = tmp_path / "state.json"
    if existing:
        path.write_text("old content\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(path) as tmp, open(tmp, "w") as f:
            f.write("half of the new cont")
            f.flush()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == (["state.json"] if existing else [])
    if existing:
        assert path.read_text() == "old content\n"


def test_a_failed_fsync_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old content\n")

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_text_atomic(path, "new content\n")
    assert os.listdir(tmp_path) == ["state.json"]
    assert path.read_text() == "old content\n"


def test_the_file_and_then_its_folder_are_fsynced(tmp_path, monkeypatch):
    """The file's data before the rename, the folder (the rename itself) after it."""
    events: list[tuple[str, int, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, False))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "sub" / "notes.txt"
    path.parent.mkdir()
    write_text_atomic(path, "new content\n")
    file_ino, folder_ino = path.stat().st_ino, path.parent.stat().st_ino
    assert events == [
        ("fsync", file_ino, False),
        ("replace", file_ino, False),
        ("fsync", folder_ino, True),
    ]
    assert path.read_text() == "new content\n"
    assert os.listdir(path.parent) == ["notes.txt"]


def test_write_json_and_text(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == json.dumps(
        {"a": [1, 2], "b": 1}, indent=1, sort_keys=True
    ) + "\n"
    write_text_atomic(tmp_path / "a.json", "überschrieben\n")  # utf-8, replaces the old file
    assert (tmp_path / "a.json").read_bytes() == "überschrieben\n".encode()
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_a_folder_that_cannot_be_fsynced_is_not_an_error(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_text_atomic(tmp_path / "x.txt", "x")
    assert (tmp_path / "x.txt").read_text() == "x"
    assert files.temporary_name(tmp_path / "x.txt").name == "x.txt.tmp"
