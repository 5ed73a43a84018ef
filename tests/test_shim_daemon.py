"""containerd's shim process protocol (`wasidispatch.shim.daemon`), driven as containerd does.

The shim here is the 30-line example of ``docs/shim.md``, extracted from the page and run as
a binary: ``start`` with containerd's argv, cwd and environment, then Create/Start/Wait/
Delete/Shutdown over ttrpc, with events received by a ttrpc ``Events/Forward`` endpoint (what
containerd's ttrpc socket serves). The same protocol against a real containerd, with the
wasidispatch shim: tests/test_shim_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from wasidispatch.shim import daemon
from wasidispatch.shim._pb import events_pb2, events_ttrpc_pb2, shim_pb2
from wasidispatch.shim.ttrpc import Client, Context, Server

ROOT = Path(__file__).resolve().parent.parent
TASK = "containerd.task.v2.Task"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="shim sockets live in /run/containerd/s (root)"
)


def _example() -> str:
    text = (ROOT / "docs" / "shim.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (code,) = [str(b) for b in blocks if "run_shim(HostShim())" in b]
    return code


class EventSink:
    """containerd's Events/Forward, as a ttrpc server on a temp socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.envelopes: list[events_ttrpc_pb2.Envelope] = []
        self.namespaces: list[str | None] = []
        self.cond = threading.Condition()
        self.server = Server()
        self.server.register(
            "containerd.services.events.ttrpc.v1.Events",
            {"Forward": (events_ttrpc_pb2.ForwardRequest, self.forward)},
        )
        self.server.serve(str(path))

    def forward(self, req: events_ttrpc_pb2.ForwardRequest, ctx: Context) -> empty_pb2.Empty:
        with self.cond:
            self.envelopes.append(req.envelope)
            self.namespaces.append(ctx.namespace)
            self.cond.notify_all()
        return empty_pb2.Empty()

    def wait_for(self, topic: str, timeout: float = 10.0) -> events_ttrpc_pb2.Envelope:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for env in self.envelopes:
                    if env.topic == topic:
                        return env
                left = deadline - time.monotonic()
                assert left > 0, f"no {topic} event: {[e.topic for e in self.envelopes]}"
                self.cond.wait(left)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, object]]:
    shim = tmp_path / "containerd-shim-hostdemo-v1"
    shim.write_text(f"#!{sys.executable}\n" + _example())
    shim.chmod(0o755)
    sink = EventSink(tmp_path / "containerd.sock.ttrpc")
    address = str(tmp_path / "containerd.sock")  # the gRPC address: only hashed here
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    started: list[str] = []
    yield {
        "tmp": tmp_path,
        "shim": shim,
        "sink": sink,
        "address": address,
        "namespace": namespace,
        "started": started,
    }
    for sock in started:
        path = sock.removeprefix("unix://")
        if os.path.exists(path):
            try:
                with Client(path, connect_timeout=2) as client:
                    client.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(now=True), timeout=5)
            except Exception:
                pass
            deadline = time.monotonic() + 5
            while os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.exists(path):
                os.unlink(path)
    sink.server.close()


def _bundle(world: dict[str, object], cid: str, args: list[str], **annotations: str) -> Path:
    bundle = Path(str(world["tmp"])) / cid
    bundle.mkdir()
    spec = {"ociVersion": "1.0.2", "process": {"args": args}, "annotations": annotations}
    (bundle / "config.json").write_text(json.dumps(spec))
    os.mkfifo(bundle / "log")
    return bundle


