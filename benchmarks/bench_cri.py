"""Pods through containerd's CRI plugin: our shim (handler ``wasidispatch``) beside runc.v2
(handler ``runc``), in one run, one containerd.

Run: ``.venv/bin/python -m pytest benchmarks/bench_cri.py -o python_files='bench_*.py'
--benchmark-only`` (root; Debian's containerd, runc and busybox-static, gcc for the pause
image). The daemon is `tests.cri_harness.CriContainerd` with ``PYTHONDONTWRITEBYTECODE``
unset (real nodes keep bytecode caches); the precompile cache is warm after the first round.
Wasm = the C ``hello`` guest, Linux = busybox ``echo hi``; pods use the node's network (no
CNI here). The CRI calls are made from this process (`tests.cri_harness.CriClient`), as a
kubelet makes them; the exit is seen by polling ``ContainerStatus`` every 5 ms. Groups:

* ``cri-pod``: RunPodSandbox, CreateContainer, StartContainer until the exit is seen, for a
  pod of one container; the pod is stopped and removed after the timer.
* ``cri-container``: a new container in a pod that stays up for the whole test (its shim
  runs), CreateContainer + StartContainer until the exit is seen; the container is removed
  after the timer.
* ``sandbox-cost``: ``cri-container``'s Wasm case with RuntimeDefault seccomp, on the daemon
  above (the container sandbox: namespaces, pivot_root, capabilities, seccomp) and on a
  second one whose environment, and so the shim's, has ``WASIDISPATCH_SANDBOX=off`` (no
  sandbox, no seccomp); a third case, sandboxed without seccomp, splits the difference.

Phase medians (RunPodSandbox, CreateContainer, StartContainer, exit seen) are in each
benchmark's ``extra_info``. After each test the daemon is checked to hold nothing of its
pods (processes, mounts, cgroups, sockets, FIFOs, state), and `CriContainerd.stop` removes
the rest.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tests.containerd_harness import missing_grpc, missing_requirements, missing_shim
from tests.cri_harness import (
    RUNC_HANDLER,
    SHIM_HANDLER,
    CriClient,
    CriContainerd,
    cri_containerd,
    import_busybox,
    import_wasm,
    read_log,
)
from tests.guests import build_c

_missing = missing_requirements() or missing_shim() or missing_grpc()
pytestmark = pytest.mark.skipif(_missing is not None, reason=str(_missing))

ROUNDS = 15
SANDBOX_ROUNDS = 40
"""sandbox-cost looks for milliseconds in ~120 ms rounds with ~10 ms of noise: more rounds."""
POLL = 0.005
EMPTY: dict[str, list[str]] = {
    "state": [],
    "cgroups": [],
    "processes": [],
    "mounts": [],
    "sockets": [],
    "fifos": [],
}
_ids = itertools.count()


class Case:
    """What one benchmark runs: an image, its command and the handler of its pods."""

    def __init__(
        self, image: str, command: list[str], handler: str, output: str, **config: Any
    ) -> None:
        self.image = image
        self.command = command
        self.handler = handler
        self.output = output
        self.config = config


def _daemon(base: Path, **options: Any) -> Iterator[CriContainerd]:
    with cri_containerd(base, bytecode=True, **options) as daemon:
        yield daemon
    assert not daemon.base.exists()
    assert daemon.processes() == []


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    yield from _daemon(tmp_path_factory.mktemp("cri-bench"))


@pytest.fixture(scope="module")
def node_unsandboxed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    base = tmp_path_factory.mktemp("cri-bench-off")
    yield from _daemon(base, env={"WASIDISPATCH_SANDBOX": "off"})


def _images(daemon: CriContainerd, base: Path) -> dict[str, str]:
    hello = {"hello.wasm": build_c("hello").read_bytes()}
    return {
        "wasm": import_wasm(daemon, base / "wasm", hello, "/hello.wasm"),
        "busybox": import_busybox(daemon, base / "busybox"),
    }


@pytest.fixture(scope="module")
def images(node: CriContainerd, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _images(node, tmp_path_factory.mktemp("cri-bench-images"))


@pytest.fixture(scope="module")
def images_unsandboxed(
    node_unsandboxed: CriContainerd, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return _images(node_unsandboxed, tmp_path_factory.mktemp("cri-bench-images-off"))


def _client(daemon: CriContainerd) -> Iterator[CriClient]:
    client = daemon.client()
    yield client
    for pod in client.list_pod_sandbox():
        client.remove_pod(pod.id)
    assert daemon.settle() == EMPTY, daemon.log()


@pytest.fixture
def cri(node: CriContainerd) -> Iterator[CriClient]:
    yield from _client(node)


@pytest.fixture
def cri_unsandboxed(node_unsandboxed: CriContainerd) -> Iterator[CriClient]:
    yield from _client(node_unsandboxed)


# ------------------------------------------------------------------------ one round


def _wait_exited(cri: CriClient, container_id: str, timeout: float = 60.0) -> Any:
    exited = cri.pb.ContainerState.Value("CONTAINER_EXITED")
    deadline = time.monotonic() + timeout
    while True:
        status = cri.container_status(container_id)
        if status.state == exited:
            return status
        assert time.monotonic() < deadline, f"{container_id} did not exit in {timeout} s"
        time.sleep(POLL)


class Round:
    """One timed round's ids and phase times, checked and cleaned up after the timer."""

    def __init__(self, cri: CriClient, daemon: CriContainerd, case: Case, logs: Path) -> None:
        self.cri = cri
        self.daemon = daemon
        self.case = case
        self.logs = logs
        self.pod_id = ""
        self.pod_config: Any = None
        self.container_id = ""
        self.phases: dict[str, float] = {}

    def run_pod(self) -> None:
        name = f"p{next(_ids)}"
        began = time.perf_counter()
        pod = self.cri.run_pod(
            name,
            runtime_handler=self.case.handler,
            log_directory=self.logs,
            cgroup_parent=self.daemon.pod_cgroup(name),
        )
        self.phases["run_pod"] = time.perf_counter() - began
        self.pod_id, self.pod_config = pod

    def run_container(self) -> None:
        name = f"c{next(_ids)}"
        began = time.perf_counter()
        self.container_id = self.cri.create_container(
            self.pod_id,
            self.pod_config,
            name,
            self.case.image,
            self.case.command,
            log_path=f"{name}.log",
            **self.case.config,
        )
        created = time.perf_counter()
        self.cri.start_container(self.container_id)
        started = time.perf_counter()
        status = _wait_exited(self.cri, self.container_id)
        self.phases.update(
            create=created - began,
            start=started - created,
            exit_seen=time.perf_counter() - started,
        )
        self.status = status

    def check(self) -> None:
        """The container exited 0 and logged what it should (outside the timer)."""
        assert self.status.exit_code == 0, (self.status, self.daemon.log())
        lines = [line.text for line in read_log(Path(self.status.log_path))]
        assert lines == [self.case.output], lines


