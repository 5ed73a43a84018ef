"""containerd's shim v2 process protocol: ``start``, ``delete`` and the long-lived daemon.

containerd (1.6+) runs a shim binary as::

    containerd-shim-NAME-v1 -namespace NS -address SOCK -publish-binary BIN -id ID [-debug] start

with the bundle as its working directory, ``TTRPC_ADDRESS`` (containerd's ttrpc socket, for
events) in the environment and the runtime options as a marshalled ``google.protobuf.Any`` on
stdin (or ``/dev/null``). `run_shim` then

- groups containers: the group is the ``io.kubernetes.cri.sandbox-id`` annotation of the
  bundle's ``config.json`` (the containers of one pod), else the id; the socket name is a
  hash of (address, namespace, group) under ``/run/containerd/s``; when a live shim already
  listens there, ``start`` prints its address and exits;
- otherwise binds and listens on the socket, forks the daemon (a new session, a child
  subreaper, stdio on the bundle's ``log`` FIFO), waits until the daemon reports that it is
  serving, prints ``unix://SOCKET`` and exits 0; a daemon that fails to come up makes
  ``start`` print why and exit 1 (containerd shows that text);
- ``-id ID -bundle B delete``: cleans up after a shim that died (`Shim.cleanup`, the rootfs
  unmounted) and prints a marshalled ``DeleteResponse`` (exit status 137).

The daemon forks its single-threaded helpers first (`Shim.prepare`, e.g. a zygote), then starts
the `Reaper`, the event publisher, the `TaskService` and the ttrpc server, and serves until
containerd's ``Shutdown`` (or SIGTERM): then it deletes what is left, removes its socket and
exits.

Example (the whole of a custom shim's ``main``)::

    def main() -> None:
        run_shim(MyShim())   # MyShim implements the `Shim` protocol
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol

from wasidispatch import _fs

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from wasidispatch.shim.instance import Factory

__all__ = [
    "GROUP_ANNOTATIONS",
    "SOCKET_DIR",
    "BaseShim",
    "Options",
    "Shim",
    "UsageError",
    "parse_args",
    "run_shim",
    "socket_path",
]

SOCKET_DIR = "/run/containerd/s"
GROUP_ANNOTATIONS = ("io.kubernetes.cri.sandbox-id",)
"""Annotations naming a container's group (the first present wins; else its id)."""

_PR_SET_CHILD_SUBREAPER = 36
_READY = b"ok"  # the daemon's line on the readiness pipe when it serves
_signalled: list[bool] = []  # set once the daemon told start it serves (the pipe is closed)
log = logging.getLogger("wasidispatch.shim")


class Shim(Protocol):
    """What a shim built on this toolkit provides to `run_shim`."""

    name: str
    """The runtime's name: ``NAME`` in ``io.containerd.NAME.v1``."""

    def prepare(self, options: Options) -> None:
        """Called in the daemon while it is still single-threaded, before anything else
        starts: fork helper processes here (a zygote)."""
        ...

    def factory(self, options: Options) -> Factory:
        """The `Factory` the Task service creates its instances with."""
        ...

    def cleanup(self, options: Options, bundle: str) -> None:
        """``delete`` after a dead shim: release what the container of ``options.id`` at
        ``bundle`` held (processes, runtime state, cgroups). The rootfs is unmounted after."""
        ...

    def close(self) -> None:
        """The daemon is exiting (every task is deleted already)."""
        ...


class BaseShim:
    """A `Shim` with nothing to prepare, clean up or close: subclass it, set ``name`` and
    write ``factory``."""

    name = "base"

    def prepare(self, options: Options) -> None:
        """Nothing to fork."""

    def factory(self, options: Options) -> Factory:
        """Subclasses return their `Factory`."""
        raise NotImplementedError

    def cleanup(self, options: Options, bundle: str) -> None:
        """Nothing outlives the daemon."""

    def close(self) -> None:
        """Nothing to close."""


@dataclass(frozen=True)
class Options:
    """containerd's command line for a shim (Go flag syntax: ``-flag value``, ``-flag=v``)."""

    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    debug: bool = False
    action: str = ""
    ttrpc_address: str = ""
    version: bool = False


_VALUE_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}
_BOOL_FLAGS = {"debug", "v"}


class UsageError(Exception):
    """The command line is not one containerd sends."""


