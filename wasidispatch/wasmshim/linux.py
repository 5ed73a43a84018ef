"""Linux containers of the shim (and the CRI sandbox): the real runc, never a home-made runtime.

``create`` runs ``runc create`` with a private ``--root``, a pid file and the container's
stdio: containerd's FIFOs are opened here and passed to runc as fds 0-2 (stdout and stderr
``O_RDWR``, which never blocks on a missing reader nor raises SIGPIPE; stdin only when
containerd names one, read-only), so runc's init inherits them as runc.v2's would get its
pipes; runc's own errors go to a JSON log in the bundle. A terminal goes through runc's
``--console-socket``: the pty master arrives over SCM_RIGHTS and two threads copy between it
and the FIFOs. After ``runc create`` exits its init is re-parented to the shim (a subreaper),
whose `Reaper` reports its exit. ``exec`` is ``runc exec --detach`` the same way.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal as _signal
import socket
import tempfile
import time
from collections.abc import Mapping

from google.protobuf.any_pb2 import Any as AnyMessage

from wasidispatch.errors import InvalidArgumentError, NotFoundError, ShimError
from wasidispatch.shim.instance import CreateRequest, Stdio
from wasidispatch.shim.reaper import Exit, Reaper
from wasidispatch.wasmshim.runc import Runc

__all__ = ["LinuxInstance", "LinuxProcess", "create_linux", "metrics_from_runc"]


def _open_stdio(stdio: Stdio) -> tuple[int | None, int | None, int | None]:
    """containerd's FIFOs as fds for runc (``None``: /dev/null)."""
    fds: list[int | None] = [None, None, None]
    try:
        if stdio.stdin:
            fd = os.open(stdio.stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(fd, True)
            fds[0] = fd
        for i, path in ((1, stdio.stdout), (2, stdio.stderr)):
            if path:
                fds[i] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        _close(fds)
        raise ShimError(f"cannot open the container's stdio: {exc}") from exc
    return fds[0], fds[1], fds[2]


def _close(fds: list[int | None] | tuple[int | None, ...]) -> None:
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Console:
    """runc's ``--console-socket``: receive the pty master, copy it to/from the FIFOs."""

    def __init__(self, directory: str) -> None:
        # short: a socket path must fit sun_path (108 bytes), a bundle path may not
        self.path = os.path.join(directory, f"wdc-{os.urandom(6).hex()}.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._listener.settimeout(60)
        self.master: int | None = None
        self._fds: list[int] = []

    def receive(self, runc_pid: int, reaper: Reaper) -> None:
        """Accept runc's connection and take the master fd (runc sends it during create);
        `ShimError` at once when runc exits without connecting (a failed create)."""
        self._listener.settimeout(0.05)
        deadline = time.monotonic() + 60
        while True:
            try:
                conn, _ = self._listener.accept()
                break
            except TimeoutError:
                if reaper.poll(runc_pid) is not None:
                    raise ShimError("runc exited before it sent the terminal") from None
                if time.monotonic() > deadline:
                    raise ShimError("runc sent no terminal within 60 s") from None
        conn.settimeout(10)
        with conn:
            fds = array.array("i")
            _, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not fds:
            raise ShimError("runc sent no terminal over the console socket")
        self.master = fds[0]
        for extra in fds[1:]:
            os.close(extra)

    def copy(self, stdio: Stdio) -> None:
        """Start the copy threads between the master and containerd's FIFOs."""
        from wasidispatch.wasmshim import _pty

        assert self.master is not None
        self._fds += _pty.connect(self.master, stdio, "console-copy")

    def resize(self, width: int, height: int) -> None:
        from wasidispatch.wasmshim import _pty

        if self.master is None:
            raise ShimError("no terminal")
        _pty.resize(self.master, width, height)

    def close_listener(self) -> None:
        self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def close(self) -> None:
        self.close_listener()
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class LinuxProcess:
    """A process runc started (the init of a container, or an exec)."""

    def __init__(self, runc: Runc, cid: str, work: str, stdio: Stdio, exec_id: str = "") -> None:
        self.runc = runc
        self.cid = cid
        self.work = work  # where pid files, logs, console sockets and process.json live
        self.stdio = stdio
        self.exec_id = exec_id
        self._pid = 0
        self._console: _Console | None = None

    @property
    def pid(self) -> int:
        """The process's host pid (0 before it exists)."""
        return self._pid

    def _run_logged(self, args: list[str], what: str) -> None:
        """``runc ARGS`` with the process's stdio (or console) and a pid file."""
        tag = self.exec_id or "init"
        pid_file = os.path.join(self.work, f"{tag}.pid")
        log = os.path.join(self.work, f"{tag}-runc.log")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log)
        console = _Console(tempfile.gettempdir()) if self.stdio.terminal else None
        stdio: tuple[int | None, int | None, int | None] = (None, None, None)
        try:
            if console is not None:
                args = [*args[:-1], "--console-socket", console.path, args[-1]]
            else:
                stdio = _open_stdio(self.stdio)
            args = [*args[:-1], "--pid-file", pid_file, args[-1]]
            runc_pid = self.runc.spawn_logged(args, log=log, stdio=stdio)
            _close(stdio)
            stdio = (None, None, None)
            if console is not None:
                try:
                    console.receive(runc_pid, self.runc.reaper)
                except (OSError, ShimError):
                    with contextlib.suppress(Exception):
                        self.runc.finish_logged(runc_pid, log=log, what=what, timeout=30)
                    raise
            self.runc.finish_logged(runc_pid, log=log, what=what)
            with open(pid_file) as fh:
                self._pid = int(fh.read().strip())
            self.runc.reaper.watch(self._pid)
            if console is not None:
                console.close_listener()
                console.copy(self.stdio)
                self._console = console
                console = None
        finally:
            _close(stdio)
            if console is not None:
                console.close()

    def start(self) -> int:
        """``runc start`` (the init); an exec runs from its creation (``exec --detach``)."""
        if not self.exec_id:
            self.runc.call("start", self.cid, what="start")
        return self._pid

    def exited(self) -> Exit | None:
        """Its exit once reaped."""
        return self.runc.reaper.poll(self._pid) if self._pid else None

    def kill(self, signal: int, all: bool = False) -> None:
        """Signal it (``all``: every process of the container, through runc)."""
        if not self._pid or self.exited() is not None:
            raise NotFoundError(f"{self.exec_id or self.cid}: process already finished")
        if self.exec_id:
            try:
                os.kill(self._pid, signal)
            except ProcessLookupError:
                raise NotFoundError(f"{self.exec_id}: process already finished") from None
            return
        self.runc.kill(self.cid, signal, all=all)

    def wait(self) -> Exit:
        """Block until it exits."""
        if not self._pid:
            raise NotFoundError(f"{self.exec_id or self.cid}: no process")
        return self.runc.reaper.wait(self._pid)

    def delete(self) -> None:
        """Kill and reap it if it still runs; release its console and files."""
        if self._pid and self.exited() is None:
            with contextlib.suppress(OSError):
                os.kill(self._pid, _signal.SIGKILL)
            with contextlib.suppress(TimeoutError, ShimError):
                self.runc.reaper.wait(self._pid, 10)
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._pid and self.exec_id:
            # its exit is consumed: a pid reused later must not read as this exit
            self.runc.reaper.forget(self._pid)
            self._pid = 0
        tag = self.exec_id or "init"
        for name in (f"{tag}.pid", f"{tag}-runc.log", f"{tag}-process.json"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.work, name))

    def resize_pty(self, width: int, height: int) -> None:
        """Set the terminal's window size."""
        if self._console is None:
            raise ShimError(f"{self.exec_id or self.cid}: no terminal", code=9)
        self._console.resize(width, height)

    def close_stdin(self) -> None:
        """Nothing held here: runc's process owns its stdin FIFO (a terminal's copy ends at
        the client's end of the FIFO)."""