class Phases:
    """Phase times of every round, reported as medians in ``extra_info``."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def add(self, phases: dict[str, float]) -> None:
        for key, value in phases.items():
            self.samples.setdefault(key, []).append(value)

    def report(self, benchmark: BenchmarkFixture) -> None:
        for key, values in self.samples.items():
            benchmark.extra_info[f"{key}_median_ms"] = round(statistics.median(values) * 1e3, 1)


def _bench_pod(
    benchmark: BenchmarkFixture, cri: CriClient, daemon: CriContainerd, case: Case, logs: Path
) -> None:
    phases = Phases()

    def setup() -> tuple[tuple[Round], dict[str, Any]]:
        return (Round(cri, daemon, case, logs),), {}

    def target(r: Round) -> None:
        r.run_pod()
        r.run_container()

    def teardown(r: Round) -> None:
        r.check()
        phases.add(r.phases)
        assert cri.remove_pod(r.pod_id) == []

    benchmark.pedantic(  # type: ignore[no-untyped-call]
        target, setup=setup, teardown=teardown, rounds=ROUNDS, warmup_rounds=1
    )
    phases.report(benchmark)


def _shim_sandbox_setting(cri: CriClient, pod_id: str) -> str:
    """``WASIDISPATCH_SANDBOX`` in the environment of the shim serving the pod (the pause
    process's parent), ``on`` when unset."""
    pid = cri.pod_info(pod_id)["pid"]
    with open(f"/proc/{pid}/stat") as fh:
        shim = int(fh.read().rpartition(")")[2].split()[1])
    with open(f"/proc/{shim}/environ", "rb") as fh:
        env = dict(v.partition(b"=")[::2] for v in fh.read().split(b"\0") if v)
    return env.get(b"WASIDISPATCH_SANDBOX", b"on").decode()


def _bench_container(
    benchmark: BenchmarkFixture,
    cri: CriClient,
    daemon: CriContainerd,
    case: Case,
    logs: Path,
    sandbox: str | None = None,
) -> None:
    """``sandbox``: the shim's ``WASIDISPATCH_SANDBOX`` setting to check (then the rounds
    are `SANDBOX_ROUNDS`)."""
    pod = Round(cri, daemon, case, logs)
    pod.run_pod()
    if sandbox is not None:
        assert _shim_sandbox_setting(cri, pod.pod_id) == sandbox
    phases = Phases()

    def setup() -> tuple[tuple[Round], dict[str, Any]]:
        r = Round(cri, daemon, case, logs)
        r.pod_id, r.pod_config = pod.pod_id, pod.pod_config
        return (r,), {}

    def target(r: Round) -> None:
        r.run_container()

    def teardown(r: Round) -> None:
        r.check()
        phases.add(r.phases)
        cri.remove_container(r.container_id)

    try:
        # the first round (untimed) warms the precompile cache and the shim's imports
        benchmark.pedantic(  # type: ignore[no-untyped-call]
            target,
            setup=setup,
            teardown=teardown,
            rounds=ROUNDS if sandbox is None else SANDBOX_ROUNDS,
            warmup_rounds=1,
        )
    finally:
        assert cri.remove_pod(pod.pod_id) == []
    phases.report(benchmark)


def _wasm(images: dict[str, str], **config: Any) -> Case:
    return Case(images["wasm"], [], SHIM_HANDLER, "hello from wasi", **config)


def _busybox(images: dict[str, str]) -> Case:
    return Case(images["busybox"], ["echo", "hi"], RUNC_HANDLER, "hi")


# ------------------------------------------------------------------------ cri-pod


@pytest.mark.benchmark(group="cri-pod")
def test_pod_of_one_wasm_container_on_our_shim(
    benchmark: BenchmarkFixture,
    cri: CriClient,
    node: CriContainerd,
    images: dict[str, str],
    tmp_path: Path,
) -> None:
    _bench_pod(benchmark, cri, node, _wasm(images), tmp_path / "logs")


@pytest.mark.benchmark(group="cri-pod")
def test_pod_of_one_busybox_container_on_runc_v2(
    benchmark: BenchmarkFixture,
    cri: CriClient,
    node: CriContainerd,
    images: dict[str, str],
    tmp_path: Path,
) -> None:
    _bench_pod(benchmark, cri, node, _busybox(images), tmp_path / "logs")


# ------------------------------------------------------------------------ cri-container


@pytest.mark.benchmark(group="cri-container")
def test_new_wasm_container_in_a_pod_on_our_shim(
    benchmark: BenchmarkFixture,
    cri: CriClient,
    node: CriContainerd,
    images: dict[str, str],
    tmp_path: Path,
) -> None:
    _bench_container(benchmark, cri, node, _wasm(images), tmp_path / "logs")


@pytest.mark.benchmark(group="cri-container")
def test_new_busybox_container_in_a_pod_on_runc_v2(
    benchmark: BenchmarkFixture,
    cri: CriClient,
    node: CriContainerd,
    images: dict[str, str],
    tmp_path: Path,
) -> None:
    _bench_container(benchmark, cri, node, _busybox(images), tmp_path / "logs")


# ------------------------------------------------------------------------ sandbox-cost


@pytest.mark.benchmark(group="sandbox-cost")
def test_new_wasm_container_sandboxed_with_runtime_default_seccomp(
    benchmark: BenchmarkFixture,
    cri: CriClient,
    node: CriContainerd,
    images: dict[str, str],
    tmp_path: Path,
) -> None:
    case = _wasm(images, seccomp="RuntimeDefault")
    _bench_container(benchmark, cri, node, case, tmp_path / "logs", sandbox="on")


@pytest.mark.benchmark(group="sandbox-cost")
def test_new_wasm_container_sandboxed_without_seccomp(
    benchmark: BenchmarkFixture,
    cri: CriClient,
    node: CriContainerd,
    images: dict[str, str],
    tmp_path: Path,
) -> None:
    """The sandbox's namespaces and capabilities alone: seccomp's share is the difference."""
    _bench_container(benchmark, cri, node, _wasm(images), tmp_path / "logs", sandbox="on")


@pytest.mark.benchmark(group="sandbox-cost")
def test_new_wasm_container_with_wasidispatch_sandbox_off(
    benchmark: BenchmarkFixture,
    cri_unsandboxed: CriClient,
    node_unsandboxed: CriContainerd,
    images_unsandboxed: dict[str, str],
    tmp_path: Path,
) -> None:
    case = _wasm(images_unsandboxed, seccomp="RuntimeDefault")
    logs = tmp_path / "logs"
    _bench_container(benchmark, cri_unsandboxed, node_unsandboxed, case, logs, sandbox="off")
