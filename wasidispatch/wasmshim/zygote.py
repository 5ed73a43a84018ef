"""The zygote: the single-threaded warm process Wasm containers are forked from.

Forking a multi-threaded process is unsafe: the child gets only the forking thread, and any
lock another thread held (the allocator's, the import lock, a logging handler's, a rayon
pool's in wasmtime) stays locked forever. The shim daemon has threads (ttrpc, events, the
reaper), so it never forks a container itself. Instead, while the daemon is still
single-threaded (`wasidispatch.shim.Shim.prepare`), `Zygote.start` forks the zygote, which

- keeps only fds 0-2 and its end of a ``SOCK_SEQPACKET`` socketpair (the daemon's listening
  socket and readiness pipe must not outlive the daemon), dies with the daemon
  (``PR_SET_PDEATHSIG``), restores the default signal dispositions;
- imports the executor and the engines and builds one `wasidispatch.executor.WasmExecutor`
  with the precompile cache, never compiling (wasmtime compiles on a thread pool): a new
  container inherits the loaded engine, and its module comes precompiled from the cache;
- serves spawn requests one at a time, and before every fork checks that it still has a
  single thread (``/proc/self/task``), refusing otherwise.

A spawn forks a child that forks the container process and exits at once, so the container
process is re-parented to the daemon (a child subreaper) and reaped by its `Reaper`, like
runc's container init. The container process talks to the shim on its own control socket
(passed with the request): its pid, then "ready" (or the error) once it prepared the module,
joined its cgroup and applied the process settings; then it waits for "start", takes its stdio
(containerd's FIFOs, or a terminal's slave) and runs the guest; its exit code is the WASI
exit code, a signal kills it (the reaper reports 128+N).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from wasidispatch._signals import cancel_on_signals
from wasidispatch.errors import ShimError

__all__ = ["Zygote", "container_main"]

_PR_SET_PDEATHSIG = 1
_THREAD_FREE = ("wasmtime-fast", "wasmtime")  # engines whose construction starts no thread
_MAX_MESSAGE = 1 << 20
_RESET_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGPIPE,
    signal.SIGCHLD,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def send(sock: socket.socket, message: Mapping[str, object], fds: Sequence[int] = ()) -> None:
    """One JSON message (and fds) on a SEQPACKET socket."""
    data = json.dumps(message).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(_fd_array(fds)))])
    else:
        sock.send(data)


def _fd_array(fds: Sequence[int]) -> bytearray:
    import array

    return bytearray(array.array("i", fds).tobytes())


def receive(sock: socket.socket, max_fds: int = 4) -> tuple[dict[str, object] | None, list[int]]:
    """One message and its fds; ``(None, [])`` at EOF."""
    import array

    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(max_fds * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message = json.loads(data)
    return (message if isinstance(message, dict) else {}), list(fds)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


class Zygote:
    """The shim side of the zygote: `start` it before any thread exists, `spawn` from any
    thread (requests are serialised), `close` at the end."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._lock = threading.Lock()

    @classmethod
    def start(cls, *, engine: str | None = None, cache_dir: str | None = None) -> Zygote:
        """Fork the zygote. Must be called while this process has a single thread."""
        if _threads() != 1:
            raise ShimError(f"the zygote must be forked single-threaded ({_threads()} threads)")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the zygote
            parent.close()
            _zygote_main(child, engine, cache_dir)
        child.close()
        return cls(pid, parent)

    def spawn(self, request: Mapping[str, object], fds: Sequence[int]) -> None:
        """Ask for a container process (``fds``: its control socket first, then a terminal's
        slave); the process reports on its control socket. Raises `ShimError` when the
        zygote refuses or is gone."""
        with self._lock:
            try:
                send(self._sock, request, fds)
                answer, extra = receive(self._sock)
            except OSError as exc:
                raise ShimError(f"the zygote is gone: {exc}") from exc
        for fd in extra:
            os.close(fd)
        if answer is None:
            raise ShimError("the zygote is gone")
        if answer.get("error"):
            raise ShimError(f"zygote: {answer['error']}")

    def threads(self) -> int:
        """How many threads the zygote has (1, always: tests check it)."""
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def close(self) -> None:
        """Stop the zygote (it exits at EOF) and reap it."""
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        from wasidispatch.shim.reaper import Reaper

        reaper = Reaper.default()
        reaper.watch(self.pid)
        with contextlib.suppress(Exception):
            reaper.wait(self.pid, 5)
            reaper.forget(self.pid)


