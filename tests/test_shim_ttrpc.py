"""The ttrpc server and client against each other over real unix sockets, raw frames against
the server, and containerd's own ttrpc endpoint (e2e)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, StringValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.containerd_harness import PrivateContainerd, missing_requirements
from wasidispatch.errors import (
    FailedPreconditionError,
    NotFoundError,
    ShimError,
    TtrpcError,
    UnimplementedError,
)
from wasidispatch.shim import ttrpc
from wasidispatch.shim._pb import ttrpc_pb2
from wasidispatch.shim.ttrpc import Client, Code, Context, Metadata, Server, Unary

SERVICE = "wasidispatch.test.v1.Echo"
_HEADER = struct.Struct(">IIBB")


class Gate:
    """A handler that blocks until opened, recording that it was entered."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.cancelled: list[bool] = []

    def __call__(self, request: StringValue, ctx: Context) -> StringValue:
        self.entered.set()
        self.opened.wait(60)
        self.cancelled.append(ctx.cancelled)
        return StringValue(value="opened " + request.value)


class Service:
    """The test service: what each method saw, and switches for the tests."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.calls: list[str] = []
        self.server: Server | None = None

    def methods(self) -> dict[str, ttrpc.Method]:
        return {
            "Echo": (StringValue, self.echo),
            "Meta": Unary(StringValue, self.meta),
            "Raw": self.raw,
            "Block": (StringValue, self.gate),
            "NotFound": (StringValue, self.not_found),
            "Precondition": (StringValue, self.precondition),
            "Internal": (StringValue, self.internal),
            "Boom": (StringValue, self.boom),
            "Remaining": (StringValue, self.remaining),
            "Big": (StringValue, self.big),
            "ShutdownSelf": (StringValue, self.shutdown_self),
        }

    def echo(self, request: StringValue, ctx: Context) -> StringValue:
        self.calls.append(request.value)
        return StringValue(value=request.value)

    def meta(self, request: StringValue, ctx: Context) -> StringValue:
        seen = {
            "pairs": ctx.metadata.pairs(),
            "namespace": ctx.namespace,
            "stream": ctx.stream_id,
            "method": f"{ctx.service}/{ctx.method}",
        }
        return StringValue(value=json.dumps(seen))

    def raw(self, payload: bytes, ctx: Context) -> bytes:
        return payload[::-1]

    def not_found(self, request: StringValue, ctx: Context) -> StringValue:
        raise NotFoundError(f"task {request.value} not found")

    def precondition(self, request: StringValue, ctx: Context) -> StringValue:
        raise FailedPreconditionError("task is running")

    def internal(self, request: StringValue, ctx: Context) -> StringValue:
        raise ShimError("engine exploded", code=13)

    def boom(self, request: StringValue, ctx: Context) -> StringValue:
        raise RuntimeError("boom")

    def remaining(self, request: StringValue, ctx: Context) -> DoubleValue:
        left = ctx.remaining()
        return DoubleValue(value=-1.0 if left is None else left)

    def big(self, request: StringValue, ctx: Context) -> BytesValue:
        return BytesValue(value=b"x" * (ttrpc.MAX_MESSAGE_LENGTH + 1))

    def shutdown_self(self, request: StringValue, ctx: Context) -> StringValue:
        assert self.server is not None
        return StringValue(value=str(self.server.shutdown(timeout=30)))


@pytest.fixture
def service() -> Iterator[Service]:
    svc = Service()
    yield svc
    svc.gate.opened.set()


@pytest.fixture
def served(tmp_path: Path, service: Service) -> Iterator[tuple[Server, str]]:
    """A server with the test service on ``tmp_path/s.sock``."""
    server = Server()
    service.server = server
    server.register(SERVICE, service.methods())
    path = str(tmp_path / "s.sock")
    server.serve(path)
    yield server, path
    service.gate.opened.set()
    server.close()


@pytest.fixture
def client(served: tuple[Server, str]) -> Iterator[Client]:
    with Client("unix://" + served[1]) as c:
        yield c


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)  # a hang fails the test instead of the run
    sock.connect(path)
    return sock


def frame(stream_id: int, payload: bytes, mtype: int = 1, length: int | None = None) -> bytes:
    return _HEADER.pack(len(payload) if length is None else length, stream_id, mtype, 0) + payload


def request_bytes(method: str, payload: bytes = b"", timeout_nano: int = 0) -> bytes:
    req = ttrpc_pb2.Request(
        service=SERVICE, method=method, payload=payload, timeout_nano=timeout_nano
    )
    return req.SerializeToString()


def read_frame(sock: socket.socket) -> tuple[int, int, ttrpc_pb2.Response]:
    header = recv_exact(sock, 10)
    length, stream_id, mtype, _ = _HEADER.unpack(header)
    response = ttrpc_pb2.Response()
    response.ParseFromString(recv_exact(sock, length))
    return stream_id, mtype, response


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"connection closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def closed_by_peer(sock: socket.socket) -> bool:
    """Read until EOF: True when the server closed the connection."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


