"""Kubernetes pods through containerd's CRI plugin and our shim: Wasm apps beside Linux sidecars.

A private containerd with its CRI plugin (`tests.cri_harness`: our static pause image as the
sandbox image, handler ``wasidispatch`` = ``io.containerd.wasidispatch.v1``) runs
host-network pods as a kubelet would drive them, with this suite's own CRI client:

- one pod holding the pause container, a busybox sidecar and Wasm apps, all served by one
  shim process; they share a host directory both ways (the logging-sidecar pattern); the
  logs land in the CRI format, stdout and stderr tagged; ``ContainerStatus`` reports exit
  codes and reasons of both kinds; a Wasm app joins the pod's IPC and UTS namespaces and
  the node's network, in a pid and mount namespace of its own; ``ContainerStats``,
  ``UpdateContainerResources``, ``ExecSync`` (into the sidecar; refused for Wasm) and
  ``StopContainer`` of a looping Wasm app (SIGTERM ends it: 143);
- the security context a kubelet sends (RuntimeDefault seccomp, a user, groups, dropped
  capabilities, a read-only rootfs) gives the Wasm app's process what it gives busybox's;
- a Wasm app over its memory limit is OOM-killed: 137, reason ``OOMKilled``.

After each pod is removed nothing is left: no process, mount, cgroup, socket, FIFO or state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest

from tests.containerd_harness import missing_grpc, missing_requirements, missing_shim
from tests.cri_harness import (
    SHIM_HANDLER,
    CriClient,
    CriContainerd,
    cri_containerd,
    import_busybox,
    import_wasm,
    read_log,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
    pytest.mark.skipif(missing_grpc() is not None, reason=str(missing_grpc())),
    pytest.mark.skipif(missing_shim() is not None, reason=str(missing_shim())),
]

EMPTY: dict[str, list[str]] = {
    "state": [],
    "cgroups": [],
    "processes": [],
    "mounts": [],
    "sockets": [],
    "fifos": [],
}
SHIM_BINARY = "containerd-shim-wasidispatch-v1"
STATUS_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
                 "Uid", "Gid", "Groups")  # fmt: skip


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    base = tmp_path_factory.mktemp("cri-pod")
    with cri_containerd(base, debug=True) as daemon:
        yield daemon
    assert not daemon.base.exists()
    assert daemon.processes() == []


@pytest.fixture(scope="module")
def images(node: CriContainerd, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.guests import build_c

    base = tmp_path_factory.mktemp("cri-images")
    guests = {f"{name}.wasm": build_c(name).read_bytes() for name in ("files", "loop", "bomb")}
    return {
        "linux": import_busybox(node, base / "busybox"),
        "wasm": import_wasm(node, base / "wasm", guests, "/files.wasm"),
    }


@pytest.fixture
def cri(node: CriContainerd) -> Iterator[CriClient]:
    client = node.client()
    yield client
    for pod in client.list_pod_sandbox():
        client.remove_pod(pod.id)
    assert node.settle() == EMPTY, node.log()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rpartition(")")[2].split()[1])


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode()


def _shims(node: CriContainerd) -> list[int]:
    """Our shim processes of ``node``: those whose parent is not one (the zygote and the Wasm
    containers are forked from a shim and share its command line)."""
    ours = {int(line.split(":")[0]) for line in node.processes() if SHIM_BINARY in line}
    return sorted(pid for pid in ours if _ppid(pid) not in ours)


def _wait_log(path: Path, text: str, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line.text for line in read_log(path)] if path.exists() else []
        if text in lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _status(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            fields[key] = " ".join(value.split())
    return fields


def test_pod_of_wasm_apps_and_a_linux_sidecar(
    cri: CriClient, node: CriContainerd, images: dict[str, str], tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    shared = tmp_path / "shared"
    shared.mkdir()
    pod = cri.run_pod(
        "mixed",
        runtime_handler=SHIM_HANDLER,
        log_directory=logs,
        cgroup_parent=node.pod_cgroup("mixed"),
    )
    volume = [cri.mount(shared, "/shared")]
    wasm, linux = images["wasm"], images["linux"]

    # the sidecar ships what the Wasm app writes, then answers
    sidecar = cri.create_container(
        pod.id,
        pod.config,
        "sidecar",
        linux,
        [
            "sh",
            "-c",
            "while [ ! -s /shared/app.log ]; do sleep 0.05; done; cat /shared/app.log;"
            " echo from-the-sidecar > /shared/reply.tmp; mv /shared/reply.tmp /shared/reply;"
            " exec sleep 300",
        ],
        mounts=volume,
        log_path="sidecar.log",
    )
    cri.start_container(sidecar)
    writer = cri.create_container(
        pod.id,
        pod.config,
        "writer",
        wasm,
        ["/files.wasm", "write", "/shared/app.log", "wasm line 1\nwasm line 2\n"],
        mounts=volume,
        log_path="writer.log",
    )
    cri.start_container(writer)
    done = cri.wait_exited(writer)
    assert (done.exit_code, done.reason) == (0, "Completed"), node.log()
    assert (shared / "app.log").read_text() == "wasm line 1\nwasm line 2\n"
    shipped = _wait_log(logs / "sidecar.log", "wasm line 2")
    assert shipped[:2] == ["wasm line 1", "wasm line 2"], shipped
    deadline = time.monotonic() + 30
    while not (shared / "reply").exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    reader = cri.create_container(
        pod.id,
        pod.config,
        "reader",
        wasm,
        ["/files.wasm", "read", "/shared/reply"],
        mounts=volume,
        log_path="reader.log",
    )
    cri.start_container(reader)
    done = cri.wait_exited(reader)
    assert (done.exit_code, done.reason) == (0, "Completed")
    assert [(x.stream, x.tag, x.text) for x in read_log(logs / "reader.log")] == [
        ("stdout", "F", "from-the-sidecar")
    ]

    failing = cri.create_container(
        pod.id, pod.config, "failing", wasm, ["/files.wasm", "read", "/no/such"], log_path="f.log"
    )
    cri.start_container(failing)
    done = cri.wait_exited(failing)
    assert (done.exit_code, done.reason) == (1, "Error")
    assert [(x.stream, x.tag) for x in read_log(logs / "f.log")] == [("stderr", "F")]
    assert "/no/such" in read_log(logs / "f.log")[0].text

    # a long-running Wasm app: one shim for all, the pod's namespaces, stats, update, exec
    looping = cri.create_container(
        pod.id,
        pod.config,
        "looping",
        wasm,
        ["/loop.wasm"],
        log_path="loop.log",
        resources={"memory_limit_in_bytes": 128 << 20},
    )
    cri.start_container(looping)
    pause = int(cri.pod_info(pod.id)["pid"])
    app = int(cri.container_info(looping)["pid"])
    side = int(cri.container_info(sidecar)["pid"])
    shim = _ppid(pause)
    assert SHIM_BINARY in _cmdline(shim)
    assert _ppid(app) == shim
    assert _ppid(side) == shim
    assert _shims(node) == [shim]  # its zygote and Wasm containers are its children

    def ns(pid: int | str, name: str) -> str:
        return os.readlink(f"/proc/{pid}/ns/{name}")

    assert ns(app, "ipc") == ns(pause, "ipc") != ns("self", "ipc")
    assert ns(app, "uts") == ns(pause, "uts") == ns("self", "uts")  # host network: host UTS
    assert ns(app, "net") == ns(pause, "net") == ns("self", "net")  # NamespaceOption NODE
    assert ns(app, "pid") not in (ns(pause, "pid"), ns("self", "pid"))
    assert ns(app, "mnt") not in (ns(pause, "mnt"), ns("self", "mnt"))
    assert os.readlink(f"/proc/{app}/root") == "/"  # its root, seen from the host, is its own
    assert os.stat(f"/proc/{app}/root/loop.wasm").st_size > 0

    stats = cri.container_stats(looping)
    assert stats.attributes.id == looping
    assert stats.memory.working_set_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0
    cri.update_container_resources(looping, {"memory_limit_in_bytes": 96 << 20})
    assert cri.container_status(looping).resources.linux.memory_limit_in_bytes == 96 << 20
    limit = _memory_limit(f"{node.pod_cgroup('mixed')}/{looping}")
    assert limit == 96 << 20

    with pytest.raises(grpc.RpcError) as refused:
        cri.exec_sync(looping, ["/loop.wasm"])
    assert "wasm" in str(refused.value.details()).lower()
    shell = cri.exec_sync(sidecar, ["sh", "-c", "cat /shared/app.log | wc -l"])
    assert (shell.stdout.strip(), shell.exit_code) == (b"2", 0)

    cri.stop_container(looping, timeout=20)
    stopped = cri.wait_exited(looping)
    assert (stopped.exit_code, stopped.reason) == (143, "Error")  # SIGTERM, not the SIGKILL
    cri.stop_container(sidecar, timeout=1)
    stopped = cri.wait_exited(sidecar)
    assert stopped.exit_code == 137  # busybox sleep as its pid 1 ignores SIGTERM: SIGKILL

    assert cri.remove_pod(pod.id) == []
    assert cri.list_pod_sandbox() == []
    assert node.settle() == EMPTY, node.log()
    assert _shims(node) == []


def _memory_limit(cgroup: str) -> int:
    relative = cgroup.lstrip("/")
    v1 = Path("/sys/fs/cgroup/memory") / relative / "memory.limit_in_bytes"
    if v1.exists():
        return int(v1.read_text())
    return int((Path("/sys/fs/cgroup") / relative / "memory.max").read_text())


@pytest.mark.parametrize(
    "security",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {
                "seccomp": "RuntimeDefault",
                "run_as_user": 1000,
                "run_as_group": 1000,
                "supplemental_groups": [2000, 2001],
                "drop_capabilities": ["CHOWN", "KILL", "NET_RAW"],
                "no_new_privs": True,
                "readonly_rootfs": True,
            },
            id="restricted",
        ),
        pytest.param({"add_capabilities": ["SYS_ADMIN"], "seccomp": "Unconfined"}, id="cap-add"),
    ],
)
def test_security_context_like_busybox(
    cri: CriClient,
    node: CriContainerd,
    images: dict[str, str],
    tmp_path: Path,
    security: dict[str, Any],
) -> None:
    logs = tmp_path / "logs"
    pod = cri.run_pod(
        "secure",
        runtime_handler=SHIM_HANDLER,
        log_directory=logs,
        cgroup_parent=node.pod_cgroup("s"),
    )
    # the Wasm app's process, read from the host while it runs (its guest sees no /proc),
    # against busybox reading its own
    wasm = cri.create_container(
        pod.id, pod.config, "wasm", images["wasm"], ["/loop.wasm"], log_path="wasm.log",
        **security,
    )  # fmt: skip
    cri.start_container(wasm)
    pid = int(cri.container_info(wasm)["pid"])
    seen = {"wasm": _status(Path(f"/proc/{pid}/status").read_text())}
    cri.stop_container(wasm, timeout=10)
    assert cri.wait_exited(wasm).exit_code == 143
    linux = cri.create_container(
        pod.id, pod.config, "linux", images["linux"], ["cat", "/proc/self/status"],
        log_path="linux.log", **security,
    )  # fmt: skip
    cri.start_container(linux)
    done = cri.wait_exited(linux)
    assert done.exit_code == 0, (read_log(logs / "linux.log"), node.log())
    seen["linux"] = _status("\n".join(x.text for x in read_log(logs / "linux.log")))
    assert set(seen["wasm"]) == set(STATUS_FIELDS)
    assert seen["wasm"] == seen["linux"]
    if security.get("seccomp") == "RuntimeDefault":
        assert seen["wasm"]["Seccomp"] == "2"
        assert seen["wasm"]["Uid"].split()[0] == "1000"
        assert {"2000", "2001"} <= set(seen["wasm"]["Groups"].split())
    assert cri.remove_pod(pod.id) == []


def test_wasm_app_over_its_memory_limit_is_oom_killed(
    cri: CriClient, node: CriContainerd, images: dict[str, str], tmp_path: Path
) -> None:
    pod = cri.run_pod(
        "oom",
        runtime_handler=SHIM_HANDLER,
        log_directory=tmp_path / "logs",
        cgroup_parent=node.pod_cgroup("oom"),
    )
    cid = cri.create_container(
        pod.id,
        pod.config,
        "bomb",
        images["wasm"],
        ["/bomb.wasm"],
        log_path="bomb.log",
        resources={"memory_limit_in_bytes": 48 << 20},
    )
    cri.start_container(cid)
    done = cri.wait_exited(cid)
    assert (done.exit_code, done.reason) == (137, "OOMKilled"), read_log(
        tmp_path / "logs" / "bomb.log"
    )
    assert cri.remove_pod(pod.id) == []
