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
        if value is None or isinstance(value, str):
            return value
        raise self._bad(key, "a string")

    def _bool(self, key: str) -> bool | None:
        value = self._doc.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self._bad(key, "a boolean")

    def _int(self, key: str) -> int | None:
        value = self._doc.get(key)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise self._bad(key, "an integer")

    def _strs(self, key: str) -> list[str] | None:
        value = self._doc.get(key)
        if value is None:
            return None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise self._bad(key, "a list of strings")

    def _child(self, key: str, kind: type[_N]) -> _N | None:
        value = self._doc.get(key)
        if value is None:
            return None
        if isinstance(value, dict):
            return kind(value, self._field(key))
        raise self._bad(key, "an object")


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
    """``linux.resources.memory``: typed ``limit``."""

    __slots__ = ()

    @property
    def limit(self) -> int | None:
        """``limit`` in bytes."""
        return self._int("limit")


class LeanResources(Node):
    """``linux.resources``: typed ``memory``."""

    __slots__ = ()

    @property
    def memory(self) -> LeanMemory | None:
        """``memory``."""
        return self._child("memory", LeanMemory)


class LeanLinux(Node):
    """``linux``: typed ``resources``."""

    __slots__ = ()

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
        value = self._doc.get("mounts")
        if value is None:
            return None
        if isinstance(value, list) and all(isinstance(m, dict) for m in value):
            return [LeanMount(m, f"mounts.{i}") for i, m in enumerate(value)]
        raise self._bad("mounts", "a list of objects")


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
        """Read ``path/config.json``; `SpecError` when it is unreadable, has no rootfs, or a
        field the executor reads has the wrong JSON type."""
        bundle = Path(path).absolute()
        config = bundle / "config.json"
        try:
            doc = json.loads(config.read_bytes())
        except (OSError, ValueError) as exc:
            raise SpecError(f"{config}: {exc}") from exc
        if not isinstance(doc, dict):
            raise SpecError(f"{config}: not a JSON object")
        root = doc.get("root")
        if not isinstance(root, dict) or not isinstance(root.get("path"), str):
            raise SpecError(f"{config}: root.path: required to run a container")
        rootfs = _resolve.rootfs_path(config, root["path"])
        notes = doc.get("annotations")
        if notes is not None and not (
            isinstance(notes, dict) and all(isinstance(v, str) for v in notes.values())
        ):
            raise SpecError(f"{config}: annotations: not a map of strings")
        loaded = cls(bundle, doc, rootfs)
        try:
            loaded._check()
        except SpecError as exc:
            raise SpecError(f"{config}: {exc}") from None
        return loaded

    def _check(self) -> None:
        """Read every typed field once, so a wrong JSON type fails `load`."""
        spec = self.spec
        process = spec.process
        if process is not None:
            _ = process.args, process.cwd, process.env_dict()
        if spec.root is not None:
            _ = spec.root.readonly
        for mount in spec.mounts or ():
            _ = mount.destination, mount.source, mount.type, mount.options
        linux = spec.linux
        resources = linux.resources if linux is not None else None
        if resources is not None and resources.memory is not None:
            _ = resources.memory.limit

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
