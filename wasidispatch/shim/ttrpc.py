"""ttrpc, containerd's RPC protocol between the daemon and its shims, over unix sockets.

A connection carries frames: a 10-byte header (payload length, stream id, both u32 big-endian;
a type byte, 1 request, 2 response, 3 data; a flags byte) and at most 4 MiB of payload. A call
is a ``Request`` (service, method, the request message's bytes, a timeout, metadata) on a new
odd stream id, answered by a ``Response`` (a status and the response message's bytes) on the
same id. Calls are independent: many are in flight on one connection, answered in any order.

`Server` answers calls with registered handlers, each call in its own thread (a ``Wait`` that
blocks for minutes does not hold up the other calls of its connection); `Client` makes calls
from any number of threads over one connection. Both are plain threads, no event loop.

Errors travel as status codes (gRPC's, `Code`): a handler raising a
`wasidispatch.errors.ShimError` answers with its ``code`` and message, and the client raises
the matching class again (`error_for_status`). What the server does with odd input follows
containerd's Go implementation where it answers (an unknown service or method: 12, an
oversized frame: 8 after discarding it, an undecodable request, an even or reused stream id:
3); a frame it cannot make sense of (an unknown type, a response sent to the server, a length
with the reserved top byte set, a truncated frame) closes that connection and only that one.

Example::

    >>> from google.protobuf.wrappers_pb2 import StringValue
    >>> server = Server()
    >>> server.register("demo.Echo", {"Say": (StringValue, lambda request, ctx: request)})
    >>> a, b = socket.socketpair()
    >>> server.add_connection(a)
    >>> with Client(b) as client:
    ...     client.call_typed("demo.Echo", "Say", StringValue(value="hi"), StringValue).value
    'hi'
    >>> server.close()
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from wasidispatch.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ShimError,
    TtrpcError,
    UnimplementedError,
)
from wasidispatch.shim._pb import ttrpc_pb2

__all__ = [
    "HEADER_LENGTH",
    "MAX_MESSAGE_LENGTH",
    "NAMESPACE_KEY",
    "Client",
    "Code",
    "Context",
    "Handler",
    "Metadata",
    "Method",
    "Server",
    "Unary",
    "bind_unix",
    "error_for_status",
    "socket_address",
]

_log = logging.getLogger("wasidispatch.shim.ttrpc")

HEADER_LENGTH = 10
MAX_MESSAGE_LENGTH = 4 << 20
NAMESPACE_KEY = "containerd-namespace-ttrpc"
"""The metadata key that carries the containerd namespace of a call."""

_HEADER = struct.Struct(">IIBB")
_REQUEST, _RESPONSE, _DATA = 1, 2, 3
# The protocol keeps the first length byte zero (the cap is below 16 MiB): a frame with it set
# is not ttrpc, and discarding gigabytes of it, as an oversized frame is, serves nobody.
_RESERVED_LENGTH = 1 << 24
_MAX_STREAM_ID = (1 << 32) - 1
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
# accept(2) failures that pass (out of fds or memory for a moment, a peer gone before accept)
_ACCEPT_RETRY = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EINTR}
)


class Code(enum.IntEnum):
    """The gRPC status codes ttrpc answers with (``google.rpc.Code``)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_ERRORS: dict[int, type[ShimError]] = {
    Code.INVALID_ARGUMENT: InvalidArgumentError,
    Code.NOT_FOUND: NotFoundError,
    Code.ALREADY_EXISTS: AlreadyExistsError,
    Code.FAILED_PRECONDITION: FailedPreconditionError,
    Code.UNIMPLEMENTED: UnimplementedError,
    Code.UNAVAILABLE: TtrpcError,
}


def error_for_status(code: int, message: str) -> ShimError:
    """The exception for a peer's non-zero status: the `ShimError` subclass of ``code``
    (`NotFoundError` for 5, ...), else ``ShimError(message, code=code)``.

    >>> type(error_for_status(5, "no such task")).__name__
    'NotFoundError'
    >>> error_for_status(8, "too big").code
    8
    """
    cls = _ERRORS.get(code)
    return cls(message) if cls is not None else ShimError(message, code=code)


def _oversized(length: int) -> str:
    # Go ttrpc's words, which containerd's users see and search for
    return f"message length {length} exceed maximum message size of {MAX_MESSAGE_LENGTH}"


