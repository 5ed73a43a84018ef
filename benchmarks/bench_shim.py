"""``containerd-shim-wasidispatch-v1`` against the stock runc.v2 shim, in one run, one containerd.

Run: ``make bench`` or ``.venv/bin/python -m pytest benchmarks/bench_shim.py
-o python_files='bench_*.py' --benchmark-only`` (root; Debian's containerd, runc and
busybox-static). containerd runs with ``PYTHONDONTWRITEBYTECODE`` unset (real nodes keep
bytecode caches; this workplace sets it, which would recompile the shim on every start). The
precompile cache is warm after the first round, as on a node. Groups:

* ``ctr-run``: wall time of ``ctr run --rm``: the C ``hello`` guest in a Wasm image through
  ``io.containerd.wasidispatch.v1`` (a new shim per container: the id is its group) beside
  busybox ``echo`` through ``io.containerd.runc.v2``.
* ``in-group``: a new container in a group whose shim already runs (a long-lived container
  of the same ``io.kubernetes.cri.sandbox-id`` keeps it), created, started and waited for
  through containerd's gRPC API from this process (`tests.containerd_harness.ContainerdClient`:
  ``ctr``'s own start-up is not timed); the task, container and snapshot are deleted after
  the timer stops, as a kubelet would later.
* ``throughput``: 200 short containers in one group, 4 at a time, end to end (delete
  included): Wasm ``hello`` on our shim beside busybox ``echo`` on runc.v2.
* ``shim-rss`` (in ``extra_info``, not timed): VmRSS and PSS of our shim with one Wasm
  container, and of runc.v2's with one busybox container.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tests.containerd_harness import (
    GROUP_ANNOTATION,
    RUNC_RUNTIME,
    SHIM_RUNTIME,
    ContainerdClient,
    ContainerTemplate,
    PrivateContainerd,
    busybox_layout,
    missing_grpc,
    missing_requirements,
    missing_shim,
    pss_kib,
    vm_rss_kib,
    wasm_layout,
)
from tests.guests import build_c

_missing = missing_requirements() or missing_shim() or missing_grpc()
pytestmark = pytest.mark.skipif(_missing is not None, reason=str(_missing))

ROUNDS = 15
_ids = itertools.count()


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    daemon = PrivateContainerd(bytecode=True)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def images(containerd: PrivateContainerd) -> dict[str, str]:
    base = containerd.base / "images"
    base.mkdir()
    files = {"hello.wasm": build_c("hello").read_bytes(), "loop.wasm": build_c("loop").read_bytes()}
    return {
        "wasm": containerd.import_layout(wasm_layout(base / "wasm", files, "/hello.wasm"), "wasm"),
        "busybox": containerd.import_layout(busybox_layout(base / "busybox"), "busybox"),
    }


@pytest.fixture(scope="module")
def client(containerd: PrivateContainerd) -> Iterator[ContainerdClient]:
    c = ContainerdClient(containerd)
    yield c
    c.close()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def _ctr_run(containerd: PrivateContainerd, image: str, runtime: str, *args: str) -> None:
    cid = f"b{next(_ids)}"
    out = containerd.ctr("run", "--rm", "--runtime", runtime, image, cid, *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "no output"


@pytest.mark.benchmark(group="ctr-run")
def test_ctr_run_wasm_on_our_shim(
    benchmark: BenchmarkFixture, containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    _ctr_run(containerd, images["wasm"], SHIM_RUNTIME)  # warms the precompile cache
    benchmark.pedantic(  # type: ignore[no-untyped-call]
        _ctr_run, args=(containerd, images["wasm"], SHIM_RUNTIME), rounds=ROUNDS, warmup_rounds=1
    )


@pytest.mark.benchmark(group="ctr-run")
def test_ctr_run_busybox_on_runc_v2(
    benchmark: BenchmarkFixture, containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    benchmark.pedantic(  # type: ignore[no-untyped-call]
        _ctr_run,
        args=(containerd, images["busybox"], RUNC_RUNTIME, "echo", "hi"),
        rounds=ROUNDS,
        warmup_rounds=1,
    )


class _Group:
    """A group whose shim stays up: one long-lived container of the group."""

    def __init__(self, client: ContainerdClient, keeper: ContainerTemplate, group: str) -> None:
        self.client = client
        self.group = group
        self.keeper_id = f"keeper-{group}"
        self._started = False
        self._keeper = keeper

    def __enter__(self) -> _Group:
        import threading

        def keep() -> None:
            self.client.run(
                self._keeper, self.keeper_id, annotations={GROUP_ANNOTATION: self.group}
            )

        self._thread = threading.Thread(target=keep, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while self.client.daemon.task_status(self.keeper_id) != "RUNNING":
            assert time.monotonic() < deadline, "the group's keeper did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.daemon.ctr("tasks", "kill", "--signal", "SIGKILL", self.keeper_id)
        self._thread.join(60)


def _in_group_once(client: ContainerdClient, template: ContainerTemplate, group: str) -> float:
    outcome = client.run(template, f"g{next(_ids)}", annotations={GROUP_ANNOTATION: group})
    assert outcome.exit_status == 0, outcome
    assert outcome.stdout.strip(), outcome
    return outcome.timings["create"] + outcome.timings["start"] + outcome.timings["wait"]


def _bench_in_group(
    benchmark: BenchmarkFixture,
    client: ContainerdClient,
    template: ContainerTemplate,
    keeper: ContainerTemplate,
) -> None:
    group = f"pod-{next(_ids)}"
    with _Group(client, keeper, group):
        _in_group_once(client, template, group)  # the cache warm, the shim's imports done
        samples: list[float] = []

        def one() -> None:
            samples.append(_in_group_once(client, template, group))

        benchmark.pedantic(one, rounds=ROUNDS)  # type: ignore[no-untyped-call]
        # the timer includes the deletes after Wait; report create+start+wait alone too
        samples.sort()
        benchmark.extra_info["create_start_exit_median_s"] = samples[len(samples) // 2]


@pytest.mark.benchmark(group="in-group")
def test_new_wasm_container_in_a_running_shim(
    benchmark: BenchmarkFixture, client: ContainerdClient, images: dict[str, str]
) -> None:
    template = client.template(images["wasm"], runtime_type=SHIM_RUNTIME)
    keeper = client.template(images["wasm"], "/loop.wasm", runtime_type=SHIM_RUNTIME)
    _bench_in_group(benchmark, client, template, keeper)


@pytest.mark.benchmark(group="in-group")
def test_new_busybox_container_in_a_running_runc_v2_shim(
    benchmark: BenchmarkFixture, client: ContainerdClient, images: dict[str, str]
) -> None:
    template = client.template(images["busybox"], "echo", "hi", runtime_type=RUNC_RUNTIME)
    keeper = client.template(images["busybox"], "sleep", "600", runtime_type=RUNC_RUNTIME)
    _bench_in_group(benchmark, client, template, keeper)


def _throughput(
    client: ContainerdClient, template: ContainerTemplate, keeper: ContainerTemplate
) -> None:
    group = f"pod-{next(_ids)}"
    with _Group(client, keeper, group):
        ids = [f"t{next(_ids)}" for _ in range(200)]
        outcomes = client.run_many(
            template, ids, concurrency=4, annotations={GROUP_ANNOTATION: group}
        )
    assert [o.exit_status for o in outcomes] == [0] * 200


@pytest.mark.benchmark(group="throughput")
def test_200_wasm_containers_in_one_group(
    benchmark: BenchmarkFixture, client: ContainerdClient, images: dict[str, str]
) -> None:
    template = client.template(images["wasm"], runtime_type=SHIM_RUNTIME)
    keeper = client.template(images["wasm"], "/loop.wasm", runtime_type=SHIM_RUNTIME)
    benchmark.pedantic(_throughput, args=(client, template, keeper), rounds=2)  # type: ignore[no-untyped-call]


@pytest.mark.benchmark(group="throughput")
def test_200_busybox_containers_in_one_runc_v2_group(
    benchmark: BenchmarkFixture, client: ContainerdClient, images: dict[str, str]
) -> None:
    template = client.template(images["busybox"], "echo", "hi", runtime_type=RUNC_RUNTIME)
    keeper = client.template(images["busybox"], "sleep", "600", runtime_type=RUNC_RUNTIME)
    benchmark.pedantic(_throughput, args=(client, template, keeper), rounds=2)  # type: ignore[no-untyped-call]


@pytest.mark.benchmark(group="shim-rss")
def test_shim_rss_with_one_container(
    benchmark: BenchmarkFixture, client: ContainerdClient, images: dict[str, str]
) -> None:
    """Not a timing: the memory of each shim serving one long-running container."""
    found: dict[str, int] = {}
    for name, image, args, runtime in (
        ("wasidispatch", images["wasm"], ("/loop.wasm",), SHIM_RUNTIME),
        ("runc.v2", images["busybox"], ("sleep", "600"), RUNC_RUNTIME),
    ):
        keeper = client.template(image, *args, runtime_type=runtime)
        group = f"pod-{next(_ids)}"
        with _Group(client, keeper, group) as g:
            shim = client.daemon.shim_pid(g.keeper_id)
            found[f"{name}_shim_rss_kib"] = vm_rss_kib(shim)
            # our shim is two processes (the daemon and its zygote): PSS sums them fairly
            helpers = [p for p in _children(shim) if p != client.daemon.task_pid(g.keeper_id)]
            found[f"{name}_shim_pss_kib"] = pss_kib(shim) + sum(pss_kib(p) for p in helpers)
    benchmark.extra_info.update(found)
    benchmark.pedantic(lambda: None, rounds=1)  # type: ignore[no-untyped-call]
    print(found)