# ------------------------------------------------------------------------------ round trips


def test_round_trip_typed_and_raw(client: Client) -> None:
    answer = client.call_typed(SERVICE, "Echo", StringValue(value="hello"), StringValue)
    assert answer.value == "hello"
    raw = client.call(SERVICE, "Raw", b"\x00\x01abc")
    assert raw == b"cba\x01\x00"
    assert client.call(SERVICE, "Raw", b"") == b""


def test_metadata_context_and_stream_ids(client: Client) -> None:
    metadata = {"containerd-namespace-ttrpc": "k8s.io", "X-Multi": ["a", "b"]}
    first = json.loads(
        client.call_typed(SERVICE, "Meta", StringValue(), StringValue, metadata=metadata).value
    )
    second = json.loads(client.call_typed(SERVICE, "Meta", StringValue(), StringValue).value)
    assert first["namespace"] == "k8s.io"
    assert ["x-multi", "a"] in first["pairs"]
    assert ["x-multi", "b"] in first["pairs"]
    assert first["method"] == f"{SERVICE}/Meta"
    assert second["namespace"] is None
    assert second["pairs"] == []
    assert first["stream"] % 2 == 1
    assert second["stream"] == first["stream"] + 2


def test_client_stream_ids_are_odd_and_increasing() -> None:
    ours, theirs = socket.socketpair()
    theirs.settimeout(60)
    seen: list[int] = []
    with Client(ours) as client:
        for n in range(3):
            result: list[bytes] = []
            t = threading.Thread(target=lambda out=result: out.append(client.call("s", "m", b"q")))
            t.start()
            stream_id, _, _ = read_frame_request(theirs)
            seen.append(stream_id)
            answer = ttrpc_pb2.Response(payload=str(n).encode()).SerializeToString()
            theirs.sendall(frame(stream_id, answer, mtype=2))
            t.join()
            assert result == [str(n).encode()]
    theirs.close()
    assert seen == [1, 3, 5]


def read_frame_request(sock: socket.socket) -> tuple[int, int, ttrpc_pb2.Request]:
    length, stream_id, mtype, _ = _HEADER.unpack(recv_exact(sock, 10))
    request = ttrpc_pb2.Request()
    request.ParseFromString(recv_exact(sock, length))
    assert (request.service, request.method, request.payload) == ("s", "m", b"q")
    return stream_id, mtype, request


def test_metadata_multidict() -> None:
    md = Metadata.of({"A": "1", "b": ["2", "3"]})
    assert md["a"] == ("1",)
    assert md["B"] == ("2", "3")
    assert md.pairs() == [("a", "1"), ("b", "2"), ("b", "3")]
    assert md.first("missing", "dflt") == "dflt"
    assert len(md) == 2
    assert sorted(md) == ["a", "b"]


