"""A runtime bundle: a directory with ``config.json`` and the root filesystem it names.

:meth:`Bundle.load` reads and validates ``config.json`` (a :class:`~wasidispatch.oci.runtime.Spec`)
and locates the rootfs (``root.path``, relative to the bundle unless absolute).
:meth:`Bundle.resolve_entrypoint` finds ``process.args[0]`` the way the container will: inside
the rootfs, following symlinks as the container sees them, searching the spec's own ``PATH``
(never the host's) when the name has no ``/``.

Errors: everything here raises :class:`~wasidispatch.errors.SpecError` naming the bundle and
the field. Path resolution is :func:`wasidispatch.detect.resolve_in_root`; its
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
import posixpath
import stat
from collections.abc import Mapping
from pathlib import Path

from wasidispatch.errors import DetectionError, SpecError
from wasidispatch.oci.runtime import DEFAULT_PATH, Spec

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
        ``root.path``, or the rootfs is not a directory.
        """
        bundle = Path(path).absolute()
        config = bundle / "config.json"
        if not bundle.is_dir():
            raise SpecError(f"{bundle}: not a bundle directory")
        spec = Spec.load(config)
        if spec.root is None:
            raise SpecError(f"{config}: root.path: required to run a container")
        rootfs = Path(spec.root.path)
        if not rootfs.is_absolute():
            rootfs = bundle / rootfs
        if not rootfs.is_dir():
            raise SpecError(f"{config}: root.path: {rootfs} is not a directory")
        return cls(bundle, spec, rootfs)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        """``config.json`` of this bundle."""
        return self.path / "config.json"

    def search_path(self) -> list[str]:
        """The spec's ``PATH`` entries (runc's default PATH when the env has none)."""
        process = self.spec.process
        env = process.env_dict() if process is not None else {}
        return env.get("PATH", DEFAULT_PATH).split(":")

    def resolve_path(self, path: str) -> Path:
        """``path`` (absolute, or relative to ``process.cwd``) as a host path inside the rootfs.

        Raises :class:`SpecError` (chaining the :class:`DetectionError`) when it escapes the
        rootfs, loops, or does not exist.
        """
        cwd = self.spec.process.cwd if self.spec.process is not None else "/"
        try:
            return _resolve(self.rootfs, posixpath.join(cwd, path))
        except DetectionError as exc:
            raise SpecError(f"{self.config_path}: {exc}") from exc

    def resolve_entrypoint(self, name: str | None = None) -> Path:
        """The host path of the file ``process.args[0]`` (or ``name``) names inside the rootfs.

        A name with a ``/`` is taken as a path (relative to ``process.cwd``) and must be a
        regular file. A bare name is searched in the spec's ``PATH`` (runc's default when
        unset); only executable regular files match, as ``execvp`` would. Symlinks are
        followed inside the rootfs; one that would leave it raises :class:`SpecError`.
        """
        process = self.spec.process
        if name is None:
            if process is None or not process.args:
                raise SpecError(f"{self.config_path}: process.args: nothing to run")
            name = process.args[0]
        if not name:
            raise SpecError(f"{self.config_path}: process.args.0: empty")
        if "/" in name:
            found = self.resolve_path(name)
            if not stat.S_ISREG(os.stat(found).st_mode):
                raise SpecError(f"{self.config_path}: process.args.0: {name} is not a file")
            return found
        for entry in self.search_path():
            directory = entry or "."  # an empty PATH entry means the working directory
            try:
                host_dir = self.resolve_path(directory)
            except SpecError:
                continue  # a PATH directory the rootfs lacks is skipped, as execvp does
            if not os.path.lexists(host_dir / name):
                continue
            # The name exists here: this is what the container would run, so an escaping or
            # looping symlink is an error, not a reason to try the next PATH entry.
            candidate = self.resolve_path(posixpath.join(directory, name))
            st = os.stat(candidate)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                return candidate
        raise SpecError(
            f"{self.config_path}: process.args.0: {name!r} is not an executable file in "
            f"PATH={':'.join(self.search_path())} inside {self.rootfs}"
        )


def _resolve(root: Path, path: str) -> Path:
    from wasidispatch.detect import resolve_in_root

    return resolve_in_root(root, path)