# ------------------------------------------------------------------------------ the zygote


def _zygote_main(
    sock: socket.socket, engine: str | None, cache_dir: str | None
) -> NoReturn:  # pragma: no cover - runs in the zygote
    code = 0
    try:
        import ctypes

        _close_all_but({0, 1, 2, sock.fileno()})
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:
            os._exit(0)
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        executor = _executor(engine, cache_dir)
        while True:
            message, fds = receive(sock)
            if message is None:
                break
            try:
                _spawn(message, fds, executor, sock)
                send(sock, {"ok": True})
            except Exception as exc:
                send(sock, {"error": str(exc) or type(exc).__name__})
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
    except BaseException:
        code = 1
    os._exit(code)


def _executor(engine: str | None, cache_dir: str | None) -> object:
    """The executor every container inherits: engines imported, cache open, nothing
    compiled (compiling starts wasmtime's thread pool)."""
    from wasidispatch.executor import WasmExecutor

    engines = engine or os.environ.get("WASIDISPATCH_ENGINE")
    cache = None
    if os.environ.get("WASIDISPATCH_CACHE", "on") != "off":
        from wasidispatch.cache import PrecompileCache
        from wasidispatch.errors import CacheError

        try:
            cache = PrecompileCache(cache_dir or os.environ.get("WASIDISPATCH_CACHE_DIR") or None)
        except CacheError as exc:  # the cache is an optimisation: containers run uncached
            print(
                f"wasidispatch zygote: running without a precompile cache: {exc}", file=sys.stderr
            )
    choice = tuple(e for e in engines.split(",") if e) if engines else None
    executor = WasmExecutor(choice, cache=cache, engine_options=SERIAL_ENGINES)
    # import what every container needs now, so a fork inherits it loaded
    import fcntl  # noqa: F401  # a terminal's set-up, after the container's pivot_root
    import termios  # noqa: F401

    import wasidispatch.runc.cgroups
    import wasidispatch.runc.sandbox
    import wasidispatch.runc.spec
    import wasidispatch.runc.wasm_container  # noqa: F401
    from wasidispatch import engines as registry

    load_engines(executor, choice or ("wasmtime-fast",))
    del registry
    if _threads() != 1:
        print(
            f"wasidispatch zygote: {_threads()} threads after loading the engines",
            file=sys.stderr,
        )
    return executor


#: Engine options for a process that forks containers (the zygote) or is one
#: (``wasidispatch-runc``): a compile there (a cache miss) must leave no thread behind, since
#: only the calling thread enters the sandbox. wasmer-sdk starts an event-loop thread anyway:
#: a sandboxed container on it is refused.
SERIAL_ENGINES: dict[str, dict[str, object]] = {
    name: {"parallel_compilation": False} for name in _THREAD_FREE
}


def load_engines(executor: object, names: Sequence[str]) -> None:
    """Construct ``names``' thread-free engines in ``executor`` now (the library loaded,
    nothing compiled), so a forked container inherits them."""
    from wasidispatch.executor import WasmExecutor

    assert isinstance(executor, WasmExecutor)
    for name in names:
        if name in _THREAD_FREE:
            with contextlib.suppress(Exception):
                executor._engine(name)


def _spawn(
    message: Mapping[str, object], fds: list[int], executor: object, sock: socket.socket
) -> None:  # pragma: no cover - runs in the zygote
    if not fds:
        raise ShimError("spawn without a control socket")
    threads = _threads()
    if threads != 1:
        raise ShimError(f"the zygote has {threads} threads: refusing to fork")
    bundle, new_pid_ns = _bundle(message)
    pid = os.fork()
    if pid == 0:
        try:
            if new_pid_ns:
                # the pid namespace a fork enters: the container process is its init
                from wasidispatch.runc.sandbox import CLONE_NEWPID, _check, _libc

                _check(_libc().unshare(CLONE_NEWPID), "a new pid namespace")
            if os.fork() == 0:
                sock.close()
                container_main(message, fds, executor, bundle)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                control = socket.socket(fileno=fds[0])
                send(control, {"error": _one_line(exc)})
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def sandboxed() -> bool:
    """Whether Wasm containers get the container sandbox (`wasidispatch.runc.sandbox`):
    always, unless ``WASIDISPATCH_SANDBOX=off`` is in the shim's environment (to measure
    what it costs; never on a node that runs untrusted code)."""
    return os.environ.get("WASIDISPATCH_SANDBOX", "on") != "off"