# ------------------------------------------------------------------------------ concurrency


def test_blocked_call_does_not_block_others(client: Client, service: Service) -> None:
    result: list[str] = []
    blocked = threading.Thread(
        target=lambda: result.append(
            client.call_typed(SERVICE, "Block", StringValue(value="w"), StringValue).value
        )
    )
    blocked.start()
    assert service.gate.entered.wait(60)
    for n in range(20):
        assert client.call_typed(SERVICE, "Echo", StringValue(value=str(n)), StringValue).value
    assert result == []
    assert blocked.is_alive()
    service.gate.opened.set()
    blocked.join(60)
    assert result == ["opened w"]


def test_fifty_concurrent_calls_from_eight_threads(client: Client, service: Service) -> None:
    def one(n: int) -> str:
        return client.call_typed(SERVICE, "Echo", StringValue(value=f"v{n}"), StringValue).value

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(50)))
    assert answers == [f"v{n}" for n in range(50)]
    assert sorted(service.calls) == sorted(f"v{n}" for n in range(50))


def test_calls_over_many_connections(served: tuple[Server, str]) -> None:
    clients = [Client(served[1]) for _ in range(5)]
    try:
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda c: c.call(SERVICE, "Raw", b"ab"), clients))
        assert answers == [b"ba"] * 5
    finally:
        for c in clients:
            c.close()


# ------------------------------------------------------------------------------ errors


def test_unknown_service_and_method(client: Client) -> None:
    with pytest.raises(UnimplementedError, match=r"^service no\.such\.Service$") as svc:
        client.call("no.such.Service", "Echo", b"")
    with pytest.raises(UnimplementedError, match=r"^method Nope$") as mth:
        client.call(SERVICE, "Nope", b"")
    assert svc.value.code == mth.value.code == 12
    assert client.call(SERVICE, "Raw", b"ok") == b"ko"


def test_handler_errors_keep_their_code(client: Client) -> None:
    with pytest.raises(NotFoundError, match="task c1 not found") as nf:
        client.call(SERVICE, "NotFound", StringValue(value="c1"))
    assert nf.value.code == 5
    with pytest.raises(FailedPreconditionError, match="task is running"):
        client.call(SERVICE, "Precondition", StringValue())
    with pytest.raises(ShimError, match="engine exploded") as internal:
        client.call(SERVICE, "Internal", StringValue())
    assert internal.value.code == 13
    assert type(internal.value) is ShimError


