"""``wasidispatch run``: SIGTERM/SIGHUP stop and delete a real runc container; a Wasm guest that
trapped, timed out or ran out of memory says so on stderr, and `DispatchExecutor.run` carries
the engine's `RunResult`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.guests import build_c, build_wat
from wasidispatch._bundles import busybox_bundle, wasm_bundle
from wasidispatch.cli import main
from wasidispatch.engines import ExitReason
from wasidispatch.executor import (
    ANNOTATION_TIMEOUT,
    DispatchExecutor,
    DispatchRun,
    LinuxExecutor,
    WasmExecutor,
)

needs_runc = pytest.mark.skipif(
    shutil.which("runc") is None or os.geteuid() != 0, reason="needs Debian's runc, as root"
)


def _state_dirs(cid: str) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"wasidispatch-linux-*/{cid}"))


def _container_pid(cid: str) -> tuple[Path, int] | None:
    for state in _state_dirs(cid):
        out = subprocess.run(
            ["runc", "--root", str(state.parent), "state", cid], capture_output=True, text=True
        )
        if out.returncode == 0:
            doc = json.loads(out.stdout)
            if doc.get("status") == "running" and doc.get("pid"):
                return state.parent, int(doc["pid"])
    return None


def _cgroup_dirs(pid: int) -> list[Path]:
    """The cgroup directories of ``pid`` other than the root (v1 hierarchies or v2)."""
    dirs = []
    for line in (Path("/proc") / str(pid) / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if path == "/":
            continue
        for name in controllers.removeprefix("name=").split(",") or [""]:
            d = Path("/sys/fs/cgroup") / name / path.lstrip("/")
            if d.is_dir():
                dirs.append(d)
    return dirs


@needs_runc
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_stops_and_deletes_the_container(tmp_path: Path, signum: int) -> None:
    cid = f"wd-signal-{os.getpid()}-{int(signum)}"
    bundle = busybox_bundle(tmp_path / "b", ["sleep", "3609"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "wasidispatch", "run", "--id", cid, str(bundle)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        found = None
        deadline = time.monotonic() + 30
        while found is None and time.monotonic() < deadline and proc.poll() is None:
            found = _container_pid(cid)
            time.sleep(0.05)
        assert found is not None, "the container never ran"
        root, pid = found
        cgroups = _cgroup_dirs(pid)
        assert cgroups, "the container has no cgroup of its own"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the fix is missing: clean up what the command left
            proc.kill()
            proc.wait()
        for state in _state_dirs(cid):
            subprocess.run(["runc", "--root", str(state.parent), "delete", "--force", cid])
    assert proc.returncode == 128 + signum, stderr
    assert b"Traceback" not in stderr
    assert not root.exists()  # the private runc state directory
    assert not Path(f"/proc/{pid}").exists()  # the container's process
    assert [d for d in cgroups if d.exists()] == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 3609" not in ps


@needs_runc
@pytest.mark.parametrize(
    ("handler", "status"), [("signal.SIG_DFL", -signal.SIGTERM), ("lambda s, f: sys.exit(7)", 7)]
)
def test_library_exec_is_stopped_by_sigterm_then_gets_the_callers_disposition(
    tmp_path: Path, handler: str, status: int
) -> None:
    """In a library caller, exec cleans up, then the caller's disposition of SIGTERM applies:
    the default kills the process by the signal, a handler runs (here it exits 7)."""
    bundle = busybox_bundle(tmp_path / "b", ["sleep", "3610"])
    state = tmp_path / "state"
    code = (
        "import signal, sys\n"
        "from wasidispatch.executor import LinuxExecutor\n"
        f"signal.signal(signal.SIGTERM, {handler})\n"
        f"LinuxExecutor(root={str(state)!r}).exec({str(bundle)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(state.glob("*/state.json")):
            time.sleep(0.05)
        assert any(state.glob("*/state.json")), "container never started"
        time.sleep(0.2)  # not an assertion: lets runc finish starting the init
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listed = subprocess.run(
            ["runc", "--root", str(state), "list", "-q"], capture_output=True, text=True
        )
        for cid in listed.stdout.split():
            subprocess.run(["runc", "--root", str(state), "delete", "--force", cid])
    assert proc.returncode == status, stderr
    assert listed.stdout.strip() == ""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 3610" not in ps


# -- why a guest ended


def _reason_bundles(tmp_path: Path) -> dict[str, tuple[Path, set[ExitReason], str]]:
    return {
        "trap": (
            wasm_bundle(tmp_path / "trap", build_wat("unreachable")),
            {ExitReason.TRAPPED},
            "wasidispatch: trapped: ",
        ),
        "timeout": (
            wasm_bundle(
                tmp_path / "loop", build_wat("loop"), annotations={ANNOTATION_TIMEOUT: "200ms"}
            ),
            {ExitReason.TIMED_OUT},
            "wasidispatch: timed-out: ",
        ),
        "oom": (
            wasm_bundle(tmp_path / "bomb", build_wat("grow_bomb"), memory_limit=4 << 20),
            {ExitReason.OUT_OF_MEMORY},
            "wasidispatch: out-of-memory: ",
        ),
    }


@pytest.mark.parametrize("case", ["trap", "timeout", "oom"])
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_cli_says_why_a_guest_ended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, verbose: bool
) -> None:
    bundle, reasons, prefix = _reason_bundles(tmp_path)[case]
    argv = ["run", "--no-cache", "--engine", "wasmtime", str(bundle)]
    assert main([*argv, "-v"] if verbose else argv) == 137
    lines = capsys.readouterr().err.splitlines()
    why = [line for line in lines if line.startswith(prefix) and "exit code" not in line]
    assert len(why) == 1, lines
    assert why[0].split(": ")[1] in {r.value for r in reasons}
    assert len(why[0].split(": ", 2)[2]) > 0  # the engine's message
    if case == "trap":
        assert "unreachable" in why[0]
    if verbose:
        exit_line = [line for line in lines if "exit code 137" in line]
        assert len(exit_line) == 1
        assert any(f"({r.value})" in exit_line[0] for r in reasons)
    else:
        assert len(lines) == 1


def test_cli_is_silent_for_a_guest_that_exits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = wasm_bundle(tmp_path / "exit", build_wat("exit42"))
    assert main(["run", "--no-cache", "--engine", "wasmtime", str(bundle)]) == 42
    assert capsys.readouterr().err == ""


def test_dispatch_run_carries_the_run_result(tmp_path: Path) -> None:
    executor = DispatchExecutor([WasmExecutor("wasmtime"), LinuxExecutor()])
    bundles = _reason_bundles(tmp_path)
    ran = executor.run(bundles["timeout"][0])
    assert isinstance(ran, DispatchRun)
    assert ran.exit_code == 137
    assert ran.result is not None
    assert ran.result.reason is ExitReason.TIMED_OUT
    assert ran.why is not None
    assert ran.why.startswith("timed-out: ")
    assert ran.decision.executor == "wasm"
    assert ran.seconds > 0
    hello = executor.run(wasm_bundle(tmp_path / "hello", build_c("hello")))
    assert hello.result is not None
    assert hello.result.reason is ExitReason.EXITED
    assert hello.why is None


@needs_runc
def test_dispatch_run_of_a_linux_bundle_has_no_run_result(tmp_path: Path) -> None:
    executor = DispatchExecutor(
        [WasmExecutor("wasmtime"), LinuxExecutor(stdout=subprocess.DEVNULL)]
    )
    ran = executor.run(busybox_bundle(tmp_path / "b", ["sh", "-c", "exit 3"]))
    assert (ran.exit_code, ran.result, ran.why, ran.decision.executor) == (3, None, None, "linux")


def test_an_unusable_default_cache_runs_uncached_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the default cache would live under a regular file: uncreatable
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    bundle = wasm_bundle(tmp_path / "exit", build_wat("exit42"))
    assert main(["run", "--engine", "wasmtime", str(bundle)]) == 42
    err = capsys.readouterr().err
    assert err.startswith("wasidispatch: warning: running without a cache: "), err
    assert not (blocker / "cache").exists()


def test_a_named_cache_that_cannot_be_used_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    bundle = wasm_bundle(tmp_path / "exit", build_wat("exit42"))
    assert main(["run", "--cache", str(blocker / "c"), str(bundle)]) == 1
    assert capsys.readouterr().err.startswith("wasidispatch: error: ")


def test_an_error_naming_a_lone_surrogate_is_printed_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "bundle-\udcff")
    assert main(["explain", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wasidispatch: error: "), err
    assert "\\udcff" in err, err


@pytest.mark.parametrize("engine", ["wasmtime-fast", "wasmtime", "wasmer"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_stops_a_looping_wasm_guest(
    tmp_path: Path, engine: str, signum: signal.Signals
) -> None:
    """The guest loops in native code, where Python runs no signal handler: without the
    wakeup-fd watcher the command would only end at a timeout (there is none here)."""
    bundle = wasm_bundle(tmp_path / "loop", build_wat("loop"))
    cli = Path(sys.executable).with_name("wasidispatch")
    proc = subprocess.Popen(
        [str(cli), "run", "-v", "--no-cache", "--engine", engine, str(bundle)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the decision line: the run is starting
        assert first.startswith("wasidispatch: wasm:"), first
        time.sleep(0.5)  # let the guest enter its loop
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 128 + signum