def parse_args(argv: Sequence[str]) -> Options:
    """Parse a shim command line the way Go's ``flag`` package does.

    >>> o = parse_args(["-namespace", "k8s.io", "-address", "/run/c.sock", "-id", "c1", "start"])
    >>> (o.namespace, o.id, o.action)
    ('k8s.io', 'c1', 'start')
    """
    values: dict[str, str] = {}
    flags: set[str] = set()
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if rest or not arg.startswith("-") or arg in ("-", "--"):
            if arg == "--" and not rest:
                rest.extend(args[i + 1 :])
                break
            rest.append(arg)
            i += 1
            continue
        name = arg.lstrip("-")
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        if name in _BOOL_FLAGS:
            if value is None or value.lower() in ("1", "t", "true"):
                flags.add(name)
            i += 1
            continue
        if name not in _VALUE_FLAGS:
            raise UsageError(f"flag provided but not defined: -{name}")
        if value is None:
            if i + 1 >= len(args):
                raise UsageError(f"flag needs an argument: -{name}")
            value = args[i + 1]
            i += 1
        values[name] = value
        i += 1
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    return Options(
        namespace=values.get("namespace", ""),
        address=values.get("address", ""),
        publish_binary=values.get("publish-binary", ""),
        id=values.get("id", ""),
        bundle=values.get("bundle", ""),
        debug="debug" in flags,
        action=rest[0] if rest else "",
        ttrpc_address=os.environ.get("TTRPC_ADDRESS", ""),
        version="v" in flags,
    )


def socket_path(name: str, address: str, namespace: str, group: str) -> str:
    """Where the shim of ``group`` listens: a hash, so the path fits a ``sun_path``.

    >>> socket_path("x", "/run/c.sock", "default", "g").startswith("/run/containerd/s/")
    True
    """
    key = "\0".join((name, address, namespace, group)).encode()
    return os.path.join(SOCKET_DIR, hashlib.sha256(key).hexdigest())


def _group(bundle: str, task_id: str) -> str:
    """The bundle's group annotation, else the id (a bad config.json: the id)."""
    try:
        data = _fs.read_regular(os.path.join(bundle, "config.json"), limit=_fs.CONFIG_LIMIT)
        spec = json.loads(data)
    except (OSError, ValueError, Exception):
        return task_id
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    if isinstance(annotations, dict):
        for key in GROUP_ANNOTATIONS:
            value = annotations.get(key)
            if isinstance(value, str) and value:
                return value
    return task_id


def _live(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), 0o711, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(64)
    except BaseException:
        listener.close()
        raise
    return listener


# ---------------------------------------------------------------------------------- start


def _start(shim: Shim, opts: Options) -> int:
    if not opts.id or not opts.namespace or not opts.address:
        print("start: -id, -namespace and -address are required", flush=True)
        return 1
    bundle = os.getcwd()
    opts = Options(**{**opts.__dict__, "bundle": opts.bundle or bundle})
    with contextlib.suppress(OSError):
        sys.stdin.buffer.read()  # runtime options: the daemon reads them per Create
    path = socket_path(shim.name, opts.address, opts.namespace, _group(bundle, opts.id))
    address = f"unix://{path}"
    if os.path.exists(path):
        if _live(path):
            _write_address(bundle, address)
            print(address, end="", flush=True)
            return 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead shim's socket
    try:
        listener = _listen(path)
    except OSError as exc:
        if _live(path):  # another start of the same group won the race
            _write_address(bundle, address)
            print(address, end="", flush=True)
            return 0
        print(f"cannot listen on {path}: {exc}", flush=True)
        return 1
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the daemon (tested end to end)
        os.close(ready_r)
        _daemon(shim, opts, listener, path, ready_w)
    os.close(ready_w)
    listener.close()
    answer = _read_all(ready_r, timeout=60.0)
    os.close(ready_r)
    if answer != _READY:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        with contextlib.suppress(FileNotFoundError):
            if not _live(path):
                os.unlink(path)
        reason = answer.decode(errors="replace").strip() or "the shim daemon died on start"
        print(reason, flush=True)
        return 1
    _write_address(bundle, address)
    with contextlib.suppress(OSError):
        _fs.write_atomic(os.path.join(bundle, "shim.pid"), str(pid).encode(), mode=0o644)
    print(address, end="", flush=True)
    return 0


def _write_address(bundle: str, address: str) -> None:
    with contextlib.suppress(OSError):
        _fs.write_atomic(os.path.join(bundle, "address"), address.encode(), mode=0o644)


def _read_all(fd: int, *, timeout: float) -> bytes:
    import select

    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"timed out waiting for the shim daemon"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        if chunk.endswith(b"\n"):  # one line; a helper process may still hold the pipe
            return b"".join(chunks).rstrip(b"\n")


