"""Wasm containers of the shim: processes forked from the zygote (`wasidispatch.wasmshim.zygote`).

`create_wasm` asks the zygote for a container process with its own control socket, learns
its pid (the process is re-parented to the shim, whose `Reaper` reaps it) and waits until it
has prepared its module (precompile cache), joined its cgroup and applied the process
settings; a failure there is the create's error, with everything undone. ``start`` tells it
to run; ``kill`` signals it (``all``: every pid of its cgroup); ``pause``/``resume`` use the
cgroup freezer (v1 ``freezer.state``, v2 ``cgroup.freeze``; SIGSTOP/SIGCONT without a
cgroup); ``stats`` reads its cgroup into containerd's cgroups ``Metrics``; ``update`` sets
memory and pids limits; ``exec`` is refused (a Wasm container has no second process).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal as _signal
import socket
import time
from collections.abc import Mapping

from google.protobuf.any_pb2 import Any as AnyMessage

from wasidispatch.errors import (
    InvalidArgumentError,
    NotFoundError,
    ShimError,
    UnimplementedError,
)
from wasidispatch.shim.instance import CreateRequest, Process, Stdio
from wasidispatch.shim.reaper import Exit, Reaper
from wasidispatch.wasmshim.zygote import Zygote, receive, send

TYPE_CHECKING = False
if TYPE_CHECKING:
    from wasidispatch.runc.cgroups import Hierarchy

__all__ = ["WasmInstance", "create_wasm"]

_READY_TIMEOUT = 300.0  # a first compile of a large module may take a while


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(path) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                out[parts[0]] = int(parts[1])
    return out


_HIERARCHIES: list[object] = []


def _hierarchies(cgroups: object) -> list[Hierarchy]:
    """The host's cgroup hierarchies, read once."""
    if not _HIERARCHIES:
        from wasidispatch.runc.cgroups import hierarchies

        _HIERARCHIES.extend(hierarchies())
    return _HIERARCHIES  # type: ignore[return-value]


