"""The state of a Wasm container under ``--root``, and its status read from ``/proc``.

A Wasm container lives in ``<root>/<id>/`` (the same directory runc would use, so ids stay
unique across both): ``wasidispatch.json`` (this module's `WasmState`) and, between
``create`` and ``start``, ``exec.fifo``. The status is computed, never stored: the recorded
pid must still be alive *and* have the recorded start time (``/proc/<pid>/stat`` field 22),
so a recycled pid is never mistaken for the container. Stdlib only: ``state``/``kill``/
``delete`` start fast.
"""

from __future__ import annotations

import os
from stat import S_ISREG as _S_ISREG

# Not `from typing import ...`: this module is on the path of every call, and typing costs
# more than the module itself; mypy treats a module-level TYPE_CHECKING = False the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal

    Status = Literal["created", "running", "paused", "stopped"]

__all__ = [
    "FIFO_NAME",
    "STATE_NAME",
    "WasmState",
    "container_dir",
    "proc_stat",
    "valid_id",
]

STATE_NAME = "wasidispatch.json"
_STATE_LIMIT = 1 << 20  # our own document is a few hundred bytes
FIFO_NAME = "exec.fifo"
OCI_VERSION = "1.0.2"

# runc's rule for container ids (libcontainer's validateID in runc 1.1: the Go regexp
# ^[\w+-\.]+$, where \w is ASCII [0-9A-Za-z_] and "+-\." is the range '+'..'.', so ","
# is in; then "/"+id must be a clean path, which refuses "." and ".."). No "/": no escape.
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_+,-.")


def valid_id(container_id: str) -> bool:
    """Whether ``container_id`` is one runc would accept: ASCII letters, digits and
    ``_ + , - .``, not empty, not ``.`` or ``..``.

    Example::

        >>> valid_id("k8s_app-1.0"), valid_id("a,b"), valid_id("../etc"), valid_id("é")
        (True, True, False, False)
    """
    if not container_id or container_id in (".", ".."):
        return False
    return all(c in _ID_CHARS for c in container_id)


def container_dir(root: str, container_id: str) -> str:
    """``<root>/<id>``; the id must be `valid_id`."""
    return os.path.join(root, container_id)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, ``None`` when it is gone.

    Example::

        >>> proc_stat(os.getpid())[0] in "RS"
        True
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ")".
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def _well_typed(doc: dict[str, Any]) -> bool:
    """The types `save` writes: a pid to signal and cgroup directories to remove must be
    exactly that (positive ints, absolute paths), whatever else the file says."""
    pid, start = doc.get("pid"), doc.get("pid_start")
    cgroups = doc.get("cgroups", [])
    notes = doc.get("annotations", {})
    return (
        type(pid) is int
        and pid > 0
        and type(start) is int
        and all(isinstance(doc.get(k, ""), str) for k in ("id", "bundle", "rootfs", "created"))
        and isinstance(cgroups, list)
        and all(isinstance(c, str) and c.startswith("/") and "\0" not in c for c in cgroups)
        and isinstance(notes, dict)
        and all(isinstance(v, str) for v in notes.values())
    )


class WasmState:
    """What ``create`` recorded about a Wasm container (``wasidispatch.json``)."""

    _FIELDS = ("id", "pid", "pid_start", "bundle", "rootfs", "created", "owner")

    def __init__(
        self,
        id: str,
        pid: int,
        pid_start: int,
        bundle: str,
        rootfs: str,
        created: str,
        owner: str = "",
        annotations: dict[str, str] | None = None,
        cgroups: list[str] | None = None,
    ) -> None:
        self.id = id
        self.pid = pid
        self.pid_start = pid_start
        self.bundle = bundle
        self.rootfs = rootfs
        self.created = created
        self.owner = owner
        self.annotations: dict[str, str] = dict(annotations or {})
        self.cgroups: list[str] = list(cgroups or [])
        self.directory = ""  # set by `load`/`save`: the container's state directory

    def __repr__(self) -> str:
        return f"WasmState({self.id!r}, pid={self.pid}, bundle={self.bundle!r})"

    def alive(self) -> bool:
        """The recorded process still runs (not a zombie, not a recycled pid)."""
        stat = proc_stat(self.pid)
        return stat is not None and stat[1] == self.pid_start and stat[0] not in "ZXx"

    def status(self) -> Status:
        """created (waiting for ``start``), running, paused (stopped by a signal) or stopped."""
        stat = proc_stat(self.pid)
        if stat is None or stat[1] != self.pid_start or stat[0] in "ZXx":
            return "stopped"
        if stat[0] in "Tt":
            return "paused"
        if os.path.exists(os.path.join(self.directory, FIFO_NAME)):
            return "created"
        return "running"

    def oci_state(self) -> dict[str, Any]:
        """The document ``runc state`` prints."""
        status = self.status()
        doc: dict[str, Any] = {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": self.pid if status != "stopped" else 0,
            "status": status,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": self.owner,
        }
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc

    def to_dict(self) -> dict[str, Any]:
        """The stored document."""
        doc: dict[str, Any] = {name: getattr(self, name) for name in self._FIELDS}
        doc["annotations"] = dict(self.annotations)
        doc["cgroups"] = list(self.cgroups)
        return doc

    def save(self, directory: str) -> None:
        """Write ``<directory>/wasidispatch.json`` whole or not at all, never through a file
        planted at that name or at a temporary one (`wasidispatch._fs.write_atomic`)."""
        import json

        from wasidispatch._fs import write_atomic  # only `create` writes: not on light paths

        self.directory = directory
        write_atomic(
            os.path.join(directory, STATE_NAME), json.dumps(self.to_dict()).encode(), mode=0o600
        )

    @classmethod
    def load(cls, root: str, container_id: str) -> WasmState | None:
        """The Wasm container ``container_id`` under ``root``, ``None`` when not ours."""
        if not valid_id(container_id):
            return None
        directory = container_dir(root, container_id)
        # Not through a symlink, never blocking on a FIFO, and only a regular file: a name
        # planted in the state directory is not ours (the directory is runc's or foreign).
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(os.path.join(directory, STATE_NAME), flags)
        except OSError:
            return None
        try:
            if not _S_ISREG(os.fstat(fd).st_mode):
                return None
            data = os.read(fd, _STATE_LIMIT + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(data) > _STATE_LIMIT:
            return None
        import json  # only for our own containers: a Linux id never pays for it

        try:
            doc = json.loads(data)
            state = cls(**doc)
        except (ValueError, TypeError, RecursionError):
            return None
        if not _well_typed(doc):
            return None  # not a document `save` wrote: not ours to act on (rmdir, kill)
        state.directory = directory
        return state