# ---------------------------------------------------------------------------------- daemon


def _redirect_stdio(bundle: str) -> None:
    """stdin /dev/null; stdout and stderr on the bundle's ``log`` FIFO when containerd reads
    it, else /dev/null (the start process's pipe must not stay open: containerd waits for
    its end)."""
    null = os.open(os.devnull, os.O_RDWR)
    out = null
    with contextlib.suppress(OSError):
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.set_blocking(fd, True)
            out = fd
        else:
            os.close(fd)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


def _daemon(
    shim: Shim, opts: Options, listener: socket.socket, path: str, ready: int
) -> NoReturn:  # pragma: no cover - runs in the daemon
    code = 0
    try:
        os.setsid()
        _redirect_stdio(opts.bundle)
        os.chdir("/")
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        logging.basicConfig(
            level=logging.DEBUG if opts.debug else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot become a child subreaper")
        code = _serve(shim, opts, listener, path, ready)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
        if not _signalled:  # the start process still waits: tell it why
            with contextlib.suppress(OSError):
                os.write(ready, message.replace("\n", " ").encode()[:4000] + b"\n")
        log.exception("shim daemon failed")
        code = 1
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(Exception):
            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


def _serve(shim: Shim, opts: Options, listener: socket.socket, path: str, ready: int) -> int:
    """The daemon's life: helpers, reaper, events, service, server; until Shutdown."""
    shim.prepare(opts)  # single-threaded still: fork the zygote here

    from wasidispatch.shim.reaper import Reaper
    from wasidispatch.shim.task import SERVICE, TaskService
    from wasidispatch.shim.ttrpc import Server

    Reaper.default().start(reap_all=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    events = _publisher(opts)
    service = TaskService(
        shim.factory(opts),
        namespace=opts.namespace,
        events=events,
        on_shutdown=stop.set,
    )
    server = Server()
    server.register(SERVICE, service.methods())
    server.serve(listener)
    os.write(ready, _READY + b"\n")
    os.close(ready)
    _signalled.append(True)
    log.info("shim %s serving on %s (pid %d)", shim.name, path, os.getpid())
    while not stop.wait(3600):
        pass
    log.info("shim shutting down")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server.shutdown(timeout=2.0)
    service.close()
    if events is not None:
        events.close(timeout=2.0)
    shim.close()
    return 0


class _Publisher(Protocol):
    def publish(self, topic: str, event: Message) -> None: ...

    def close(self, timeout: float = ...) -> None: ...


def _publisher(opts: Options) -> _Publisher | None:
    if not opts.ttrpc_address:
        log.warning("TTRPC_ADDRESS is not set: events are not published")
        return None
    from wasidispatch.shim.events import Publisher

    return Publisher(opts.ttrpc_address, opts.namespace)


# ---------------------------------------------------------------------------------- delete


def _delete(shim: Shim, opts: Options) -> int:
    bundle = opts.bundle or os.getcwd()
    opts = Options(**{**opts.__dict__, "bundle": bundle})
    try:
        shim.cleanup(opts, bundle)
    except Exception as exc:
        print(f"delete {opts.id}: {exc}", file=sys.stderr, flush=True)
    try:
        from wasidispatch.shim.mount import unmount_rootfs

        unmount_rootfs(os.path.join(bundle, "rootfs"))
    except Exception as exc:
        print(f"delete {opts.id}: cannot unmount the rootfs: {exc}", file=sys.stderr, flush=True)
    from google.protobuf import timestamp_pb2

    from wasidispatch.shim._pb import shim_pb2

    at = timestamp_pb2.Timestamp()
    at.FromNanoseconds(time.time_ns())
    response = shim_pb2.DeleteResponse(pid=0, exit_status=128 + signal.SIGKILL, exited_at=at)
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0


def run_shim(shim: Shim, argv: Sequence[str] | None = None) -> int:
    """A shim binary's ``main``: parse containerd's command line and do its action.

    Returns the exit code (the daemon never returns: it exits the process itself).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args)
    except UsageError as exc:
        print(str(exc), flush=True)
        return 2
    if opts.version:
        from wasidispatch import __version__

        print(f"containerd-shim-{shim.name}-v1 {__version__}")
        return 0
    if opts.action == "start":
        return _start(shim, opts)
    if opts.action == "delete":
        return _delete(shim, opts)
    print(f"unknown action {opts.action!r}: expected start or delete", flush=True)
    return 2
