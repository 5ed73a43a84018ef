"""The engine-agnostic containerd shim v2 toolkit: what a shim written in Python imports.

It knows nothing of Wasm (as runwasi's ``containerd-shimkit``): the Wasm and Linux containers
of ``containerd-shim-wasidispatch-v1`` are built on it in `wasidispatch.wasmshim`.

- `run_shim` (`wasidispatch.shim.daemon`): containerd's ``start``/``delete`` protocol, the
  socket per group of containers, the detached subreaper daemon.
- `TaskService` (`wasidispatch.shim.task`): ``containerd.task.v2.Task`` over `Instance`s with
  the task state machine, events and the rootfs mount.
- `Instance`, `Process`, `BaseInstance`, `CreateRequest`, `Stdio` (`wasidispatch.shim.instance`):
  what a shim writes for its containers.
- `Server`, `Client` (`wasidispatch.shim.ttrpc`): ttrpc over unix sockets; `Publisher`
  (`wasidispatch.shim.events`): events to containerd.
- `Reaper` (`wasidispatch.shim.reaper`): every child's exit status, in one place.
- Messages: ``wasidispatch.shim._pb`` (generated from the project's own ``.proto`` files).

Names are imported lazily: ``import wasidispatch.shim`` costs no protobuf.

Example: a whole shim (see ``docs/shim.md`` for the instance)::

    from wasidispatch.shim import BaseShim, run_shim

    class MyShim(BaseShim):
        name = "mine"                      # io.containerd.mine.v1
        def factory(self, options):
            return MyInstance              # called with a CreateRequest

    raise SystemExit(run_shim(MyShim()))
"""

from __future__ import annotations

import importlib

# no `typing` import (~3 ms): the shim's start and delete run once per container
TYPE_CHECKING = False

__all__ = [
    "BaseInstance",
    "BaseShim",
    "Client",
    "Completed",
    "Context",
    "CreateRequest",
    "EventSink",
    "Exit",
    "Factory",
    "Instance",
    "Mount",
    "Options",
    "Process",
    "Publisher",
    "Reaper",
    "Server",
    "Shim",
    "Stdio",
    "TaskService",
    "run_shim",
]

_LAZY = {
    "BaseInstance": "wasidispatch.shim.instance",
    "CreateRequest": "wasidispatch.shim.instance",
    "Exit": "wasidispatch.shim.reaper",
    "Factory": "wasidispatch.shim.instance",
    "Instance": "wasidispatch.shim.instance",
    "Mount": "wasidispatch.shim.instance",
    "Process": "wasidispatch.shim.instance",
    "Stdio": "wasidispatch.shim.instance",
    "Completed": "wasidispatch.shim.reaper",
    "Reaper": "wasidispatch.shim.reaper",
    "BaseShim": "wasidispatch.shim.instance",
    "Options": "wasidispatch.shim.daemon",
    "Shim": "wasidispatch.shim.instance",
    "run_shim": "wasidispatch.shim.daemon",
    "EventSink": "wasidispatch.shim.task",
    "TaskService": "wasidispatch.shim.task",
    "Client": "wasidispatch.shim.ttrpc",
    "Context": "wasidispatch.shim.ttrpc",
    "Server": "wasidispatch.shim.ttrpc",
    "Publisher": "wasidispatch.shim.events",
}

if TYPE_CHECKING:
    from typing import Any

    from wasidispatch.shim.daemon import Options, run_shim
    from wasidispatch.shim.events import Publisher
    from wasidispatch.shim.instance import (
        BaseInstance,
        BaseShim,
        CreateRequest,
        Factory,
        Instance,
        Mount,
        Process,
        Shim,
        Stdio,
    )
    from wasidispatch.shim.reaper import Completed, Exit, Reaper
    from wasidispatch.shim.task import EventSink, TaskService
    from wasidispatch.shim.ttrpc import Client, Context, Server


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wasidispatch.shim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
