"""``wasidispatch-runc`` called directly, as containerd's runc shim calls it.

Every call is a real process running the installed console script, against real bundles and
Debian's real ``runc``. The test process makes itself a child subreaper for the lifecycle
tests, so it inherits the container processes as the shim does and reads their exit status
by waiting on them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wasidispatch import __version__
from wasidispatch.runc.args import UsageError, parse
from wasidispatch.runc.state import WasmState, proc_stat, valid_id

RUNC_CMD = Path(sys.executable).with_name("wasidispatch-runc")
RUNC = shutil.which("runc")
BUSYBOX = shutil.which("busybox")
PR_SET_CHILD_SUBREAPER = 36

needs_runtime = pytest.mark.skipif(
    os.geteuid() != 0 or RUNC is None or BUSYBOX is None or not RUNC_CMD.exists(),
    reason="needs root, Debian's runc and busybox-static, and the installed wasidispatch-runc",
)


# ----------------------------------------------------------------------------- the parser


def test_parse_containerd_create_line() -> None:
    inv = parse(
        [
            "--root",
            "/run/containerd/runc/default",
            "--log",
            "/b/log.json",
            "--log-format",
            "json",
            "--systemd-cgroup",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "--console-socket",
            "/tmp/pty.sock",
            "--preserve-fds",
            "2",
            "c1",
        ]
    )
    assert inv.command == "create"
    assert inv.root == "/run/containerd/runc/default"
    assert (inv.log_path, inv.log_format) == ("/b/log.json", "json")
    assert inv.global_options["systemd-cgroup"] is True
    assert inv.value("bundle") == "/b"
    assert inv.value("pid-file") == "/b/init.pid"
    assert inv.value("console-socket") == "/tmp/pty.sock"
    assert inv.value("preserve-fds") == "2"
    assert inv.args == ["c1"]


def test_parse_defaults_and_reordered_flags() -> None:
    inv = parse(["delete", "c1", "-f"])
    assert (inv.root, inv.log_path, inv.log_format) == ("/run/runc", None, "text")
    assert inv.flag("force")
    assert inv.args == ["c1"]
    assert parse(["kill", "--all=false", "c1", "9"]).flag("all") is False


def test_parse_exec_keeps_the_process_argv() -> None:
    inv = parse(["exec", "-t", "c1", "sh", "-c", "echo hi", "--all"])
    assert inv.flag("tty")
    assert inv.args == ["c1", "sh", "-c", "echo hi", "--all"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-such-flag", "state", "c1"],
        ["kill", "--force", "c1"],
        ["frobnicate", "c1"],
        ["create", "--bundle"],
        ["kill", "--all=maybe", "c1"],
    ],
)
def test_parse_refuses_what_runc_refuses(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(argv)


_VALUE = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"), min_size=1
).filter(lambda s: not s.startswith("-"))


@given(
    root=_VALUE,
    spelling=st.sampled_from(["--{}={}", "-{}={}", "--{} {}", "-{} {}"]),
    all_flag=st.sampled_from(["--all", "-a", "-all", "--all=true", "-a=1"]),
    before=st.booleans(),
    container_id=_VALUE,
)
def test_parse_flag_spellings(
    root: str, spelling: str, all_flag: str, before: bool, container_id: str
) -> None:
    if " " in spelling:
        name_fmt, value_fmt = spelling.split(" ")
        root_words = [name_fmt.format("root"), value_fmt.format(root)]
    else:
        root_words = [spelling.format("root", root)]
    rest = [all_flag, container_id, "KILL"] if before else [container_id, "KILL", all_flag]
    inv = parse([*root_words, "kill", *rest])
    assert inv.root == root
    assert inv.flag("all") is True
    assert inv.args == [container_id, "KILL"]


# ----------------------------------------------------------------------------- state helpers


def test_container_ids_cannot_escape_the_root() -> None:
    assert valid_id("abc_DEF-1.2+x")
    for bad in ("", ".", "..", "a/b", "../x", "a b", "a\nb"):
        assert not valid_id(bad)


def test_state_status_follows_the_process_and_its_start_time(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        stat = proc_stat(proc.pid)
        assert stat is not None
        state = WasmState("c", proc.pid, stat[1], "/b", "/b/rootfs", "now")
        state.save(str(tmp_path))
        loaded = WasmState.load(str(tmp_path.parent), tmp_path.name)
        assert loaded is not None
        assert loaded.pid == proc.pid
        assert loaded.status() == "running"
        (tmp_path / "exec.fifo").touch()
        assert loaded.status() == "created"
        # the same pid with another start time is a recycled pid, not our container
        recycled = WasmState("c", proc.pid, stat[1] + 1, "/b", "/b/rootfs", "now")
        assert recycled.status() == "stopped"
        assert not recycled.alive()
        os.kill(proc.pid, signal.SIGSTOP)
        proc_state = proc_stat(proc.pid)
        while proc_state is not None and proc_state[0] not in "Tt":
            proc_state = proc_stat(proc.pid)
        assert loaded.status() == "paused"
    finally:
        proc.kill()
        proc.wait()
    assert loaded.status() == "stopped"
    assert loaded.oci_state()["pid"] == 0


def test_state_load_ignores_foreign_directories(tmp_path: Path) -> None:
    (tmp_path / "runc-owned").mkdir()
    (tmp_path / "runc-owned" / "state.json").write_text("{}")
    assert WasmState.load(str(tmp_path), "runc-owned") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "wasidispatch.json").write_text('{"id": 1}')
    assert WasmState.load(str(tmp_path), "broken") is None
    assert WasmState.load(str(tmp_path), "../etc") is None


# ----------------------------------------------------------------------------- the command


@dataclass
class Runtime:
    """``wasidispatch-runc`` with a private ``--root`` and a JSON ``--log``."""

    root: Path
    log: Path

    def __call__(
        self,
        *args: str,
        stdin: Any = subprocess.DEVNULL,
        stdout: Any = None,
        pass_fds: tuple[int, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run one subcommand. stdout/stderr go to files, never pipes: after ``create`` the
        container holds them, and waiting for a pipe's EOF would wait for the container."""
        out = self.root.parent / f"out-{uuid.uuid4().hex[:8]}"
        err = out.with_suffix(".err")
        try:
            with out.open("w+") as out_f, err.open("w+") as err_f:
                proc = subprocess.run(
                    [
                        str(RUNC_CMD),
                        "--root",
                        str(self.root),
                        "--log",
                        str(self.log),
                        "--log-format",
                        "json",
                        *args,
                    ],
                    stdout=out_f if stdout is None else stdout,
                    stderr=err_f,
                    stdin=stdin,
                    check=False,
                    pass_fds=pass_fds,
                    timeout=60,
                )
            return subprocess.CompletedProcess(
                proc.args, proc.returncode, out.read_text(), err.read_text()
            )
        finally:
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)

    def errors(self) -> list[str]:
        if not self.log.exists():
            return []
        records = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [r["msg"] for r in records if r["level"] == "error"]

    def state(self, cid: str) -> dict[str, Any]:
        out = self("state", cid)
        assert out.returncode == 0, out.stderr + "\n".join(self.errors())
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc


