"""_fs: writes never follow planted names; reads take only bounded regular files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from wasidispatch import _fs
from wasidispatch.errors import DetectionError, SpecError


def test_write_atomic_replaces_a_planted_symlink_without_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "state.json"
    link.symlink_to(victim)
    _fs.write_atomic(link, b"new")
    assert not link.is_symlink()
    assert link.read_bytes() == b"new"
    assert victim.read_text() == "keep"


def test_write_atomic_never_uses_a_planted_temporary_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    tokens = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(_fs, "_token", lambda: next(tokens))
    (tmp_path / ".pid.aaaaaaaaaaaa.tmp").symlink_to(victim)
    _fs.write_atomic(tmp_path / "pid", b"42")
    assert (tmp_path / "pid").read_bytes() == b"42"
    assert victim.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pid.aaaaaaaaaaaa.tmp", "pid", "victim"]


def test_write_atomic_mode_and_no_leftover_on_failure(tmp_path: Path) -> None:
    _fs.write_atomic(tmp_path / "f", b"x", mode=0o640, durable=True, mtime_ns=10**18)
    st = os.stat(tmp_path / "f")
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 10**18)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        _fs.write_atomic(tmp_path / "d", b"x")  # rename over a directory fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


@pytest.mark.parametrize("planted", ["file", "symlink", "dangling"])
def test_create_new_refuses_anything_planted(tmp_path: Path, planted: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "pid"
    if planted == "file":
        target.write_text("old")
    elif planted == "symlink":
        target.symlink_to(victim)
    else:
        target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        _fs.create_new(target, b"42")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "nowhere").exists()


def test_append_fd_refuses_symlinks_and_appends(tmp_path: Path) -> None:
    log = tmp_path / "log"
    for text in (b"a\n", b"b\n"):
        fd = _fs.append_fd(log)
        os.write(fd, text)
        os.close(fd)
    assert log.read_bytes() == b"a\nb\n"
    (tmp_path / "link").symlink_to(log)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        _fs.append_fd(tmp_path / "link")
    assert log.read_bytes() == b"a\nb\n"


def test_read_regular_refuses_devices_fifos_dirs_and_big_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="character device"):
        _fs.read_regular("/dev/zero", limit=100, what="config.json")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def read() -> None:
        try:
            _fs.read_regular(fifo, limit=100)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=read)
    t.start()
    t.join(10)
    assert not t.is_alive(), "read_regular blocked on a FIFO"
    assert isinstance(result[0], SpecError)
    assert "FIFO" in str(result[0])
    with pytest.raises(SpecError, match="directory"):
        _fs.read_regular(tmp_path, limit=100)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(SpecError, match="101 bytes, over the 100-byte limit"):
        _fs.read_regular(big, limit=100)
    with pytest.raises(DetectionError, match="does not exist"):
        _fs.read_regular(tmp_path / "missing", limit=100, error=DetectionError)
    ok = tmp_path / "ok"
    ok.write_bytes(b"x" * 100)
    assert _fs.read_regular(ok, limit=100) == b"x" * 100
    (tmp_path / "link").symlink_to(ok)
    assert _fs.read_regular(tmp_path / "link", limit=100) == b"x" * 100
    with pytest.raises(SpecError):
        _fs.read_regular(tmp_path / "link", limit=100, follow=False)
