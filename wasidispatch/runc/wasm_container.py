"""Wasm containers: ``create`` forks the container process; the other subcommands act on it.

The container process is a child of ``create`` that outlives it: when ``create`` exits it is
re-parented to the nearest subreaper (containerd's shim), which learns its exit status by
waiting on it, exactly as for runc's container init. It

1. starts a new session, restores default signal dispositions (a signal stops the guest and
   the shim sees 128+n), and keeps only fds 0-2 (the container's stdio, or the terminal sent
   over ``--console-socket``) and the ``--preserve-fds`` ones: fd 3 of ``create`` is the
   shim's own socket;
2. prepares the module with `wasidispatch.executor.WasmExecutor` (precompile cache), so the
   interpreter and engine are charged to the caller's cgroup, not the container's;
3. joins the container's cgroup (`wasidispatch.runc.cgroups`), applies ``oomScoreAdj``,
   ``rlimits``, ``noNewPrivileges`` and the user, reports "ready" to ``create``;
4. blocks opening ``exec.fifo`` for writing until ``start`` opens it for reading (runc's
   handshake), then runs the guest and exits with its exit code.

A Linux bundle whose entrypoint is an ELF of another architecture that the node cannot run
(no binfmt_misc handler, `wasidispatch._binfmt`) is refused by ``create`` before runc, naming
the architecture. Errors of ``create`` reach the log (`wasidispatch.runc.log`): the runtime
itself prints nothing on the container's stdio. The guest's trap or timeout message, if any,
is logged as a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence

from wasidispatch.runc import cgroups
from wasidispatch.runc.args import Invocation
from wasidispatch.runc.cli import RuntimeFailure
from wasidispatch.runc.log import RuntimeLog
from wasidispatch.runc.state import (
    FIFO_NAME,
    STATE_NAME,
    WasmState,
    container_dir,
    proc_stat,
    valid_id,
)

# Not `from typing import ...` nor dataclasses: `start`, `kill` and `delete` import this module
# and each costs more than the module itself (mypy reads TYPE_CHECKING = False as usual).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from wasidispatch.detect import Detected
    from wasidispatch.executor import Decision, Prepared, WasmExecutor
    from wasidispatch.runc.spec import LeanBundle, LeanSpec

__all__ = ["COMMANDS", "Plan", "create", "plan", "run"]

# The annotations that can make a bundle Wasm without looking at its bytes (see
# wasidispatch.executor; spelled out here so the Linux fast path imports nothing heavy).
_WASM_ANNOTATIONS = ("run.oci.handler", "module.wasm.image/variant")


class Plan:
    """A bundle the dispatch rule sent to Wasm."""

    def __init__(self, directory: str, bundle: LeanBundle, decision: Decision) -> None:
        self.directory = directory
        self.bundle = bundle
        self.decision = decision


# ------------------------------------------------------------------------------ the decision


def _plainly_linux(bundle_dir: str) -> _Entrypoint | None:
    """The entrypoint when the rule can only say Linux: no Wasm annotation, and
    ``process.args[0]``, resolved as `decide` resolves it (`wasidispatch._resolve`), is an ELF
    binary or a ``#!`` script; else None.

    Without `LeanBundle` or the executor (their typing and dataclasses), so a Linux ``create``
    reaches runc with the fewest imports; anything unexpected answers False and leaves the
    verdict to `decide`.
    """
    from pathlib import Path

    from wasidispatch import _fs, _resolve
    from wasidispatch.detect import sniff_path
    from wasidispatch.errors import WasiDispatchError

    config = os.path.join(bundle_dir, "config.json")
    try:
        # never blocking on a FIFO, a regular file under the cap (else LeanBundle says why)
        doc = json.loads(_fs.read_regular(config, limit=_fs.CONFIG_LIMIT, what="config.json"))
        notes = doc.get("annotations") or {}
        if any(key in notes for key in _WASM_ANNOTATIONS):
            return None
        root = doc["root"]["path"]
        rootfs = root if os.path.isabs(root) else os.path.join(bundle_dir, root)
        process = doc["process"]
        args0: str = process["args"][0]
        if "#" in args0:
            return None
        path: str | None = None
        for entry in process.get("env") or ():
            if entry.startswith("PATH="):
                path = entry[5:]  # the last one wins, as in env_dict
        cwd: str = process.get("cwd") or "/"
        found = _resolve.resolve_entrypoint(Path(config), Path(rootfs), args0, cwd=cwd, path=path)
        detected = sniff_path(found)
        return _Entrypoint(detected, args0, rootfs, str(found)) if detected.is_linux else None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        return None
    except WasiDispatchError:
        return None


class _Entrypoint:
    """A Linux entrypoint as found: what `sniff` said, ``args[0]``, the rootfs, the host file."""

    __slots__ = ("args0", "detected", "host_path", "rootfs")

    def __init__(self, detected: Detected, args0: str, rootfs: str, host_path: str) -> None:
        self.detected = detected
        self.args0 = args0
        self.rootfs = rootfs
        self.host_path = host_path


def _refuse_foreign(found: _Entrypoint) -> None:
    """A Linux entrypoint this node cannot execute (an ELF of another architecture, without a
    binfmt_misc handler for it) is refused here, naming the architecture: runc would create
    the container and fail only at ``start`` with "exec format error"."""
    if found.detected.elf is None:
        return  # a script: the kernel finds its interpreter, runc reports its errors
    from wasidispatch._binfmt import foreign_elf_refusal

    refusal = foreign_elf_refusal(
        found.detected, entrypoint=found.args0, rootfs=found.rootfs, path=found.host_path
    )
    if refusal:
        raise RuntimeFailure(refusal)


def plan(bundle_dir: str, log: RuntimeLog) -> Plan | None:
    """The `Plan` when the dispatch rule says Wasm; ``None`` hands the bundle to runc (a
    Linux container, or one whose entrypoint the rule cannot decide: runc reports its own
    errors). Raises `SpecError` when config.json itself is unreadable or has a bad field."""
    found = _plainly_linux(bundle_dir)
    if found is not None:
        _refuse_foreign(found)
        log.debug(f"{bundle_dir}: Linux entrypoint, handing to runc")
        return None
    from wasidispatch.errors import WasiDispatchError
    from wasidispatch.executor import decide
    from wasidispatch.runc.spec import LeanBundle

    # A config.json that cannot be read, or a field with a wrong type or value, is reported
    # here, naming the field (runc would say much the same, or hang on a FIFO).
    bundle = LeanBundle.load(bundle_dir)
    try:
        decision = decide(bundle)  # a BundleLike, as a Bundle is, without pydantic
    except WasiDispatchError as exc:
        log.debug(f"{bundle_dir}: not decided as Wasm ({exc}), handing to runc")
        return None
    if decision.kind != "wasm":
        if decision.detected is not None and decision.entrypoint is not None:
            args0 = (
                bundle.spec.process.args[0]
                if bundle.spec.process and bundle.spec.process.args
                else ""
            )
            entry = _Entrypoint(
                decision.detected, args0, str(bundle.rootfs), str(decision.entrypoint)
            )
            _refuse_foreign(entry)
        return None
    log.debug(f"{bundle_dir}: Wasm container ({decision.reason})")
    return Plan(bundle_dir, bundle, decision)


# ------------------------------------------------------------------------------ create


def _now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


# More descriptors than a process can hold is no count of fds to keep (and would make the
# set of fds to keep as big as the number).
_MAX_FDS = 1 << 20


def _int_option(inv: Invocation, name: str) -> int:
    raw = inv.value(name)
    if raw is None:
        return 0
    if not raw.isascii() or not raw.isdigit():  # as Go's strconv: no sign, space or "_"
        raise RuntimeFailure(f"invalid value {raw!r} for --{name}")
    value = int(raw)
    if value > _MAX_FDS:
        raise RuntimeFailure(f"invalid value {raw!r} for --{name}: over {_MAX_FDS}")
    return value


def _write_pid_file(path: str, pid: int) -> None:
    """Digits only, no newline (containerd's parser refuses one), written as runc writes it:
    an exclusive temporary file renamed over the name, so a symlink or file planted at the
    final or at a temporary name is replaced, never followed or truncated."""
    from wasidispatch._fs import write_atomic

    write_atomic(os.path.abspath(path), str(pid).encode(), mode=0o644)


def _send_console(socket_path: str, master: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(socket_path)
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except OSError as exc:
        raise RuntimeFailure(f"cannot send the console to {socket_path}: {exc}") from exc


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _remove_state_dir(directory: str) -> None:
    for name in (STATE_NAME, FIFO_NAME):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(directory)


class _Undo:
    """What a ``create`` in progress has made, so that any failure takes all of it back: the
    container process (killed and reaped) and every cgroup directory created (ancestors
    included, in creation order), filled in as each comes to exist."""

    def __init__(self) -> None:
        self.pid = 0
        self.cgroups: list[str] = []

    def rollback(self, directory: str) -> None:
        if self.pid:  # spawned but not recorded: it must not wait on the fifo forever
            _kill_and_reap(self.pid)
            self.pid = 0
        cgroups.remove(reversed(self.cgroups))  # leaves first, then the ancestors we made
        self.cgroups.clear()
        with contextlib.suppress(OSError):  # a name planted in it is not ours to remove
            _remove_state_dir(directory)


# Signals that stop a `create` in progress: each becomes a RuntimeFailure at the point where
# create is (usually waiting for the container process), so its rollback runs. SIGKILL
# cannot be caught: that leaves the cgroups and the container process, as it does for runc.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _interrupted(signum: int, frame: object) -> None:
    raise RuntimeFailure(f"create interrupted by {signal.Signals(signum).name}")


def create(inv: Invocation, planned: Plan, log: RuntimeLog) -> int:
    """``create``: fork the container process, wait until it is ready, record it.

    Any failure (a signal included) kills and reaps the container process and removes every
    cgroup directory and the state directory this call made."""
    cid = inv.args[0]
    if not valid_id(cid):
        raise RuntimeFailure("invalid container ID format")  # runc's words
    os.makedirs(inv.root, mode=0o711, exist_ok=True)
    directory = container_dir(inv.root, cid)
    undo = _Undo()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # the caller's, restored at the end
    previous = {sig: signal.signal(sig, _interrupted) for sig in _STOP_SIGNALS}
    try:
        try:
            os.mkdir(directory, 0o711)
        except FileExistsError:
            raise RuntimeFailure(f"container with id exists: {cid}") from None
        try:
            leaves = _spawn(inv, planned, directory, log, undo)
            stat = proc_stat(undo.pid)
            if stat is None:
                raise RuntimeFailure("container process exited during create")
            bundle = planned.bundle
            WasmState(
                id=cid,
                pid=undo.pid,
                pid_start=stat[1],
                bundle=planned.directory,
                rootfs=str(bundle.rootfs),
                created=_now_rfc3339(),
                annotations=dict(bundle.spec.annotations or {}),
                cgroups=leaves,
            ).save(directory)
            pid_file = inv.value("pid-file")
            if pid_file:
                _write_pid_file(pid_file, undo.pid)
        except BaseException:
            # A second signal must not cut the rollback short (it would leave cgroups and the
            # state dir behind, and the next create would fail with "container with id exists").
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            undo.rollback(directory)
            raise
        # Done: a signal from here on must not turn a recorded container into a failure.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return 0


def _kill_and_reap(pid: int) -> None:
    """SIGKILL our own child ``pid`` and wait for it (its cgroup can then be removed)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _spawn(
    inv: Invocation, planned: Plan, directory: str, log: RuntimeLog, undo: _Undo
) -> list[str]:
    """Fork the container process and wait for its "ready"; returns the cgroup leaves.
    Everything made is recorded in ``undo`` as it is made (the caller rolls back)."""
    spec = planned.bundle.spec
    process = spec.process
    terminal = bool(process is not None and process.terminal)
    console_socket = inv.value("console-socket")
    if terminal and not console_socket:
        raise RuntimeFailure(
            "cannot allocate tty if runc will detach without setting console socket"
        )
    if console_socket and not terminal:
        raise RuntimeFailure("cannot use console socket if runc will not detach or allocate tty")
    preserve = _int_option(inv, "preserve-fds")
    try:
        listen = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        listen = 0
    keep = set(range(3, 3 + min(max(listen, 0), _MAX_FDS) + preserve))

    linux = spec.linux
    resources = linux.resources if linux is not None else None
    memory = resources.memory.limit if resources and resources.memory else None
    pids = resources.pids.limit if resources and resources.pids else None
    try:
        path = cgroups.resolve(
            linux.cgroups_path if linux is not None else None,
            systemd=inv.global_options.get("systemd-cgroup") is True,
        )
        leaves = (
            []
            if path is None
            else cgroups.create(
                path,
                memory_limit=memory,
                pids_limit=pids,
                made=undo.cgroups,
                devices=cgroups.device_rules(_raw_devices(linux)),
            )
        )
    except cgroups.CgroupError as exc:
        raise RuntimeFailure(str(exc)) from exc

    fifo = os.path.join(directory, FIFO_NAME)
    os.mkfifo(fifo, 0o622)
    slave: int | None = None
    if terminal and console_socket:
        master, slave = os.openpty()
        try:
            _send_console(console_socket, master)
        except BaseException:
            os.close(slave)
            raise
        finally:
            os.close(master)
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    # No stop signal between the fork and the child's own dispositions: the child must never
    # run create's rollback, and the parent must know the pid before it can be interrupted.
    if _sandboxed():
        from wasidispatch.runc import sandbox

        if sandbox.pid_namespace(sandbox._doc(spec)):
            # the next fork is its init; this process itself stays where it is
            sandbox._check(sandbox._libc().unshare(sandbox.CLONE_NEWPID), "a pid namespace")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the container process
            for sig in _STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(ready_r)
            _container_process(planned, inv, fifo, ready_w, keep, leaves, slave, log)
        undo.pid = pid
    except BaseException:
        os.close(ready_r)
        os.close(ready_w)
        if slave is not None:
            os.close(slave)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(ready_w)
    if slave is not None:
        os.close(slave)
    try:
        if leaves:
            cgroups.prewarm()  # the container process joins `leaves` once prepared
        answer = _read_all(ready_r)
    finally:
        os.close(ready_r)
    if answer != b"ok":
        raise RuntimeFailure(answer.decode(errors="replace") or "container process died")
    return leaves


# ------------------------------------------------------------------------------ the container


def _close_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _apply_process(spec: LeanSpec) -> None:
    """oomScoreAdj, rlimits, noNewPrivileges and the user of ``process`` (each checked by
    `LeanBundle.load` already)."""
    process = spec.process
    if process is None:
        return
    oom = process.oom_score_adj
    if oom is not None:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write(str(oom))
    for rlimit in process.rlimits or ():
        import resource

        which = getattr(resource, rlimit.type, None)
        if not isinstance(which, int):
            raise RuntimeFailure(f"rlimit {rlimit.type} is not known on this system")
        resource.setrlimit(which, (_rlim(rlimit.soft), _rlim(rlimit.hard)))
    if process.no_new_privileges:
        import ctypes

        pr_set_no_new_privs = 38
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
            raise RuntimeFailure("cannot set no_new_privs")
    user = process.user
    if user is not None and (user.uid or user.gid) and os.getuid() == 0:
        os.setgroups(user.additional_gids)
        os.setgid(user.gid)
        os.setuid(user.uid)


def _raw_devices(linux: object) -> object:
    """``linux.resources.devices`` as JSON (`cgroups.device_rules` checks it)."""
    doc = getattr(getattr(linux, "resources", None), "_doc", None)
    return doc.get("devices") if isinstance(doc, dict) else None


def _sandboxed() -> bool:
    return os.environ.get("WASIDISPATCH_SANDBOX", "on") != "off"


def _sandbox(
    planned: Plan, prepared: Prepared, fifo: str, keep: set[int]
) -> tuple[Prepared, int]:  # pragma: no cover - runs in the container process
    """The container sandbox (`wasidispatch.runc.sandbox`), as the shim's Wasm containers
    get it; returns the workload seen from the new root and an ``O_PATH`` fd of
    ``exec.fifo``, reopened through ``/proc`` once sandboxed (runc does the same)."""
    import dataclasses

    from wasidispatch.runc import sandbox

    bundle = planned.bundle
    if not sandbox._mounts_proc(bundle):
        raise RuntimeFailure(
            "a sandboxed Wasm container needs /proc in its mounts (WASIDISPATCH_SANDBOX=off "
            "runs it unsandboxed)"
        )
    # the artifact in memory: a descriptor of the cache's file could be reopened for writing
    workload = sandbox.rewrite(prepared.workload, bundle, in_memory=True)
    prepared = dataclasses.replace(prepared, workload=workload)
    fifo_fd = os.open(fifo, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    _close_fds({0, 1, 2, fifo_fd, *keep})
    finish = sandbox.enter(bundle)
    finish()
    _SEAL.append(finish.seal)
    return dataclasses.replace(prepared, workload=sandbox.with_root(workload, finish.root)), fifo_fd


_SEAL: list[Callable[[], None]] = []  # the seccomp filter, loaded just before the guest runs


def _rlim(value: int) -> int:
    """An OCI (uint64) rlimit for `resource.setrlimit` (a C long): from 2**63 - 1 up, which
    includes Go's RLIM_INFINITY (2**64 - 1), it is infinity, as the kernel reads it."""
    import resource

    return resource.RLIM_INFINITY if value >= (1 << 63) - 1 else value


def _executor(log: RuntimeLog, *, serial: bool = False) -> WasmExecutor:
    """The container's executor; ``serial``: its engines compile on the calling thread (a
    sandboxed container process must have no other thread)."""
    from wasidispatch.executor import WasmExecutor

    engines = os.environ.get("WASIDISPATCH_ENGINE")
    cache = None
    if os.environ.get("WASIDISPATCH_CACHE", "on") != "off":
        from wasidispatch.cache import PrecompileCache
        from wasidispatch.errors import CacheError

        try:
            cache = PrecompileCache(os.environ.get("WASIDISPATCH_CACHE_DIR") or None)
        except CacheError as exc:  # the cache is an optimisation: the container runs uncached
            log.warning(f"running without a precompile cache: {exc}")
    engine = tuple(e for e in engines.split(",") if e) if engines else None
    if not serial:
        return WasmExecutor(engine, cache=cache)
    from wasidispatch.wasmshim.zygote import SERIAL_ENGINES

    return WasmExecutor(engine, cache=cache, engine_options=SERIAL_ENGINES)


def _container_process(
    planned: Plan,
    inv: Invocation,
    fifo: str,
    ready: int,
    keep: set[int],
    made: Sequence[str],
    slave: int | None,
    log: RuntimeLog,
) -> NoReturn:  # pragma: no cover - runs in the container process
    try:
        os.setsid()
        if slave is not None:
            import fcntl
            import termios

            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        _close_fds(keep | {ready})
        executor = _executor(log, serial=_sandboxed())
        prepared = executor.prepare(planned.bundle)  # map, pick the engine, precompile
        cgroups.join(made)
        fifo_fd = None
        if _sandboxed():
            from wasidispatch.wasmshim.zygote import _cancel_on_signals  # before the pivot

            held = log.hold()
            prepared, fifo_fd = _sandbox(
                planned, prepared, fifo, keep | {ready, *([held] if held is not None else [])}
            )
            fifo = f"/proc/self/fd/{fifo_fd}"  # the state dir is not in the new root
        else:
            _apply_process(planned.bundle.spec)
        os.write(ready, b"ok")
        os.close(ready)
    except BaseException as exc:  # everything goes back to create, which logs it
        process = planned.bundle.spec.process
        where = process.args[0] if process is not None and process.args else "container"
        try:
            os.write(ready, f"{where}: {str(exc) or type(exc).__name__}".encode())
        finally:
            os._exit(1)
    try:
        flags = os.O_WRONLY | os.O_CLOEXEC | (0 if fifo_fd is not None else os.O_NOFOLLOW)
        fd = os.open(fifo, flags)  # blocks until `start`
        os.write(fd, b"0")
        os.close(fd)
        if fifo_fd is not None:
            os.close(fifo_fd)
    except OSError:
        os._exit(1)
    code = 137
    try:
        cancel = None
        if os.getpid() == 1:  # its pid namespace's init: only caught signals reach it
            cancel = _cancel_on_signals()
        for seal in _SEAL:
            seal()
        result = executor.run(prepared, cancel=cancel)  # type: ignore[arg-type]
        code = result.exit_code
        if result.message:
            log.warning(f"container {inv.args[0]}: {result.reason.value}: {result.message}")
    except BaseException as exc:
        log.error(f"container {inv.args[0]}: {type(exc).__name__}: {exc}")
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(code & 0xFF)


# ------------------------------------------------------------------------------ run


def run(inv: Invocation, planned: Plan, log: RuntimeLog) -> int:
    """``run``: create, start, and (unless ``--detach``) wait and delete."""
    create(inv, planned, log)
    state = WasmState.load(inv.root, inv.args[0])
    if state is None:
        raise RuntimeFailure("container state vanished during run")
    start(inv, state, log)
    if inv.flag("detach"):
        return 0
    _, status = os.waitpid(state.pid, 0)
    _delete_stopped(state, log)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


# ------------------------------------------------------------------------------ the others


def start(inv: Invocation, state: WasmState, log: RuntimeLog) -> int:
    """``start``: release the container process blocked on ``exec.fifo``."""
    status = state.status()
    if status == "stopped":
        raise RuntimeFailure("cannot start a container that has stopped")
    if status != "created":
        raise RuntimeFailure("cannot start an already running container")
    fifo = os.path.join(state.directory, FIFO_NAME)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    data = b""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            if poller.poll(50):
                try:
                    data = os.read(fd, 1)
                except BlockingIOError:
                    continue
                break
            if not state.alive():
                break
    finally:
        os.close(fd)
    if data != b"0":
        raise RuntimeFailure("cannot start container: its process exited before start")
    os.unlink(fifo)
    return 0


def print_state(inv: Invocation, state: WasmState, log: RuntimeLog) -> int:
    """``state``: runc's JSON document."""
    print(json.dumps(state.oci_state(), indent=2))
    return 0


def _parse_signal(text: str) -> int:
    if text.isascii() and text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        value = getattr(signal.Signals, name, None)
        if value is not None:
            return int(value)
    raise RuntimeFailure(f"unknown signal {text!r}")


def _pidfd(state: WasmState) -> int | None:
    """A pidfd for the container process, ``None`` when it is gone (or the pid recycled)."""
    try:
        fd = os.pidfd_open(state.pid)
    except OSError:
        return None
    if not state.alive():  # checked after opening: the pidfd pins the process we checked
        os.close(fd)
        return None
    return fd


def _signal(state: WasmState, sig: int) -> bool:
    fd = _pidfd(state)
    if fd is None:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
    return True


def kill(inv: Invocation, state: WasmState, log: RuntimeLog) -> int:
    """``kill [--all] ID [SIGNAL]``: signal the container process (default SIGTERM)."""
    sig = _parse_signal(inv.args[1]) if len(inv.args) > 1 else int(signal.SIGTERM)
    if _signal(state, sig):
        return 0
    if inv.flag("all"):
        return 0  # containerd's cleanup kills all of a stopped container: nothing to do
    raise RuntimeFailure("container not running")


def _wait_gone(state: WasmState, timeout: float) -> bool:
    fd = _pidfd(state)
    if fd is None:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        # A pidfd is readable once the process has exited (zombie or reaped).
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


def _delete_stopped(state: WasmState, log: RuntimeLog) -> None:
    left = cgroups.remove(state.cgroups)
    if left:
        log.warning(f"cgroups left behind for {state.id}: {', '.join(left)}")
    _remove_state_dir(state.directory)


def delete(inv: Invocation, state: WasmState, log: RuntimeLog) -> int:
    """``delete [--force] ID``: remove a stopped (or created) container; ``--force`` kills a
    running one first."""
    status = state.status()
    if status in ("running", "paused") and not inv.flag("force"):
        raise RuntimeFailure(f"cannot delete container {state.id} that is not stopped: {status}")
    if status != "stopped":
        _signal(state, signal.SIGKILL)
        if not _wait_gone(state, 10.0):
            raise RuntimeFailure(f"container {state.id} did not exit after SIGKILL")
    _delete_stopped(state, log)
    return 0


def _pids(state: WasmState) -> list[int]:
    for directory in state.cgroups:
        try:
            with open(os.path.join(directory, "cgroup.procs")) as fh:
                return sorted(int(line) for line in fh if line.strip())
        except OSError:
            continue
    return [state.pid] if state.alive() else []


def ps(inv: Invocation, state: WasmState, log: RuntimeLog) -> int:
    """``ps [--format table|json] ID [ps options]``."""
    pids = _pids(state) if state.status() != "stopped" else []
    fmt = inv.value("format") or "table"
    if fmt == "json":
        print(json.dumps(pids))
        return 0
    if fmt != "table":
        raise RuntimeFailure(f"invalid format option {fmt!r}")
    import subprocess

    options = inv.args[1:] or ["-ef"]
    out = subprocess.run(["ps", *options], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeFailure(f"ps failed: {out.stderr.strip()}")
    lines = out.stdout.splitlines()
    if not lines:
        return 0
    header = lines[0].split()
    if "PID" not in header:
        raise RuntimeFailure("couldn't find PID field in ps output")
    column = header.index("PID")
    wanted = set(pids)
    print(lines[0])
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in wanted:
            print(line)
    return 0


def pause(inv: Invocation, state: WasmState, log: RuntimeLog) -> int:
    """``pause``: stop the container process (SIGSTOP)."""
    if state.status() != "running" or not _signal(state, signal.SIGSTOP):
        raise RuntimeFailure("container not running")
    return 0


def resume(inv: Invocation, state: WasmState, log: RuntimeLog) -> int:
    """``resume``: continue a paused container (SIGCONT)."""
    if state.status() != "paused":
        raise RuntimeFailure("container not paused")
    _signal(state, signal.SIGCONT)
    return 0


def _unsupported(inv: Invocation, state: WasmState, log: RuntimeLog) -> int:
    raise RuntimeFailure(f"{inv.command} is not supported for Wasm containers")


Handler = Callable[[Invocation, WasmState, RuntimeLog], int]

COMMANDS: dict[str, Handler] = {
    "start": start,
    "state": print_state,
    "kill": kill,
    "delete": delete,
    "ps": ps,
    "pause": pause,
    "resume": resume,
    "exec": _unsupported,
    "update": _unsupported,
    "events": _unsupported,
}
