"""config.json read with the stdlib, for the runtime's ``create`` of a Wasm container.

Every ``wasidispatch-runc create`` is a fresh interpreter, and importing the pydantic OCI
models costs more than everything else ``create`` does (about 120 ms of a 250 ms ``create``
here). So ``create`` reads config.json into `LeanBundle`: the same attribute view as
`wasidispatch.oci.bundle.Bundle` (``path``, ``rootfs``, ``spec.process.args``,
``spec.linux.cgroups_path``..., ``resolve_entrypoint``), read lazily from the JSON, enough for
`wasidispatch.executor.decide` and for `lean_workload`, which maps it to the same `Workload`
as `wasidispatch.executor.WasmExecutor.workload` does (``tests/test_runc_cli.py`` checks both
agree on bundles exercising every mapped field). The models still validate the bundle when
a full check is wanted (``wasidispatch inspect``); runc does not validate more than this
either.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from wasidispatch.detect import resolve_in_root
from wasidispatch.engines._api import Limits, Preopen, Workload
from wasidispatch.errors import CantHandle, DetectionError, SpecError

__all__ = ["DEFAULT_PATH", "LeanBundle", "Node", "lean_workload"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Fields whose JSON objects are maps of arbitrary keys, kept as dicts.
_MAPS = frozenset({"annotations", "sysctl", "unified", "net_devices", "rdma"})
_SPECIAL = {"block_io": "blockIO"}


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

    __slots__ = ("_doc",)

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self._doc = doc

    def __getattr__(self, name: str) -> Any:
        value = self._doc.get(_camel(name))
        if name in _MAPS:
            return dict(value) if isinstance(value, dict) else None
        return _wrap(value)

    def env_dict(self) -> dict[str, str]:
        """``process.env`` as a mapping (the last of a repeated name wins, as ``getenv``)."""
        out: dict[str, str] = {}
        for entry in self._doc.get("env") or ():
            key, sep, value = str(entry).partition("=")
            if not sep or not key:
                raise SpecError(f"process.env entry {entry!r} is not KEY=value")
            out[key] = value
        return out


class LeanBundle:
    """A runtime bundle read with the stdlib: ``path``, ``spec`` (a `Node`), ``rootfs``,
    ``annotations``; resolution as `wasidispatch.oci.bundle.Bundle` does it."""

    __slots__ = ("annotations", "path", "rootfs", "spec")

    def __init__(self, path: Path, doc: Mapping[str, Any], rootfs: Path) -> None:
        self.path = path
        self.spec = Node(doc)
        self.rootfs = rootfs
        notes = doc.get("annotations")
        self.annotations: dict[str, str] = dict(notes) if isinstance(notes, dict) else {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LeanBundle:
        """Read ``path/config.json``; `SpecError` when it is unreadable or has no rootfs."""
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
        rootfs = Path(root["path"])
        if not rootfs.is_absolute():
            rootfs = bundle / rootfs
        if not rootfs.is_dir():
            raise SpecError(f"{config}: root.path: {rootfs} is not a directory")
        process = doc.get("process")
        if process is not None and not isinstance(process, dict):
            raise SpecError(f"{config}: process: not an object")
        return cls(bundle, doc, rootfs)

    def __repr__(self) -> str:
        return f"LeanBundle({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        """``config.json`` of this bundle."""
        return self.path / "config.json"

    def search_path(self) -> list[str]:
        """The spec's ``PATH`` entries (runc's default PATH when the env has none)."""
        process = self.spec.process
        env: dict[str, str] = process.env_dict() if process is not None else {}
        return env.get("PATH", DEFAULT_PATH).split(":")

    def resolve_path(self, path: str) -> Path:
        """``path`` (absolute, or relative to ``process.cwd``) as a host path in the rootfs."""
        process = self.spec.process
        cwd = (process.cwd if process is not None else None) or "/"
        try:
            return resolve_in_root(self.rootfs, posixpath.join(cwd, path))
        except DetectionError as exc:
            raise SpecError(f"{self.config_path}: {exc}") from exc

    def resolve_entrypoint(self, name: str | None = None) -> Path:
        """The host path of ``process.args[0]`` (or ``name``), as ``Bundle`` resolves it."""
        process = self.spec.process
        if name is None:
            if process is None or not process.args:
                raise SpecError(f"{self.config_path}: process.args: nothing to run")
            name = str(process.args[0])
        if not name:
            raise SpecError(f"{self.config_path}: process.args.0: empty")
        if "/" in name:
            found = self.resolve_path(name)
            if not stat.S_ISREG(os.stat(found).st_mode):
                raise SpecError(f"{self.config_path}: process.args.0: {name} is not a file")
            return found
        for entry in self.search_path():
            directory = entry or "."
            try:
                host_dir = self.resolve_path(directory)
            except SpecError:
                continue
            if not os.path.lexists(host_dir / name):
                continue
            candidate = self.resolve_path(posixpath.join(directory, name))
            st = os.stat(candidate)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                return candidate
        raise SpecError(
            f"{self.config_path}: process.args.0: {name!r} is not an executable file in "
            f"PATH={':'.join(self.search_path())} inside {self.rootfs}"
        )


def lean_workload(bundle: LeanBundle, entrypoint: Path | None = None) -> Workload:
    """The `Workload` `WasmExecutor.workload` makes for the same bundle (stdio inherited)."""
    from wasidispatch.executor import (
        ANNOTATION_TIMEOUT,
        _entry_path,
        _is_bind,
        parse_duration,
    )

    spec = bundle.spec
    process = spec.process
    if process is None or not process.args:
        raise CantHandle(f"{bundle.path}: config.json has no process.args to run")
    args = tuple(str(a) for a in process.args)
    path, func = _entry_path(args[0])
    wasm = entrypoint or bundle.resolve_entrypoint(path)

    root = spec.root
    preopens = [Preopen(bundle.rootfs, "/", readonly=bool(root is not None and root.readonly))]
    for mount in spec.mounts or ():
        options = tuple(mount.options or ())
        if not mount.source or not _is_bind(mount.type, options):
            continue
        source = Path(mount.source)
        if not source.is_absolute():
            source = bundle.path / source
        if not source.is_dir():
            continue
        preopens.append(Preopen(source, mount.destination, readonly="ro" in options))

    limits = Limits()
    linux = spec.linux
    resources = linux.resources if linux is not None else None
    memory = resources.memory if resources is not None else None
    limit = memory.limit if memory is not None else None
    if isinstance(limit, int) and limit > 0:
        limits = replace(limits, memory_bytes=limit)
    timeout = bundle.annotations.get(ANNOTATION_TIMEOUT)
    if timeout is not None:
        limits = replace(limits, timeout=parse_duration(timeout))
    return Workload(
        wasm=wasm,
        argv=args,
        env=process.env_dict(),
        preopens=tuple(preopens),
        cwd=process.cwd or "/",
        entry=func,
        limits=limits,
    )