@pytest.fixture
def subreaper() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def runtime(tmp_path: Path, subreaper: None) -> Iterator[Runtime]:
    rt = Runtime(tmp_path / "state", tmp_path / "log.json")
    yield rt
    leftovers = sorted(p.name for p in rt.root.iterdir()) if rt.root.exists() else []
    for cid in leftovers:
        rt("delete", "--force", cid)
    assert leftovers == [], "containers left behind"


@pytest.fixture
def cgroup_name() -> Iterator[str]:
    """A unique top-level cgroup path; the test asserts it is gone in every hierarchy."""
    name = f"wasidispatch-test-{uuid.uuid4().hex[:12]}"
    yield f"/{name}"
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        left = hierarchy / name
        if left.is_dir():
            left.rmdir()


def cgroup_dirs(path: str) -> list[Path]:
    return [
        p for p in (h / path.lstrip("/") for h in Path("/sys/fs/cgroup").iterdir()) if p.is_dir()
    ]


def linux_bundle(directory: Path, args: list[str], cgroups_path: str) -> Path:
    """A busybox bundle from Debian's busybox-static and ``runc spec``'s template."""
    assert BUSYBOX is not None
    assert RUNC is not None
    (directory / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, directory / "rootfs" / "bin" / "busybox")
    for applet in ("sh", "echo", "sleep", "cat"):
        (directory / "rootfs" / "bin" / applet).symlink_to("busybox")
    subprocess.run([RUNC, "spec", "--bundle", str(directory)], check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    config["root"]["readonly"] = True
    config["linux"]["cgroupsPath"] = cgroups_path
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def wait_exit(pid: int) -> int:
    """The exit status as containerd reports it: the code, or 128+signal."""
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def test_version_names_us_and_the_real_runc() -> None:
    out = subprocess.run([str(RUNC_CMD), "--version"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == f"wasidispatch-runc version {__version__}"
    if RUNC is not None:
        runc_version = subprocess.run(
            [RUNC, "--version"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        assert f"runc: {runc_version.removeprefix('runc version ')}" in lines


@pytest.mark.skipif(RUNC is None, reason="needs Debian's runc")
def test_features_are_runcs_plus_ours() -> None:
    assert RUNC is not None
    ours = json.loads(
        subprocess.run([str(RUNC_CMD), "features"], capture_output=True, check=True).stdout
    )
    theirs = json.loads(subprocess.run([RUNC, "features"], capture_output=True, check=True).stdout)
    assert ours["annotations"]["io.github.wasidispatch.version"] == __version__
    assert ours["hooks"] == theirs["hooks"]
    assert ours["ociVersionMax"] == theirs["ociVersionMax"]


@needs_runtime
def test_linux_container_lifecycle_is_runcs(
    runtime: Runtime, tmp_path: Path, cgroup_name: str
) -> None:
    bundle = linux_bundle(tmp_path / "b", ["sh", "-c", "read x; echo got-$x; exit 3"], cgroup_name)
    pid_file = tmp_path / "init.pid"
    stdin_r, stdin_w = os.pipe()
    out_path = tmp_path / "stdout"
    with out_path.open("wb") as out:
        created = runtime(
            "create",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(pid_file),
            "c1",
            stdin=stdin_r,
            stdout=out,
        )
    os.close(stdin_r)
    assert created.returncode == 0, runtime.errors()
    raw = pid_file.read_bytes()
    assert raw.isdigit(), raw  # digits only: containerd refuses a trailing newline
    pid = int(raw)
    # runc's own state file: the container was handed over, not run by us
    assert (runtime.root / "c1" / "state.json").exists()
    assert not (runtime.root / "c1" / "wasidispatch.json").exists()
    state = runtime.state("c1")
    assert (state["status"], state["pid"], state["bundle"]) == ("created", pid, str(bundle))
    assert any(
        (d / "cgroup.procs").read_text().split() == [str(pid)] for d in cgroup_dirs(cgroup_name)
    )

    assert runtime("start", "c1").returncode == 0
    os.write(stdin_w, b"ping\n")
    os.close(stdin_w)
    assert wait_exit(pid) == 3
    assert out_path.read_text() == "got-ping\n"
    assert runtime.state("c1")["status"] == "stopped"
    assert runtime("delete", "c1").returncode == 0
    assert not (runtime.root / "c1").exists()
    assert cgroup_dirs(cgroup_name) == []


@needs_runtime
def test_linux_kill_and_delete_go_to_runc(
    runtime: Runtime, tmp_path: Path, cgroup_name: str
) -> None:
    bundle = linux_bundle(tmp_path / "b", ["sleep", "60"], cgroup_name)
    pid_file = tmp_path / "init.pid"
    assert runtime("create", "-b", str(bundle), "--pid-file", str(pid_file), "c2").returncode == 0
    pid = int(pid_file.read_text())
    assert runtime("start", "c2").returncode == 0
    assert runtime.state("c2")["status"] == "running"
    assert json.loads(runtime("ps", "--format", "json", "c2").stdout) == [pid]

    refused = runtime("delete", "c2")
    assert refused.returncode != 0
    assert any("not stopped" in msg for msg in runtime.errors())  # runc's message, in the log

    assert runtime("kill", "c2", "KILL").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGKILL
    assert runtime("kill", "--all", "c2", "9").returncode == 0
    assert runtime("delete", "c2").returncode == 0
    assert runtime("delete", "--force", "c2").returncode == 0  # containerd's cleanup call
    assert cgroup_dirs(cgroup_name) == []


@needs_runtime
def test_unknown_ids_go_to_runc(runtime: Runtime) -> None:
    out = runtime("state", "nobody")
    assert out.returncode != 0
    assert any("does not exist" in msg for msg in runtime.errors())
    assert runtime("delete", "--force", "nobody").returncode == 0
    # a directory without state (an aborted create): runc removes it
    (runtime.root / "half").mkdir(parents=True)
    assert runtime("delete", "--force", "half").returncode == 0
    assert not (runtime.root / "half").exists()


# ----------------------------------------------------------------------------- Wasm containers


def wasm_bundle(
    directory: Path,
    guest: str,
    args: list[str],
    cgroups_path: str,
    *,
    memory_limit: int | None = None,
    annotations: dict[str, str] | None = None,
    wasm: bytes | None = None,
) -> Path:
    """A bundle whose rootfs holds one C guest as ``/app.wasm``; ``runc spec``'s template."""
    from tests.guests import build_c

    assert RUNC is not None
    (directory / "rootfs").mkdir(parents=True)
    data = build_c(guest).read_bytes() if wasm is None else wasm
    (directory / "rootfs" / "app.wasm").write_bytes(data)
    subprocess.run([RUNC, "spec", "--bundle", str(directory)], check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/app.wasm", *args]
    config["linux"]["cgroupsPath"] = cgroups_path
    if memory_limit is not None:
        config["linux"]["resources"]["memory"] = {"limit": memory_limit}
    if annotations:
        config["annotations"] = annotations
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def wasm_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private precompile cache for the runtime processes."""
    monkeypatch.setenv("WASIDISPATCH_CACHE_DIR", str(tmp_path / "cache"))


def create(runtime: Runtime, bundle: Path, cid: str, out: Path) -> int:
    pid_file = bundle / "init.pid"
    with out.open("wb") as out_f:
        proc = runtime(
            "create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid, stdout=out_f
        )
    assert proc.returncode == 0, runtime.errors()
    raw = pid_file.read_bytes()
    assert raw.isdigit(), raw
    return int(raw)


@needs_runtime
def test_wasm_container_lifecycle(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    limit = 256 * 1024 * 1024
    bundle = wasm_bundle(
        tmp_path / "b", "hello", [], cgroup_name, memory_limit=limit, annotations={"a": "1"}
    )
    out = tmp_path / "stdout"
    pid = create(runtime, bundle, "w1", out)
    # our state, not runc's: the container was dispatched to Wasm
    assert (runtime.root / "w1" / "wasidispatch.json").exists()
    assert not (runtime.root / "w1" / "state.json").exists()
    state = runtime.state("w1")
    assert set(state) == {
        "ociVersion",
        "id",
        "pid",
        "status",
        "bundle",
        "rootfs",
        "created",
        "owner",
        "annotations",
    }
    assert (state["id"], state["pid"], state["status"]) == ("w1", pid, "created")
    assert (state["bundle"], state["rootfs"]) == (str(bundle), str(bundle / "rootfs"))
    assert state["annotations"] == {"a": "1"}
    dirs = cgroup_dirs(cgroup_name)
    assert dirs, "no cgroup created"
    for d in dirs:
        assert (d / "cgroup.procs").read_text().split() == [str(pid)]
    memory = Path("/sys/fs/cgroup/memory") / cgroup_name.lstrip("/")
    if memory.is_dir():
        assert int((memory / "memory.limit_in_bytes").read_text()) == limit
    assert out.read_bytes() == b""  # the runtime prints nothing on the container's stdio

    assert runtime("start", "w1").returncode == 0
    assert wait_exit(pid) == 0
    assert out.read_text() == "hello from wasi\n"
    assert runtime.state("w1")["status"] == "stopped"
    assert runtime("start", "w1").returncode == 1
    assert runtime.errors()[-1] == "cannot start a container that has stopped"
    assert runtime("delete", "w1").returncode == 0
    assert not (runtime.root / "w1").exists()
    assert cgroup_dirs(cgroup_name) == []


@needs_runtime
def test_wasm_container_runs_uncached_when_the_cache_dir_is_unusable(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the cache directory would live under a regular file
    monkeypatch.setenv("WASIDISPATCH_CACHE_DIR", str(blocker / "cache"))
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    out = tmp_path / "out"
    pid = create(runtime, bundle, "w-nocache", out)
    assert runtime("start", "w-nocache").returncode == 0
    assert wait_exit(pid) == 0
    assert out.read_text() == "hello from wasi\n"
    records = [json.loads(line) for line in runtime.log.read_text().splitlines() if line]
    assert any(
        r["level"] == "warning" and "running without a precompile cache" in r["msg"]
        for r in records
    ), records
    assert runtime("delete", "w-nocache").returncode == 0


@needs_runtime
def test_wasm_exit_code_is_the_guests(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "exit", ["7"], cgroup_name)
    pid = create(runtime, bundle, "w2", tmp_path / "out")
    assert runtime("start", "w2").returncode == 0
    assert wait_exit(pid) == 7
    assert runtime("delete", "w2").returncode == 0


@needs_runtime
def test_wasm_kill_stops_the_guest(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "loop", [], cgroup_name)
    pid = create(runtime, bundle, "w3", tmp_path / "out")
    assert runtime("start", "w3").returncode == 0
    assert runtime.state("w3")["status"] == "running"
    assert json.loads(runtime("ps", "--format", "json", "w3").stdout) == [pid]
    table = runtime("ps", "w3").stdout.splitlines()
    assert "PID" in table[0].split()
    assert [line.split()[1] for line in table[1:]] == [str(pid)]  # ps -ef: PID is column 2

    assert runtime("delete", "w3").returncode == 1
    assert runtime.errors()[-1] == "cannot delete container w3 that is not stopped: running"
    assert runtime("pause", "w3").returncode == 0
    assert runtime.state("w3")["status"] == "paused"
    assert runtime("resume", "w3").returncode == 0
    assert runtime.state("w3")["status"] == "running"

    assert runtime("kill", "w3", "TERM").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGTERM
    assert runtime.state("w3") == {**runtime.state("w3"), "status": "stopped", "pid": 0}
    assert runtime("kill", "w3", "KILL").returncode == 1
    assert runtime.errors()[-1] == "container not running"
    # containerd's cleanup after exit: kill --all, delete, then delete --force
    assert runtime("kill", "--all", "w3", "9").returncode == 0
    assert runtime("delete", "w3").returncode == 0
    assert runtime("delete", "--force", "w3").returncode == 0
    assert not (runtime.root / "w3").exists()
    assert cgroup_dirs(cgroup_name) == []


@needs_runtime
def test_wasm_delete_force_kills_a_running_guest(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "loop", [], cgroup_name)
    pid = create(runtime, bundle, "w4", tmp_path / "out")
    assert runtime("start", "w4").returncode == 0
    assert runtime("exec", "w4", "/app.wasm").returncode == 1
    assert runtime.errors()[-1] == "exec is not supported for Wasm containers"
    assert runtime("delete", "--force", "w4").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGKILL
    assert not (runtime.root / "w4").exists()
    assert cgroup_dirs(cgroup_name) == []


@needs_runtime
def test_wasm_delete_of_a_created_container_kills_it(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    out = tmp_path / "out"
    pid = create(runtime, bundle, "w5", out)
    assert runtime("delete", "w5").returncode == 0  # runc deletes a created container too
    assert wait_exit(pid) == 128 + signal.SIGKILL
    assert out.read_bytes() == b""  # it never ran
    assert not (runtime.root / "w5").exists()


@needs_runtime
def test_wasm_create_failure_is_logged_and_leaves_nothing(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    broken = b"\0asm\x01\0\0\0" + b"\x01\xff\xff\xff\xff\x0f"  # a section longer than the file
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name, wasm=broken)
    out = tmp_path / "out"
    children_before = _children()
    with out.open("wb") as out_f:
        proc = runtime(
            "create", "--bundle", str(bundle), "--pid-file", str(bundle / "p"), "w6", stdout=out_f
        )
    assert proc.returncode == 1
    assert len(runtime.errors()) == 1
    assert runtime.errors()[0]  # the engine's reason, shown by containerd
    assert out.read_bytes() == b""
    assert proc.stderr == ""  # with --log, nothing on stderr (the container's stderr)
    assert not (bundle / "p").exists()
    assert not (runtime.root / "w6").exists()
    assert cgroup_dirs(cgroup_name) == []
    assert _children() <= children_before  # no container process was left to us


@needs_runtime
def test_wasm_create_with_an_unwritable_pid_file_leaves_no_process(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    """The container process is already waiting on exec.fifo when the pid file fails: it is
    killed and reaped, not left orphaned with no state to find it by."""
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    pid_file = tmp_path / "no-such-dir" / "p"
    children_before = _children()
    with (tmp_path / "out").open("wb") as out_f:
        proc = runtime(
            "create", "--bundle", str(bundle), "--pid-file", str(pid_file), "w7", stdout=out_f
        )
    assert proc.returncode == 1
    assert len(runtime.errors()) == 1
    assert "No such file or directory" in runtime.errors()[0]
    assert not (runtime.root / "w7").exists()
    assert cgroup_dirs(cgroup_name) == []
    assert _children() <= children_before


def _children() -> set[int]:
    """This process's children (other fixtures, e.g. a registry, may have some of their own)."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


@needs_runtime
def test_wasm_container_keeps_only_stdio_and_preserved_fds(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "loop", [], cgroup_name)
    r3, w3 = os.pipe()
    r4, w4 = os.pipe()
    pid_file = bundle / "init.pid"
    # fd 3 and 4 of `create`, as the shim's socket is its fd 3; --preserve-fds 1 keeps fd 3
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    argv = [sys.executable, "-c", launcher, str(r3), str(r4), str(RUNC_CMD)]
    argv += ["--root", str(runtime.root), "--log", str(runtime.log), "--log-format", "json"]
    argv += ["create", "--preserve-fds", "1", "-b", str(bundle), "--pid-file", str(pid_file), "w7"]
    subprocess.run(
        argv, pass_fds=(r3, r4), check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    pid = int(pid_file.read_text())
    links = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert links[3] == os.readlink(f"/proc/self/fd/{r3}")
    assert os.readlink(f"/proc/self/fd/{r4}") not in links.values()
    assert not any(link.startswith("socket:") for link in links.values())
    for fd in (r3, w3, r4, w4):
        os.close(fd)
    assert runtime("delete", "--force", "w7").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGKILL


@needs_runtime
def test_wasm_state_kill_delete_import_no_heavy_modules(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "loop", [], cgroup_name)
    pid = create(runtime, bundle, "w8", tmp_path / "out")
    probe = (
        "import sys, json; from wasidispatch.runc.cli import main; "
        "code = main(sys.argv[1:]); "
        "heavy = sorted(m for m in ('pydantic', 'wasmtime', 'wasidispatch.executor', "
        "'wasidispatch.oci', 'cffi', 'typing', 'dataclasses', 'wasidispatch._fs', "
        "'wasidispatch._binfmt', 'wasidispatch.runc.spec') if m in sys.modules); "
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)"
    )
    base = ["--root", str(runtime.root), "--log", str(runtime.log), "--log-format", "json"]
    for args in (["state", "w8"], ["start", "w8"], ["kill", "w8", "KILL"], ["delete", "w8"]):
        if args[0] == "delete":
            assert wait_exit(pid) == 128 + signal.SIGKILL
        proc = subprocess.run(
            [sys.executable, "-c", probe, *base, *args], capture_output=True, text=True, check=True
        )
        report = json.loads(proc.stderr.splitlines()[-1])
        assert report == {"code": 0, "heavy": []}, (args, report)
    assert not (runtime.root / "w8").exists()


# ----------------------------------------------------------------------------- the lean spec


def _rich_bundle(directory: Path, args0: str) -> Path:
    """A bundle using every field the Wasm mapping reads."""
    from tests.guests import build_c

    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "data").mkdir()
    app = rootfs / "bin" / "app.wasm"
    app.write_bytes(build_c("hello").read_bytes())
    app.chmod(0o755)
    (directory / "shared").mkdir()
    (directory / "hosts").write_text("")
    config = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": True},
        "process": {
            "cwd": "/data",
            "args": [args0, "one", "two words"],
            "env": ["PATH=/sbin:/bin", "A=1", "A=2", "EMPTY=", "BARE"],
            "user": {"uid": 0, "gid": 0},
        },
        "mounts": [
            {"destination": "/ro", "source": "shared", "type": "bind", "options": ["rbind", "ro"]},
            {"destination": "/rw", "source": str(directory / "shared"), "options": ["bind"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/etc/hosts", "source": str(directory / "hosts"), "options": ["bind"]},
        ],
        "annotations": {"dev.wasidispatch.timeout": "1500ms", "other": "x"},
        "linux": {"resources": {"memory": {"limit": 64 * 1024 * 1024}}, "cgroupsPath": "/x/y"},
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("args0", ["/bin/app.wasm", "app.wasm", "../bin/app.wasm#_start"])
def test_lean_bundle_decides_and_maps_like_the_models(tmp_path: Path, args0: str) -> None:
    from wasidispatch.executor import WasmExecutor, decide
    from wasidispatch.oci.bundle import Bundle
    from wasidispatch.runc.spec import LeanBundle

    directory = _rich_bundle(tmp_path / "b", args0)
    full, lean = Bundle.load(directory), LeanBundle.load(directory)
    decision = decide(full)
    assert decision.kind == "wasm"
    assert decide(lean) == decision
    executor = WasmExecutor("wasmtime")
    expected = executor.workload(full)
    assert executor.workload(lean) == expected
    assert executor.workload(lean, entrypoint=decision.entrypoint) == expected
    assert expected.limits.timeout == 1.5  # the fields really were mapped
    assert len(expected.preopens) == 3
    assert expected.env == {"PATH": "/sbin:/bin", "A": "2", "EMPTY": "", "BARE": ""}
    planned_full, planned_lean = executor.plan(full), WasmExecutor("wasmtime").plan(lean)
    assert planned_lean.workload == planned_full.workload
    assert planned_lean.decision == planned_full.decision
    assert full.spec.linux is not None
    assert lean.spec.linux is not None
    assert lean.spec.linux.cgroups_path == full.spec.linux.cgroups_path == "/x/y"
    assert lean.annotations == dict(full.annotations)


def test_linux_fast_check_resolves_as_decide_does(tmp_path: Path) -> None:
    """The check that hands plainly Linux bundles to runc finds the entrypoint with the same
    code as `decide`: a non-executable ELF earlier on PATH is skipped (execvp would skip it),
    so the executable Wasm file later on PATH decides."""
    from wasidispatch.executor import decide
    from wasidispatch.runc.spec import LeanBundle
    from wasidispatch.runc.wasm_container import _plainly_linux

    elf = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00" + bytes(44)
    rootfs = tmp_path / "rootfs"
    for directory, data, mode in (("a", elf, 0o644), ("b", b"\0asm\1\0\0\0", 0o755)):
        (rootfs / directory).mkdir(parents=True)
        (rootfs / directory / "app").write_bytes(data)
        (rootfs / directory / "app").chmod(mode)
    config = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"cwd": "/", "args": ["app"], "env": ["PATH=/a:/b"]},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not _plainly_linux(str(tmp_path))
    decision = decide(LeanBundle.load(tmp_path))
    assert decision.kind == "wasm"
    assert decision.entrypoint == (rootfs / "b" / "app").resolve()
    (rootfs / "a" / "app").chmod(0o755)  # now execvp would run the ELF
    assert _plainly_linux(str(tmp_path))
    assert decide(LeanBundle.load(tmp_path)).kind == "linux"


def test_lean_bundle_refuses_what_cannot_run(tmp_path: Path) -> None:
    from wasidispatch.errors import SpecError
    from wasidispatch.runc.spec import LeanBundle

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError):
        LeanBundle.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"root": {"path": "missing"}}))
    with pytest.raises(SpecError, match="not a directory"):
        LeanBundle.load(tmp_path)
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
    with pytest.raises(SpecError, match="nothing to run"):
        LeanBundle.load(tmp_path).resolve_entrypoint()


@pytest.mark.parametrize("absolute", [False, True])
def test_lean_bundle_locates_the_rootfs_as_the_models_do(tmp_path: Path, absolute: bool) -> None:
    """``root.path`` relative to the bundle, or absolute anywhere: both views agree."""
    from wasidispatch.oci.bundle import Bundle
    from wasidispatch.runc.spec import LeanBundle

    rootfs = tmp_path / "elsewhere" / "rootfs" if absolute else tmp_path / "b" / "fs"
    rootfs.mkdir(parents=True)
    (tmp_path / "b").mkdir(exist_ok=True)
    root_path = str(rootfs) if absolute else "fs"
    config = {"ociVersion": "1.0.2", "root": {"path": root_path}}
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    assert LeanBundle.load(tmp_path / "b").rootfs == Bundle.load(tmp_path / "b").rootfs == rootfs


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"process": {"cwd": "/", "args": "/app.wasm"}}, "process.args: not a list of strings"),
        ({"process": {"cwd": 1, "args": ["/a"]}}, "process.cwd: not a string"),
        ({"process": {"cwd": "/", "env": [1]}}, "process.env: not a list of strings"),
        ({"process": []}, "process: not an object"),
        ({"root": {"path": "rootfs", "readonly": "yes"}}, "root.readonly: not a boolean"),
        ({"mounts": [{"source": "/x"}]}, "mounts.0.destination: not set"),
        ({"mounts": [{"destination": "/d", "options": "ro"}]}, "mounts.0.options: not a list"),
        ({"mounts": {"destination": "/d"}}, "mounts: not a list of objects"),
        ({"linux": {"resources": {"memory": {"limit": "1G"}}}}, "memory.limit: not an integer"),
        ({"linux": {"resources": {"memory": {"limit": True}}}}, "memory.limit: not an integer"),
        ({"annotations": {"a": 1}}, "annotations: not a map of strings"),
    ],
)
def test_lean_bundle_refuses_wrong_json_types(
    tmp_path: Path, patch: dict[str, object], message: str
) -> None:
    """Every field the executor reads is type-checked when the bundle is loaded, as the
    models check it: a `SpecError` naming config.json and the field, never a TypeError."""
    from wasidispatch.errors import SpecError
    from wasidispatch.oci.bundle import Bundle
    from wasidispatch.runc.spec import LeanBundle

    (tmp_path / "rootfs").mkdir()
    config = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, **patch}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=message.replace(".", r"\.")) as caught:
        LeanBundle.load(tmp_path)
    assert str(tmp_path / "config.json") in str(caught.value)
    with pytest.raises(SpecError):  # the models refuse the same config.json
        Bundle.load(tmp_path)