def test_unexpected_exception_is_unknown_and_logged(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    logs = caplog.at_level(logging.ERROR, logger="wasidispatch.shim.ttrpc")
    with logs, pytest.raises(ShimError, match=r"^boom$") as boom:
        client.call(SERVICE, "Boom", StringValue())
    assert boom.value.code == Code.UNKNOWN
    logged = [r for r in caplog.records if "Boom failed" in r.getMessage()]
    assert logged
    assert logged[0].exc_info
    assert client.call_typed(SERVICE, "Echo", StringValue(value="alive"), StringValue).value


def test_undecodable_payload_of_typed_method_is_internal(client: Client) -> None:
    with pytest.raises(ShimError, match="error unmarshalling payload") as err:
        client.call(SERVICE, "Echo", b"\xff\xff\xff")
    assert err.value.code == 13


def test_duplicate_service_refused() -> None:
    server = Server()
    server.register("a.B", {})
    with pytest.raises(ValueError, match=r"duplicate service a\.B"):
        server.register("a.B", {})


# ------------------------------------------------------------------------------ oversized


def test_oversized_request_frame_answered_8_and_connection_survives(
    served: tuple[Server, str],
) -> None:
    sock = raw_connect(served[1])
    length = ttrpc.MAX_MESSAGE_LENGTH + 1
    sock.sendall(_HEADER.pack(length, 1, 1, 0))
    sock.sendall(b"\0" * length)
    stream_id, mtype, response = read_frame(sock)
    assert (stream_id, mtype, response.status.code) == (1, 2, Code.RESOURCE_EXHAUSTED)
    assert "exceed maximum message size of 4194304" in response.status.message
    sock.sendall(frame(3, request_bytes("Raw", b"xy")))
    stream_id, _, response = read_frame(sock)
    assert (stream_id, response.status.code, response.payload) == (3, 0, b"yx")
    sock.close()


def test_oversized_call_refused_by_client_and_response_by_server(client: Client) -> None:
    with pytest.raises(ShimError, match="exceed maximum message size") as err:
        client.call(SERVICE, "Raw", b"x" * ttrpc.MAX_MESSAGE_LENGTH)
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    with pytest.raises(ShimError, match="exceed maximum message size") as big:
        client.call(SERVICE, "Big", StringValue())
    assert big.value.code == Code.RESOURCE_EXHAUSTED
    assert client.call(SERVICE, "Raw", b"still") == b"llits"


def test_largest_message_passes(client: Client) -> None:
    payload = os.urandom(ttrpc.MAX_MESSAGE_LENGTH - 64)
    assert client.call(SERVICE, "Raw", payload) == payload[::-1]


# ------------------------------------------------------------------------------ bad frames

BAD_INPUT = {
    "garbage": b"this is not a ttrpc frame at all\n",
    "truncated header": b"\x00\x00\x00",
    "truncated payload": _HEADER.pack(100, 1, 1, 0) + b"\x01" * 10,
    "bad type": frame(1, request_bytes("Raw", b"x"), mtype=7),
    "response to the server": frame(1, ttrpc_pb2.Response().SerializeToString(), mtype=2),
}


@pytest.mark.parametrize("data", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_frames_close_only_that_connection(
    served: tuple[Server, str], client: Client, data: bytes
) -> None:
    bystander = Client(served[1])
    bad = raw_connect(served[1])
    bad.sendall(data)
    bad.shutdown(socket.SHUT_WR)
    assert closed_by_peer(bad)
    bad.close()
    assert bystander.call(SERVICE, "Raw", b"ab") == b"ba"
    assert client.call(SERVICE, "Raw", b"cd") == b"dc"
    with Client(served[1]) as fresh:
        assert fresh.call(SERVICE, "Raw", b"ef") == b"fe"
    bystander.close()


ANSWERED = {
    "undecodable request": (frame(1, b"\xff\xff\xff\xff"), 1, "unmarshal request error"),
    "even stream id": (frame(2, request_bytes("Raw")), 2, "StreamID must be odd"),
    "data frame": (frame(1, b"", mtype=3), 1, "StreamID is no longer active"),
}


@pytest.mark.parametrize(("data", "stream_id", "message"), ANSWERED.values(), ids=ANSWERED.keys())
def test_frames_answered_invalid_argument_as_go_ttrpc(
    served: tuple[Server, str], data: bytes, stream_id: int, message: str
) -> None:
    sock = raw_connect(served[1])
    sock.sendall(data)
    got_id, mtype, response = read_frame(sock)
    assert (got_id, mtype, response.status.code) == (stream_id, 2, Code.INVALID_ARGUMENT)
    assert message in response.status.message
    sock.sendall(frame(5, request_bytes("Raw", b"12")))
    assert read_frame(sock)[2].payload == b"21"
    sock.close()


def test_reused_stream_id_refused(served: tuple[Server, str]) -> None:
    sock = raw_connect(served[1])
    sock.sendall(frame(7, request_bytes("Raw", b"a")))
    assert read_frame(sock)[2].payload == b"a"
    sock.sendall(frame(7, request_bytes("Raw", b"b")))
    _, _, response = read_frame(sock)
    assert response.status.code == Code.INVALID_ARGUMENT
    assert "must increment" in response.status.message
    sock.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=1, max_size=200))
