"""End to end: containerd's stock runc shim runs ``wasidispatch-runc`` as its runc binary.

A private containerd (every path under a temporary directory, see
`tests.containerd_harness`) imports a busybox image and a Wasm image, both built here, and
``ctr run --rm --runc-binary wasidispatch-runc`` runs each: Linux goes through the real runc,
Wasm runs in our container process. After every test no runtime state, cgroup or process is
left; after the module, containerd is stopped and its directory is gone.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.containerd_harness import (
    RUNC_CMD,
    PrivateContainerd,
    busybox_layout,
    missing_requirements,
    wasm_layout,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    daemon = PrivateContainerd()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        assert not daemon.base.exists()
        assert daemon.processes() == []
        assert daemon.cgroups() == []


@pytest.fixture(scope="module")
def images(containerd: PrivateContainerd) -> dict[str, str]:
    from tests.guests import build_c

    guests = {f"{name}.wasm": build_c(name).read_bytes() for name in ("hello", "exit", "loop")}
    guests["broken.wasm"] = b"\0asm\x01\0\0\0\x01\xff\xff\xff\xff\x0f"  # section overruns
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
    """The daemon, checked afterwards: no runtime state, cgroup, task or process left."""
    yield containerd
    assert containerd.ctr("tasks", "ls", "-q").stdout.split() == []
    assert containerd.ctr("containers", "ls", "-q").stdout.split() == []
    assert containerd.leftovers() == {"state": [], "cgroups": [], "processes": []}


RUNTIME = str(RUNC_CMD)


def test_linux_container_goes_to_runc(clean: PrivateContainerd, images: dict[str, str]) -> None:
    out = clean.run(images["linux"], "linux-echo", "echo", "hello from busybox", runtime=RUNTIME)
    assert (out.returncode, out.stdout) == (0, "hello from busybox\n"), out.stderr
    out = clean.run(images["linux"], "linux-exit", "sh", "-c", "echo bye; exit 3", runtime=RUNTIME)
    assert (out.returncode, out.stdout) == (3, "bye\n"), out.stderr


def test_wasm_container_runs_in_wasidispatch(
    clean: PrivateContainerd, images: dict[str, str]
) -> None:
    out = clean.run(images["wasm"], "wasm-hello", runtime=RUNTIME)
    assert (out.returncode, out.stdout) == (0, "hello from wasi\n"), out.stderr
    out = clean.run(images["wasm"], "wasm-exit", "/exit.wasm", "7", runtime=RUNTIME)
    assert (out.returncode, out.stdout) == (7, ""), out.stderr


def test_plain_runc_cannot_run_the_wasm_image(
    clean: PrivateContainerd, images: dict[str, str]
) -> None:
    out = clean.run(images["wasm"], "wasm-on-runc")
    assert out.returncode != 0
    assert "exec format error" in out.stderr


def test_ctr_task_kill_stops_a_looping_wasm_task(
    clean: PrivateContainerd, images: dict[str, str]
) -> None:
    argv = clean.run_argv(images["wasm"], "wasm-loop", "/loop.wasm", runtime=RUNTIME)
    runner = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tasks = clean.ctr("tasks", "ls").stdout
            if any(
                line.split()[:1] == ["wasm-loop"] and "RUNNING" in line
                for line in tasks.splitlines()
            ):
                break
            assert runner.poll() is None, runner.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the Wasm task never ran")
        state = list((clean.runc_root / "default" / "wasm-loop").iterdir())
        assert [p.name for p in state] == ["wasidispatch.json"]  # ours: dispatched to Wasm
        killed = clean.ctr("tasks", "kill", "wasm-loop")
        assert killed.returncode == 0, killed.stderr
        _, err = runner.communicate(timeout=60)
        assert runner.returncode == 128 + 15, err
    finally:
        if runner.poll() is None:
            clean.ctr("tasks", "kill", "-s", "SIGKILL", "wasm-loop")
            runner.wait(timeout=60)


def test_create_failure_reaches_the_user(clean: PrivateContainerd, images: dict[str, str]) -> None:
    out = clean.run(images["wasm"], "wasm-broken", "/broken.wasm", runtime=RUNTIME)
    assert out.returncode != 0
    # the shim reads the last error of <bundle>/log.json: our message, after runc's prefix
    assert "OCI runtime create failed: " in out.stderr
    message = out.stderr.split("OCI runtime create failed: ", 1)[1]
    assert message.startswith("/broken.wasm: invalid WebAssembly module"), message