class LinuxInstance(LinuxProcess):
    """A Linux container on runc (its init plus what containers add)."""

    def __init__(self, runc: Runc, request: CreateRequest, work: str) -> None:
        super().__init__(runc, request.id, work, request.stdio)
        self.bundle = request.bundle
        self._execs: dict[str, LinuxProcess] = {}

    def create(self) -> None:
        """``runc create``; on failure nothing is left (``runc delete --force``)."""
        try:
            self._run_logged(["create", "--bundle", self.bundle, self.cid], "create")
        except BaseException:
            self.runc.delete(self.cid)
            super().delete()
            raise

    def delete(self) -> None:
        """Kill and reap, ``runc delete --force``, release files."""
        for proc in list(self._execs.values()):
            proc.delete()
        if self._pid and self.exited() is None:
            with contextlib.suppress(ShimError):
                self.runc.kill(self.cid, _signal.SIGKILL, all=True)
        super().delete()
        self.runc.delete(self.cid)
        if self._pid:
            self.runc.reaper.forget(self._pid)
        # the namespace's runc root goes once empty (runc makes it again when needed)
        with contextlib.suppress(OSError):
            os.rmdir(self.runc.root)

    def pids(self) -> list[int]:
        """``runc ps``."""
        return self.runc.ps(self.cid)

    def pause(self) -> None:
        """``runc pause`` (the cgroup freezer)."""
        self.runc.call("pause", self.cid, what="pause")

    def resume(self) -> None:
        """``runc resume``."""
        self.runc.call("resume", self.cid, what="resume")

    def stats(self) -> AnyMessage:
        """cgroups metrics from ``runc events --stats``."""
        return metrics_from_runc(self.runc.events_stats(self.cid))

    def update(self, resources: AnyMessage) -> None:
        """``runc update --resources -`` with the LinuxResources JSON."""
        try:
            json.loads(resources.value or b"{}")
        except ValueError as exc:
            raise InvalidArgumentError(f"update {self.cid}: bad resources: {exc}") from exc
        self.runc.call("update", "--resources", "-", self.cid, input=resources.value, what="update")

    def exec(self, exec_id: str, process: Mapping[str, object], stdio: Stdio) -> LinuxProcess:
        """``runc exec --detach`` of a runtime-spec ``process`` (created and started at once
        by runc; `start` then reports its pid)."""
        spec = dict(process)
        spec["terminal"] = stdio.terminal
        path = os.path.join(self.work, f"{exec_id}-process.json")
        from wasidispatch import _fs

        _fs.write_atomic(path, json.dumps(spec).encode(), mode=0o600)
        proc = _DeferredExec(self.runc, self.cid, self.work, stdio, exec_id, path)
        self._execs[exec_id] = proc
        return proc