def test_random_bytes_never_hurt_the_server(served: tuple[Server, str], data: bytes) -> None:
    bad = raw_connect(served[1])
    with contextlib.suppress(OSError):
        bad.sendall(data)
        bad.shutdown(socket.SHUT_WR)
        closed_by_peer(bad)
    bad.close()
    with Client(served[1]) as fresh:
        assert fresh.call(SERVICE, "Raw", data) == data[::-1]


# ------------------------------------------------------------------------------ disconnects


def test_client_disconnect_mid_request(served: tuple[Server, str], service: Service) -> None:
    sock = raw_connect(served[1])
    sock.sendall(frame(1, request_bytes("Block", StringValue(value="x").SerializeToString())))
    assert service.gate.entered.wait(60)
    sock.close()
    with Client(served[1]) as other:  # the server is serving and notices the close
        assert other.call(SERVICE, "Raw", b"ab") == b"ba"
    service.gate.opened.set()
    with Client(served[1]) as other:
        assert other.call(SERVICE, "Raw", b"cd") == b"dc"


def test_cancelled_context_when_connection_goes(served: tuple[Server, str]) -> None:
    server, path = served
    seen = threading.Event()

    def waiter(request: StringValue, ctx: Context) -> StringValue:
        seen.set()
        return StringValue(value=str(ctx.wait_cancelled(60)))

    server.register("w.W", {"Wait": (StringValue, waiter)})
    sock = raw_connect(path)
    req = ttrpc_pb2.Request(service="w.W", method="Wait", payload=b"")
    sock.sendall(frame(1, req.SerializeToString()))
    assert seen.wait(60)
    sock.close()
    assert server.shutdown(timeout=60)


