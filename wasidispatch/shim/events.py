"""Task events, forwarded to containerd over ttrpc (``Events/Forward`` on ``TTRPC_ADDRESS``).

`Publisher.publish` stamps the event at once (timestamp, namespace, topic, the message packed
in an ``Any`` under containerd's type URL) and queues it; one background thread sends the
queue in order over one connection, as containerd's own shim publisher does: each call has a
5 s deadline, a lost connection is reopened, and a failed send is retried after 1 s, 2 s, ...
(5 retries), then logged and dropped. Unlike Go's publisher, a retry holds back the events
behind it, so containerd sees them in the order they happened (an exit never before its start).
An answer that a retry cannot change (containerd refusing the envelope) drops the event at once.

The ``ForwardRequest`` always carries its envelope (containerd 1.6.20 crashes on one without),
and the call carries the namespace as ``containerd-namespace-ttrpc`` metadata, as containerd's
ttrpc clients send it.

Example (``address`` is containerd's ``<grpc socket>.ttrpc``)::

    publisher = Publisher(os.environ["TTRPC_ADDRESS"], namespace="default")
    publisher.publish("/tasks/start", events_pb2.TaskStart(container_id="c1", pid=42))
    publisher.close(timeout=2.0)  # sends what is queued first
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message

from wasidispatch.errors import InvalidArgumentError, ShimError, TtrpcError
from wasidispatch.shim._pb import events_ttrpc_pb2
from wasidispatch.shim.ttrpc import NAMESPACE_KEY, Client, Code

__all__ = ["EVENTS_SERVICE", "Publisher", "type_url"]

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"

_log = logging.getLogger("wasidispatch.shim.events")

# Statuses worth a retry: the transport, or a containerd too busy or too slow to answer.
_RETRY_CODES = frozenset({Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED})


def type_url(event: Message) -> str:
    """The type URL containerd gives an event in its ``Any``: the message's full protobuf
    name (``containerd.events.TaskExit``), which its ``typeurl`` registry resolves.

    >>> from google.protobuf.empty_pb2 import Empty
    >>> type_url(Empty())
    'google.protobuf.Empty'
    """
    return event.DESCRIPTOR.full_name


class _Queued(NamedTuple):
    topic: str
    namespace: str
    request: bytes  # the whole ForwardRequest, stamped at publish time


class Publisher:
    """Forwards events to containerd's ttrpc ``address`` (see the module docstring).

    ``namespace`` is the default for `publish`. ``timeout`` bounds each call, ``retries``
    and ``backoff`` (seconds, times the attempt number) shape the retries; at most
    ``max_queued`` events wait (more are dropped, logged). ``connect`` makes the client (a
    test seam; `wasidispatch.shim.ttrpc.Client` by default). Not for use in a forked child:
    its thread does not survive ``fork``.
    """

    def __init__(
        self,
        address: str | os.PathLike[str],
        namespace: str | None = None,
        *,
        timeout: float = 5.0,
        retries: int = 5,
        backoff: float = 1.0,
        max_queued: int = 2048,
        connect: Callable[[str], Client] = Client,
    ) -> None:
        self.address = os.fspath(address)
        self.namespace = namespace
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._max_queued = max_queued
        self._connect = connect
        self._cond = threading.Condition()
        self._queue: collections.deque[_Queued] = collections.deque()
        self._sending = False
        self._closing = False  # no more publish
        self._stopped = False  # close's flush is over: drop the rest, stop retrying
        self._client: Client | None = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def publish(self, topic: str, event: Message, *, namespace: str | None = None) -> None:
        """Queue ``event`` under ``topic`` (``/tasks/exit``, ...) in ``namespace`` (default:
        the publisher's) and return at once. A publisher without a namespace raises
        `InvalidArgumentError`; a closed or full queue drops the event (logged)."""
        ns = namespace or self.namespace
        if not ns:
            raise InvalidArgumentError(f"event {topic}: no namespace to publish it in")
        request = events_ttrpc_pb2.ForwardRequest()
        envelope = request.envelope  # always present, even if every field were empty
        envelope.timestamp.FromNanoseconds(time.time_ns())
        envelope.namespace = ns
        envelope.topic = topic
        envelope.event.CopyFrom(
            AnyMessage(type_url=type_url(event), value=event.SerializeToString())
        )
        item = _Queued(topic, ns, request.SerializeToString())
        with self._cond:
            if self._closing:
                _log.warning("event %s dropped: the publisher is closed", topic)
                return
            if len(self._queue) >= self._max_queued:
                _log.error("event %s dropped: %d events wait already", topic, len(self._queue))
                return
            self._queue.append(item)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event is sent (or dropped); False if ``timeout`` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._sending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking events, send what is queued for at most ``timeout`` seconds (the
        rest is dropped, logged), then close the connection. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is self._thread:
            return
        self.flush(timeout)
        with self._cond:
            self._stopped = True
            client = self._client
            self._cond.notify_all()
        if client is not None:
            client.close()  # a call in flight ends now
        self._thread.join(timeout=5.0)
        with self._cond:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ sender

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._stopped)
                if self._stopped:
                    dropped = len(self._queue)
                    self._queue.clear()
                    self._cond.notify_all()
                    break
                item = self._queue[0]
                self._sending = True
            try:
                self._deliver(item)
            except Exception:  # the sender must outlive any one event
                _log.exception("event %s dropped", item.topic)
            finally:
                with self._cond:
                    self._queue.popleft()
                    self._sending = False
                    self._cond.notify_all()
        if dropped:
            _log.error("%d more events dropped at close: not sent", dropped)

    def _deliver(self, item: _Queued) -> None:
        """Send ``item`` with retries; log and give up when they are spent."""
        for attempt in range(self._retries + 1):
            if attempt:
                with self._cond:
                    if self._cond.wait_for(lambda: self._stopped, self._backoff * attempt):
                        _log.error("event %s dropped at close: not sent", item.topic)
                        return
            error = self._forward(item)
            if error is None:
                return
            if error.code not in _RETRY_CODES:
                _log.error("event %s dropped: containerd refused it: %s", item.topic, error)
                return
            _log.warning("event %s not sent (attempt %d): %s", item.topic, attempt + 1, error)
        _log.error("event %s dropped after %d attempts", item.topic, self._retries + 1)

    def _forward(self, item: _Queued) -> ShimError | None:
        """One attempt. A connection that proves dead is replaced at once, once (containerd
        restarted since the last event); a new one that fails is the attempt's failure."""
        fresh = False
        while True:
            with self._cond:
                if self._stopped:
                    return TtrpcError("ttrpc: the publisher is closed")
                client = self._client
            try:
                if client is None:
                    fresh = True
                    client = self._connect(self.address)
                    with self._cond:
                        self._client = client
                client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    item.request,
                    timeout=self._timeout,
                    metadata={NAMESPACE_KEY: item.namespace},
                )
                return None
            except TtrpcError as exc:
                with self._cond:
                    if self._client is client:
                        self._client = None
                if client is not None:
                    client.close()
                if fresh:
                    return exc
            except ShimError as exc:
                return exc