@needs_runtime
def test_wasm_run_waits_and_cleans_up(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "exit", ["5"], cgroup_name)
    proc = runtime("run", "--bundle", str(bundle), "w9")
    assert proc.returncode == 5, runtime.errors()
    assert not (runtime.root / "w9").exists()
    assert cgroup_dirs(cgroup_name) == []


@needs_runtime
def test_wasm_terminal_goes_to_the_console_socket(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    import socket

    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = True
    (bundle / "config.json").write_text(json.dumps(config))
    assert runtime("create", "-b", str(bundle), "w10").returncode == 1
    assert "console socket" in runtime.errors()[-1]

    path = tmp_path / "console.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        pid_file = bundle / "init.pid"
        created = runtime(
            "create",
            "-b",
            str(bundle),
            "--console-socket",
            str(path),
            "--pid-file",
            str(pid_file),
            "w10",
        )
        assert created.returncode == 0, runtime.errors()
        conn, _ = server.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 64, 1)
    (master,) = fds
    try:
        assert os.isatty(master)
        pid = int(pid_file.read_text())
        assert runtime("start", "w10").returncode == 0
        output = b""
        while True:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the terminal's last user is gone
                break
            if not chunk:
                break
            output += chunk
        assert output == b"hello from wasi\r\n"
        assert wait_exit(pid) == 0
    finally:
        os.close(master)
    assert runtime("delete", "w10").returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write cgroup.procs")