def test_shutdown_does_not_wait_for_abandoned_calls(
    served: tuple[Server, str], service: Service
) -> None:
    sock = raw_connect(served[1])
    sock.sendall(frame(1, request_bytes("Block", StringValue(value="x").SerializeToString())))
    assert service.gate.entered.wait(60)
    sock.close()  # nobody can take the answer: the blocked call does not hold shutdown up
    assert served[0].shutdown(timeout=60)
    assert not service.gate.opened.is_set()


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from google.protobuf.wrappers_pb2 import StringValue
    from wasidispatch.shim.ttrpc import Server
    server = Server()
    never = threading.Event()
    server.register("k.K", {"Hang": (StringValue, lambda r, c: never.wait() or r)})
    server.serve(sys.argv[1])
    print("ready", flush=True)
    never.wait()
    """
)


def test_client_sees_ttrpc_error_when_the_server_dies(tmp_path: Path) -> None:
    path = str(tmp_path / "k.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        client = Client(path)
        errors: list[BaseException] = []

        def hang() -> None:
            try:
                client.call("k.K", "Hang", StringValue())
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=hang)
        t.start()
        with pytest.raises(UnimplementedError):  # the server has the connection: it answers
            client.call("k.K", "Nope", b"")
        proc.kill()
        t.join(60)
        assert len(errors) == 1
        assert isinstance(errors[0], TtrpcError)
        assert errors[0].code == 14
        with pytest.raises(TtrpcError, match="closed"):
            client.call("k.K", "Hang", b"")
        assert client.closed
        client.close()
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(TtrpcError, match="cannot connect"):
        Client(path)


def test_in_flight_call_fails_when_server_closes(
    served: tuple[Server, str], client: Client, service: Service
) -> None:
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.call(SERVICE, "Block", StringValue())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert service.gate.entered.wait(60)
    served[0].close()
    t.join(60)
    assert len(errors) == 1
    assert isinstance(errors[0], TtrpcError)
    service.gate.opened.set()
    assert service.gate.cancelled in ([], [True])


def test_connect_errors() -> None:
    with pytest.raises(TtrpcError, match=r"cannot connect to /nonexistent/x\.sock"):
        Client("/nonexistent/x.sock")
    with pytest.raises(TtrpcError, match="empty socket address"):
        Client("unix://")


# ------------------------------------------------------------------------------ deadlines


def test_deadline_reaches_the_handler(client: Client) -> None:
    left = client.call_typed(SERVICE, "Remaining", StringValue(), DoubleValue, timeout=30).value
    assert 0 < left <= 30
    none = client.call_typed(SERVICE, "Remaining", StringValue(), DoubleValue).value
    assert none == -1.0


def test_client_timeout_gives_deadline_exceeded(client: Client, service: Service) -> None:
    with pytest.raises(ShimError, match="deadline exceeded") as err:
        client.call(SERVICE, "Block", StringValue(value="t"), timeout=0.2)
    assert err.value.code == Code.DEADLINE_EXCEEDED
    service.gate.opened.set()  # its late answer is dropped; the connection goes on
    assert client.call(SERVICE, "Raw", b"ab") == b"ba"
    with pytest.raises(ShimError) as zero:
        client.call(SERVICE, "Raw", b"ab", timeout=0)
    assert zero.value.code == Code.DEADLINE_EXCEEDED


def test_expired_request_is_not_run(served: tuple[Server, str], service: Service) -> None:
    sock = raw_connect(served[1])
    payload = StringValue(value="late").SerializeToString()
    sock.sendall(frame(1, request_bytes("Echo", payload, timeout_nano=-1)))
    _, _, response = read_frame(sock)
    assert response.status.code == Code.DEADLINE_EXCEEDED
    assert service.calls == []
    sock.close()


# ------------------------------------------------------------------------------ shutdown


def test_shutdown_waits_for_in_flight(
    served: tuple[Server, str], client: Client, service: Service
) -> None:
    server, path = served
    result: list[str] = []
    call = threading.Thread(
        target=lambda: result.append(
            client.call_typed(SERVICE, "Block", StringValue(value="s"), StringValue).value
        )
    )
    call.start()
    assert service.gate.entered.wait(60)
    finished: list[bool] = []
    stopper = threading.Thread(target=lambda: finished.append(server.shutdown(timeout=60)))
    stopper.start()
    while os.path.exists(path):  # the listener goes first
        stopper.join(0.01)
    with pytest.raises(TtrpcError, match="cannot connect"):
        Client(path)
    assert stopper.is_alive()
    assert finished == []
    service.gate.opened.set()
    stopper.join(60)
    call.join(60)
    assert finished == [True]
    assert result == ["opened s"]
    with pytest.raises(TtrpcError):
        client.call(SERVICE, "Raw", b"")


def test_shutdown_timeout_closes_the_rest(
    served: tuple[Server, str], client: Client, service: Service
) -> None:
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.call(SERVICE, "Block", StringValue())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert service.gate.entered.wait(60)
    assert served[0].shutdown(timeout=0.1) is False
    t.join(60)
    assert len(errors) == 1
    assert isinstance(errors[0], TtrpcError)


def test_shutdown_from_a_handler_answers_it(client: Client) -> None:
    answer = client.call_typed(SERVICE, "ShutdownSelf", StringValue(), StringValue)
    assert answer.value == "True"
    # then its connection closes (at once, or after calls already on their way)
    with pytest.raises(TtrpcError):
        calls_until_closed(client)


def calls_until_closed(client: Client) -> None:
    while True:
        client.call(SERVICE, "Raw", b"")


def test_serve_forever_on_a_given_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "given.sock")
    listener = ttrpc.bind_unix(path)
    server = Server()
    server.register("g.G", {"Raw": lambda payload, ctx: payload})
    thread = threading.Thread(target=server.serve_forever, args=(listener,))
    thread.start()
    with Client(path) as c:
        assert c.call("g.G", "Raw", b"given") == b"given"
    assert server.shutdown(timeout=60)
    thread.join(60)
    assert not thread.is_alive()
    assert os.path.exists(path)  # a given socket's file is its owner's
    with pytest.raises(TtrpcError, match="server closed"):
        server.serve(str(tmp_path / "again.sock"))


def test_served_path_removed_at_close(tmp_path: Path) -> None:
    path = str(tmp_path / "owned.sock")
    server = Server()
    thread = server.serve(path)
    assert os.path.exists(path)
    server.close()
    thread.join(60)
    assert not os.path.exists(path)


@pytest.mark.e2e
def test_other_users_are_refused(service: Service) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    # an abstract socket has no file permissions: anyone may connect, the server refuses
    name = f"@wasidispatch-test-{os.getpid()}-{threading.get_ident()}"
    server = Server()
    server.register(SERVICE, service.methods())
    server.serve(name)
    script = textwrap.dedent(
        f"""
        import os
        from wasidispatch.shim.ttrpc import Client
        from wasidispatch.errors import TtrpcError
        os.setgid(65534)
        os.setuid(65534)
        client = Client({name!r})  # SO_PEERCRED is taken at connect
        try:
            client.call({SERVICE!r}, "Raw", b"x")
        except TtrpcError as exc:
            print(exc.code, exc)
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
        )
        # the server closes at once: the client sees EOF, a reset or a broken pipe depending
        # on how far its request got; always a transport error (14), never an answer
        code, _, reason = out.stdout.strip().partition(" ttrpc: closed: ")
        assert code == "14", out.stdout + out.stderr
        assert reason in (
            "connection closed by the server",
            "Connection reset by peer",
            "Broken pipe",
        ), out.stdout
        with Client(name) as mine:
            assert mine.call(SERVICE, "Raw", b"ab") == b"ba"
    finally:
        server.close()


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