class _Terminal:
    """A pty whose slave is the container's stdio; `wasidispatch.wasmshim._pty` copies the
    master to/from the FIFOs."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self._fds: list[int] = []

    def copy(self, stdio: Stdio) -> None:
        from wasidispatch.wasmshim import _pty

        self._fds += _pty.connect(self.master, stdio, "pty-copy")

    def resize(self, width: int, height: int) -> None:
        from wasidispatch.wasmshim import _pty

        _pty.resize(self.master, width, height)

    def close(self) -> None:
        for fd in (self.master, self.slave, *self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class WasmInstance:
    """One Wasm container: a process forked from the zygote, waiting for `start`."""

    def __init__(self, request: CreateRequest, reaper: Reaper) -> None:
        self.id = request.id
        self.stdio = request.stdio
        self._reaper = reaper
        self._pid = 0
        self._control: socket.socket | None = None
        self._terminal: _Terminal | None = None
        self.leaves: list[str] = []
        self._made: list[str] = []
        self._paused = False
        self._oom = 0

    @property
    def pid(self) -> int:
        """The container process's host pid."""
        return self._pid

    # ---------------------------------------------------------------------------- create

    def _create(self, request: CreateRequest, zygote: Zygote) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = ours
        if request.stdio.terminal:
            self._terminal = _Terminal()
        fds = [theirs.fileno()]
        if self._terminal is not None:
            fds.append(self._terminal.slave)
        message = {
            "id": request.id,
            "bundle": request.bundle,
            "stdio": {
                "stdin": request.stdio.stdin,
                "stdout": request.stdio.stdout,
                "stderr": request.stdio.stderr,
            },
        }
        try:
            zygote.spawn(message, fds)
        finally:
            theirs.close()
            if self._terminal is not None:
                os.close(self._terminal.slave)
                self._terminal.slave = -1
        from wasidispatch.runc import cgroups

        # the kernel's wait before a cgroup migration (an RCU grace period, 5-15 ms here)
        # starts now, while the container process prepares its module, not at its join
        cgroups.prewarm()
        ours.settimeout(_READY_TIMEOUT)
        try:
            hello, _ = receive(ours)
        except TimeoutError:
            raise ShimError(f"create {self.id}: the container process did not start") from None
        pid = hello.get("pid") if hello is not None else None
        if hello is not None and hello.get("error"):
            raise ShimError(f"create {self.id}: {hello['error']}")
        if not isinstance(pid, int):
            raise ShimError(f"create {self.id}: the container process died before it started")
        self._pid = pid
        self._reaper.watch(self._pid)
        try:
            answer, _ = receive(ours)
        except TimeoutError:
            raise ShimError(f"create {self.id}: the module was not ready in time") from None
        if answer is None:
            raise ShimError(f"create {self.id}: the container process died while preparing")
        made = answer.get("made")
        self._made = [str(d) for d in made] if isinstance(made, list) else []
        if answer.get("error"):
            raise ShimError(f"create {self.id}: {answer['error']}")
        leaves = answer.get("leaves")
        self.leaves = [str(d) for d in leaves] if isinstance(leaves, list) else []
        ours.settimeout(None)

    # ---------------------------------------------------------------------------- process

    def start(self) -> int:
        """Let the container process run its guest."""
        if self._control is None:
            raise ShimError(f"start {self.id}: the container process is gone")
        if self._terminal is not None:
            self._terminal.copy(self.stdio)
        try:
            send(self._control, {"op": "start"})
        except OSError as exc:
            raise ShimError(f"start {self.id}: the container process is gone: {exc}") from exc
        return self._pid

    def exited(self) -> Exit | None:
        """Its exit once reaped."""
        return self._reaper.poll(self._pid) if self._pid else None

    def kill(self, signal: int, all: bool = False) -> None:
        """Signal the process (``all``: every pid of its cgroup)."""
        if not self._pid or self.exited() is not None:
            raise NotFoundError(f"{self.id}: process already finished")
        targets = set(self.pids()) if all else {self._pid}
        for pid in targets or {self._pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal)
        if self._paused and signal in (_signal.SIGKILL, _signal.SIGTERM):
            with contextlib.suppress(ShimError):
                self._freeze(False)  # a frozen process handles no signal until thawed

    def wait(self) -> Exit:
        """Block until the container process exits."""
        return self._reaper.wait(self._pid)

    def delete(self) -> None:
        """Kill and reap the process if it still runs; remove its cgroup; close fds."""
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.close()
            self._control = None
        if self._pid and self.exited() is None:
            with contextlib.suppress(OSError):
                os.kill(self._pid, _signal.SIGKILL)
            if self._paused:
                with contextlib.suppress(ShimError):
                    self._freeze(False)
            with contextlib.suppress(TimeoutError, ShimError):
                self._reaper.wait(self._pid, 10)
        if self._made:
            from wasidispatch.runc import cgroups

            cgroups.remove(reversed(self._made))
            self._made = []
        if self._terminal is not None:
            self._terminal.close()
            self._terminal = None
        if self._pid:
            self._reaper.forget(self._pid)

    def resize_pty(self, width: int, height: int) -> None:
        """Set the terminal's window size."""
        if self._terminal is None:
            raise ShimError(f"{self.id}: no terminal", code=9)
        self._terminal.resize(width, height)

    def close_stdin(self) -> None:
        """Nothing held here: the container process owns its stdin FIFO."""

    # ---------------------------------------------------------------------------- container

    def _hierarchy_dir(self, controller: str) -> str | None:
        """The container's v1 directory of ``controller``."""
        from wasidispatch.runc import cgroups

        for h in _hierarchies(cgroups):
            if h.version == 1 and controller in h.controllers:
                for leaf in self.leaves:
                    if leaf.startswith(h.mountpoint.rstrip("/") + "/"):
                        return leaf
        return None

    def _unified(self) -> str | None:
        """The container's v2 directory (with controllers), if any."""
        for leaf in self.leaves:
            if os.path.exists(os.path.join(leaf, "cgroup.controllers")):
                return leaf
        return None

    def pids(self) -> list[int]:
        """Every pid in the container's cgroup (just its process without one)."""
        for leaf in self.leaves:
            try:
                with open(os.path.join(leaf, "cgroup.procs")) as fh:
                    return sorted(int(x) for x in fh.read().split())
            except OSError:
                continue
        return [self._pid] if self._pid and self.exited() is None else []

    def _freeze(self, frozen: bool) -> None:
        v1 = self._hierarchy_dir("freezer")
        if v1 is not None:
            state = "FROZEN" if frozen else "THAWED"
            with open(os.path.join(v1, "freezer.state"), "w") as fh:
                fh.write(state)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                with open(os.path.join(v1, "freezer.state")) as fh:
                    if fh.read().strip() == state:
                        return
                time.sleep(0.002)
            raise ShimError(f"{self.id}: the freezer did not reach {state}")
        v2 = self._unified()
        if v2 is not None and os.path.exists(os.path.join(v2, "cgroup.freeze")):
            with open(os.path.join(v2, "cgroup.freeze"), "w") as fh:
                fh.write("1" if frozen else "0")
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, _signal.SIGSTOP if frozen else _signal.SIGCONT)

    def pause(self) -> None:
        """Freeze the container."""
        self._freeze(True)
        self._paused = True

    def resume(self) -> None:
        """Thaw it."""
        self._freeze(False)
        self._paused = False

    @property
    def oom_events(self) -> int:
        """How often the kernel's OOM killer struck in its memory cgroup, plus one when the
        guest ran out of the memory its limit allows (the engine's cap, reported by the
        container process as it exits: the Wasm form of the same event)."""
        count = self._engine_oom()
        v1 = self._hierarchy_dir("memory")
        if v1 is not None:
            return count + _read_keyed(os.path.join(v1, "memory.oom_control")).get("oom_kill", 0)
        v2 = self._unified()
        if v2 is not None:
            return count + _read_keyed(os.path.join(v2, "memory.events")).get("oom_kill", 0)
        return count

    def _engine_oom(self) -> int:
        control = self._control
        if control is not None:
            with contextlib.suppress(OSError, ValueError):
                control.setblocking(False)
                while True:
                    message, fds = receive(control)
                    for fd in fds:
                        os.close(fd)
                    if message is None:
                        break
                    if message.get("oom"):
                        self._oom = 1
        return self._oom

    def stats(self) -> AnyMessage:
        """containerd's cgroups ``Metrics`` of the container (v1 on v1/hybrid hosts)."""
        from wasidispatch.shim._pb import cgroups_v1_pb2, cgroups_v2_pb2

        memory = self._hierarchy_dir("memory")
        if memory is not None or not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            m1 = cgroups_v1_pb2.Metrics()
            if memory is not None:
                m1.memory.usage.usage = (
                    _read_int(os.path.join(memory, "memory.usage_in_bytes")) or 0
                )
                m1.memory.usage.max = (
                    _read_int(os.path.join(memory, "memory.max_usage_in_bytes")) or 0
                )
                m1.memory.usage.limit = (
                    _read_int(os.path.join(memory, "memory.limit_in_bytes")) or 0
                )
                m1.memory.usage.failcnt = _read_int(os.path.join(memory, "memory.failcnt")) or 0
                raw = _read_keyed(os.path.join(memory, "memory.stat"))
                m1.memory.rss, m1.memory.cache = raw.get("rss", 0), raw.get("cache", 0)
            cpu = self._hierarchy_dir("cpuacct")
            if cpu is not None:
                m1.cpu.usage.total = _read_int(os.path.join(cpu, "cpuacct.usage")) or 0
                m1.cpu.usage.user = _read_int(os.path.join(cpu, "cpuacct.usage_user")) or 0
                m1.cpu.usage.kernel = _read_int(os.path.join(cpu, "cpuacct.usage_sys")) or 0
            pids = self._hierarchy_dir("pids")
            if pids is not None:
                m1.pids.current = _read_int(os.path.join(pids, "pids.current")) or 0
                m1.pids.limit = _read_int(os.path.join(pids, "pids.max")) or 0
            return AnyMessage(
                type_url="io.containerd.cgroups.v1.Metrics", value=m1.SerializeToString()
            )
        m2 = cgroups_v2_pb2.Metrics()
        unified = self._unified()
        if unified is not None:
            m2.memory.usage = _read_int(os.path.join(unified, "memory.current")) or 0
            m2.memory.usage_limit = _read_int(os.path.join(unified, "memory.max")) or 0
            cpu_stat = _read_keyed(os.path.join(unified, "cpu.stat"))
            m2.cpu.usage_usec = cpu_stat.get("usage_usec", 0)
            m2.cpu.user_usec = cpu_stat.get("user_usec", 0)
            m2.cpu.system_usec = cpu_stat.get("system_usec", 0)
            m2.pids.current = _read_int(os.path.join(unified, "pids.current")) or 0
        return AnyMessage(type_url="io.containerd.cgroups.v2.Metrics", value=m2.SerializeToString())

    def update(self, resources: AnyMessage) -> None:
        """Apply ``memory.limit`` and ``pids.limit`` of a LinuxResources JSON."""
        try:
            doc = json.loads(resources.value or b"{}")
        except ValueError as exc:
            raise InvalidArgumentError(f"update {self.id}: bad resources: {exc}") from exc
        if not isinstance(doc, dict):
            raise InvalidArgumentError(f"update {self.id}: resources must be a JSON object")
        memory = doc.get("memory")
        memory = memory if isinstance(memory, dict) else {}
        pids = doc.get("pids")
        pids = pids if isinstance(pids, dict) else {}
        writes: list[tuple[str | None, str, object]] = [
            (self._hierarchy_dir("memory"), "memory.limit_in_bytes", memory.get("limit")),
            (self._hierarchy_dir("pids"), "pids.max", pids.get("limit")),
            (self._unified(), "memory.max", memory.get("limit")),
            (self._unified(), "pids.max", pids.get("limit")),
        ]
        if not self.leaves:
            raise ShimError(f"update {self.id}: the container has no cgroup", code=9)
        for directory, name, value in writes:
            if directory is None or value is None or not isinstance(value, int):
                continue
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                continue
            text = "max" if value < 0 and name.endswith(".max") else str(value)
            try:
                with open(path, "w") as fh:
                    fh.write(text)
            except OSError as exc:
                raise ShimError(f"update {self.id}: {name} = {text}: {exc.strerror}") from exc

    def exec(self, exec_id: str, process: Mapping[str, object], stdio: Stdio) -> Process:
        """Refused: a Wasm container runs one guest, no second process."""
        raise UnimplementedError(
            f"exec into Wasm container {self.id} is not supported: a Wasm container runs "
            "one guest and has no shell (exec into a Linux sidecar of the pod instead)"
        )


def create_wasm(
    request: CreateRequest, zygote: Zygote, reaper: Reaper | None = None
) -> WasmInstance:
    """A Wasm container for ``request``, forked from ``zygote`` and waiting for Start;
    `ShimError` with the reason (and nothing left) when it cannot be."""
    instance = WasmInstance(request, reaper or Reaper.default())
    try:
        instance._create(request, zygote)
    except BaseException:
        instance.delete()
        raise
    return instance
