"""End to end: containerd runs Wasm and Linux containers through our shim v2.

A private containerd (every path under a temporary directory, see
`tests.containerd_harness`; its own namespace, debug logs so that the shims' logs land in
``containerd.log``) imports a busybox image and a Wasm image built here, and ``ctr`` drives
``io.containerd.wasidispatch.v1`` (``containerd-shim-wasidispatch-v1`` from the virtualenv):
output and exit codes, ``ctr task kill`` (SIGTERM, SIGKILL, ``--all``), ``ctr task ps``,
pause/resume, failing creates, and several containers of one group (the
``io.kubernetes.cri.sandbox-id`` annotation) served by one shim process, Wasm and Linux
together. The Linux cases also run through containerd's stock ``io.containerd.runc.v2``:
the same assertions hold for the shim we replace.

After every test no task, container, process, cgroup, mount, runtime state dir, shim socket
or FIFO directory is left; after the module, containerd is still alive, then stopped, and
its directory is gone.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd_harness import (
    GROUP_ANNOTATION,
    RUNC_RUNTIME,
    SHIM_BINARY,
    SHIM_RUNC_ROOT,
    SHIM_RUNTIME,
    PrivateContainerd,
    busybox_layout,
    missing_requirements,
    missing_shim,
    wasm_layout,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

needs_shim = pytest.mark.skipif(missing_shim() is not None, reason=str(missing_shim()))
RUNTIMES = [
    pytest.param(RUNC_RUNTIME, id="runc.v2"),
    pytest.param(SHIM_RUNTIME, id="wasidispatch", marks=needs_shim),
]
EMPTY: dict[str, list[str]] = {
    "state": [],
    "cgroups": [],
    "processes": [],
    "mounts": [],
    "sockets": [],
    "fifos": [],
}


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    daemon = PrivateContainerd(namespace=f"wdx-e2e-{uuid.uuid4().hex[:8]}", debug=True)
    try:
        daemon.start()
        yield daemon
        assert daemon.alive(), daemon.log()
        assert daemon.settle() == EMPTY
    finally:
        daemon.stop()
    assert not daemon.base.exists()
    assert daemon.processes() == []
    assert daemon.cgroups() == []
    assert not (SHIM_RUNC_ROOT / daemon.namespace).exists()


@pytest.fixture(scope="module")
def images(containerd: PrivateContainerd) -> dict[str, str]:
    from tests.guests import build_c

    guests = {f"{name}.wasm": build_c(name).read_bytes() for name in ("hello", "exit", "loop")}
    hello = guests["hello.wasm"]
    guests["broken.wasm"] = hello[: len(hello) // 2]  # a real module cut short: no compile
    base = containerd.base
    return {
        "linux": containerd.import_layout(
            busybox_layout(base / "busybox-layout"), "localhost/wasidispatch/busybox"
        ),
        "wasm": containerd.import_layout(
            wasm_layout(base / "wasm-layout", guests, "/hello.wasm"), "localhost/wasidispatch/wasm"
        ),
    }


@pytest.fixture
def clean(containerd: PrivateContainerd) -> Iterator[PrivateContainerd]:
    """The daemon, checked afterwards: nothing of any container left (what a failed test
    left is removed, then reported)."""
    yield containerd
    tasks = containerd.ctr("tasks", "ls", "-q").stdout.split()
    containers = containerd.ctr("containers", "ls", "-q").stdout.split()
    for cid in containers:
        containerd.remove(cid)
    left = containerd.settle()
    assert (tasks, containers) == ([], [])
    assert left == EMPTY, containerd.log()


def _started(d: PrivateContainerd, image: str, cid: str, *args: str, **kw: object) -> int:
    """``ctr run -d`` and wait for RUNNING; returns the task's pid."""
    out = d.run(image, cid, *args, detach=True, **kw)  # type: ignore[arg-type]
    assert out.returncode == 0, f"{out.stderr}\n{d.log()}"
    assert d.wait_status(cid, "RUNNING") == "RUNNING", d.log()
    pid = d.task_pid(cid)
    assert pid > 0
    return pid


def _stopped(d: PrivateContainerd, cid: str) -> int:
    """Wait for STOPPED in ``ctr task ls``, delete the task and the container; the exit code."""
    assert d.wait_status(cid, "STOPPED") == "STOPPED", d.log()
    code = d.delete_task(cid)
    assert d.ctr("containers", "rm", cid).returncode == 0
    return code


# ------------------------------------------------------------------------ run to completion