def _bundle(message: Mapping[str, object]) -> tuple[object, bool]:
    """The bundle, read once in the zygote (the container process inherits it), and whether
    the container gets a new pid namespace; ``(None, False)`` when it cannot be read (the
    container process then reports why)."""
    try:
        from wasidispatch.runc.sandbox import _doc, pid_namespace
        from wasidispatch.runc.spec import LeanBundle

        bundle = LeanBundle.load(str(message["bundle"]))
        if not sandboxed():
            return bundle, False
        doc = _doc(bundle.spec)
        linux = doc.get("linux")
        profile = linux.get("seccomp") if isinstance(linux, dict) else None
        if isinstance(profile, dict):
            from wasidispatch import _seccomp

            # built once here and inherited: libseccomp takes ~20 ms for a default profile
            with contextlib.suppress(Exception):  # an invalid one fails in the container
                _seccomp.program(profile)
        return bundle, pid_namespace(doc)
    except Exception:
        return None, False


# ------------------------------------------------------------------------------ the container


def container_main(
    message: Mapping[str, object], fds: list[int], executor: object, bundle: object = None
) -> NoReturn:  # pragma: no cover - runs in the container process
    """The container process: report, prepare, sandbox, wait for start, run, exit with the
    code. In a pid namespace of its own it is that namespace's init, which the kernel only
    delivers caught signals to: SIGTERM and friends then cancel the guest (exit 128+N)."""
    control = socket.socket(fileno=fds[0])
    slave = fds[1] if len(fds) > 1 else None
    code = 137
    made: list[str] = []  # cgroup dirs created: the shim removes them once this process is gone
    try:
        # the zygote's fds are its own (the cache's directories, the engine's): every fd of
        # the daemon was closed when the zygote started, and the zygote's socket by the caller
        os.setsid()
        # the host's /proc is still mounted here: /proc/self is the pid the shim sees
        send(control, {"pid": int(os.readlink("/proc/self"))})
        prepared, leaves, stdio = _prepare(
            message, executor, made, slave, bundle, keep={control.fileno()}
        )
        send(control, {"ready": True, "leaves": leaves, "made": made})
    except BaseException as exc:
        with contextlib.suppress(Exception):
            send(control, {"error": f"{_entrypoint(message)}{_one_line(exc)}", "made": made})
        os._exit(1)
    try:
        answer, _ = receive(control)
    except OSError:
        answer = None
    if not answer or answer.get("op") != "start":
        os._exit(137)
    try:
        _take_stdio(stdio, slave)
        from wasidispatch.executor import WasmExecutor

        assert isinstance(executor, WasmExecutor)
        cancel = _cancel_on_signals() if os.getpid() == 1 else None
        for seal in _SEAL:
            seal()
        result = executor.run(prepared, cancel=cancel)  # type: ignore[arg-type]
        code = result.exit_code
        if result.reason.value == "out-of-memory":  # the shim reports it as TaskOOM
            with contextlib.suppress(OSError):
                send(control, {"oom": True})
        signalled = cancel is not None and cancel.cancelled  # type: ignore[attr-defined]
        if result.message and not signalled:  # a signal's end is silent, as a process's is
            print(f"wasidispatch: {result.reason.value}: {result.message}", file=sys.stderr)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            print(f"wasidispatch: {_one_line(exc)}", file=sys.stderr)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code & 0xFF)


#: The signals a container's init turns into a cancel of its guest (SIGKILL needs nothing).
_CANCELLING = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
)


def _cancel_on_signals() -> object:
    """A `Cancel` fired by any of `_CANCELLING` (`wasidispatch._signals`; both imported
    before the container's pivot_root)."""
    from wasidispatch.engines import Cancel

    cancel = Cancel()
    cancel_on_signals(cancel, _CANCELLING, install=True)
    return cancel