class _DeferredExec(LinuxProcess):
    """An exec whose ``runc exec --detach`` runs at Start (containerd's order: Exec, then
    Start), so the process does not run before it is started."""

    def __init__(
        self, runc: Runc, cid: str, work: str, stdio: Stdio, exec_id: str, process_json: str
    ) -> None:
        super().__init__(runc, cid, work, stdio, exec_id)
        self._json = process_json

    def start(self) -> int:
        self._run_logged(["exec", "--detach", "--process", self._json, self.cid], "exec")
        return self._pid


def _u(value: object) -> int:
    return int(value) if isinstance(value, int | float) and value >= 0 else 0


def _obj(data: Mapping[str, object], key: str) -> Mapping[str, object]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def metrics_from_runc(data: Mapping[str, object]) -> AnyMessage:
    """``runc events --stats`` data as containerd's cgroups ``Metrics`` in an ``Any``
    (v1 on v1/hybrid hosts, v2 on a unified host)."""
    from wasidispatch.shim._pb import cgroups_v1_pb2, cgroups_v2_pb2

    cpu, memory, pids = _obj(data, "cpu"), _obj(data, "memory"), _obj(data, "pids")
    usage, mem_usage = _obj(cpu, "usage"), _obj(memory, "usage")
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        m2 = cgroups_v2_pb2.Metrics()
        m2.pids.current = _u(pids.get("current"))
        m2.pids.limit = _u(pids.get("limit"))
        m2.cpu.usage_usec = _u(usage.get("total")) // 1000
        m2.cpu.user_usec = _u(usage.get("user")) // 1000
        m2.cpu.system_usec = _u(usage.get("kernel")) // 1000
        m2.memory.usage = _u(mem_usage.get("usage"))
        m2.memory.usage_limit = _u(mem_usage.get("limit"))
        return AnyMessage(type_url="io.containerd.cgroups.v2.Metrics", value=m2.SerializeToString())
    m1 = cgroups_v1_pb2.Metrics()
    m1.pids.current = _u(pids.get("current"))
    m1.pids.limit = _u(pids.get("limit"))
    m1.cpu.usage.total = _u(usage.get("total"))
    m1.cpu.usage.user = _u(usage.get("user"))
    m1.cpu.usage.kernel = _u(usage.get("kernel"))
    per_cpu = usage.get("percpu")
    if isinstance(per_cpu, list):
        m1.cpu.usage.per_cpu.extend(_u(v) for v in per_cpu)
    m1.memory.usage.usage = _u(mem_usage.get("usage"))
    m1.memory.usage.limit = _u(mem_usage.get("limit"))
    m1.memory.usage.max = _u(mem_usage.get("max"))
    m1.memory.usage.failcnt = _u(mem_usage.get("failcnt"))
    raw = _obj(memory, "raw")
    m1.memory.rss = _u(raw.get("rss"))
    m1.memory.cache = _u(raw.get("cache"))
    return AnyMessage(type_url="io.containerd.cgroups.v1.Metrics", value=m1.SerializeToString())


def create_linux(
    request: CreateRequest, *, runc_root: str, runc_binary: str = "runc", systemd: bool = False
) -> LinuxInstance:
    """``runc create`` the container of ``request``; `ShimError` with runc's message (and
    nothing left) when it fails."""
    os.makedirs(runc_root, 0o711, exist_ok=True)
    work = os.path.join(request.bundle, "wasidispatch")
    try:
        os.mkdir(work, 0o700)
    except FileExistsError:
        if os.path.islink(work) or not os.path.isdir(work):
            raise ShimError(f"create {request.id}: {work} is not a directory") from None
    except OSError:
        work = tempfile.mkdtemp(prefix=f"wasidispatch-{request.id[:16]}-")
    instance = LinuxInstance(Runc(runc_root, binary=runc_binary, systemd=systemd), request, work)
    instance.create()
    return instance