@needs_shim
def test_wasm_output_and_exit_code(clean: PrivateContainerd, images: dict[str, str]) -> None:
    out = clean.run(images["wasm"], "wasm-hello", runtime_type=SHIM_RUNTIME)
    assert (out.returncode, out.stdout) == (0, "hello from wasi\n"), f"{out.stderr}\n{clean.log()}"
    out = clean.run(images["wasm"], "wasm-exit", "/exit.wasm", "3", runtime_type=SHIM_RUNTIME)
    assert (out.returncode, out.stdout) == (3, ""), f"{out.stderr}\n{clean.log()}"


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("kind", ["wasm", "linux"])
def test_terminal(
    clean: PrivateContainerd, images: dict[str, str], runtime: str, kind: str
) -> None:
    """``ctr run -t`` (a pty: the sandboxed Wasm process sets its controlling terminal
    after the pivot; runc sends the master over the console socket): output and exit code
    through the terminal. ``script`` gives ctr the terminal it wants on its own side."""
    import shlex
    import shutil

    if shutil.which("script") is None:
        pytest.skip("util-linux script is not installed")
    if kind == "wasm" and runtime != SHIM_RUNTIME:
        pytest.skip("plain runc cannot run Wasm")
    args = ("/exit.wasm", "5") if kind == "wasm" else ("sh", "-c", "tty; exit 5")
    argv = clean.run_argv(images[kind], f"tty-{kind}", *args, runtime_type=runtime)
    argv.insert(argv.index("--rm") + 1, "-t")
    done = subprocess.run(
        ["script", "-qec", shlex.join(argv), "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 5, f"{done.stdout}{done.stderr}\n{clean.log()}"
    if kind == "linux":
        assert "/dev/pts/" in done.stdout  # its stdio is a terminal


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_linux_output_and_exit_code(
    clean: PrivateContainerd, images: dict[str, str], runtime: str
) -> None:
    out = clean.run(images["linux"], "bb-echo", "echo", "hello from busybox", runtime_type=runtime)
    assert (out.returncode, out.stdout) == (0, "hello from busybox\n"), out.stderr
    out = clean.run(images["linux"], "bb-exit", "sh", "-c", "exit 7", runtime_type=runtime)
    assert (out.returncode, out.stdout) == (7, ""), out.stderr


# ------------------------------------------------------------------------ kill, ps, pause

# (image, args, ctr task kill options, exit code): a looping Wasm guest dies of the signal;
# busybox sh as pid 1 of its namespace ignores SIGTERM unless it traps it, and `--all`
# reaches the sleeps it waits for, so it goes on to `exit 5`
KILLS = [
    pytest.param("wasm", ("/loop.wasm",), (), 128 + 15, id="wasm-term"),
    pytest.param("wasm", ("/loop.wasm",), ("-s", "SIGKILL"), 128 + 9, id="wasm-kill"),
    pytest.param("wasm", ("/loop.wasm",), ("--all", "-s", "SIGKILL"), 128 + 9, id="wasm-kill-all"),
    pytest.param(
        "linux",
        ("sh", "-c", "trap 'exit 42' TERM; while :; do sleep 0.1; done"),
        (),
        42,
        id="busybox-term-trapped",
    ),
    pytest.param("linux", ("sleep", "1000"), ("-s", "SIGKILL"), 128 + 9, id="busybox-kill"),
    pytest.param(
        "linux",
        ("sh", "-c", "sleep 1000 & sleep 1000; exit 5"),
        ("--all", "-s", "SIGTERM"),
        5,
        id="busybox-term-all",
    ),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("kind", "args", "kill", "code"), KILLS)
def test_ctr_task_kill(
    clean: PrivateContainerd,
    images: dict[str, str],
    runtime: str,
    kind: str,
    args: tuple[str, ...],
    kill: tuple[str, ...],
    code: int,
) -> None:
    if kind == "wasm" and runtime == RUNC_RUNTIME:
        pytest.skip("plain runc cannot run Wasm (test_runc_e2e shows its exec format error)")
    cid = f"kill-{kind}"
    _started(clean, images[kind], cid, *args, runtime_type=runtime)
    killed = clean.ctr("tasks", "kill", *kill, cid)
    assert killed.returncode == 0, killed.stderr
    assert _stopped(clean, cid) == code


@needs_shim
def test_ctr_run_sees_a_killed_wasm_task_exit(
    clean: PrivateContainerd, images: dict[str, str]
) -> None:
    """``ctr run --rm`` in the foreground: its Wait returns the signal's code."""
    argv = clean.run_argv(images["wasm"], "wasm-loop", "/loop.wasm", runtime_type=SHIM_RUNTIME)
    runner = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert clean.wait_status("wasm-loop", "RUNNING") == "RUNNING", clean.log()
        killed = clean.ctr("tasks", "kill", "-s", "SIGTERM", "wasm-loop")
        assert killed.returncode == 0, killed.stderr
        _, err = runner.communicate(timeout=60)
        assert runner.returncode == 128 + signal.SIGTERM, err
    finally:
        if runner.poll() is None:
            clean.ctr("tasks", "kill", "-s", "SIGKILL", "wasm-loop")
            runner.wait(timeout=60)


PS = [
    pytest.param("wasm", ("/loop.wasm",), 1, id="wasm"),
    pytest.param("linux", ("sh", "-c", "sleep 1000 & sleep 1000; exit 5"), 3, id="busybox"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("kind", "args", "count"), PS)
def test_ctr_task_ps(
    clean: PrivateContainerd,
    images: dict[str, str],
    runtime: str,
    kind: str,
    args: tuple[str, ...],
    count: int,
) -> None:
    if kind == "wasm" and runtime == RUNC_RUNTIME:
        pytest.skip("plain runc cannot run Wasm")
    cid = f"ps-{kind}"
    pid = _started(clean, images[kind], cid, *args, runtime_type=runtime)
    try:
        pids = clean.task_pids(cid)
        assert pid in pids
        assert len(pids) == count, pids
        for each in pids:
            assert Path(f"/proc/{each}").exists()
    finally:
        clean.remove(cid)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(
    ("kind", "args"),
    [
        pytest.param("wasm", ("/loop.wasm",), id="wasm"),
        pytest.param("linux", ("sleep", "1000"), id="busybox"),
    ],
)
def test_pause_and_resume(
    clean: PrivateContainerd,
    images: dict[str, str],
    runtime: str,
    kind: str,
    args: tuple[str, ...],
) -> None:
    if kind == "wasm" and runtime == RUNC_RUNTIME:
        pytest.skip("plain runc cannot run Wasm")
    cid = f"pause-{kind}"
    _started(clean, images[kind], cid, *args, runtime_type=runtime)
    try:
        assert clean.frozen(cid) is False
        paused = clean.ctr("tasks", "pause", cid)
        assert paused.returncode == 0, paused.stderr
        assert clean.task_status(cid) == "PAUSED"
        assert clean.frozen(cid) is True
        resumed = clean.ctr("tasks", "resume", cid)
        assert resumed.returncode == 0, resumed.stderr
        assert clean.task_status(cid) == "RUNNING"
        assert clean.frozen(cid) is False
        killed = clean.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        assert killed.returncode == 0, killed.stderr
        assert _stopped(clean, cid) == 128 + 9
    finally:
        clean.remove(cid)


# ------------------------------------------------------------------------ failing creates


@needs_shim
@pytest.mark.parametrize(
    ("kind", "args", "words"),
    [
        pytest.param("wasm", ("/broken.wasm",), ("/broken.wasm",), id="does-not-compile"),
        pytest.param("wasm", ("/missing.wasm",), ("/missing.wasm",), id="missing-entrypoint"),
        pytest.param("linux", ("nosuchcommand",), ("nosuchcommand",), id="runc-fails"),
    ],
)
def test_failing_create_reaches_ctr_and_leaves_nothing(
    clean: PrivateContainerd,
    images: dict[str, str],
    kind: str,
    args: tuple[str, ...],
    words: tuple[str, ...],
) -> None:
    out = clean.run(images[kind], f"bad-{kind}", *args, runtime_type=SHIM_RUNTIME)
    assert out.returncode != 0
    assert out.stderr.startswith("ctr: "), out.stderr
    for word in words:
        assert word in out.stderr, f"{out.stderr}\n{clean.log()}"
    assert clean.ctr("containers", "ls", "-q").stdout.split() == []
    # `clean` then checks that no shim, socket, mount, cgroup or state is left


# ------------------------------------------------------------------------ one shim per group


def _group(name: str) -> dict[str, str]:
    return {GROUP_ANNOTATION: f"{name}-{uuid.uuid4().hex[:8]}"}


@needs_shim
def test_one_shim_serves_a_group_of_wasm_and_linux_containers(
    clean: PrivateContainerd, images: dict[str, str]
) -> None:
    d, group = clean, _group("pod")
    members = {
        "g-wasm-1": ("wasm", ("/loop.wasm",)),
        "g-linux": ("linux", ("sleep", "1000")),
        "g-wasm-2": ("wasm", ("/loop.wasm",)),
    }
    try:
        for cid, (kind, args) in members.items():
            _started(d, images[kind], cid, *args, runtime_type=SHIM_RUNTIME, annotations=group)
        shims = {cid: d.shim_pid(cid) for cid in members}
        shim = shims["g-wasm-1"]
        assert shim > 0
        assert set(shims.values()) == {shim}, shims
        cmdline = Path(f"/proc/{shim}/cmdline").read_bytes().decode()
        assert SHIM_BINARY in cmdline
        assert len(d.sockets()) == 1, d.sockets()
        # the Linux member went to the real runc, the Wasm ones did not
        state = SHIM_RUNC_ROOT / d.namespace
        assert (state / "g-linux" / "state.json").is_file()
        assert not (state / "g-wasm-1").exists()

        # a short container of the group, run to completion by the same shim
        out = d.run(images["wasm"], "g-hello", runtime_type=SHIM_RUNTIME, annotations=group)
        assert (out.returncode, out.stdout) == (0, "hello from wasi\n"), out.stderr
        assert len(d.sockets()) == 1

        # a container outside the group gets a shim of its own
        _started(d, images["wasm"], "solo", "/loop.wasm", runtime_type=SHIM_RUNTIME)
        assert d.shim_pid("solo") not in (0, shim)
        assert len(d.sockets()) == 2
        d.ctr("tasks", "kill", "-s", "SIGKILL", "solo")
        assert _stopped(d, "solo") == 128 + 9

        # members leave one by one; the shim serves the rest until the last is deleted
        for cid in ("g-wasm-1", "g-linux"):
            assert d.ctr("tasks", "kill", "-s", "SIGKILL", cid).returncode == 0
            assert _stopped(d, cid) == 128 + 9
            assert Path(f"/proc/{shim}").exists()
            assert d.task_status("g-wasm-2") == "RUNNING"
            assert d.shim_pid("g-wasm-2") == shim
        assert d.ctr("tasks", "kill", "g-wasm-2").returncode == 0
        assert _stopped(d, "g-wasm-2") == 128 + 15
    finally:
        for cid in [*members, "solo"]:
            d.remove(cid)
    # `clean`: the shim exited with its last container, its socket is gone


def test_runc_v2_groups_the_same_way(clean: PrivateContainerd, images: dict[str, str]) -> None:
    """The reference: the stock shim serves a group by the same annotation (and the
    harness finds its pid the same way)."""
    d, group = clean, _group("ref")
    try:
        for cid in ("r-1", "r-2"):
            _started(d, images["linux"], cid, "sleep", "1000", annotations=group)
        assert d.shim_pid("r-1") == d.shim_pid("r-2") > 0
        assert "containerd-shim-runc-v2" in Path(f"/proc/{d.shim_pid('r-1')}/cmdline").read_text()
        assert len(d.sockets()) == 1
    finally:
        for cid in ("r-1", "r-2"):
            d.remove(cid)


@needs_shim
def test_exec_and_metrics_of_a_linux_container_and_refusals_for_wasm(
    clean: PrivateContainerd, images: dict[str, str]
) -> None:
    d = clean
    _started(d, images["linux"], "ex-linux", "sleep", "60", runtime_type=SHIM_RUNTIME)
    out = d.ctr("task", "exec", "--exec-id", "e1", "ex-linux", "sh", "-c", "echo in exec; exit 4")
    assert (out.returncode, out.stdout) == (4, "in exec\n"), out.stderr
    metrics = d.ctr("task", "metrics", "ex-linux")
    assert metrics.returncode == 0, metrics.stderr
    assert "memory.usage_in_bytes" in metrics.stdout
    assert "cpuacct.usage" in metrics.stdout
    _started(d, images["wasm"], "ex-wasm", "/loop.wasm", runtime_type=SHIM_RUNTIME)
    refused = d.ctr("task", "exec", "--exec-id", "e1", "ex-wasm", "sh")
    assert refused.returncode != 0
    assert "exec into Wasm container ex-wasm is not supported" in refused.stderr
    wasm_metrics = d.ctr("task", "metrics", "ex-wasm")
    assert wasm_metrics.returncode == 0, wasm_metrics.stderr
    usage = [line for line in wasm_metrics.stdout.splitlines() if "memory.usage_in_bytes" in line]
    assert usage
    assert int(usage[0].split()[1]) > 0
    for cid in ("ex-linux", "ex-wasm"):
        d.remove(cid)