def _entrypoint(message: Mapping[str, object]) -> str:
    """``"ARGS0: "`` of the bundle's process, for error messages (``""`` when unknown)."""
    try:
        from wasidispatch.runc.spec import LeanBundle

        process = LeanBundle.load(str(message["bundle"])).spec.process
        return f"{process.args[0]}: " if process is not None and process.args else ""
    except Exception:
        return ""


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _prepare(
    message: Mapping[str, object],
    executor: object,
    made: list[str],
    slave: int | None,
    bundle: object = None,
    keep: set[int] | None = None,
) -> tuple[object, list[str], tuple[int, int, int] | None]:
    """Prepare the module, join the cgroup (``made`` gets every directory created), open
    the stdio (containerd's FIFOs are host paths), enter the sandbox and apply the process
    settings (`wasidispatch.runc.sandbox`): after this, nothing of the host is in reach."""
    import dataclasses

    from wasidispatch.executor import WasmExecutor
    from wasidispatch.runc import cgroups
    from wasidispatch.runc.spec import LeanBundle

    assert isinstance(executor, WasmExecutor)
    if not isinstance(bundle, LeanBundle):
        bundle = LeanBundle.load(str(message["bundle"]))
    prepared = executor.prepare(bundle)
    spec = bundle.spec
    linux = spec.linux
    resources = linux.resources if linux is not None else None
    memory = resources.memory.limit if resources and resources.memory else None
    pids = resources.pids.limit if resources and resources.pids else None
    leaves: list[str] = []
    path = cgroups.resolve(
        linux.cgroups_path if linux is not None else None, systemd=bool(message.get("systemd"))
    )
    if path is not None:
        raw = getattr(getattr(linux, "resources", None), "_doc", {})
        leaves = cgroups.create(
            path,
            memory_limit=memory,
            pids_limit=pids,
            made=made,
            devices=cgroups.device_rules(raw.get("devices") if isinstance(raw, dict) else None),
        )
        cgroups.join(leaves)
    stdio = None if slave is not None else _open_stdio(message)
    if not sandboxed():
        from wasidispatch.runc.wasm_container import _apply_process

        _apply_process(spec)
        return prepared, leaves, stdio
    from wasidispatch.runc import sandbox

    # the artifact in memory: a descriptor of the cache's file could be reopened for writing
    # through /proc and change the code every container of that module maps
    workload = sandbox.rewrite(prepared.workload, bundle, in_memory=True)
    prepared = dataclasses.replace(prepared, workload=workload)
    # the zygote's descriptors (the cache's directories...) are the host's: only the
    # control socket, the stdio and the module's artifact go in
    held = {0, 1, 2, *(keep or ()), *(stdio or ()), *([slave] if slave is not None else [])}
    _close_all_but(held)
    finish = sandbox.enter(bundle)
    finish()
    prepared = dataclasses.replace(prepared, workload=sandbox.with_root(workload, finish.root))
    _SEAL.append(finish.seal)
    return prepared, leaves, stdio


_SEAL: list[Callable[[], None]] = []  # the seccomp filter, loaded just before the guest runs


def _open_stdio(message: Mapping[str, object]) -> tuple[int, int, int]:
    """containerd's FIFOs (or /dev/null), opened now: they are not in the container's root."""
    stdio = message.get("stdio")
    paths = stdio if isinstance(stdio, dict) else {}
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        stdin = str(paths.get("stdin") or "")
        if stdin:
            fd_in = os.open(stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(fd_in, True)
        else:
            fd_in = os.dup(null)
        out = []
        for key in ("stdout", "stderr"):
            path = str(paths.get(key) or "")
            out.append(os.open(path, os.O_RDWR | os.O_CLOEXEC) if path else os.dup(null))
    finally:
        os.close(null)
    return fd_in, out[0], out[1]


def _take_stdio(stdio: tuple[int, int, int] | None, slave: int | None) -> None:
    """The container's stdio on fds 0-2: a terminal's slave, or containerd's FIFOs."""
    if slave is not None:
        import fcntl
        import termios

        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.close(slave)
        return
    assert stdio is not None
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
        os.close(fd)