# ------------------------------------------------------------------------------ metadata


class Metadata(Mapping[str, tuple[str, ...]]):
    """A call's metadata: keys (lower-cased, as gRPC's) to every value sent for them, in order.

    >>> md = Metadata([("Containerd-Namespace-Ttrpc", "k8s.io"), ("x", "1"), ("x", "2")])
    >>> md.first("containerd-namespace-ttrpc"), md["x"], md.first("y")
    ('k8s.io', ('1', '2'), None)
    """

    __slots__ = ("_values",)

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        values: dict[str, list[str]] = {}
        for key, value in pairs:
            values.setdefault(key.lower(), []).append(value)
        self._values = {k: tuple(v) for k, v in values.items()}

    @classmethod
    def of(cls, mapping: Mapping[str, str | Sequence[str]]) -> Metadata:
        """Metadata from ``{key: value}`` or ``{key: [values]}``."""
        if isinstance(mapping, Metadata):
            return mapping
        pairs: list[tuple[str, str]] = []
        for key, value in mapping.items():
            pairs += [(key, value)] if isinstance(value, str) else [(key, v) for v in value]
        return cls(pairs)

    def __getitem__(self, key: str) -> tuple[str, ...]:
        return self._values[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Metadata({self.pairs()!r})"

    def first(self, key: str, default: str | None = None) -> str | None:
        """The first value sent for ``key``, or ``default``."""
        values = self._values.get(key.lower())
        return values[0] if values else default

    def pairs(self) -> list[tuple[str, str]]:
        """Every (key, value), in the order of the keys' first appearance."""
        return [(k, v) for k, values in self._values.items() for v in values]


# ------------------------------------------------------------------------------ framing


class _Closed(Exception):
    """The peer closed the connection; ``partial`` when it did so inside a frame."""

    def __init__(self, partial: bool) -> None:
        super().__init__("truncated frame" if partial else "connection closed")
        self.partial = partial


class _ProtocolError(Exception):
    """A frame that is not ttrpc: the connection cannot go on."""


class _Channel:
    """One connected socket: buffered exact reads (one reader thread) and locked writes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._shut = False
        self._released = False

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes of the frame being read; `_Closed` (partial) at EOF."""
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, min(n - len(self._buf), 1 << 20)))
            if not chunk:
                raise _Closed(partial=True)
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read_header(self) -> tuple[int, int, int, int] | None:
        """The next header (length, stream id, type, flags), or ``None`` at a clean EOF."""
        if not self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        length, stream_id, mtype, flags = _HEADER.unpack(self.read(HEADER_LENGTH))
        if length >= _RESERVED_LENGTH:
            raise _ProtocolError(f"frame length {length} is not ttrpc (reserved byte set)")
        return length, stream_id, mtype, flags

    def discard(self, n: int) -> None:
        """Skip ``n`` bytes without keeping them."""
        take = min(n, len(self._buf))
        del self._buf[:take]
        n -= take
        while n > 0:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise _Closed(partial=True)
            n -= len(chunk)

    def send(self, stream_id: int, mtype: int, payload: bytes) -> None:
        """One frame, whole, under the write lock (frames of concurrent calls never mix)."""
        frame = _HEADER.pack(len(payload), stream_id, mtype, 0) + payload
        with self._write_lock:
            self.sock.sendall(frame, _SEND_FLAGS)

    def shutdown(self) -> None:
        """Wake the reader and any blocked writer; the reader thread then calls `release`."""
        with self._state_lock:
            if self._shut or self._released:
                return
            self._shut = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """Close the socket (by the reader thread, once nothing can block on it)."""
        self.shutdown()
        with self._write_lock, self._state_lock:
            if not self._released:
                self._released = True
                self.sock.close()


def socket_address(address: str | os.PathLike[str]) -> str | bytes:
    """The ``AF_UNIX`` address of ``unix:///path``, ``/path`` or ``@name`` (abstract).

    >>> socket_address("unix:///run/containerd/containerd.sock.ttrpc")
    '/run/containerd/containerd.sock.ttrpc'
    >>> socket_address("@shim")
    b'\\x00shim'
    """
    text = os.fspath(address)
    if text.startswith("unix://"):
        text = text[len("unix://") :]
    if not text:
        raise TtrpcError(f"ttrpc: empty socket address {os.fspath(address)!r}")
    if text.startswith("@"):
        return b"\0" + text[1:].encode()
    return text