def _start(world: dict[str, object], bundle: Path, cid: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TTRPC_ADDRESS=str(world["tmp"]) + "/containerd.sock.ttrpc")
    argv = [
        str(world["shim"]),
        "-namespace",
        str(world["namespace"]),
        "-address",
        str(world["address"]),
        "-publish-binary",
        "/usr/bin/containerd",
        "-id",
        cid,
        "start",
    ]
    log = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)  # containerd reads the log
    try:
        out = subprocess.run(
            argv, cwd=bundle, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        os.close(log)
    if out.returncode == 0:
        started = world["started"]
        assert isinstance(started, list)
        started.append(out.stdout)
    return out


def test_start_create_start_wait_delete_shutdown(world: dict[str, object]) -> None:
    bundle = _bundle(world, "c1", ["sh", "-c", "echo hello; exit 3"])
    out = _start(world, bundle, "c1")
    assert out.returncode == 0, out.stdout + out.stderr
    address = out.stdout
    assert address.startswith(f"unix://{daemon.SOCKET_DIR}/")
    assert (bundle / "address").read_text() == address
    socket_path = address.removeprefix("unix://")
    stdout = bundle / "stdout"
    stdout.write_bytes(b"")
    with Client(socket_path) as client:
        created = client.call_typed(
            TASK,
            "Create",
            shim_pb2.CreateTaskRequest(id="c1", bundle=str(bundle), stdout=str(stdout)),
            shim_pb2.CreateTaskResponse,
        )
        assert created.pid == 0  # the demo spawns at Start
        started = client.call_typed(
            TASK, "Start", shim_pb2.StartRequest(id="c1"), shim_pb2.StartResponse
        )
        waited = client.call_typed(
            TASK, "Wait", shim_pb2.WaitRequest(id="c1"), shim_pb2.WaitResponse, timeout=30
        )
        assert waited.exit_status == 3
        assert stdout.read_bytes() == b"hello\n"
        deleted = client.call_typed(
            TASK, "Delete", shim_pb2.DeleteRequest(id="c1"), shim_pb2.DeleteResponse
        )
        assert (deleted.pid, deleted.exit_status) == (started.pid, 3)
        connect = client.call_typed(
            TASK, "Connect", shim_pb2.ConnectRequest(id="c1"), shim_pb2.ConnectResponse
        )
        shim_pid = connect.shim_pid
        # the daemon is detached: its own session, not the start process's child
        assert os.getsid(shim_pid) == shim_pid
        client.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(id="c1"), timeout=10)
    sink = world["sink"]
    assert isinstance(sink, EventSink)
    exit_env = sink.wait_for("/tasks/exit")
    assert exit_env.namespace == world["namespace"]
    assert exit_env.timestamp.seconds > 0
    exit_event = events_pb2.TaskExit()
    assert exit_env.event.Unpack(exit_event) or exit_env.event.value
    exit_event.ParseFromString(exit_env.event.value)
    assert (exit_event.container_id, exit_event.exit_status) == ("c1", 3)
    assert [e.topic for e in sink.envelopes][:3] == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    sink.wait_for("/tasks/delete")
    deadline = time.monotonic() + 10
    while os.path.exists(socket_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(socket_path), "the daemon left its socket"
    while os.path.exists(f"/proc/{shim_pid}") and not _zombie(shim_pid):
        assert time.monotonic() < deadline, "the daemon did not exit after Shutdown"
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_group_shares_one_shim(world: dict[str, object]) -> None:
    a = _bundle(world, "a", ["true"], **{"io.kubernetes.cri.sandbox-id": "pod1"})
    b = _bundle(world, "b", ["true"], **{"io.kubernetes.cri.sandbox-id": "pod1"})
    c = _bundle(world, "c", ["true"])
    first, second, third = (_start(world, x, x.name) for x in (a, b, c))
    assert first.returncode == second.returncode == third.returncode == 0
    assert first.stdout == second.stdout != third.stdout
    with Client(first.stdout.removeprefix("unix://")) as one:
        pid = one.call_typed(
            TASK, "Connect", shim_pb2.ConnectRequest(id="a"), shim_pb2.ConnectResponse
        ).shim_pid
    with Client(third.stdout.removeprefix("unix://")) as other:
        assert (
            other.call_typed(
                TASK, "Connect", shim_pb2.ConnectRequest(id="c"), shim_pb2.ConnectResponse
            ).shim_pid
            != pid
        )


def test_start_failure_prints_the_reason_and_exits_1(world: dict[str, object]) -> None:
    bundle = _bundle(world, "bad", ["true"])
    out = subprocess.run(
        [str(world["shim"]), "-id", "bad", "start"],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert "-namespace" in out.stdout


def test_delete_prints_a_delete_response(world: dict[str, object]) -> None:
    bundle = _bundle(world, "gone", ["true"])
    out = subprocess.run(
        [str(world["shim"]), "-namespace", "x", "-id", "gone", "-bundle", str(bundle), "delete"],
        cwd=bundle,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    response = shim_pb2.DeleteResponse()
    response.ParseFromString(out.stdout)
    assert response.exit_status == 137
    assert response.exited_at.seconds > 0


def test_go_flag_syntax() -> None:
    opts = daemon.parse_args(
        [
            "--namespace=k8s.io",
            "-address",
            "/a",
            "-debug",
            "-id",
            "x",
            "-publish-binary",
            "b",
            "start",
        ]
    )
    assert (opts.namespace, opts.address, opts.debug, opts.id, opts.action) == (
        "k8s.io",
        "/a",
        True,
        "x",
        "start",
    )
    with pytest.raises(daemon.UsageError, match="not defined"):
        daemon.parse_args(["-bogus", "start"])
    with pytest.raises(daemon.UsageError, match="needs an argument"):
        daemon.parse_args(["-id"])


def test_socket_names_derive_from_address_namespace_and_group() -> None:
    base = daemon.socket_path("w", "/a", "ns", "g")
    assert base == daemon.socket_path("w", "/a", "ns", "g")
    others = {
        daemon.socket_path("w", "/b", "ns", "g"),
        daemon.socket_path("w", "/a", "ns2", "g"),
        daemon.socket_path("w", "/a", "ns", "g2"),
        daemon.socket_path("runc", "/a", "ns", "g"),
    }
    assert base not in others
    assert len(others) == 4
    assert len(base) < 108  # sun_path


def test_delete_response_is_the_generated_message() -> None:
    for pid, status, at in [(0, 137, 1_700_000_000_123_456_789), (4242, 0, 5), (1, 255, 0)]:
        ours = shim_pb2.DeleteResponse()
        ours.ParseFromString(daemon.delete_response(pid, status, at))
        expected = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
        expected.exited_at.FromNanoseconds(at)
        assert ours == expected


@pytest.mark.parametrize(
    ("config", "value"),
    [
        ({"annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}}, "pod1"),
        ({"annotations": {"io.kubernetes.cri.sandbox-id": 'p"\\u00e9\n'}}, 'p"\\u00e9\n'),
        ({"process": {"env": ['"io.kubernetes.cri.sandbox-id": "no"']}}, None),
        ({"annotations": {"other": "io.kubernetes.cri.sandbox-id"}}, None),
        ({"annotations": {"io.kubernetes.cri.sandbox-id": 3}}, None),
        ({}, None),
    ],
)
def test_group_annotation_without_json(config: dict[str, object], value: str | None) -> None:
    for text in (
        json.dumps(config),
        json.dumps(config, indent=2),
        json.dumps(config, ensure_ascii=False),
    ):
        assert daemon.annotation(text.encode(), "io.kubernetes.cri.sandbox-id") == value
