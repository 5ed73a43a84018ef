"""``wasidispatch-runc`` under containerd, against runc, in one run and one containerd.

Run: ``.venv/bin/python -m pytest benchmarks/bench_runtime.py -o python_files='bench_*.py'
--benchmark-only`` (root; Debian's containerd, runc and busybox-static). Groups:

* ``ctr-run``: wall time of ``ctr run --rm`` (client, containerd, the stock runc.v2 shim and
  the runtime: create, start, exit, kill --all, delete, delete --force) for the C ``hello``
  guest in a Wasm image with ``wasidispatch-runc``, beside busybox ``echo`` with plain runc,
  and busybox ``echo`` through ``wasidispatch-runc`` (the Linux hand-over's cost).
* ``create-start-exit``: the runtime alone, called the way the shim calls it, precompile
  cache warm: ``create`` + ``start`` + waiting for the exit (this process is a subreaper, as
  the shim is), Wasm via ``wasidispatch-runc`` beside busybox via runc; and ``start``-to-exit
  alone for the Wasm container (created in the untimed setup).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tests.containerd_harness import (
    RUNC_CMD,
    PrivateContainerd,
    busybox_layout,
    missing_requirements,
    wasm_layout,
)
from tests.guests import build_c

pytestmark = pytest.mark.skipif(
    missing_requirements() is not None, reason=str(missing_requirements())
)

ROUNDS = 15
_ids = itertools.count()


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    daemon = PrivateContainerd()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def images(containerd: PrivateContainerd) -> dict[str, str]:
    base = containerd.base
    hello = build_c("hello").read_bytes()
    return {
        "linux": containerd.import_layout(
            busybox_layout(base / "bb"), "localhost/wasidispatch/busybox"
        ),
        "wasm": containerd.import_layout(
            wasm_layout(base / "wasm", {"hello.wasm": hello}, "/hello.wasm"),
            "localhost/wasidispatch/wasm",
        ),
    }


def _ctr_run(
    containerd: PrivateContainerd, image: str, args: tuple[str, ...], runtime: str | None, want: str
) -> Callable[[], None]:
    def once() -> None:
        out = containerd.run(image, f"bench-{next(_ids)}", *args, runtime=runtime)
        assert (out.returncode, out.stdout) == (0, want), out.stderr

    return once


@pytest.mark.benchmark(group="ctr-run")
def test_ctr_run_busybox_echo_runc(
    benchmark: BenchmarkFixture, containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    run = _ctr_run(containerd, images["linux"], ("echo", "hello"), None, "hello\n")
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)  # type: ignore[no-untyped-call]


@pytest.mark.benchmark(group="ctr-run")
def test_ctr_run_wasm_hello_wasidispatch_runc(
    benchmark: BenchmarkFixture, containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    run = _ctr_run(containerd, images["wasm"], (), str(RUNC_CMD), "hello from wasi\n")
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)  # type: ignore[no-untyped-call]


@pytest.mark.benchmark(group="ctr-run")
def test_ctr_run_busybox_echo_wasidispatch_runc(
    benchmark: BenchmarkFixture, containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    run = _ctr_run(containerd, images["linux"], ("echo", "hello"), str(RUNC_CMD), "hello\n")
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------------- the runtime alone


@pytest.fixture(scope="module")
def subreaper() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER, as the shim
    yield
    libc.prctl(36, 0, 0, 0, 0)


def _bundle(directory: Path, wasm: bool) -> Path:
    runc = shutil.which("runc")
    assert runc is not None
    rootfs = directory / "rootfs"
    if wasm:
        rootfs.mkdir(parents=True)
        shutil.copy(build_c("hello"), rootfs / "hello.wasm")
        args = ["/hello.wasm"]
    else:
        (rootfs / "bin").mkdir(parents=True)
        busybox = shutil.which("busybox")
        assert busybox is not None
        shutil.copy(busybox, rootfs / "bin" / "busybox")
        (rootfs / "bin" / "echo").symlink_to("busybox")
        args = ["echo", "hello"]
    subprocess.run([runc, "spec", "--bundle", str(directory)], check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    config["linux"]["cgroupsPath"] = f"/wasidispatch-bench/{directory.name}"
    (directory / "config.json").write_text(json.dumps(config))
    return directory


class Runtime:
    """create/start/wait/delete the way the runc shim calls a runtime."""

    def __init__(self, binary: str, root: Path, bundle: Path, cache: Path) -> None:
        self.base = [binary, "--root", str(root), "--log", str(bundle / "log.json")]
        self.base += ["--log-format", "json"]
        self.bundle = bundle
        # as under containerd: bytecode caches written and used (a test runner may disable it)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env = {**env, "WASIDISPATCH_CACHE_DIR": str(cache)}
        self.sink = open(os.devnull, "wb")  # noqa: SIM115 - lives as long as the benchmark
        self.done: list[str] = []

    def call(self, *args: str) -> None:
        subprocess.run(
            [*self.base, *args],
            check=True,
            cwd=self.bundle,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.sink,
            stderr=self.sink,
        )

    def create(self) -> tuple[str, int]:
        cid = f"bench-{next(_ids)}"
        pid_file = self.bundle / "init.pid"
        self.call("create", "--bundle", str(self.bundle), "--pid-file", str(pid_file), cid)
        return cid, int(pid_file.read_text())

    def start_and_wait(self, cid: str, pid: int) -> None:
        self.call("start", cid)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        self.done.append(cid)

    def lifecycle(self) -> None:
        self.start_and_wait(*self.create())

    def flush(self) -> tuple[tuple[()], dict[str, object]]:
        """Delete the finished containers (untimed: pedantic's setup)."""
        while self.done:
            self.call("delete", self.done.pop())
        return (), {}


@pytest.fixture(scope="module")
def runtimes(
    tmp_path_factory: pytest.TempPathFactory, subreaper: None
) -> Iterator[dict[str, Runtime]]:
    base = tmp_path_factory.mktemp("runtime")
    runc = shutil.which("runc")
    assert runc is not None
    made = {
        "wasm": Runtime(str(RUNC_CMD), base / "root", _bundle(base / "wasm", True), base / "cache"),
        "linux": Runtime(runc, base / "root", _bundle(base / "linux", False), base / "cache"),
    }
    made["wasm"].lifecycle()  # warm the precompile cache
    yield made
    for rt in made.values():
        rt.flush()
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for leftover in (
            "wasidispatch-bench/wasm",
            "wasidispatch-bench/linux",
            "wasidispatch-bench",
        ):
            if (hierarchy / leftover).is_dir():
                (hierarchy / leftover).rmdir()


@pytest.mark.benchmark(group="create-start-exit")
def test_create_start_exit_wasm_wasidispatch_runc(
    benchmark: BenchmarkFixture, runtimes: dict[str, Runtime]
) -> None:
    rt = runtimes["wasm"]
    benchmark.pedantic(rt.lifecycle, setup=rt.flush, rounds=ROUNDS)  # type: ignore[no-untyped-call]


@pytest.mark.benchmark(group="create-start-exit")
def test_create_start_exit_busybox_runc(
    benchmark: BenchmarkFixture, runtimes: dict[str, Runtime]
) -> None:
    rt = runtimes["linux"]
    benchmark.pedantic(rt.lifecycle, setup=rt.flush, rounds=ROUNDS)  # type: ignore[no-untyped-call]


@pytest.mark.benchmark(group="create-start-exit")
def test_start_to_exit_wasm_wasidispatch_runc(
    benchmark: BenchmarkFixture, runtimes: dict[str, Runtime]
) -> None:
    rt = runtimes["wasm"]

    def setup() -> tuple[tuple[str, int], dict[str, object]]:
        rt.flush()
        return rt.create(), {}

    benchmark.pedantic(rt.start_and_wait, setup=setup, rounds=ROUNDS)  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------------- the Linux hand-over


@pytest.mark.benchmark(group="linux-handover")
def test_linux_create_handover_alone(
    benchmark: BenchmarkFixture, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``create`` of a busybox bundle up to the ``exec`` of runc, with ``/bin/true`` as runc:
    a fresh interpreter, the plainly-Linux check, the exec; no container. Bytecode caches
    are written and used (PYTHONDONTWRITEBYTECODE unset), as under containerd."""
    base = tmp_path_factory.mktemp("handover")
    bundle = _bundle(base / "linux", False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["WASIDISPATCH_RUNC"] = "/bin/true"
    argv = [str(RUNC_CMD), "--root", str(base / "root"), "create", "--bundle", str(bundle), "c"]

    def once() -> None:
        subprocess.run(argv, check=True, env=env, stdin=subprocess.DEVNULL)

    once()  # bytecode compiled
    benchmark.pedantic(once, rounds=40, warmup_rounds=2)  # type: ignore[no-untyped-call]