def bind_unix(path: str | os.PathLike[str], *, backlog: int = 128) -> socket.socket:
    """A listening unix socket bound at ``path`` (which must not exist yet)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(socket_address(path))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TtrpcError(
            f"ttrpc: cannot listen on {os.fspath(path)}: {exc.strerror or exc}"
        ) from exc
    return sock


# ------------------------------------------------------------------------------ server


class Context:
    """What a handler knows about its call: ``service``, ``method``, ``stream_id``, the
    ``metadata``, the ``deadline`` the client set (a `time.monotonic` value, or ``None``), and
    whether the call is ``cancelled`` (its connection closed or the server closed: the answer
    will reach nobody)."""

    __slots__ = ("_cancel", "deadline", "metadata", "method", "service", "stream_id")

    def __init__(
        self,
        *,
        service: str,
        method: str,
        stream_id: int = 0,
        metadata: Metadata | None = None,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.service = service
        self.method = method
        self.stream_id = stream_id
        self.metadata = metadata if metadata is not None else Metadata()
        self.deadline = deadline
        self._cancel = cancel if cancel is not None else threading.Event()

    def __repr__(self) -> str:
        return f"Context({self.service}/{self.method}, stream {self.stream_id})"

    @property
    def namespace(self) -> str | None:
        """The containerd namespace of the call (``containerd-namespace-ttrpc``), if sent."""
        return self.metadata.first(NAMESPACE_KEY)

    def remaining(self) -> float | None:
        """Seconds left until the deadline (0 once passed), or ``None`` without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def expired(self) -> bool:
        """Whether the client's deadline has passed."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def cancelled(self) -> bool:
        """Whether the connection is gone (or the server closed)."""
        return self._cancel.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block until the call is cancelled (True) or ``timeout`` seconds pass (False)."""
        return self._cancel.wait(timeout)


Handler = Callable[[bytes, Context], bytes]
"""A method: the request message's bytes (and the call's `Context`) in, the response
message's bytes out; it raises a `ShimError` to answer with that error's code."""

Method = Handler | tuple[type[Message], Callable[[Any, Context], Message]]
"""What `Server.register` takes per method: a `Handler` (a `Unary` is one), or a pair
(request class, function of (request message, `Context`) returning the response message)."""

RequestT = TypeVar("RequestT", bound=Message)


class Unary(Generic[RequestT]):
    """A typed `Handler`: decodes the request into ``request_type``, calls ``func`` with it
    and the `Context` (request first, as grpc servicers) and encodes the message ``func``
    returns. An undecodable payload answers code 13, as Go's ttrpc does."""

    __slots__ = ("func", "request_type")

    def __init__(
        self, request_type: type[RequestT], func: Callable[[RequestT, Context], Message]
    ) -> None:
        self.request_type = request_type
        self.func = func

    def __call__(self, payload: bytes, ctx: Context) -> bytes:
        request = self.request_type()
        try:
            request.ParseFromString(payload)
        except DecodeError as exc:
            raise ShimError(
                f"ttrpc: error unmarshalling payload: {exc}", code=Code.INTERNAL
            ) from exc
        return self.func(request, ctx).SerializeToString()


_handling = threading.local()  # .conn: the _ServerConnection whose call this thread runs