def test_cgroup_prewarm_is_a_no_op_migration() -> None:
    from wasidispatch.runc.cgroups import Hierarchy, prewarm

    before = Path("/proc/self/cgroup").read_text()
    assert prewarm() is True
    assert Path("/proc/self/cgroup").read_text() == before
    assert prewarm([]) is False
    assert prewarm([Hierarchy("/nonexistent-cgroup-mount", 1, frozenset({"cpu"}))]) is False


def test_cgroup_hierarchies_from_mountinfo(tmp_path: Path) -> None:
    from wasidispatch.runc.cgroups import hierarchies

    pure_v2 = tmp_path / "v2"
    pure_v2.write_text(
        "24 18 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        "25 24 0:22 /sub /mnt/again rw - cgroup2 cgroup2 rw\n"
        "26 18 0:5 / /proc rw - proc proc rw\n"
    )
    found = hierarchies(str(pure_v2))
    assert [(h.mountpoint, h.version) for h in found] == [("/sys/fs/cgroup", 2)]
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    got = {h.mountpoint: (h.version, sorted(h.controllers)) for h in hierarchies(str(hybrid))}
    assert got == {
        "/sys/fs/cgroup/cpu,cpuacct": (1, ["cpu", "cpuacct"]),
        "/sys/fs/cgroup/memory": (1, ["memory"]),
        "/sys/fs/cgroup/systemd": (1, ["name=systemd"]),
        "/sys/fs/cgroup/unified": (2, []),
    }


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("system.slice:docker:abc", "/system.slice/docker-abc.scope"),
        (":cri:abc", "/system.slice/cri-abc.scope"),
        ("-.slice:p:n", "/p-n.scope"),
        ("a-b.slice::c", "/a.slice/a-b.slice/c.scope"),
        ("a.slice:p:x.slice", "/a.slice/x.slice"),
    ],
)
def test_systemd_cgroup_paths(path: str, expected: str) -> None:
    from wasidispatch.runc.cgroups import expand_systemd

    assert expand_systemd(path) == expected


