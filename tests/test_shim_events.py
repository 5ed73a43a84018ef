"""The event publisher against a ttrpc Events service of ours (order, envelope, retries,
reconnects, close) and against a real containerd (e2e: ``ctr events`` shows the event)."""

from __future__ import annotations

import contextlib
import logging
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import StringValue

from tests.containerd_harness import PrivateContainerd, missing_requirements
from wasidispatch.errors import InvalidArgumentError, ShimError, TtrpcError
from wasidispatch.shim._pb import events_ttrpc_pb2
from wasidispatch.shim.events import EVENTS_SERVICE, Publisher, type_url
from wasidispatch.shim.ttrpc import Client, Context, Server

Envelope = events_ttrpc_pb2.Envelope
ForwardRequest = events_ttrpc_pb2.ForwardRequest


class Events:
    """A stand-in for containerd's ttrpc Events service that records what it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[str | None, Envelope]] = []
        self.calls = 0
        self.fail_with: ShimError | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.cond = threading.Condition()

    def forward(self, request: ForwardRequest, ctx: Context) -> Empty:
        self.entered.set()
        self.gate.wait(60)
        with self.cond:
            self.calls += 1
            self.cond.notify_all()
            if self.fail_with is not None:
                raise self.fail_with
            assert request.HasField("envelope")
            self.received.append((ctx.namespace, request.envelope))
        return Empty()

    def serve(self, path: str) -> Server:
        server = Server()
        server.register(EVENTS_SERVICE, {"Forward": (ForwardRequest, self.forward)})
        server.serve(path)
        return server

    def topics(self) -> list[str]:
        return [envelope.topic for _, envelope in self.received]


@pytest.fixture
def events() -> Iterator[Events]:
    svc = Events()
    yield svc
    svc.gate.set()


@pytest.fixture
def address(tmp_path: Path, events: Events) -> Iterator[str]:
    path = str(tmp_path / "containerd.sock.ttrpc")
    server = events.serve(path)
    yield path
    server.close()


def value(envelope: Envelope) -> str:
    return StringValue.FromString(envelope.event.value).value


def test_events_arrive_in_order_with_a_whole_envelope(address: str, events: Events) -> None:
    before = time.time_ns()
    with Publisher(address, namespace="default") as publisher:
        for n in range(30):
            publisher.publish(f"/tasks/t{n}", StringValue(value=str(n)))
        assert publisher.flush(timeout=60)
    after = time.time_ns()
    assert events.topics() == [f"/tasks/t{n}" for n in range(30)]
    for n, (namespace, envelope) in enumerate(events.received):
        assert namespace == "default"  # containerd-namespace-ttrpc metadata
        assert envelope.namespace == "default"
        assert envelope.event.type_url == "google.protobuf.StringValue"
        assert value(envelope) == str(n)
        assert before <= envelope.timestamp.ToNanoseconds() <= after
    stamps = [e.timestamp.ToNanoseconds() for _, e in events.received]
    assert stamps == sorted(stamps)


def test_envelope_is_set_even_for_an_empty_event(address: str, events: Events) -> None:
    with Publisher(address, namespace="ns1") as publisher:
        publisher.publish("/tasks/oom", Empty())
        assert publisher.flush(timeout=60)
    ((namespace, envelope),) = events.received
    assert envelope.event.type_url == type_url(Empty()) == "google.protobuf.Empty"
    assert envelope.event.value == b""
    assert (namespace, envelope.namespace, envelope.topic) == ("ns1", "ns1", "/tasks/oom")


def test_namespace_per_event_and_required(address: str, events: Events) -> None:
    with Publisher(address) as publisher:
        with pytest.raises(InvalidArgumentError, match="no namespace"):
            publisher.publish("/tasks/start", StringValue())
        publisher.publish("/tasks/start", StringValue(), namespace="k8s.io")
        assert publisher.flush(timeout=60)
    assert [(ns, e.namespace) for ns, e in events.received] == [("k8s.io", "k8s.io")]


def test_publish_returns_while_containerd_is_slow(address: str, events: Events) -> None:
    events.gate.clear()
    with Publisher(address, namespace="default") as publisher:
        publisher.publish("/a", StringValue(value="a"))
        assert events.entered.wait(60)
        publisher.publish("/b", StringValue(value="b"))  # returns: the sender is blocked
        publisher.publish("/c", StringValue(value="c"))
        assert events.received == []
        assert not publisher.flush(timeout=0)
        events.gate.set()
        assert publisher.flush(timeout=60)
    assert events.topics() == ["/a", "/b", "/c"]


def test_full_queue_drops_new_events(
    address: str, events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    events.gate.clear()
    with Publisher(address, namespace="default", max_queued=2) as publisher:
        publisher.publish("/a", StringValue())
        assert events.entered.wait(60)
        publisher.publish("/b", StringValue())
        with caplog.at_level(logging.ERROR, logger="wasidispatch.shim.events"):
            publisher.publish("/c", StringValue())
        assert any("/c dropped" in r.getMessage() for r in caplog.records)
        events.gate.set()
        assert publisher.flush(timeout=60)
    assert events.topics() == ["/a", "/b"]


def test_close_sends_what_is_queued(address: str, events: Events) -> None:
    events.gate.clear()
    publisher = Publisher(address, namespace="default")
    for n in range(5):
        publisher.publish(f"/q{n}", StringValue())
    assert events.entered.wait(60)
    closer = threading.Thread(target=publisher.close, kwargs={"timeout": 60})
    closer.start()
    events.gate.set()
    closer.join(60)
    assert not closer.is_alive()
    assert events.topics() == [f"/q{n}" for n in range(5)]
    publisher.publish("/late", StringValue())  # dropped, logged, no exception
    publisher.close()
    assert events.topics()[-1] == "/q4"


def test_close_gives_up_on_an_absent_containerd(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = Publisher(str(tmp_path / "nobody.sock"), "default", retries=1000, backoff=0.01)
    publisher.publish("/never", StringValue())
    publisher.publish("/never2", StringValue())
    with caplog.at_level(logging.ERROR, logger="wasidispatch.shim.events"):
        publisher.close(timeout=0.2)
    assert not publisher._thread.is_alive()
    messages = [r.getMessage() for r in caplog.records]
    assert "event /never dropped at close: not sent" in messages
    assert "1 more events dropped at close: not sent" in messages


def test_reconnects_after_containerd_restarts(tmp_path: Path, events: Events) -> None:
    path = str(tmp_path / "restart.sock")
    connects: list[str] = []

    def connect(address: str) -> Client:
        connects.append(address)
        return Client(address)

    first = events.serve(path)
    publisher = Publisher(path, "default", connect=connect, backoff=0.01)
    try:
        publisher.publish("/one", StringValue())
        assert publisher.flush(timeout=60)
        first.close()  # containerd goes and comes back: the held connection is stale
        second = events.serve(path)
        publisher.publish("/two", StringValue())
        assert publisher.flush(timeout=60)
        assert events.topics() == ["/one", "/two"]
        assert connects == [path, path]
        second.close()
    finally:
        publisher.close()


def test_retries_until_containerd_is_back(tmp_path: Path, events: Events) -> None:
    path = str(tmp_path / "late.sock")
    failed = threading.Event()

    def connect(address: str) -> Client:
        try:
            return Client(address)
        except TtrpcError:
            failed.set()
            raise

    publisher = Publisher(path, "default", connect=connect, retries=200, backoff=0.01)
    try:
        publisher.publish("/early", StringValue(value="1"))
        publisher.publish("/after", StringValue(value="2"))
        assert failed.wait(60)  # no containerd yet: the first attempt failed
        server = events.serve(path)
        assert publisher.flush(timeout=60)
        assert events.topics() == ["/early", "/after"]
        server.close()
    finally:
        publisher.close()


def test_unavailable_is_retried_then_dropped(
    address: str, events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    events.fail_with = TtrpcError("busy")
    logs = caplog.at_level(logging.WARNING, logger="wasidispatch.shim.events")
    with logs, Publisher(address, "default", retries=3, backoff=0.01) as publisher:
        publisher.publish("/lost", StringValue())
        assert publisher.flush(timeout=60)
        assert events.calls == 4
        events.fail_with = None
        publisher.publish("/next", StringValue())
        assert publisher.flush(timeout=60)
    assert events.topics() == ["/next"]
    assert any("/lost dropped after 4 attempts" in r.getMessage() for r in caplog.records)


def test_refused_event_is_dropped_at_once(
    address: str, events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    events.fail_with = InvalidArgumentError("envelope namespace required")
    logs = caplog.at_level(logging.ERROR, logger="wasidispatch.shim.events")
    with logs, Publisher(address, "default", retries=3, backoff=0.01) as publisher:
        publisher.publish("/bad", StringValue())
        assert publisher.flush(timeout=60)
    assert events.calls == 1
    assert any("/bad dropped: containerd refused it" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ containerd


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    reason = missing_requirements()
    if reason is not None:
        pytest.skip(reason)
    daemon = PrivateContainerd()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def ctr_events(containerd: PrivateContainerd) -> Iterator[queue.Queue[str]]:
    """``ctr events`` running, its output lines in a queue."""
    proc = subprocess.Popen(
        ["ctr", "-a", str(containerd.sock), "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=30)


def wait_line(lines: queue.Queue[str], needle: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            return None
        if needle in line:
            return line
    return None


@pytest.mark.e2e
def test_containerd_shows_a_published_task_event(containerd: PrivateContainerd) -> None:
    from wasidispatch.shim._pb import events_pb2

    address = f"{containerd.sock}.ttrpc"
    with ctr_events(containerd) as lines, Publisher(address, "default") as publisher:
        # ctr subscribes some time after it starts: probe until it shows one event
        for n in range(300):
            publisher.publish("/tasks/delete", events_pb2.TaskDelete(container_id=f"probe{n}"))
            if wait_line(lines, "probe", 0.2) is not None:
                break
        else:
            pytest.fail("ctr events showed no event")
        cid = f"wd-{uuid.uuid4().hex[:8]}"
        publisher.publish("/tasks/exit", events_pb2.TaskExit(container_id=cid, exit_status=7))
        line = wait_line(lines, cid, 60)
    assert line is not None
    assert " default /tasks/exit " in line, line
    assert '"exit_status":7' in line, line


def _envelope(namespace: str, *, timestamp: bool = True) -> bytes:
    request = ForwardRequest()
    env = request.envelope
    if timestamp:
        env.timestamp.GetCurrentTime()
    env.namespace = namespace
    env.topic = "/tasks/exit"
    env.event.Pack(StringValue(value="x"))
    return request.SerializeToString()


@pytest.mark.e2e
def test_containerd_refuses_an_envelope_without_namespace_or_timestamp(
    containerd: PrivateContainerd,
) -> None:
    with Client(f"{containerd.sock}.ttrpc") as client:
        with pytest.raises(InvalidArgumentError) as no_ns:
            client.call(EVENTS_SERVICE, "Forward", _envelope(""))
        with pytest.raises(InvalidArgumentError):
            client.call(EVENTS_SERVICE, "Forward", _envelope("default", timestamp=False))
        assert no_ns.value.code == 3
        # and a whole one is taken (the connection survived the refusals)
        client.call(EVENTS_SERVICE, "Forward", _envelope("default"))
