"""What the later subcommands read: the state file and the signal argument.

A state file that `WasmState.save` did not write (wrong types, relative cgroup paths) is not
acted on: ``delete`` would rmdir its "cgroups" and ``kill`` signal its "pid". A signal is
ASCII digits or a name, as runc parses it.
"""

# The fixtures are test_runc_cli's, imported by name (pytest finds them in the module):
# ruff: noqa: F811
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.test_runc_cli import (  # noqa: F401 - fixtures
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
from wasidispatch.runc.state import STATE_NAME, WasmState

GOOD: dict[str, Any] = {
    "id": "c",
    "pid": os.getpid(),
    "pid_start": 1,
    "bundle": "/b",
    "rootfs": "/b/rootfs",
    "created": "now",
    "owner": "",
    "annotations": {},
    "cgroups": ["/sys/fs/cgroup/memory/c"],
}


@pytest.mark.parametrize(
    "patch",
    [
        {"cgroups": "abc"},  # list("abc"): rmdir of "a", "b", "c" relative to the cwd
        {"cgroups": ["relative/dir"]},
        {"cgroups": [1]},
        {"pid": True},
        {"pid": 0},
        {"pid": -1},
        {"pid": 1.5},
        {"pid_start": "1"},
        {"annotations": {"a": 1}},
        {"bundle": 3},
    ],
)
def test_state_not_written_by_save_is_not_ours(tmp_path: Path, patch: dict[str, Any]) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / STATE_NAME).write_text(json.dumps({**GOOD, **patch}))
    assert WasmState.load(str(tmp_path), "c") is None


def test_state_written_by_save_loads(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / STATE_NAME).write_text(json.dumps(GOOD))
    loaded = WasmState.load(str(tmp_path), "c")
    assert loaded is not None
    assert loaded.cgroups == GOOD["cgroups"]


@needs_runtime
def test_kill_refuses_a_non_ascii_digit_signal(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    """ "١" (Arabic-Indic one) passed str.isdigit and int(): it sent SIGHUP."""
    bundle = wasm_bundle(tmp_path / "b", "loop", [], cgroup_name)
    pid = create(runtime, bundle, "k1", tmp_path / "out")
    proc = runtime("kill", "k1", "\u0661")
    assert proc.returncode == 1
    assert runtime.errors() == ["unknown signal '\u0661'"]
    assert runtime.state("k1")["status"] == "created"
    assert runtime("delete", "--force", "k1").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGKILL
