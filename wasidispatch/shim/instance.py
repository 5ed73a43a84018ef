"""What a shim's containers are: the `Instance` and `Process` protocols the Task service drives.

The Task service (`wasidispatch.shim.task`) owns everything containerd sees: the task state
machine, events, the rootfs mount, the fan-out of ``Wait``. An instance only does the work for
one container: the factory creates it (the container exists, blocked before its entrypoint),
``start`` runs it, ``kill`` signals it, ``wait`` returns its `Exit`, ``delete`` frees it. A
Linux instance adds ``exec`` processes, pause/resume, pids, stats and update; an instance that
cannot do one of those raises `wasidispatch.errors.UnimplementedError` with a clear message.

A minimal custom shim implements `Instance` for its containers and hands a `Factory` to
`wasidispatch.shim.run_shim` (see ``docs/shim.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from wasidispatch.errors import UnimplementedError
from wasidispatch.shim.reaper import Exit

if TYPE_CHECKING:
    from google.protobuf.any_pb2 import Any as AnyMessage

    from wasidispatch.shim.daemon import Options

__all__ = [
    "BaseInstance",
    "BaseShim",
    "CreateRequest",
    "Exit",
    "Factory",
    "Instance",
    "Mount",
    "Process",
    "Shim",
    "Stdio",
]


class Stdio(NamedTuple):
    """A process's stdio as containerd names it: FIFO paths (``""``: none) and whether it
    has a terminal (then ``stdout`` carries the terminal's output and ``stderr`` is unused).

    >>> Stdio("", "/run/fifo/c1-stdout", "/run/fifo/c1-stderr").stdin
    ''
    """

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Mount(NamedTuple):
    """One rootfs mount of a Create request (containerd's ``types.Mount``)."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


class CreateRequest(NamedTuple):
    """What the Task service hands the `Factory` for a Create: the container ``id``, its
    ``bundle`` directory (``config.json``; ``rootfs/`` already mounted from ``rootfs``), the
    containerd ``namespace``, its `Stdio`, the runtime ``options`` (the request's ``Any``, or
    ``None``) and ``spec``, the parsed ``config.json`` object."""

    id: str
    bundle: str
    namespace: str
    stdio: Stdio
    spec: Mapping[str, object]
    rootfs: tuple[Mount, ...] = ()
    options: AnyMessage | None = None
    annotations: Mapping[str, str] = MappingProxyType({})


@runtime_checkable
class Process(Protocol):
    """A process the service manages: a container's init (an `Instance`) or an exec."""

    @property
    def pid(self) -> int:
        """Its host pid (0 when it has none)."""
        ...

    def start(self) -> int:
        """Run it; returns its pid."""
        ...

    def kill(self, signal: int, all: bool = False) -> None:
        """Deliver ``signal`` (``all``: to every process of the container). A process that
        has exited raises `wasidispatch.errors.NotFoundError`."""
        ...

    def wait(self) -> Exit:
        """Block until it has exited; any number of threads may call it."""
        ...

    def delete(self) -> None:
        """Free everything it holds; kill and reap it first if it still runs."""
        ...

    def resize_pty(self, width: int, height: int) -> None:
        """Set its terminal's window size."""
        ...

    def close_stdin(self) -> None:
        """Close its stdin (the client finished writing)."""
        ...


@runtime_checkable
class Instance(Process, Protocol):
    """A container, as its init process plus what containers add."""

    def pids(self) -> list[int]:
        """Every pid in the container."""
        ...

    def pause(self) -> None:
        """Freeze every process of the container."""
        ...

    def resume(self) -> None:
        """Thaw it."""
        ...

    def stats(self) -> AnyMessage:
        """Its metrics (cgroups ``Metrics`` in a ``google.protobuf.Any``)."""
        ...

    def update(self, resources: AnyMessage) -> None:
        """Apply new resources (runtime-spec ``LinuxResources`` JSON in an ``Any``)."""
        ...

    def exec(self, exec_id: str, process: Mapping[str, object], stdio: Stdio) -> Process:
        """Create (not start) another process in the container from a runtime-spec
        ``process`` object."""
        ...


Factory = Callable[[CreateRequest], Instance]
"""Creates a container's `Instance` for a Create (it leaves nothing behind when it raises)."""


class BaseInstance:
    """Defaults for what a minimal `Instance` does not do: subclass it and write ``pid``,
    ``start``, ``kill``, ``wait`` and ``delete`` (runwasi's ``Instance`` trait has the same
    five). ``pids`` is the one pid; pause, resume, stats, update, exec and the terminal
    methods raise `UnimplementedError` (code 12, which containerd shows as "not
    implemented"); ``close_stdin`` does nothing.
    """

    @property
    def pid(self) -> int:
        """Its host pid (0 before `start`)."""
        return 0

    def pids(self) -> list[int]:
        """The one process."""
        return [self.pid] if self.pid else []

    def pause(self) -> None:
        """Not supported."""
        raise UnimplementedError(f"{type(self).__name__}: pause is not supported")

    def resume(self) -> None:
        """Not supported."""
        raise UnimplementedError(f"{type(self).__name__}: resume is not supported")

    def stats(self) -> AnyMessage:
        """Not supported."""
        raise UnimplementedError(f"{type(self).__name__}: stats are not supported")

    def update(self, resources: AnyMessage) -> None:
        """Not supported."""
        raise UnimplementedError(f"{type(self).__name__}: update is not supported")

    def exec(self, exec_id: str, process: Mapping[str, object], stdio: Stdio) -> Process:
        """Not supported."""
        raise UnimplementedError(f"{type(self).__name__}: exec is not supported")

    def resize_pty(self, width: int, height: int) -> None:
        """Not supported."""
        raise UnimplementedError(f"{type(self).__name__}: no terminal")

    def close_stdin(self) -> None:
        """Nothing to close."""


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