EVENTS = "containerd.services.events.ttrpc.v1.Events"


@pytest.mark.e2e
def test_containerd_answers_unknown_method_and_service(containerd: PrivateContainerd) -> None:
    with Client(f"{containerd.sock}.ttrpc") as c:
        with pytest.raises(UnimplementedError, match=r"^method Nope$") as method:
            c.call(EVENTS, "Nope", b"")
        with pytest.raises(UnimplementedError, match=r"^service wasidispatch\.No$"):
            c.call("wasidispatch.No", "Forward", b"")
        assert method.value.code == 12
        with pytest.raises(UnimplementedError):  # the connection goes on
            c.call(EVENTS, "Nope", b"")


def _go_ttrpc_cases() -> dict[str, tuple[bytes, int, int, str]]:
    length = ttrpc.MAX_MESSAGE_LENGTH + 1
    forward = ttrpc_pb2.Request(service=EVENTS, method="Nope").SerializeToString()
    return {
        "oversized": (
            _HEADER.pack(length, 1, 1, 0) + b"\0" * length,
            1,
            Code.RESOURCE_EXHAUSTED,
            f"message length {length} exceed maximum message size of 4194304",
        ),
        "undecodable request": (frame(3, b"\xff\xff\xff\xff"), 3, 3, "unmarshal request error"),
        "even stream id": (frame(4, forward), 4, 3, "StreamID must be odd"),
    }


@pytest.mark.e2e
@pytest.mark.parametrize("case", _go_ttrpc_cases().keys())
def test_server_answers_odd_frames_as_containerd_does(
    containerd: PrivateContainerd, served: tuple[Server, str], case: str
) -> None:
    data, stream_id, code, message = _go_ttrpc_cases()[case]
    answers = []
    for path in (f"{containerd.sock}.ttrpc", served[1]):
        sock = raw_connect(path)
        sock.sendall(data)
        got_id, mtype, response = read_frame(sock)
        answers.append((got_id, mtype, response.status.code))
        assert message in response.status.message, path
        sock.close()
    assert answers[0] == answers[1] == (stream_id, 2, code)
