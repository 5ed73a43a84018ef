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

import os
import sys

# Only os and sys at import: `start` of a container whose group's shim runs and `delete` are
# a fresh interpreter per container, in containerd's critical path, and each stdlib module
# costs milliseconds here (json, hashlib, socket, logging, dataclasses: ~50 ms together).
# Everything else is imported where it is used (mypy reads TYPE_CHECKING = False as usual).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Sequence
    from typing import NoReturn, Protocol

    from google.protobuf.message import Message

    from wasidispatch.shim.instance import Shim

__all__ = [
    "GROUP_ANNOTATIONS",
    "SOCKET_DIR",
    "Options",
    "UsageError",
    "annotation",
    "delete_response",
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
_LOGGER = "wasidispatch.shim"


class Options:
    """containerd's command line for a shim (Go flag syntax: ``-flag value``, ``-flag=v``)."""

    __slots__ = (
        "action",
        "address",
        "bundle",
        "debug",
        "id",
        "namespace",
        "publish_binary",
        "ttrpc_address",
        "version",
    )

    def __init__(
        self,
        *,
        namespace: str = "",
        address: str = "",
        publish_binary: str = "",
        id: str = "",
        bundle: str = "",
        debug: bool = False,
        action: str = "",
        ttrpc_address: str = "",
        version: bool = False,
    ) -> None:
        self.namespace = namespace
        self.address = address
        self.publish_binary = publish_binary
        self.id = id
        self.bundle = bundle
        self.debug = debug
        self.action = action
        self.ttrpc_address = ttrpc_address
        self.version = version

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Options({fields})"


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


def _sha256_hex(data: bytes) -> str:
    try:  # the builtin module: hashlib's OpenSSL import costs ~6 ms
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - other interpreters
        from hashlib import sha256
    digest: str = sha256(data).hexdigest()
    return digest


def socket_path(name: str, address: str, namespace: str, group: str) -> str:
    """Where the shim of ``group`` listens: a hash, so the path fits a ``sun_path``.

    >>> socket_path("x", "/run/c.sock", "default", "g").startswith("/run/containerd/s/")
    True
    """
    key = "\0".join((name, address, namespace, group)).encode()
    return os.path.join(SOCKET_DIR, _sha256_hex(key))


def _read_small(path: str, limit: int = 4 << 20) -> bytes | None:
    """A regular file's bytes (no FIFO wait, no symlink at ``path``), or ``None``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000 or st.st_size > limit:
            return None
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks) if total <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def annotation(config: bytes, key: str) -> str | None:
    """The string value of ``key`` among config.json's ``annotations``, without importing
    ``json`` (its import costs ~12 ms on the ``start`` path): the key quoted and followed by
    ``:`` can only be an object key (``process.env`` holds ``"K=V"`` strings), and the value
    is decoded by the C scanner ``json`` itself uses. Anything unusual falls back to ``json``.

    >>> annotation(b'{"annotations": {"a": "b", "k": "v\\\\u0021"}}', "k")
    'v!'
    """
    needle = ('"' + key + '"').encode()
    at = config.find(needle)
    if at < 0 or config.find(needle, at + 1) >= 0 or b"\\u" in config[:at]:
        return _annotation_json(config, key) if at >= 0 else None
    i = at + len(needle)
    while i < len(config) and config[i] in b" \t\r\n":
        i += 1
    if i >= len(config) or config[i] != ord(":"):
        return _annotation_json(config, key)
    i += 1
    while i < len(config) and config[i] in b" \t\r\n":
        i += 1
    if i >= len(config) or config[i] != ord('"'):
        return _annotation_json(config, key)
    try:
        from _json import scanstring

        value, _ = scanstring(config.decode(), len(config[: i + 1].decode()), True)
    except (ImportError, UnicodeDecodeError, ValueError):
        return _annotation_json(config, key)
    return str(value)


def _annotation_json(config: bytes, key: str) -> str | None:
    import json

    try:
        spec = json.loads(config)
    except ValueError:
        return None
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    value = annotations.get(key) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) else None


def _group(bundle: str, task_id: str) -> str:
    """The bundle's group annotation, else the id (a bad config.json: the id)."""
    config = _read_small(os.path.join(bundle, "config.json"))
    if config is None:
        return task_id
    for key in GROUP_ANNOTATIONS:
        value = annotation(config, key)
        if value:
            return value
    return task_id


def _live(path: str) -> bool:
    import _socket

    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _listen(path: str) -> socket.socket:
    import socket

    os.makedirs(os.path.dirname(path), 0o711, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        st = os.stat(path)
        _OWN_SOCKET[:] = [(st.st_dev, st.st_ino)]
        os.chmod(path, 0o600)
        listener.listen(64)
    except BaseException:
        listener.close()
        raise
    return listener


_OWN_SOCKET: list[tuple[int, int]] = []  # (st_dev, st_ino) of the socket this daemon bound


def _unlink_own(path: str, listener: socket.socket) -> None:
    """Remove the group's socket only while it is still this daemon's: after this daemon
    unlinked it, the next ``start`` of the group may have bound a new one there."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if _OWN_SOCKET and (st.st_dev, st.st_ino) != _OWN_SOCKET[0]:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_small(path: str, data: bytes) -> None:
    """Replace ``path`` (in a bundle) with ``data``: an exclusive, non-following temporary
    name and ``rename(2)``, as `wasidispatch._fs.write_atomic` (whose imports ``start``
    cannot afford). Failures are ignored: these files only help a restarted containerd."""
    tmp = f"{path}.{os.urandom(6).hex()}.tmp"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
    except OSError:
        return
    try:
        os.write(fd, data)
        os.close(fd)
        os.rename(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------- start


def _start(shim: Shim, opts: Options) -> int:
    if not opts.id or not opts.namespace or not opts.address:
        _out("start: -id, -namespace and -address are required\n")
        return 1
    bundle = opts.bundle or os.getcwd()
    opts.bundle = bundle
    try:
        sys.stdin.buffer.read()  # runtime options: the daemon reads them per Create
    except OSError:
        pass
    path = socket_path(shim.name, opts.address, opts.namespace, _group(bundle, opts.id))
    address = f"unix://{path}"
    if os.path.exists(path):
        if _live(path):
            _write_small(os.path.join(bundle, "address"), address.encode())
            _out(address)
            return 0
        try:
            os.unlink(path)  # a dead shim's socket
        except FileNotFoundError:
            pass
    try:
        listener = _listen(path)
    except OSError as exc:
        if _live(path):  # another start of the same group won the race
            _write_small(os.path.join(bundle, "address"), address.encode())
            _out(address)
            return 0
        _out(f"cannot listen on {path}: {exc}\n")
        return 1
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the daemon (tested end to end)
        os.close(ready_r)
        _daemon(shim, opts, listener, path, ready_w)
    os.close(ready_w)
    listener.close()
    answer = _read_line(ready_r, timeout=60.0)
    os.close(ready_r)
    if answer != _READY:
        import signal

        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        if os.path.exists(path) and not _live(path):
            try:
                os.unlink(path)
            except OSError:
                pass
        reason = answer.decode(errors="replace").strip() or "the shim daemon died on start"
        _out(reason + "\n")
        return 1
    _write_small(os.path.join(bundle, "address"), address.encode())
    _write_small(os.path.join(bundle, "shim.pid"), str(pid).encode())
    _out(address)
    return 0


def _read_line(fd: int, *, timeout: float) -> bytes:
    """The daemon's one line (without its newline), or what came before EOF."""
    import select
    import time

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
    import stat

    null = os.open(os.devnull, os.O_RDWR)
    out = null
    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.set_blocking(fd, True)
            out = fd
        else:
            os.close(fd)
    except OSError:
        pass
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


def _daemon(
    shim: Shim, opts: Options, listener: socket.socket, path: str, ready: int
) -> NoReturn:  # pragma: no cover - runs in the daemon
    import contextlib
    import ctypes
    import logging
    import signal

    code = 0
    log = logging.getLogger(_LOGGER)
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
        _unlink_own(path, listener)
        with contextlib.suppress(Exception):
            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


def _serve(shim: Shim, opts: Options, listener: socket.socket, path: str, ready: int) -> int:
    """The daemon's life: helpers, reaper, events, service, server; until Shutdown."""
    shim.prepare(opts)  # single-threaded still: fork the zygote here

    import logging
    import signal
    import threading

    from wasidispatch.shim.reaper import Reaper
    from wasidispatch.shim.task import SERVICE, TaskService
    from wasidispatch.shim.ttrpc import Server

    log = logging.getLogger(_LOGGER)
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
    _unlink_own(path, listener)  # first: a new start of the group makes a new shim at once
    server.shutdown(timeout=2.0)
    service.close()
    if events is not None:
        events.close(timeout=2.0)
    shim.close()
    return 0


if TYPE_CHECKING:

    class _Publisher(Protocol):
        def publish(self, topic: str, event: Message) -> None: ...

        def close(self, timeout: float = ...) -> None: ...


def _publisher(opts: Options) -> _Publisher | None:
    if not opts.ttrpc_address:
        import logging

        logging.getLogger(_LOGGER).warning("TTRPC_ADDRESS is not set: events are not published")
        return None
    from wasidispatch.shim.events import Publisher

    return Publisher(opts.ttrpc_address, opts.namespace)


# ---------------------------------------------------------------------------------- delete


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def delete_response(pid: int, exit_status: int, at_ns: int) -> bytes:
    """A marshalled ``containerd.task.v2.DeleteResponse`` (pid=1, exit_status=2,
    exited_at=3 {seconds=1, nanos=2}), encoded here: ``delete`` runs once per container in
    containerd's critical path and importing protobuf costs ~25 ms (a test compares this
    with the generated message).

    >>> delete_response(0, 137, 1_500_000_000).hex()
    '1089011a0808011080cab5ee01'
    """
    seconds, nanos = divmod(at_ns, 1_000_000_000)
    stamp = b""
    if seconds:
        stamp += b"\x08" + _varint(seconds)
    if nanos:
        stamp += b"\x10" + _varint(nanos)
    out = b""
    if pid:
        out += b"\x08" + _varint(pid)
    if exit_status:
        out += b"\x10" + _varint(exit_status)
    return out + b"\x1a" + _varint(len(stamp)) + stamp


def _delete(shim: Shim, opts: Options) -> int:
    import time

    bundle = opts.bundle or os.getcwd()
    opts.bundle = bundle
    try:
        shim.cleanup(opts, bundle)
    except Exception as exc:
        sys.stderr.write(f"delete {opts.id}: {exc}\n")
    rootfs = os.path.join(bundle, "rootfs")
    if _mounted_below(rootfs):
        try:
            from wasidispatch.shim.mount import unmount_rootfs

            unmount_rootfs(rootfs)
        except Exception as exc:
            sys.stderr.write(f"delete {opts.id}: cannot unmount the rootfs: {exc}\n")
    sys.stdout.buffer.write(delete_response(0, 128 + 9, time.time_ns()))
    sys.stdout.flush()
    return 0


def _mounted_below(path: str) -> bool:
    """Whether anything is mounted at or below ``path`` (from /proc/self/mountinfo)."""
    data = _read_small("/proc/self/mountinfo", limit=64 << 20)
    if data is None:
        return True  # cannot tell: let unmount_rootfs look
    prefix = path.rstrip("/").encode()
    for line in data.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4:
            point = fields[4].replace(b"\\040", b" ")
            if point == prefix or point.startswith(prefix + b"/"):
                return True
    return False


def run_shim(shim: Shim, argv: Sequence[str] | None = None) -> int:
    """A shim binary's ``main``: parse containerd's command line and do its action.

    Returns the exit code (the daemon never returns: it exits the process itself).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args)
    except UsageError as exc:
        _out(f"{exc}\n")
        return 2
    if opts.version:
        from wasidispatch import __version__

        _out(f"containerd-shim-{shim.name}-v1 {__version__}\n")
        return 0
    if opts.action == "start":
        return _start(shim, opts)
    if opts.action == "delete":
        return _delete(shim, opts)
    _out(f"unknown action {opts.action!r}: expected start or delete\n")
    return 2
