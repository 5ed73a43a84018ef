"""config.json read with the stdlib, for the runtime's ``create`` of a Wasm container.

Every ``wasidispatch-runc create`` is a fresh interpreter, and importing the pydantic OCI
models costs more than everything else ``create`` does (about 120 ms of a 250 ms ``create``
here). So ``create`` reads config.json into `LeanBundle`, a
`wasidispatch.executor.BundleLike` like `wasidispatch.oci.bundle.Bundle`: ``path``,
``rootfs``, ``annotations``, ``spec`` and ``resolve_entrypoint`` (the same resolution code,
:mod:`wasidispatch._resolve`). The executor's `decide`, `WasmExecutor.workload` and
`WasmExecutor.prepare` take it as they take a `Bundle` (``tests/test_runc_cli.py`` checks both
give the same decision and `Workload`).

The fields the executor reads are typed properties that check their JSON type when read
(`SpecError` otherwise; `LeanBundle.load` reads them all once, so a bad config.json fails
there); any other field reads through `Node`'s untyped attribute view, as runc, which does not
validate more either. The models still validate the whole bundle when a full check is wanted
(``wasidispatch inspect``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from wasidispatch import _resolve
from wasidispatch.errors import SpecError

__all__ = ["LeanBundle", "LeanSpec", "Node"]

# Fields whose JSON objects are maps of arbitrary keys, kept as dicts.
_MAPS = frozenset({"annotations", "sysctl", "unified", "net_devices", "rdma"})
_SPECIAL = {"block_io": "blockIO"}

_N = TypeVar("_N", bound="Node")

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT32_MAX, UINT64_MAX = (1 << 32) - 1, (1 << 64) - 1
_RLIMITS = frozenset(
    [
        "RLIMIT_AS",
        "RLIMIT_CORE",
        "RLIMIT_CPU",
        "RLIMIT_DATA",
        "RLIMIT_FSIZE",
        "RLIMIT_LOCKS",
        "RLIMIT_MEMLOCK",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_NOFILE",
        "RLIMIT_NPROC",
        "RLIMIT_RSS",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
        "RLIMIT_SIGPENDING",
        "RLIMIT_STACK",
    ]
)


def _camel(name: str) -> str:
    special = _SPECIAL.get(name)
    if special is not None:
        return special
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return Node(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class Node:
    """A JSON object read as attributes: ``cgroups_path`` reads ``cgroupsPath``; a missing
    field reads ``None``, as an unset optional model field does.

    Example::

        >>> Node({"linux": {"cgroupsPath": "/a"}}).linux.cgroups_path
        '/a'
        >>> Node({}).process is None
        True
    """

    __slots__ = ("_doc", "_where")

    def __init__(self, doc: Mapping[str, Any], where: str = "") -> None:
        self._doc = doc
        self._where = where

    def __getattr__(self, name: str) -> Any:
        value = self._doc.get(_camel(name))
        if name in _MAPS:
            return dict(value) if isinstance(value, dict) else None
        return _wrap(value)

    # -- typed reads, for the subclasses' properties

    def _field(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def _bad(self, key: str, want: str) -> SpecError:
        return SpecError(f"{self._field(key)}: not {want}")

    def _str(self, key: str) -> str | None:
        value = self._doc.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            _check_text(value, self._field(key))
            return value
        raise self._bad(key, "a string")

    def _bool(self, key: str) -> bool | None:
        value = self._doc.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self._bad(key, "a boolean")

    def _int(self, key: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int | None:
        """An integer field in ``[lo, hi]`` (int64 unless told: Go's type for most of them).
        A float (``1e308``, ``1.0``), ``NaN``, ``Infinity`` or a boolean is not one."""
        value = self._doc.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(key, "an integer")
        if not lo <= value <= hi:
            raise SpecError(f"{self._field(key)}: {value} is out of range [{lo}, {hi}]")
        return value

    def _strs(self, key: str) -> list[str] | None:
        value = self._doc.get(key)
        if value is None:
            return None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            for i, item in enumerate(value):
                _check_text(item, f"{self._field(key)}.{i}")
            return value
        raise self._bad(key, "a list of strings")

    def _child(self, key: str, kind: type[_N]) -> _N | None:
        value = self._doc.get(key)
        if value is None:
            return None
        if isinstance(value, dict):
            return kind(value, self._field(key))
        raise self._bad(key, "an object")

    def _children(self, key: str, kind: type[_N]) -> list[_N] | None:
        value = self._doc.get(key)
        if value is None:
            return None
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return [kind(v, f"{self._field(key)}.{i}") for i, v in enumerate(value)]
        raise self._bad(key, "a list of objects")


def _check_text(value: str, field: str) -> None:
    """A string that becomes a path, an argument or an environment entry: no NUL (the kernel
    would cut it there) and valid Unicode (JSON can carry a lone surrogate, which has no
    bytes on the file system)."""
    if "\0" in value:
        raise SpecError(f"{field}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(f"{field}: contains a lone surrogate (not valid Unicode)") from None


class LeanProcess(Node):
    """``process``: typed ``args``, ``cwd``, ``env_dict()``."""

    __slots__ = ()

    @property
    def args(self) -> list[str] | None:
        """``process.args``."""
        return self._strs("args")

    @property
    def cwd(self) -> str:
        """``process.cwd`` (``/`` when unset)."""
        return self._str("cwd") or "/"

    @property
    def terminal(self) -> bool | None:
        """``process.terminal``."""
        return self._bool("terminal")

    @property
    def no_new_privileges(self) -> bool | None:
        """``process.noNewPrivileges``."""
        return self._bool("noNewPrivileges")

    @property
    def oom_score_adj(self) -> int | None:
        """``process.oomScoreAdj``, in the kernel's range -1000..1000."""
        return self._int("oomScoreAdj", -1000, 1000)

    @property
    def rlimits(self) -> list[LeanRlimit] | None:
        """``process.rlimits``."""
        return self._children("rlimits", LeanRlimit)

    @property
    def user(self) -> LeanUser | None:
        """``process.user``."""
        return self._child("user", LeanUser)

    def env_dict(self) -> dict[str, str]:
        """``process.env`` as a mapping, as the models' ``Process.env_dict`` (later entries
        win; an entry without ``=`` maps to ``""``).

        >>> LeanProcess({"env": ["A=1", "B", "A=2"]}).env_dict()
        {'A': '2', 'B': ''}
        """
        out: dict[str, str] = {}
        for entry in self._strs("env") or ():
            key, _, value = entry.partition("=")
            out[key] = value
        return out


class LeanRlimit(Node):
    """One of ``process.rlimits``: ``type`` (``RLIMIT_*``), ``soft`` <= ``hard`` (uint64)."""

    __slots__ = ()

    @property
    def type(self) -> str:
        """``type``, one of the kernel's ``RLIMIT_*`` names."""
        value = self._str("type")
        if value not in _RLIMITS:
            raise SpecError(f"{self._field('type')}: unknown rlimit {value!r}")
        return value

    @property
    def soft(self) -> int:
        """``soft`` (0 when unset)."""
        return self._int("soft", 0, UINT64_MAX) or 0

    @property
    def hard(self) -> int:
        """``hard`` (0 when unset), at least ``soft``."""
        hard = self._int("hard", 0, UINT64_MAX) or 0
        if hard < self.soft:
            raise SpecError(f"{self._field('soft')}: {self.soft} is above hard ({hard})")
        return hard


class LeanUser(Node):
    """``process.user``: ``uid``, ``gid``, ``additionalGids`` (uint32)."""

    __slots__ = ()

    @property
    def uid(self) -> int:
        """``uid`` (0 when unset)."""
        return self._int("uid", 0, UINT32_MAX) or 0

    @property
    def gid(self) -> int:
        """``gid`` (0 when unset)."""
        return self._int("gid", 0, UINT32_MAX) or 0

    @property
    def additional_gids(self) -> list[int]:
        """``additionalGids``."""
        value = self._doc.get("additionalGids")
        if value is None:
            return []
        if isinstance(value, list) and all(
            isinstance(g, int) and not isinstance(g, bool) and 0 <= g <= UINT32_MAX for g in value
        ):
            return value
        raise self._bad("additionalGids", f"a list of integers in [0, {UINT32_MAX}]")


class LeanRoot(Node):
    """``root``: typed ``readonly``."""

    __slots__ = ()

    @property
    def readonly(self) -> bool | None:
        """``root.readonly``."""
        return self._bool("readonly")


class LeanMount(Node):
    """One of ``mounts``: typed ``destination``, ``source``, ``type``, ``options``."""

    __slots__ = ()

    @property
    def destination(self) -> str:
        """``destination`` (required)."""
        value = self._str("destination")
        if value is None:
            raise self._bad("destination", "set")
        return value

    @property
    def source(self) -> str | None:
        """``source``."""
        return self._str("source")

    @property
    def type(self) -> str | None:
        """``type``."""
        return self._str("type")

    @property
    def options(self) -> list[str] | None:
        """``options``."""
        return self._strs("options")


class LeanMemory(Node):
    """``linux.resources.memory``: typed ``limit``, ``reservation``, ``swap`` (int64 bytes;
    -1 is unlimited, as for runc)."""

    __slots__ = ()

    @property
    def limit(self) -> int | None:
        """``limit`` in bytes."""
        return self._int("limit", -1)

    @property
    def reservation(self) -> int | None:
        """``reservation`` in bytes."""
        return self._int("reservation", -1)

    @property
    def swap(self) -> int | None:
        """``swap`` in bytes."""
        return self._int("swap", -1)


class LeanPids(Node):
    """``linux.resources.pids``: typed ``limit`` (int64; 0 or -1 is unlimited)."""

    __slots__ = ()

    @property
    def limit(self) -> int | None:
        """``limit``."""
        return self._int("limit", -1)


class LeanCpu(Node):
    """``linux.resources.cpu``: typed ``shares``, ``quota``, ``period`` (not applied to a
    Wasm container, but refused when runc would refuse them)."""

    __slots__ = ()

    @property
    def shares(self) -> int | None:
        """``shares`` (uint64)."""
        return self._int("shares", 0, UINT64_MAX)

    @property
    def quota(self) -> int | None:
        """``quota`` (int64; -1 is unlimited)."""
        return self._int("quota")

    @property
    def period(self) -> int | None:
        """``period`` (uint64)."""
        return self._int("period", 0, UINT64_MAX)

    @property
    def cpus(self) -> str | None:
        """``cpus``."""
        return self._str("cpus")

    @property
    def mems(self) -> str | None:
        """``mems``."""
        return self._str("mems")


class LeanResources(Node):
    """``linux.resources``: typed ``memory``, ``pids``, ``cpu``."""

    __slots__ = ()

    @property
    def memory(self) -> LeanMemory | None:
        """``memory``."""
        return self._child("memory", LeanMemory)

    @property
    def pids(self) -> LeanPids | None:
        """``pids``."""
        return self._child("pids", LeanPids)

    @property
    def cpu(self) -> LeanCpu | None:
        """``cpu``."""
        return self._child("cpu", LeanCpu)


class LeanLinux(Node):
    """``linux``: typed ``resources`` and ``cgroupsPath``."""

    __slots__ = ()

    @property
    def cgroups_path(self) -> str | None:
        """``cgroupsPath``."""
        return self._str("cgroupsPath")

    @property
    def resources(self) -> LeanResources | None:
        """``resources``."""
        return self._child("resources", LeanResources)


class LeanSpec(Node):
    """config.json: typed ``process``, ``root``, ``mounts``, ``linux`` (what the executor reads).

    Example::

        >>> spec = LeanSpec({"process": {"args": ["/a.wasm"]}, "mounts": [{"destination": "/d"}]})
        >>> spec.process.args, spec.process.cwd, spec.mounts[0].destination
        (['/a.wasm'], '/', '/d')
        >>> LeanSpec({"process": {"args": "/a.wasm"}}).process.args
        Traceback (most recent call last):
        ...
        wasidispatch.errors.SpecError: process.args: not a list of strings
    """

    __slots__ = ()

    @property
    def process(self) -> LeanProcess | None:
        """``process``."""
        return self._child("process", LeanProcess)

    @property
    def root(self) -> LeanRoot | None:
        """``root``."""
        return self._child("root", LeanRoot)

    @property
    def linux(self) -> LeanLinux | None:
        """``linux``."""
        return self._child("linux", LeanLinux)

    @property
    def mounts(self) -> list[LeanMount] | None:
        """``mounts``."""
        return self._children("mounts", LeanMount)


def _no_constant(name: str) -> Any:
    raise SpecError(f"{name} is not a JSON number")


class LeanBundle:
    """A runtime bundle read with the stdlib: ``path``, ``spec`` (a `LeanSpec`), ``rootfs``,
    ``annotations``; ``resolve_entrypoint`` as `wasidispatch.oci.bundle.Bundle` has it."""

    __slots__ = ("annotations", "path", "rootfs", "spec")

    def __init__(self, path: Path, doc: Mapping[str, Any], rootfs: Path) -> None:
        self.path = path
        self.spec = LeanSpec(doc)
        self.rootfs = rootfs
        notes = doc.get("annotations")
        self.annotations: dict[str, str] = dict(notes) if isinstance(notes, dict) else {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LeanBundle:
        """Read ``path/config.json``; `SpecError` naming the field when it is not a bounded
        regular file of JSON (a FIFO, a device, a directory, over `_fs.CONFIG_LIMIT`, nested
        too deep, ``NaN``), has no rootfs, or a field the runtime reads has the wrong JSON
        type, a value out of range, or a string with a NUL or a lone surrogate."""
        from wasidispatch._fs import CONFIG_LIMIT, read_regular

        bundle = Path(path).absolute()
        config = bundle / "config.json"
        data = read_regular(config, limit=CONFIG_LIMIT, what="config.json")
        try:
            doc = json.loads(data, parse_constant=_no_constant)
        except RecursionError:
            raise SpecError(f"{config}: nested too deeply to be a runtime config") from None
        except ValueError as exc:
            raise SpecError(f"{config}: not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise SpecError(f"{config}: not a JSON object")
        try:
            root = doc.get("root")
            if not isinstance(root, dict) or not isinstance(root.get("path"), str):
                raise SpecError("root.path: required to run a container")
            _check_text(root["path"], "root.path")
            notes = doc.get("annotations")
            if notes is not None and not (
                isinstance(notes, dict) and all(isinstance(v, str) for v in notes.values())
            ):
                raise SpecError("annotations: not a map of strings")
            rootfs = _resolve.rootfs_path(config, root["path"])
            loaded = cls(bundle, doc, rootfs)
            loaded._check()
        except SpecError as exc:
            if str(config) in str(exc):
                raise
            raise SpecError(f"{config}: {exc}") from None
        return loaded

    def _check(self) -> None:
        """Read every typed field once, so a wrong JSON type or value fails `load`."""
        spec = self.spec
        _ = spec._str("ociVersion")
        process = spec.process
        if process is not None:
            _ = process.args, process.cwd, process.env_dict(), process.terminal
            _ = process.no_new_privileges, process.oom_score_adj
            for rlimit in process.rlimits or ():
                _ = rlimit.type, rlimit.soft, rlimit.hard
            if process.user is not None:
                _ = process.user.uid, process.user.gid, process.user.additional_gids
        if spec.root is not None:
            _ = spec.root.readonly
        for mount in spec.mounts or ():
            _ = mount.destination, mount.source, mount.type, mount.options
        linux = spec.linux
        if linux is None:
            return
        _ = linux.cgroups_path
        resources = linux.resources
        if resources is None:
            return
        if resources.memory is not None:
            _ = resources.memory.limit, resources.memory.reservation, resources.memory.swap
        if resources.pids is not None:
            _ = resources.pids.limit
        cpu = resources.cpu
        if cpu is not None:
            _ = cpu.shares, cpu.quota, cpu.period, cpu.cpus, cpu.mems

    def __repr__(self) -> str:
        return f"LeanBundle({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        """``config.json`` of this bundle."""
        return self.path / "config.json"

    def resolve_entrypoint(self, name: str | None = None) -> Path:
        """The host path of ``process.args[0]`` (or ``name``), as ``Bundle`` resolves it
        (:mod:`wasidispatch._resolve`)."""
        process = self.spec.process
        if name is None:
            args = process.args if process is not None else None
            name = _resolve.entrypoint_name(self.config_path, args)
        cwd, path = "/", None
        if process is not None:
            cwd, path = process.cwd, process.env_dict().get("PATH")
        return _resolve.resolve_entrypoint(self.config_path, self.rootfs, name, cwd=cwd, path=path)
