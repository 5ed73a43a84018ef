"""The shim's protobuf messages: reproducible generation and containerd's wire facts."""

from __future__ import annotations

import subprocess
import sys

from google.protobuf import any_pb2

from wasidispatch.shim import _build
from wasidispatch.shim._pb import (
    cgroups_v1_pb2,
    events_pb2,
    events_ttrpc_pb2,
    mount_pb2,
    runc_options_pb2,
    runtimeoptions_pb2,
    shim_pb2,
    task_types_pb2,
    ttrpc_pb2,
)


def test_generated_modules_are_what_the_sources_generate() -> None:
    files = _build.generate()
    committed = {p.name: p.read_bytes() for p in _build.OUT.iterdir() if p.is_file()}
    assert files == committed
    assert _build.generate() == files  # twice the same: nothing time- or path-dependent
    for name, data in files.items():
        assert str(_build.HERE).encode() not in data, name


def _key(field: int, wire: int) -> bytes:
    return bytes([field << 3 | wire])


def _str(field: int, value: bytes) -> bytes:
    return _key(field, 2) + bytes([len(value)]) + value


def test_create_request_field_numbers() -> None:
    request = shim_pb2.CreateTaskRequest(
        id="c",
        bundle="/b",
        rootfs=[mount_pb2.Mount(type="overlay")],
        terminal=True,
        stdin="i",
        stdout="o",
        stderr="e",
        options=any_pb2.Any(type_url="t"),
    )
    expected = (
        _str(1, b"c")
        + _str(2, b"/b")
        + _str(3, _str(1, b"overlay"))
        + _key(4, 0)
        + b"\x01"
        + _str(5, b"i")
        + _str(6, b"o")
        + _str(7, b"e")
        + _str(10, _str(1, b"t"))
    )
    assert request.SerializeToString() == expected


def test_ttrpc_frames_payloads() -> None:
    request = ttrpc_pb2.Request(
        service="s",
        method="m",
        payload=b"p",
        timeout_nano=1,
        metadata=[ttrpc_pb2.KeyValue(key="k", value="v")],
    )
    assert request.SerializeToString() == (
        _str(1, b"s")
        + _str(2, b"m")
        + _str(3, b"p")
        + _key(4, 0)
        + b"\x01"
        + _str(5, _str(1, b"k") + _str(2, b"v"))
    )
    response = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=5, message="x"), payload=b"y")
    assert response.SerializeToString() == _str(1, _key(1, 0) + b"\x05" + _str(2, b"x")) + _str(
        2, b"y"
    )


def test_event_envelope_and_task_exit() -> None:
    exit_ = events_pb2.TaskExit(container_id="c", id="c", pid=7, exit_status=3)
    assert exit_.SerializeToString() == _str(1, b"c") + _str(2, b"c") + b"\x18\x07\x20\x03"
    envelope = events_ttrpc_pb2.Envelope(namespace="n", topic="/tasks/exit")
    envelope.event.type_url = "containerd.events.TaskExit"
    data = events_ttrpc_pb2.ForwardRequest(envelope=envelope).SerializeToString()
    assert data.startswith(b"\x0a")  # envelope = 1
    inner = envelope.SerializeToString()
    assert _str(2, b"n") in inner
    assert _str(3, b"/tasks/exit") in inner
    assert events_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"


def test_names_containerd_resolves() -> None:
    assert shim_pb2.DESCRIPTOR.services_by_name["Task"].full_name == "containerd.task.v2.Task"
    assert runc_options_pb2.Options.DESCRIPTOR.full_name == "containerd.runc.v1.Options"
    assert runtimeoptions_pb2.Options.DESCRIPTOR.full_name == "runtimeoptions.v1.Options"
    assert cgroups_v1_pb2.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert [task_types_pb2.CREATED, task_types_pb2.RUNNING, task_types_pb2.STOPPED] == [1, 2, 3]
    assert task_types_pb2.PAUSED == 4
    options = runc_options_pb2.Options(root="/r", binary_name="runc")
    assert options.SerializeToString() == _str(6, b"runc") + _str(7, b"/r")


def test_importing_the_messages_needs_no_grpc_tooling() -> None:
    code = (
        "import sys; import wasidispatch.shim._pb.shim_pb2, wasidispatch.shim.ttrpc;"
        "print(sorted(m for m in sys.modules if m.startswith(('grpc', 'grpc_tools'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