class _ServerConnection:
    """One accepted connection: its reader thread, its calls in flight."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.channel = _Channel(sock)
        self.cancel = threading.Event()
        self.active = 0  # calls in flight, under server._cond
        self.last_stream_id = 0
        self.thread = threading.Thread(target=self._run, name="ttrpc-conn", daemon=True)

    def close(self) -> None:
        self.cancel.set()
        self.channel.shutdown()

    def _status(self, stream_id: int, code: int, message: str) -> None:
        self.respond(stream_id, code, message, b"")

    def respond(self, stream_id: int, code: int, message: str, payload: bytes) -> None:
        response = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message=message))
        if payload:
            response.payload = payload
        data = response.SerializeToString()
        if len(data) > MAX_MESSAGE_LENGTH:
            # Go's server gives up the whole connection here; the caller learns more this way.
            _log.error("ttrpc: stream %d: response of %d bytes is too big", stream_id, len(data))
            data = ttrpc_pb2.Response(
                status=ttrpc_pb2.Status(code=Code.RESOURCE_EXHAUSTED, message=_oversized(len(data)))
            ).SerializeToString()
        try:
            self.channel.send(stream_id, _RESPONSE, data)
        except OSError as exc:
            _log.debug("ttrpc: stream %d: the answer is lost: %s", stream_id, exc)
            self.close()

    def _run(self) -> None:
        try:
            if self.server._peer_refused(self.channel.sock):
                return
            while True:
                header = self.channel.read_header()
                if header is None:
                    return
                self._frame(*header)
        except _Closed as exc:
            if exc.partial:
                _log.warning("ttrpc: connection closed inside a frame")
        except _ProtocolError as exc:
            _log.warning("ttrpc: closing the connection: %s", exc)
        except OSError as exc:
            if not self.cancel.is_set():
                _log.debug("ttrpc: connection failed: %s", exc)
        finally:
            self.cancel.set()
            self.channel.release()
            self.server._forget(self)

    def _frame(self, length: int, stream_id: int, mtype: int, flags: int) -> None:
        if length > MAX_MESSAGE_LENGTH:
            self.channel.discard(length)
            self._status(stream_id, Code.RESOURCE_EXHAUSTED, _oversized(length))
            return
        payload = self.channel.read(length)
        if mtype not in (_REQUEST, _DATA):
            raise _ProtocolError(f"frame type {mtype} on stream {stream_id}")
        if stream_id % 2 != 1:
            message = "StreamID must be odd for client initiated streams"
            self._status(stream_id, Code.INVALID_ARGUMENT, message)
        elif mtype == _DATA:
            # No method here streams: a data frame belongs to no live stream.
            self._status(stream_id, Code.INVALID_ARGUMENT, "StreamID is no longer active")
        elif stream_id <= self.last_stream_id:
            message = "StreamID cannot be re-used and must increment"
            self._status(stream_id, Code.INVALID_ARGUMENT, message)
        else:
            self.last_stream_id = stream_id
            request = ttrpc_pb2.Request()
            try:
                request.ParseFromString(payload)
            except DecodeError as exc:
                message = f"unmarshal request error: {exc}"
                self._status(stream_id, Code.INVALID_ARGUMENT, message)
                return
            self.server._dispatch(self, stream_id, request)


class Server:
    """A ttrpc server: `register` services, then `serve` (blocking) or `start` (a thread) on
    listening unix sockets, or `add_connection` for a socket already connected.

    ``require_same_user`` refuses peers whose ``SO_PEERCRED`` uid/gid differ from this
    process's effective ones, as containerd's shims do. At most ``max_requests`` calls run at
    once over all connections; one more is answered code 8 at once (never queued: a queue of
    blocking calls such as ``Wait`` could starve the calls that would unblock them).
    """

    def __init__(self, *, require_same_user: bool = True, max_requests: int = 1024) -> None:
        self._services: dict[str, dict[str, Handler]] = {}
        self._require_same_user = require_same_user
        self._max_requests = max_requests
        self._cond = threading.Condition()
        self._listeners: dict[socket.socket, str | None] = {}
        self._connections: set[_ServerConnection] = set()
        self._in_flight = 0
        self._draining = False
        self._closed = False

    def register(self, service: str, methods: Mapping[str, Method]) -> None:
        """Serve ``methods`` (name -> `Method`) as ``service``, its full protobuf name
        (``containerd.task.v2.Task``). A service is registered once."""
        handlers: dict[str, Handler] = {}
        for name, method in methods.items():
            handlers[name] = Unary(*method) if isinstance(method, tuple) else method
        with self._cond:
            if service in self._services:
                raise ValueError(f"duplicate service {service} registered")
            self._services[service] = handlers

    # -------------------------------------------------------------------------- listening

    def serve(self, listener: socket.socket | str | os.PathLike[str]) -> threading.Thread:
        """Accept connections on ``listener`` in a daemon thread (returned) until `shutdown`
        or `close`. A path is bound before this returns (a client may connect at once) and
        removed at close; a socket is the caller's, already listening (the shim's ``start``
        binds it before the daemon runs)."""
        sock = self._listen(listener)
        thread = threading.Thread(target=self._accept, args=(sock,), name="ttrpc-accept")
        thread.daemon = True
        thread.start()
        return thread

    def serve_forever(self, listener: socket.socket | str | os.PathLike[str]) -> None:
        """`serve` in the calling thread: returns after `shutdown` or `close`."""
        self._accept(self._listen(listener))

    def _listen(self, listener: socket.socket | str | os.PathLike[str]) -> socket.socket:
        owned: str | None = None
        if isinstance(listener, socket.socket):
            sock = listener
        else:
            sock = bind_unix(listener)
            address = socket_address(listener)
            owned = address if isinstance(address, str) else None
        with self._cond:
            if not self._draining:
                self._listeners[sock] = owned
                sock.settimeout(None)
                return sock
        self._discard_listener(sock, owned)
        raise TtrpcError("ttrpc: server closed")

    def _accept(self, sock: socket.socket) -> None:
        backoff = 0.0
        try:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError as exc:
                    with self._cond:
                        if sock not in self._listeners:
                            return
                    if exc.errno not in _ACCEPT_RETRY:
                        _log.error("ttrpc: accept failed, no longer listening: %s", exc)
                        return
                    backoff = min(1.0, backoff * 2 or 0.001)
                    _log.error("ttrpc: accept failed (%s); retrying in %.3fs", exc, backoff)
                    time.sleep(backoff)
                    continue
                backoff = 0.0
                self.add_connection(conn)
        finally:
            self._close_listener(sock)

    def add_connection(self, sock: socket.socket) -> None:
        """Serve one connected socket (its reader thread starts here)."""
        conn = _ServerConnection(self, sock)
        with self._cond:
            if self._closed or self._draining:
                sock.close()
                return
            self._connections.add(conn)
        conn.thread.start()

    def _peer_refused(self, sock: socket.socket) -> bool:
        if not self._require_same_user or sock.family != socket.AF_UNIX:
            return False
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if uid == os.geteuid() and gid == os.getegid():
            return False
        _log.warning("ttrpc: refusing pid %d (uid %d, gid %d): not our user", pid, uid, gid)
        return True

    def _close_listener(self, sock: socket.socket) -> None:
        with self._cond:
            if sock not in self._listeners:
                return
            owned = self._listeners.pop(sock)
        self._discard_listener(sock, owned)

    @staticmethod
    def _discard_listener(sock: socket.socket, owned: str | None) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        sock.close()
        if owned is not None:
            with contextlib.suppress(OSError):
                os.unlink(owned)

    def _forget(self, conn: _ServerConnection) -> None:
        with self._cond:
            self._connections.discard(conn)
            self._cond.notify_all()

    # -------------------------------------------------------------------------- calls

    def _dispatch(
        self, conn: _ServerConnection, stream_id: int, request: ttrpc_pb2.Request
    ) -> None:
        received = time.monotonic()
        methods = self._services.get(request.service)
        if methods is None:
            conn._status(stream_id, Code.UNIMPLEMENTED, f"service {request.service}")
            return
        handler = methods.get(request.method)
        if handler is None:
            conn._status(stream_id, Code.UNIMPLEMENTED, f"method {request.method}")
            return
        deadline = None
        if request.timeout_nano != 0:
            deadline = received + request.timeout_nano / 1e9
        ctx = Context(
            service=request.service,
            method=request.method,
            stream_id=stream_id,
            metadata=Metadata((kv.key, kv.value) for kv in request.metadata),
            deadline=deadline,
            cancel=conn.cancel,
        )
        with self._cond:
            busy = self._in_flight >= self._max_requests
            if not busy:
                self._in_flight += 1
                conn.active += 1
        if busy:
            message = f"ttrpc: too many concurrent requests ({self._max_requests})"
            conn._status(stream_id, Code.RESOURCE_EXHAUSTED, message)
            return
        thread = threading.Thread(
            target=self._handle,
            args=(conn, handler, ctx, request.payload),
            name=f"ttrpc {request.method}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError as exc:  # can't start new thread
            self._done(conn)
            conn._status(stream_id, Code.RESOURCE_EXHAUSTED, f"ttrpc: {exc}")

    def _handle(
        self, conn: _ServerConnection, handler: Handler, ctx: Context, payload: bytes
    ) -> None:
        _handling.conn = conn
        code: int = Code.OK
        message, answer = "", b""
        try:
            if ctx.expired:
                code, message = Code.DEADLINE_EXCEEDED, "context deadline exceeded"
            else:
                answer = handler(payload, ctx)
                if not isinstance(answer, bytes):
                    raise TypeError(f"handler returned {type(answer).__name__}, not bytes")
        except ShimError as exc:
            code, message = exc.code or Code.UNKNOWN, exc.message
            _log.debug("ttrpc: %s/%s: code %d: %s", ctx.service, ctx.method, code, message)
        except Exception as exc:
            _log.exception("ttrpc: %s/%s failed", ctx.service, ctx.method)
            code, message = Code.UNKNOWN, str(exc) or type(exc).__name__
        finally:
            _handling.conn = None
        try:
            conn.respond(ctx.stream_id, code, message, answer)
        finally:
            self._done(conn)

    def _done(self, conn: _ServerConnection) -> None:
        with self._cond:
            self._in_flight -= 1
            conn.active -= 1
            idle = conn.active == 0
            self._cond.notify_all()
            draining = self._draining
        if draining and idle:
            conn.close()

    # -------------------------------------------------------------------------- stopping

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, let the calls in flight on open connections finish (at most
        ``timeout`` seconds), closing every connection as it becomes idle; True when all
        finished in time, else the rest is closed as by `close`. Calls arriving meanwhile on
        open connections are still served; calls whose client is gone are not waited for
        (their ``ctx.cancelled`` is set). Called from a handler, it does not wait for that
        handler's own call, whose answer is still sent before its connection closes."""
        with self._cond:
            self._draining = True
            listeners = list(self._listeners)
        for sock in listeners:
            self._close_listener(sock)
        own = getattr(_handling, "conn", None)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                busy = 0
                for conn in self._connections:
                    if conn.active == 0:
                        conn.close()
                    busy += conn.active - (conn is own)
                if busy == 0:
                    finished = True
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    finished = False
                    break
                self._cond.wait(remaining)
        if not finished:
            _log.warning("ttrpc: %d calls still running at shutdown", busy)
            self.close()
        return finished

    def close(self) -> None:
        """Stop at once: close the listeners and every connection (handlers still running
        see ``ctx.cancelled``; their answers are dropped). Idempotent."""
        with self._cond:
            self._closed = True
            self._draining = True
            listeners = list(self._listeners)
            connections = list(self._connections)
        for sock in listeners:
            self._close_listener(sock)
        for conn in connections:
            conn.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ client

