"""Files at shared or caller-chosen paths: written without following what was planted there,
read only when they are regular files of a bounded size.

Stdlib only (the runtime command's light paths import it). Every file the project writes at a
path someone else may also write to (pid files, state, logs, cache entries, layouts, bundles)
goes through :func:`write_atomic` or :func:`create_new`, so a symlink or a file planted at the
final or at the temporary name is never followed or truncated: the temporary file is created
with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a planted name makes it fail with "file exists"), and
the final name is replaced by ``rename(2)``, which replaces a symlink instead of following it.
Everything the project reads from a bundle, an image or a cache goes through
:func:`read_regular`: a symlink to ``/dev/zero``, a FIFO or a 10 GB file is refused with a
typed error instead of eating memory or blocking.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from wasidispatch.errors import SpecError, WasiDispatchError

__all__ = [
    "CONFIG_LIMIT",
    "append_fd",
    "create_new",
    "fsync_dir",
    "read_regular",
    "write_atomic",
]

#: The cap on a bundle's config.json (runc has none; real ones are a few KiB, 4 MiB is generous).
CONFIG_LIMIT = 4 << 20


def _token() -> str:
    """A fresh random part of a temporary name (``os.urandom``: importing ``secrets`` costs
    ~20 ms, which the runtime command's light paths cannot pay)."""
    return os.urandom(6).hex()


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """``fsync`` a directory, so a rename or a new entry in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_new(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Create ``path`` holding ``data``; `FileExistsError` when anything (a file, a symlink,
    even a dangling one) is already there. A half-written file is removed on failure.

    Example::

        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> create_new(os.path.join(d, "pid"), b"42")
        >>> create_new(os.path.join(d, "pid"), b"43")
        Traceback (most recent call last):
        ...
        FileExistsError: [Errno 17] File exists: '...pid'
    """
    fd = os.open(path, _CREATE, mode)
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o644,
    durable: bool = False,
    mtime_ns: int | None = None,
) -> None:
    """Replace ``path`` with a file holding ``data``, whole or not at all.

    The data goes to a fresh temporary name beside ``path`` (created exclusively, never
    following a symlink), then ``rename(2)`` puts it in place: a symlink planted at ``path`` is
    replaced, not followed, and nothing outside the directory is ever written. ``durable``
    fsyncs the file and the directory; ``mtime_ns`` sets the file's times before the rename.
    ``mode`` is applied exactly (not filtered by the umask). Raises `OSError`; the temporary
    file never outlives the call.

    Example::

        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> path = os.path.join(d, "state.json")
        >>> os.symlink("/etc/passwd", path)
        >>> write_atomic(path, b"{}")
        >>> os.path.islink(path), open(path).read()
        (False, '{}')
    """
    target = Path(path)
    directory = target.parent
    for _ in range(16):
        tmp = directory / f".{target.name}.{_token()}.tmp"
        try:
            fd = os.open(tmp, _CREATE, 0o600)
            break
        except FileExistsError:
            continue  # a planted or concurrent temporary name: pick another
    else:
        raise FileExistsError(f"no free temporary name beside {target}")
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def append_fd(path: str | os.PathLike[str], *, mode: int = 0o644) -> int:
    """An ``O_APPEND`` descriptor on ``path`` (a log), created when missing.

    A symlink at ``path`` is refused (`OSError` ``ELOOP``) and so is anything but a regular
    file or a FIFO (containerd hands FIFOs as logs): a planted name never redirects the writes.
    The caller closes the descriptor.
    """
    fd = os.open(
        path,
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        mode,
    )
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            raise OSError(f"{path}: not a regular file or FIFO")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(
    path: str | os.PathLike[str],
    *,
    limit: int,
    what: str = "file",
    error: type[WasiDispatchError] = SpecError,
    follow: bool = True,
) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    Opening never blocks (a FIFO is refused, not waited on), a device or directory is refused,
    and at most ``limit + 1`` bytes are ever read, also from a file that grows meanwhile. With
    ``follow=False`` a symlink at ``path`` itself is refused too. Every refusal is ``error``
    (default `SpecError`) with a message naming ``what`` and ``path``.

    Example::

        >>> read_regular("/dev/zero", limit=4096, what="config.json")
        Traceback (most recent call last):
        ...
        wasidispatch.errors.SpecError: config.json /dev/zero is not a regular file (character ...
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if not follow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise error(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise error(f"cannot open {what} {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is not a regular file ({_kind(st.st_mode)})")
        if st.st_size > limit:
            raise error(f"{what} {path} is {st.st_size} bytes, over the {limit}-byte limit")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise error(f"{what} {path} grew over the {limit}-byte limit while being read")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "special file"
