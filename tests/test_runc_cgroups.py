"""``wasidispatch-runc create`` removes every cgroup it made, whatever fails.

Real cgroups (this machine is hybrid: v1 controllers and a v2 mount), real bad input: a
module that does not compile, an unwritable ``--pid-file``, a ``pids.limit`` the kernel
refuses, a console socket nobody listens on, a SIGTERM while the container process compiles.
The container's ``cgroupsPath`` is nested (``/<top>/pod/c``) so that the ancestors ``create``
made must go too; afterwards ``<top>`` exists in no hierarchy and no process is left.
"""

# The fixtures are test_runc_cli's, imported by name (pytest finds them in the module):
# ruff: noqa: F811
from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_runc_cli import (  # noqa: F401 - fixtures
    RUNC_CMD,
    Runtime,
    _children,
    needs_runtime,
    runtime,
    subreaper,
    wasm_bundle,
    wasm_env,
)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _hierarchies() -> list[Path]:
    return [h for h in CGROUP_ROOT.iterdir() if (h / "cgroup.procs").exists()]


@pytest.fixture
def top() -> Iterator[str]:
    """A unique top-level cgroup name; whatever a failing test left is removed after it."""
    name = f"wasidispatch-test-{uuid.uuid4().hex[:12]}"
    yield name
    for hierarchy in _hierarchies():
        base = hierarchy / name
        if base.is_dir():
            for directory in sorted(
                (Path(d) for d, _, _ in os.walk(base)), key=lambda p: -len(p.parts)
            ):
                directory.rmdir()


def _left(top: str) -> list[str]:
    return [str(h / top) for h in _hierarchies() if (h / top).exists()]


def _edit(bundle: Path, **changes: object) -> None:
    config = json.loads((bundle / "config.json").read_text())
    for dotted, value in changes.items():
        node = config
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    (bundle / "config.json").write_text(json.dumps(config))


def _create(runtime: Runtime, bundle: Path, tmp_path: Path, *extra: str) -> int:
    with (tmp_path / "out").open("wb") as out:
        proc = runtime("create", "--bundle", str(bundle), *extra, "cg", stdout=out)
    assert proc.stderr == ""
    return proc.returncode


BROKEN = b"\0asm\x01\0\0\0" + b"\x01\xff\xff\xff\xff\x0f"  # a section longer than the file


@needs_runtime
def test_nested_cgroups_removed_when_the_module_does_not_compile(
    runtime: Runtime, tmp_path: Path, top: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "hello", [], f"/{top}/pod/c", wasm=BROKEN)
    before = _children()
    assert _create(runtime, bundle, tmp_path) == 1
    assert len(runtime.errors()) == 1
    assert _left(top) == []
    assert _children() <= before


@needs_runtime
def test_nested_cgroups_removed_when_the_pid_file_is_unwritable(
    runtime: Runtime, tmp_path: Path, top: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "hello", [], f"/{top}/pod/c")
    before = _children()
    pid_file = tmp_path / "no-such-dir" / "pid"
    assert _create(runtime, bundle, tmp_path, "--pid-file", str(pid_file)) == 1
    assert "No such file or directory" in runtime.errors()[0]
    assert _left(top) == []
    assert _children() <= before


@needs_runtime
def test_nested_cgroups_removed_when_the_kernel_refuses_a_limit(
    runtime: Runtime, tmp_path: Path, top: str, wasm_env: None
) -> None:
    """A pids limit within int64 but above the kernel's PID_MAX_LIMIT: the write of
    ``pids.max`` fails after directories were made in other hierarchies."""
    bundle = wasm_bundle(tmp_path / "b", "hello", [], f"/{top}/pod/c")
    _edit(bundle, linux__resources__pids={"limit": 10**12})
    assert _create(runtime, bundle, tmp_path) == 1
    assert "pids" in runtime.errors()[0] or "cgroup" in runtime.errors()[0]
    assert _left(top) == []


