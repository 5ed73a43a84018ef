"""``wasidispatch-runc`` never writes through a file planted at a name it writes.

The pid file (``--pid-file``), the log (``--log``) and the state file
(``<root>/<id>/wasidispatch.json``) are at caller-chosen or shared paths: a symlink (or a
hard link) planted there beforehand, at the final or at a temporary name, must never be
followed or truncated. Each test plants one and runs the real command (or, for the state
file, whose directory ``create`` makes exclusively, the real `WasmState.save`).
"""

# The fixtures are test_runc_cli's, imported by name (pytest finds them in the module):
# ruff: noqa: F811
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.test_runc_cli import (  # noqa: F401 - fixtures
    Runtime,
    cgroup_name,
    needs_runtime,
    runtime,
    subreaper,
    wait_exit,
    wasm_bundle,
    wasm_env,
)
from wasidispatch.runc.state import STATE_NAME, WasmState

VICTIM = b"precious: must not change\n"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    return victim


def _plant(name: Path, victim: Path, kind: str) -> None:
    if kind == "symlink":
        name.symlink_to(victim)
    else:  # a hard link: writing in place (O_TRUNC) would change the victim too
        os.link(victim, name)


def _create(runtime: Runtime, bundle: Path, pid_file: Path, cid: str, tmp_path: Path) -> int:
    with (tmp_path / f"out-{cid}").open("wb") as out:
        proc = runtime(
            "create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid, stdout=out
        )
    return proc.returncode


@needs_runtime
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_pid_file_planted_at_the_final_name_is_replaced_not_followed(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None, kind: str
) -> None:
    victim = _victim(tmp_path)
    bundle = wasm_bundle(tmp_path / "b", "loop", [], cgroup_name)
    pid_file = bundle / "init.pid"
    _plant(pid_file, victim, kind)
    assert _create(runtime, bundle, pid_file, "p1", tmp_path) == 0, runtime.errors()
    assert victim.read_bytes() == VICTIM
    assert not pid_file.is_symlink()
    pid = int(pid_file.read_bytes())
    assert runtime("delete", "--force", "p1").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGKILL


@needs_runtime
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_pid_file_planted_at_the_temporary_name_is_not_followed(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None, kind: str
) -> None:
    """The temporary names a writer could use: runc's ``.NAME`` and ours before the fix."""
    victim = _victim(tmp_path)
    bundle = wasm_bundle(tmp_path / "b", "loop", [], cgroup_name)
    pid_file = bundle / "init.pid"
    for tmp in (bundle / ".init.pid", bundle / ".init.pid.tmp"):
        _plant(tmp, victim, kind)
    assert _create(runtime, bundle, pid_file, "p2", tmp_path) == 0, runtime.errors()
    assert victim.read_bytes() == VICTIM
    pid = int(pid_file.read_bytes())
    assert runtime("delete", "--force", "p2").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGKILL
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith(".")) == [
        ".init.pid",
        ".init.pid.tmp",
    ]  # nothing else left beside the pid file


@needs_runtime
def test_log_planted_as_a_symlink_is_not_followed(
    tmp_path: Path, subreaper: None, cgroup_name: str, wasm_env: None
) -> None:
    """An error to log (a module that does not compile) with a symlink at the log's name:
    the record is dropped rather than appended to the victim; the exit status still says 1."""
    victim = _victim(tmp_path)
    broken = b"\0asm\x01\0\0\0" + b"\x01\xff\xff\xff\xff\x0f"
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name, wasm=broken)
    log = tmp_path / "log.json"
    log.symlink_to(victim)
    rt = Runtime(tmp_path / "state", log)
    assert _create(rt, bundle, bundle / "p", "l1", tmp_path) == 1
    assert victim.read_bytes() == VICTIM
    assert log.is_symlink()
    assert not (rt.root / "l1").exists()


def test_log_appends_to_a_regular_file_and_refuses_a_symlink(tmp_path: Path) -> None:
    from wasidispatch.runc.log import RuntimeLog

    victim = _victim(tmp_path)
    (tmp_path / "link").symlink_to(victim)
    RuntimeLog(str(tmp_path / "link"), "json").error("boom")
    assert victim.read_bytes() == VICTIM
    RuntimeLog(str(victim), "json").error("boom")  # a real log file is appended to
    assert victim.read_bytes().startswith(VICTIM)
    assert b'"msg": "boom"' in victim.read_bytes()


@pytest.mark.parametrize("at", [STATE_NAME, f".{STATE_NAME}.tmp"])
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_state_file_never_written_through_a_planted_name(
    tmp_path: Path, at: str, kind: str
) -> None:
    victim = _victim(tmp_path)
    directory = tmp_path / "c1"
    directory.mkdir()
    _plant(directory / at, victim, kind)
    state = WasmState("c1", os.getpid(), 1, "/b", "/b/rootfs", "now")
    state.save(str(directory))
    assert victim.read_bytes() == VICTIM
    assert not (directory / STATE_NAME).is_symlink()
    loaded = WasmState.load(str(tmp_path), "c1")
    assert loaded is not None
    assert loaded.pid == os.getpid()


def test_state_load_refuses_a_symlink_or_a_fifo(tmp_path: Path) -> None:
    """`state`/`kill`/`delete` read the state file: a planted symlink is not ours, and a FIFO
    must not block the command."""
    good = tmp_path / "good"
    good.mkdir()
    WasmState("good", os.getpid(), 1, "/b", "/b/rootfs", "now").save(str(good))
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / STATE_NAME).symlink_to(good / STATE_NAME)
    assert WasmState.load(str(tmp_path), "link") is None
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / STATE_NAME)
    assert WasmState.load(str(tmp_path), "fifo") is None


@needs_runtime
@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_state_directory_planted_before_create_is_refused(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None, kind: str
) -> None:
    """``<root>/<id>`` holds exec.fifo and the state file: create makes it exclusively, so a
    symlink (or a directory) planted there is refused as runc does, and nothing is written
    into what it points to."""
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    runtime.root.mkdir(parents=True)
    if kind == "symlink":
        (runtime.root / "d1").symlink_to(victim_dir)
    else:
        (runtime.root / "d1").mkdir()
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    assert _create(runtime, bundle, bundle / "pid", "d1", tmp_path) == 1
    assert runtime.errors() == ["container with id exists: d1"]
    assert list(victim_dir.iterdir()) == []
    assert not (bundle / "pid").exists()
    if kind == "symlink":  # the planted name is the test's, not a container to delete
        (runtime.root / "d1").unlink()
    else:
        (runtime.root / "d1").rmdir()


@needs_runtime
def test_start_does_not_follow_a_symlink_at_exec_fifo(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    """A FIFO planted in place of exec.fifo is never opened by ``start`` (O_NOFOLLOW)."""
    bundle = wasm_bundle(tmp_path / "b", "loop", [], cgroup_name)
    pid_file = bundle / "init.pid"
    assert _create(runtime, bundle, pid_file, "e1", tmp_path) == 0, runtime.errors()
    pid = int(pid_file.read_bytes())
    victim = tmp_path / "victim.fifo"
    os.mkfifo(victim)
    fifo = runtime.root / "e1" / "exec.fifo"
    fifo.unlink()
    fifo.symlink_to(victim)
    assert runtime("start", "e1").returncode == 1
    assert runtime("delete", "--force", "e1").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGKILL
