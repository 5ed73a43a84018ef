"""Where a bundle's entrypoint is: ``process.args[0]`` resolved inside the rootfs, stdlib only.

One implementation for both views of a bundle: :class:`wasidispatch.oci.bundle.Bundle` (the
pydantic models) and :class:`wasidispatch.runc.spec.LeanBundle` (config.json read with the
stdlib for ``wasidispatch-runc create``), and for ``wasidispatch-runc``'s check that hands a
plainly Linux bundle to runc. They pass the fields of ``process`` they read (``args``,
``cwd``, the ``PATH`` of ``env``) to the functions here. Outside ``wasidispatch.oci`` so that
the runtime's Linux path does not import that package (its ``__init__`` imports ``typing``).

Rules, as the container will see it: a name with a ``/`` is a path (relative to
``process.cwd``) that must name a regular file; a bare name is searched in the spec's own
``PATH`` (runc's default when it has none; never the host's), where only executable regular
files match, as ``execvp`` would — except that a Wasm file needs no execute bit: when no
executable matches, a regular file of that name whose bytes are Wasm is taken from ``PATH``,
then from ``cwd`` (runwasi's order); symlinks are followed inside the rootfs
(:func:`wasidispatch.detect.resolve_in_root`). Every failure is a
:class:`~wasidispatch.errors.SpecError` naming ``config.json`` (a
:class:`~wasidispatch.errors.DetectionError` from the walk is chained).

Example::

    >>> import os, pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     rootfs = pathlib.Path(tmp)
    ...     (rootfs / "bin").mkdir()
    ...     _ = (rootfs / "bin" / "app").write_bytes(b"\\0asm\\1\\0\\0\\0")
    ...     os.chmod(rootfs / "bin" / "app", 0o755)
    ...     found = resolve_entrypoint(
    ...         rootfs / "config.json", rootfs, "app", cwd="/", path="/sbin:/bin"
    ...     )
    ...     str(found.relative_to(rootfs.resolve()))
    'bin/app'
"""

from __future__ import annotations

import os
import posixpath
import stat

from wasidispatch.detect import resolve_in_root, sniff_path
from wasidispatch.errors import DetectionError, SpecError

# Not `from typing import ...`: mypy reads a module-level TYPE_CHECKING = False as usual.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

__all__ = ["DEFAULT_PATH", "entrypoint_name", "resolve_entrypoint", "resolve_path", "rootfs_path"]

#: runc's ``PATH`` for a process whose env sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def rootfs_path(config: Path, root_path: str) -> Path:
    """The rootfs directory ``root.path`` names (relative to the bundle, which holds
    ``config``, unless absolute); `SpecError` when it is not a directory."""
    rootfs = config.parent / root_path  # an absolute root_path replaces the bundle part
    if not rootfs.is_dir():
        raise SpecError(f"{config}: root.path: {rootfs} is not a directory")
    return rootfs


def entrypoint_name(config: Path, args: Sequence[str] | None) -> str:
    """``args[0]``; `SpecError` when there is nothing to run."""
    if not args:
        raise SpecError(f"{config}: process.args: nothing to run")
    return args[0]


def resolve_path(config: Path, rootfs: Path, cwd: str, path: str) -> Path:
    """``path`` (absolute, or relative to ``cwd``) as a host path inside ``rootfs``.

    Raises `SpecError` (chaining the `DetectionError`) when it escapes the rootfs, loops, or
    does not exist.
    """
    try:
        return resolve_in_root(rootfs, posixpath.join(cwd or "/", path))
    except DetectionError as exc:
        raise SpecError(f"{config}: {exc}") from exc


def resolve_entrypoint(
    config: Path, rootfs: Path, name: str, *, cwd: str, path: str | None
) -> Path:
    """The host path of the file ``name`` names inside ``rootfs`` (see the module docstring).

    ``path`` is the ``PATH`` of ``process.env`` (``None``: runc's `DEFAULT_PATH`).
    """
    if not name:
        raise SpecError(f"{config}: process.args.0: empty")
    if "/" in name:
        found = resolve_path(config, rootfs, cwd, name)
        if not stat.S_ISREG(os.stat(found).st_mode):
            raise SpecError(f"{config}: process.args.0: {name} is not a file")
        return found
    search = DEFAULT_PATH if path is None else path
    for entry in search.split(":"):
        directory = entry or "."  # an empty PATH entry means the working directory
        try:
            host_dir = resolve_path(config, rootfs, cwd, directory)
        except SpecError:
            continue  # a PATH directory the rootfs lacks is skipped, as execvp does
        if not os.path.lexists(host_dir / name):
            continue
        # The name exists here: this is what the container would run, so an escaping or
        # looping symlink is an error, not a reason to try the next PATH entry.
        candidate = resolve_path(config, rootfs, cwd, posixpath.join(directory, name))
        st = os.stat(candidate)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return candidate
    wasm = _wasm_without_exec_bit(config, rootfs, cwd, name, search)
    if wasm is not None:
        return wasm
    raise SpecError(
        f"{config}: process.args.0: {name!r} is not an executable file in "
        f"PATH={search} inside {rootfs}"
    )


def _wasm_without_exec_bit(
    config: Path, rootfs: Path, cwd: str, name: str, search: str
) -> Path | None:
    """A Wasm file needs no execute bit: when no executable matched, take the first regular
    file named ``name`` in ``PATH``, then in ``cwd``, whose bytes are Wasm (runwasi resolves
    Wasm entrypoints in ``PATH`` then ``cwd`` without looking at the execute bit). Anything
    else stays unresolved: Linux would not run it either."""
    for directory in [*(entry or "." for entry in search.split(":")), cwd or "/"]:
        try:
            candidate = resolve_path(config, rootfs, cwd, posixpath.join(directory, name))
            if stat.S_ISREG(os.stat(candidate).st_mode) and sniff_path(candidate).is_wasm:
                return candidate
        except (SpecError, DetectionError, OSError):
            continue
    return None
