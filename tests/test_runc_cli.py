"""``wasidispatch-runc`` called directly, as containerd's runc shim calls it.

Every call is a real process running the installed console script, against real bundles and
Debian's real ``runc``. The test process makes itself a child subreaper for the lifecycle
tests, so it inherits the container processes as the shim does and reads their exit status
by waiting on them.
"""

from __future__ import annotations

import ctypes
import json
import os
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