@needs_runtime
def test_nested_cgroups_removed_when_the_console_socket_fails(
    runtime: Runtime, tmp_path: Path, top: str, wasm_env: None
) -> None:
    """The console is sent after the cgroups are made: nobody listening fails it."""
    bundle = wasm_bundle(tmp_path / "b", "hello", [], f"/{top}/pod/c")
    _edit(bundle, process__terminal=True)
    sock = tmp_path / "nobody.sock"
    assert _create(runtime, bundle, tmp_path, "--console-socket", str(sock)) == 1
    assert "console" in runtime.errors()[0]
    assert _left(top) == []
    assert not (runtime.root / "cg").exists()


def _slow_module() -> bytes:
    """A real module whose compilation takes seconds (thousands of big functions)."""
    import wasmtime

    body = "(local.get 0)" + "(i32.const 7)(i32.mul)(i32.const 3)(i32.add)" * 100
    funcs = "".join(f"(func $f{i} (param i32) (result i32) {body})" for i in range(4000))
    wat = f'(module (memory (export "memory") 1) {funcs} (func (export "_start")))'
    return bytes(wasmtime.wat2wasm(wat))


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(kids - found)
            found |= kids
    return found


@needs_runtime
def test_sigterm_while_the_container_process_prepares_removes_everything(
    tmp_path: Path, subreaper: None, top: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WASIDISPATCH_CACHE", "off")  # compile in the container process, slowly
    bundle = wasm_bundle(tmp_path / "b", "hello", [], f"/{top}/pod/c", wasm=_slow_module())
    rt = Runtime(tmp_path / "state", tmp_path / "log.json")
    before = _children()
    argv = [str(RUNC_CMD), "--root", str(rt.root), "--log", str(rt.log), "--log-format", "json"]
    argv += ["create", "--bundle", str(bundle), "--pid-file", str(bundle / "pid"), "cg"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # wait (no time limit but the test's own) until the container process exists and its
    # cgroup is made, then stop `create` as containerd would
    while proc.poll() is None and not (_descendants(proc.pid) and _left(top)):
        os.sched_yield()
    assert proc.poll() is None, "create finished before the container process compiled"
    assert (rt.root / "cg").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 1
    assert rt.errors() == ["create interrupted by SIGTERM"]
    assert _left(top) == []
    assert not (rt.root / "cg").exists()
    assert not (bundle / "pid").exists()
    assert _children() <= before


@needs_runtime
def test_nested_cgroups_removed_when_fork_fails(
    tmp_path: Path, subreaper: None, top: str, wasm_env: None
) -> None:
    """``create`` itself runs in a pids cgroup allowing one task: its fork of the container
    process fails (EAGAIN) after the container's cgroups were made."""
    jail = CGROUP_ROOT / "pids" / f"{top}-jail"
    if not (CGROUP_ROOT / "pids" / "cgroup.procs").exists():
        pytest.skip("no v1 pids hierarchy to confine create in")
    jail.mkdir()
    try:
        (jail / "pids.max").write_text("1")
        bundle = wasm_bundle(tmp_path / "b", "hello", [], f"/{top}/pod/c")
        rt = Runtime(tmp_path / "state", tmp_path / "log.json")
        argv = [str(RUNC_CMD), "--root", str(rt.root), "--log", str(rt.log)]
        argv += ["--log-format", "json", "create", "--bundle", str(bundle), "cg"]
        launcher = (
            "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
            "os.execv(sys.argv[2], sys.argv[2:])"
        )
        import sys

        proc = subprocess.run(
            [sys.executable, "-c", launcher, str(jail / "cgroup.procs"), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            capture_output=False,
            stderr=subprocess.PIPE,
            check=False,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert "Resource temporarily unavailable" in rt.errors()[0]
        assert _left(top) == []
        assert not (rt.root / "cg").exists()
    finally:
        jail.rmdir()
