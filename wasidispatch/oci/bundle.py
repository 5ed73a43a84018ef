"""A runtime bundle: a directory with ``config.json`` and the root filesystem it names.

:meth:`Bundle.load` reads and validates ``config.json`` (a :class:`~wasidispatch.oci.runtime.Spec`)
and locates the rootfs (``root.path``, relative to the bundle unless absolute).
:meth:`Bundle.resolve_entrypoint` finds ``process.args[0]`` the way the container will: inside
the rootfs, following symlinks as the container sees them, searching the spec's own ``PATH``
(never the host's) when the name has no ``/``.

Errors: everything here raises :class:`~wasidispatch.errors.SpecError` naming the bundle and
the field. Path resolution is :mod:`wasidispatch._resolve` over
:func:`wasidispatch.detect.resolve_in_root`; its
:class:`~wasidispatch.errors.DetectionError` (a path escaping the rootfs, a symlink loop, a
missing component) is translated into ``SpecError`` and chained, because for a bundle it means
the bundle is unusable as written.

Example::

    >>> import json, os, tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     root = pathlib.Path(tmp, "rootfs", "usr", "bin")
    ...     root.mkdir(parents=True)
    ...     _ = (root / "app").write_bytes(b"\\0asm\\1\\0\\0\\0")
    ...     os.chmod(root / "app", 0o755)
    ...     _ = pathlib.Path(tmp, "config.json").write_text(json.dumps({
    ...         "ociVersion": "1.3.0", "root": {"path": "rootfs"},
    ...         "process": {"cwd": "/", "args": ["app"], "env": ["PATH=/usr/bin"]}}))
    ...     bundle = Bundle.load(tmp)
    ...     str(bundle.resolve_entrypoint().relative_to(bundle.rootfs))
    'usr/bin/app'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from wasidispatch import _fs, _resolve
from wasidispatch._resolve import DEFAULT_PATH
from wasidispatch.errors import SpecError
from wasidispatch.oci.runtime import Spec

__all__ = ["Bundle"]


class Bundle:
    """A loaded runtime bundle: ``path``, ``spec``, ``rootfs`` and ``annotations``."""

    __slots__ = ("annotations", "path", "rootfs", "spec")

    def __init__(self, path: Path, spec: Spec, rootfs: Path) -> None:
        self.path = path
        self.spec = spec
        self.rootfs = rootfs
        self.annotations: Mapping[str, str] = spec.annotations or {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Bundle:
        """Read ``path/config.json`` and locate the rootfs.

        Raises :class:`SpecError` when ``config.json`` is missing or invalid, has no
        ``root.path``, or the rootfs is not a directory. ``config.json`` is read only when it
        is a regular file of at most :data:`wasidispatch._fs.CONFIG_LIMIT` bytes (4 MiB): a
        symlink to ``/dev/zero``, a FIFO or a huge file is refused without reading it.
        """
        bundle = Path(path).absolute()
        config = bundle / "config.json"
        if not bundle.is_dir():
            raise SpecError(f"{bundle}: not a bundle directory")
        try:
            data = _fs.read_regular(config, limit=_fs.CONFIG_LIMIT, what="config.json")
        except SpecError as exc:  # every bundle error starts with the file it is about
            raise SpecError(f"{config}: cannot read: {exc}") from exc
        spec = Spec.parse(data, source=str(config))
        if spec.root is None:
            raise SpecError(f"{config}: root.path: required to run a container")
        return cls(bundle, spec, _resolve.rootfs_path(config, spec.root.path))

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        """``config.json`` of this bundle."""
        return self.path / "config.json"

    def _process_view(self) -> tuple[str, str | None]:
        """``process.cwd`` and the ``PATH`` of ``process.env`` (``None`` when unset)."""
        process = self.spec.process
        if process is None:
            return "/", None
        return process.cwd, process.env_dict().get("PATH")

    def search_path(self) -> list[str]:
        """The spec's ``PATH`` entries (runc's default PATH when the env has none)."""
        path = self._process_view()[1]
        return (DEFAULT_PATH if path is None else path).split(":")

    def resolve_path(self, path: str) -> Path:
        """``path`` (absolute, or relative to ``process.cwd``) as a host path inside the rootfs.

        Raises :class:`SpecError` (chaining the :class:`DetectionError`) when it escapes the
        rootfs, loops, or does not exist.
        """
        return _resolve.resolve_path(self.config_path, self.rootfs, self._process_view()[0], path)

    def resolve_entrypoint(self, name: str | None = None) -> Path:
        """The host path of the file ``process.args[0]`` (or ``name``) names inside the rootfs.

        A name with a ``/`` is taken as a path (relative to ``process.cwd``) and must be a
        regular file. A bare name is searched in the spec's ``PATH`` (runc's default when
        unset); executable regular files match, as ``execvp`` would, and when none does, a
        Wasm file of that name (no execute bit needed) in ``PATH`` then ``cwd``. Symlinks are
        followed inside the rootfs; one that would leave it raises :class:`SpecError`.
        (:mod:`wasidispatch._resolve`, shared with ``wasidispatch-runc``'s ``LeanBundle``.)
        """
        if name is None:
            process = self.spec.process
            name = _resolve.entrypoint_name(
                self.config_path, process.args if process is not None else None
            )
        cwd, path = self._process_view()
        return _resolve.resolve_entrypoint(self.config_path, self.rootfs, name, cwd=cwd, path=path)
