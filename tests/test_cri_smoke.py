"""The CRI harness against a real containerd: one pod through containerd's CRI plugin.

A private containerd with its CRI plugin (`tests.cri_harness.cri_containerd`: our pause
image as the sandbox image, handler ``runc`` = ``io.containerd.runc.v2``) runs one
host-network pod whose busybox container writes a line to stdout and one to stderr and exits
3, as a kubelet would drive it: the exit code and reason CRI reports, the CRI log file, the
pod's cgroup parent and network namespace. A second pod's long-running container serves
``ExecSync`` (environment, a read-only host mount, seccomp ``RuntimeDefault``),
``ContainerStats``, ``UpdateContainerResources`` (its memory cgroup) and ``StopContainer``.
After each pod is removed nothing is left (no state dir, cgroup, process, mount, shim socket
or FIFO directory), and after the daemon is stopped its directory is gone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd_harness import RUNC_RUNTIME, missing_grpc, missing_requirements
from tests.cri_harness import (
    RUNC_HANDLER,
    CriContainerd,
    cri_containerd,
    import_busybox,
    read_log,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
    pytest.mark.skipif(missing_grpc() is not None, reason=str(missing_grpc())),
]

EMPTY: dict[str, list[str]] = {
    "state": [],
    "cgroups": [],
    "processes": [],
    "mounts": [],
    "sockets": [],
    "fifos": [],
}
RFC3339_NANO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[CriContainerd]:
    with cri_containerd(tmp_path, {RUNC_HANDLER: RUNC_RUNTIME}) as daemon:
        yield daemon
    assert not daemon.base.exists()
    assert daemon.processes() == []


def _net_ns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_host_network_pod_runs_a_failing_busybox(node: CriContainerd, tmp_path: Path) -> None:
    assert node.cri_plugin_error() is None
    cri = node.client()
    version = cri.version()
    assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1")
    assert cri.conditions()["RuntimeReady"] is True
    image = import_busybox(node, tmp_path)
    logs = tmp_path / "logs"
    parent = node.pod_cgroup("smoke")

    pod = cri.run_pod(
        "smoke", runtime_handler=RUNC_HANDLER, log_directory=logs, cgroup_parent=parent
    )
    status = cri.pod_sandbox_status(pod.id).status
    assert cri.pb.PodSandboxState.Name(status.state) == "SANDBOX_READY"
    assert status.runtime_handler == RUNC_HANDLER
    assert _net_ns(cri.pod_info(pod.id)["pid"]) == _net_ns("self")  # NamespaceOption network = NODE
    assert any((group / pod.id).is_dir() for group in node.cgroups())

    cid = cri.create_container(
        pod.id,
        pod.config,
        "busybox",
        image,
        ["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        log_path="busybox.log",
    )
    cri.start_container(cid)
    exited = cri.wait_exited(cid)
    assert (exited.exit_code, exited.reason) == (3, "Error")
    assert exited.log_path == str(logs / "busybox.log")
    lines = read_log(logs / "busybox.log")
    assert all(RFC3339_NANO.fullmatch(line.time) for line in lines), lines
    # two pipes, two readers: the streams' lines may land in either order
    assert sorted((line.stream, line.tag, line.text) for line in lines) == [
        ("stderr", "F", "to-stderr"),
        ("stdout", "F", "to-stdout"),
    ]
    assert [c.id for c in cri.list_containers(pod.id)] == [cid]

    assert cri.remove_pod(pod.id) == []
    assert cri.list_pod_sandbox() == []
    assert cri.list_containers() == []
    assert node.settle() == EMPTY, node.log()


def _memory_limit(cgroup: str) -> int:
    """The memory limit of cgroup ``cgroup``: v1's ``memory.limit_in_bytes``, else v2's
    ``memory.max``."""
    relative = cgroup.lstrip("/")
    v1 = Path("/sys/fs/cgroup/memory") / relative / "memory.limit_in_bytes"
    if v1.exists():
        return int(v1.read_text())
    return int((Path("/sys/fs/cgroup") / relative / "memory.max").read_text())


def test_exec_stats_update_and_stop_in_a_running_container(
    node: CriContainerd, tmp_path: Path
) -> None:
    cri = node.client()
    image = import_busybox(node, tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "marker").write_text("from the host\n")
    parent = node.pod_cgroup("tools")
    pod = cri.run_pod(
        "tools", runtime_handler=RUNC_HANDLER, log_directory=tmp_path / "logs", cgroup_parent=parent
    )
    cid = cri.create_container(
        pod.id,
        pod.config,
        "sleeper",
        image,
        ["sleep", "300"],
        log_path="sleeper.log",
        envs={"GREETING": "hej"},
        mounts=[cri.mount(shared, "/shared", readonly=True)],
        resources={"memory_limit_in_bytes": 64 << 20, "cpu_shares": 512},
        seccomp="RuntimeDefault",
    )
    cri.start_container(cid)
    running = cri.pb.ContainerState.Value("CONTAINER_RUNNING")
    assert cri.container_status(cid).state == running

    done = cri.exec_sync(
        cid, ["sh", "-c", "echo $GREETING; cat /shared/marker; echo e >&2; exit 4"]
    )
    assert (done.stdout, done.stderr, done.exit_code) == (b"hej\nfrom the host\n", b"e\n", 4)
    seccomp = cri.exec_sync(cid, ["sh", "-c", "grep Seccomp: /proc/self/status"]).stdout
    assert seccomp.split() == [b"Seccomp:", b"2"]  # RuntimeDefault: a filter
    refused = cri.exec_sync(cid, ["sh", "-c", "echo x > /shared/new"])
    assert refused.exit_code != 0  # a readonly mount
    assert not (shared / "new").exists()

    stats = cri.container_stats(cid)
    assert stats.attributes.id == cid
    assert stats.memory.working_set_bytes.value > 0

    assert _memory_limit(f"{parent}/{cid}") == 64 << 20
    cri.update_container_resources(cid, {"memory_limit_in_bytes": 96 << 20})
    assert _memory_limit(f"{parent}/{cid}") == 96 << 20
    assert cri.container_status(cid).resources.linux.memory_limit_in_bytes == 96 << 20

    cri.stop_container(cid, timeout=0)
    stopped = cri.wait_exited(cid)
    assert (stopped.exit_code, stopped.reason) == (137, "Error")  # SIGKILL
    cri.remove_container(cid)
    assert cri.list_containers(pod.id) == []

    assert cri.remove_pod(pod.id) == []
    assert node.settle() == EMPTY, node.log()