@pytest.mark.parametrize("path", ["a:b", "a.slice:b:../x", "noslice:p:n", "a.slice:p:"])
def test_systemd_cgroup_paths_refused(path: str) -> None:
    from wasidispatch.runc.cgroups import CgroupError, expand_systemd

    with pytest.raises(CgroupError):
        expand_systemd(path)


@needs_runtime
def test_wasm_relative_cgroups_path_is_below_the_callers_cgroup(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    relative = cgroup_name.lstrip("/")
    bundle = wasm_bundle(tmp_path / "b", "loop", [], relative)
    pid = create(runtime, bundle, "w11", tmp_path / "out")
    own = dict(
        (ctrl, path)
        for _, ctrl, path in (
            line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()
        )
    )
    theirs = dict(
        (ctrl, path)
        for _, ctrl, path in (
            line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        )
    )
    assert own.keys() == theirs.keys()
    for ctrl, path in theirs.items():
        assert path == posixpath.join(own[ctrl], relative), ctrl
    assert runtime("delete", "--force", "w11").returncode == 0
    assert wait_exit(pid) == 128 + signal.SIGKILL
    state = WasmState.load(str(runtime.root), "w11")
    assert state is None
    for ctrl, path in theirs.items():
        mount = "unified" if ctrl == "" else ctrl.replace("name=", "")
        assert not Path("/sys/fs/cgroup", mount, path.lstrip("/")).exists()