ResponseT = TypeVar("ResponseT", bound=Message)


class _Pending:
    __slots__ = ("done", "error", "response")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: ttrpc_pb2.Response | None = None
        self.error: str | None = None


class Client:
    """A ttrpc client on one connection to ``address`` (``unix:///path``, ``/path``,
    ``@abstract``, or a connected socket). Thread-safe: concurrent calls share the connection,
    a reader thread hands each response to its caller. A transport failure or a closed
    connection raises `TtrpcError`; the peer's status raises `error_for_status`. The client
    does not reconnect: make a new one."""

    def __init__(
        self, address: str | os.PathLike[str] | socket.socket, *, connect_timeout: float = 10.0
    ) -> None:
        if isinstance(address, socket.socket):
            sock = address
            self.address = "<socket>"
        else:
            self.address = os.fspath(address)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(connect_timeout)
                sock.connect(socket_address(address))
                sock.settimeout(None)
            except OSError as exc:
                sock.close()
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise TtrpcError(f"ttrpc: cannot connect to {self.address}: {reason}") from exc
        self._channel = _Channel(sock)
        self._lock = threading.Lock()  # _pending, _error
        self._send_lock = threading.Lock()  # stream id order == wire order
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._error: str | None = None
        self._reader = threading.Thread(target=self._read, name="ttrpc-client", daemon=True)
        self._reader.start()

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (every further call raises `TtrpcError`)."""
        return self._error is not None

    def call(
        self,
        service: str,
        method: str,
        request: Message | bytes,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | Sequence[str]] | None = None,
    ) -> bytes:
        """Call ``service/method`` with ``request`` (a message or its bytes); returns the
        response message's bytes. ``timeout`` (seconds) is sent as the call's deadline and
        bounds the wait here (then code 4, ``DEADLINE_EXCEEDED``)."""
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        frame = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout is not None:
            if timeout <= 0:
                raise ShimError("context deadline exceeded", code=Code.DEADLINE_EXCEEDED)
            frame.timeout_nano = max(1, int(timeout * 1e9))
        if metadata:
            for key, value in Metadata.of(metadata).pairs():
                frame.metadata.add(key=key, value=value)
        data = frame.SerializeToString()
        if len(data) > MAX_MESSAGE_LENGTH:
            raise ShimError(_oversized(len(data)), code=Code.RESOURCE_EXHAUSTED)
        pending = _Pending()
        with self._send_lock:
            with self._lock:
                if self._error is not None:
                    raise TtrpcError(self._error)
                stream_id = self._next_id
                if stream_id > _MAX_STREAM_ID:
                    raise TtrpcError("ttrpc: stream ids exhausted on this connection")
                self._next_id += 2
                self._pending[stream_id] = pending
            try:
                self._channel.send(stream_id, _REQUEST, data)
            except OSError as exc:
                self._fail(f"ttrpc: closed: {exc.strerror or exc}")
                raise TtrpcError(f"ttrpc: closed: {exc.strerror or exc}") from exc
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(stream_id, None)
            if not pending.done.is_set():
                raise ShimError("context deadline exceeded", code=Code.DEADLINE_EXCEEDED)
        if pending.error is not None:
            raise TtrpcError(pending.error)
        response = pending.response
        assert response is not None
        if response.HasField("status") and response.status.code != Code.OK:
            raise error_for_status(response.status.code, response.status.message)
        return response.payload

    def call_typed(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | Sequence[str]] | None = None,
    ) -> ResponseT:
        """`call`, decoding the answer into a ``response_type`` message."""
        payload = self.call(service, method, request, timeout=timeout, metadata=metadata)
        response = response_type()
        try:
            response.ParseFromString(payload)
        except DecodeError as exc:
            raise TtrpcError(f"ttrpc: undecodable {response_type.__name__}: {exc}") from exc
        return response

    def _fail(self, reason: str) -> None:
        """Close the connection for ``reason``: every waiting call raises `TtrpcError`."""
        with self._lock:
            if self._error is None:
                self._error = reason
            pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.error = reason
            waiter.done.set()
        self._channel.shutdown()

    def _deliver(self, stream_id: int, response: ttrpc_pb2.Response) -> None:
        with self._lock:
            waiter = self._pending.pop(stream_id, None)
        if waiter is None:  # the caller gave up (timeout) or the peer is confused
            _log.debug("ttrpc: response for unknown stream %d", stream_id)
            return
        waiter.response = response
        waiter.done.set()

    def _read(self) -> None:
        reason = "ttrpc: closed: connection closed by the server"
        try:
            while True:
                header = self._channel.read_header()
                if header is None:
                    break
                length, stream_id, mtype, _flags = header
                if length > MAX_MESSAGE_LENGTH:
                    self._channel.discard(length)
                    status = ttrpc_pb2.Status(
                        code=Code.RESOURCE_EXHAUSTED, message=_oversized(length)
                    )
                    self._deliver(stream_id, ttrpc_pb2.Response(status=status))
                    continue
                payload = self._channel.read(length)
                if mtype == _DATA:
                    _log.debug("ttrpc: data frame on unary stream %d ignored", stream_id)
                    continue
                if mtype != _RESPONSE:
                    raise _ProtocolError(f"frame type {mtype} from the server")
                response = ttrpc_pb2.Response()
                try:
                    response.ParseFromString(payload)
                except DecodeError as exc:
                    raise _ProtocolError(f"undecodable response: {exc}") from exc
                self._deliver(stream_id, response)
        except _Closed as exc:
            if exc.partial:
                reason = "ttrpc: closed: the server closed the connection inside a frame"
        except _ProtocolError as exc:
            reason = f"ttrpc: protocol error: {exc}"
        except OSError as exc:
            reason = f"ttrpc: closed: {exc.strerror or exc}"
        finally:
            self._fail(reason)
            self._channel.release()

    def close(self) -> None:
        """Close the connection (calls in flight raise `TtrpcError`). Idempotent."""
        self._fail("ttrpc: closed")
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
