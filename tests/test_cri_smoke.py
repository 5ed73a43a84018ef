"""The CRI harness against a real containerd: one pod through containerd's CRI plugin.

A private containerd with its CRI plugin (`tests.cri_harness.cri_containerd`: our pause
image as the sandbox image, handler ``runc`` = ``io.containerd.runc.v2``) runs one
host-network pod whose busybox container writes a line to stdout and one to stderr and exits
3, as a kubelet would drive it: the exit code and reason CRI reports, the CRI log file, the
pod's cgroup parent and network namespace. After the pod is removed, nothing is left (no
state dir, cgroup, process, mount, shim socket or FIFO directory), and after the daemon is
stopped its directory is gone.
"""

from __future__ import annotations

import json
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
    status = cri.pod_sandbox_status(pod.id, verbose=True)
    assert cri.pb.PodSandboxState.Name(status.status.state) == "SANDBOX_READY"
    assert status.status.runtime_handler == RUNC_HANDLER
    sandbox_pid = json.loads(status.info["info"])["pid"]
    assert _net_ns(sandbox_pid) == _net_ns("self")  # NamespaceOption network = NODE
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
