"""``wasidispatch-runc`` writing into a closed pipe ends as runc does: killed by SIGPIPE,
silently (``wasidispatch-runc list | head -0``), never a BrokenPipeError traceback or a
"Broken pipe" error in the log."""

# The fixtures are test_runc_cli's, imported by name (pytest finds them in the module):
# ruff: noqa: F811
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.test_runc_cli import (  # noqa: F401 - fixtures
    RUNC,
    RUNC_CMD,
    Runtime,
    cgroup_name,
    create,
    needs_runtime,
    runtime,
    subreaper,
    wait_exit,
    wasm_bundle,
    wasm_env,
)


def _into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write fails with EPIPE
    try:
        return subprocess.run(
            argv, stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, check=False
        )
    finally:
        os.close(write_end)


@pytest.mark.skipif(RUNC is None, reason="needs Debian's runc")
@pytest.mark.parametrize("args", [["features"], ["--version"], ["list"]])
def test_closed_pipe_ends_quietly_as_runc(tmp_path: Path, args: list[str]) -> None:
    argv = ["--root", str(tmp_path / "state"), "--log", str(tmp_path / "log"), *args]
    ours = _into_closed_pipe([str(RUNC_CMD), *argv])
    assert ours.stderr == b""
    assert ours.returncode == -signal.SIGPIPE
    assert not (tmp_path / "log").exists() or (tmp_path / "log").read_text() == ""
    if args != ["--version"]:  # runc's own version output is not ours to compare
        assert RUNC is not None
        assert _into_closed_pipe([RUNC, *argv]).returncode == ours.returncode


@needs_runtime
def test_state_and_ps_of_a_wasm_container_into_a_closed_pipe(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "loop", [], cgroup_name)
    pid = create(runtime, bundle, "pp", tmp_path / "out")
    base = [str(RUNC_CMD), "--root", str(runtime.root), "--log", str(runtime.log)]
    for args in (["state", "pp"], ["ps", "pp"], ["ps", "--format", "json", "pp"]):
        proc = _into_closed_pipe([*base, *args])
        assert proc.stderr == b"", args
        assert proc.returncode == -signal.SIGPIPE, args
    assert runtime.errors() == []
    assert runtime("delete", "--force", "pp").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGKILL
