"""Classify an OCI image as Wasm or Linux before it runs, reading as little of it as needed.

:func:`classify` takes a registry reference (``127.0.0.1:5000/app:1``, ``...@sha256:...``) or a
local image layout (``DIR`` or ``DIR:TAG``) and answers an :class:`ImageDecision`: ``wasm``,
``linux`` or ``unknown``, with the evidence. The first rule that speaks decides:

1. artifact media types: a CNCF Wasm artifact (config ``application/vnd.wasm.config.v0+json``,
   or its legacy v1) or any ``application/wasm`` layer;
2. the platform: a ``wasi*`` OS or a ``wasm`` architecture, in the config or in the index entry
   picked for this node;
3. crun's annotations ``module.wasm.image/variant: compat`` / ``run.oci.handler: wasm`` (the
   manifest's annotations or the config's labels);
4. the entrypoint's first bytes: ``Entrypoint`` + ``Cmd`` resolved as the container would see
   its root filesystem (``PATH`` from the config's ``Env``, runc's default when it has none;
   upper layers first, ``.wh.`` whiteouts and ``.wh..wh..opq`` opaque directories, symlinks
   followed inside the image with ``..`` clamped at its root as the kernel does, hard links),
   then :func:`wasidispatch.detect.sniff` on its first 256 bytes. ELF gives the architecture.
   An image whose config names another OS (``windows``) is ``unknown`` without this step.

Layers are streamed top layer first and only as far as the answer needs: once the entrypoint's
first bytes are known the stream is closed (an HTTP response mid-body, a file mid-way). Deciding
that a name is *absent* from a directory needs every layer to be read through (a lower layer
could hold it), so a bare command searched along a ``PATH`` that does not find it in its first
directory reads more than an absolute entrypoint. A layer listing one path twice is decided by
the copy met first when the answer comes before the second. Layer bytes read this way are not
verified against their digests (a layer is verified only when read to its end); manifests,
indexes and configs always are. Gzip and uncompressed layers are read (compression is
detected from the bytes, as containerd does); zstd needs the ``zstandard`` module, otherwise a
:class:`~wasidispatch.errors.SpecError` says so.

Multi-platform indexes: the ``platform`` asked for (``OS/ARCH[/VARIANT]``; any ``wasi*`` OS
matches any other), else what a node of this machine runs
(:func:`~wasidispatch.oci.layout.node_platform`), else a ``wasi`` entry, which is Wasm.

Results are cached in-process (an LRU of :data:`CACHE_SIZE` decisions) by manifest digest,
scoped to the registry repository or the layout directory the image came from (layer bytes are
read unverified, so one source's answer is never reused for another's). A reference by digest
or a layout is answered from the cache without a network request; a reference by tag still
costs one ``GET`` of its manifest (the digest is that of the bytes received), a few ms on a
loopback registry against tens of us. On a miss the top layer's request is started while the
config is fetched. :attr:`ImageDecision.bytes_read` counts the bytes read for one answer (0
when it came from the cache).

Bounds: one deadline for everything (``timeout``, seconds), manifests and configs of at most
:data:`~wasidispatch.oci.layout.MAX_MANIFEST_SIZE`, indexes nested at most
:data:`~wasidispatch.oci.registry.MAX_INDEX_DEPTH` deep, at most
:data:`~wasidispatch.oci.layout.MAX_LAYER_SCAN` decompressed bytes and :data:`MAX_ENTRIES` tar
headers scanned, 40 symlinks per path. Failures are typed:
:class:`~wasidispatch.errors.RegistryError` for the network, the registry and authentication
(and a passed deadline on a registry),
:class:`~wasidispatch.errors.SpecError` for an invalid or hostile image (a layer that is not a
tar, a symlink loop, an entrypoint that is not in the image, content over a cap).

Example::

    >>> import tempfile, wasmtime
    >>> from wasidispatch.oci.layout import ImageLayout, pack_image
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     layout = ImageLayout.create(tmp)
    ...     _ = pack_image(layout, wasmtime.wat2wasm("(module)"), "v1", variant=None)
    ...     decision = classify(f"{tmp}:v1")
    >>> decision.kind, decision.entrypoint
    ('wasm', '/app.wasm')
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import importlib
import io
import json
import os
import posixpath
import tarfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from wasidispatch.detect import MAX_SYMLINK_HOPS, SCRIPT_LINE_MAX, Detected, sniff
from wasidispatch.errors import RegistryError, SpecError

if TYPE_CHECKING:
    from wasidispatch.oci.image import Descriptor, ImageConfig, Index, Manifest
    from wasidispatch.oci.layout import ImageLayout
    from wasidispatch.oci.registry import _Client

__all__ = ["CACHE_SIZE", "MAX_ENTRIES", "Classifier", "ImageDecision", "classify"]

Kind = Literal["wasm", "linux", "unknown"]

CACHE_SIZE = 1024
"""Decisions the in-process cache keeps (least recently used dropped first)."""

MAX_ENTRIES = 1 << 20
"""At most this many tar headers are indexed over all the layers of one image (with at most
128 MiB of names): what one decision may hold in memory is bounded."""

_HEAD = SCRIPT_LINE_MAX  # an ELF header, a Wasm preamble, a #! line (the kernel reads 256)
_HEADS_MAX = 16 << 20  # first bytes kept for files that may turn out to be the entrypoint
_BUFFER = 1 << 16  # read size: small enough that an early stop reads little past the answer
_MAX_RESCANS = 64
_PATH_MAX = 4096  # Linux's: a longer name is no path the container could run
_NAMES_MAX = 128 << 20  # member names and link targets kept in the index, over all layers
_ENTRY_COST = 64  # what one indexed entry costs beside its names (for the bound above)

_WASM_CONFIG_TYPES = (
    "application/vnd.wasm.config.v0+json",
    "application/vnd.wasm.config.v1+json",
)
_IMAGE_CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True)
class ImageDecision:
    """What an image would run as, and why.

    ``kind``: ``wasm``, ``linux`` or ``unknown``. ``evidence``: what was looked at, in order,
    the deciding fact last. ``architecture``: for ``linux``, the entrypoint's ELF machine (the
    config's architecture for a script). ``digest``: the image manifest decided on (the index's
    when no entry fits the platform). ``reference``: as given. ``entrypoint``: the file the
    decision read, as a path inside the image (``Entrypoint[0]``/``Cmd[0]`` as written when a
    rule before the bytes decided; ``None`` for an artifact). ``platform``: the image's
    ``OS/ARCH[/VARIANT]``. ``bytes_read`` and ``cached`` describe this answer, not the image,
    and take no part in equality.
    """

    kind: Kind
    evidence: tuple[str, ...]
    architecture: str | None
    digest: str
    reference: str
    entrypoint: str | None
    platform: str | None = None
    bytes_read: int = field(default=0, compare=False)
    cached: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {
            "kind": self.kind,
            "evidence": list(self.evidence),
            "architecture": self.architecture,
            "digest": self.digest,
            "reference": self.reference,
            "entrypoint": self.entrypoint,
            "platform": self.platform,
            "bytes_read": self.bytes_read,
            "cached": self.cached,
        }


# --- the root filesystem as the container sees it ------------------------------------------


class _Entry(NamedTuple):
    kind: Literal["file", "dir", "symlink", "hardlink", "other"]
    mode: int
    link: str  # a symlink's target, a hard link's path in the layer; "" otherwise


_IMPLICIT_DIR = _Entry("dir", 0o755, "")  # a parent directory a layer holds entries under


class _Layer:
    """What is known of one layer: its entries, whiteouts and opaque directories so far."""

    __slots__ = (
        "complete",
        "descriptor",
        "entries",
        "heads",
        "number",
        "opaque",
        "seen",
        "whiteouts",
    )

    def __init__(self, descriptor: Descriptor, number: int) -> None:
        self.descriptor = descriptor
        self.number = number  # 1-based, bottom layer first (as the manifest lists them)
        self.entries: dict[str, _Entry] = {}
        self.whiteouts: set[str] = set()
        self.opaque: set[str] = set()
        self.heads: dict[str, bytes] = {}
        self.seen = 0  # members indexed (a second pass only looks for first bytes)
        self.complete = False


class _NeedMore(Exception):  # control flow, never escapes this module
    """A lookup of ``path`` needs more of a layer than has been read."""

    def __init__(self, path: str) -> None:
        self.path = path


class _NeedHead(Exception):
    """The first bytes of ``path`` in ``layer`` were not kept: read that layer again."""

    def __init__(self, layer: _Layer, path: str) -> None:
        self.layer = layer
        self.path = path


class _Loc(NamedTuple):
    path: str  # inside the image, no leading "/" ("" is the root)
    entry: _Entry
    layer: _Layer | None  # None for the root directory


class _Found(NamedTuple):
    loc: _Loc
    head: bytes
    how: str  # how the name was found, for the evidence


def _norm(name: str) -> str:
    """A tar member name or a path as a path inside the image: ``..`` clamped at the root."""
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/".join(parts)


def _ancestors(path: str) -> list[str]:
    """``a``, ``a/b`` for ``a/b/c`` (not the root, not the path itself)."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _related(blocked: str, path: str) -> bool:
    """Whether an entry at ``path`` can change the lookup of ``blocked``."""
    return (
        path == blocked
        or not path
        or blocked.startswith(path + "/")
        or path.startswith(blocked + "/")
    )


class _Stream(io.RawIOBase):
    """Counts what is read through it against the scan budget and the deadline."""

    def __init__(self, inner: Any, rootfs: _Rootfs, name: str, seekable: bool = False) -> None:
        super().__init__()
        self._inner = inner
        self._rootfs = rootfs
        self._name = name
        self._seekable = seekable

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._inner.seek(offset, whence))

    def tell(self) -> int:
        return int(self._inner.tell())

    def readinto(self, buffer: Any) -> int:
        n = int(self._inner.readinto(buffer) or 0)
        self._rootfs.charge(n, self._name)
        return n


class _Rootfs:
    """The merged view of an image's layers, filled in by streaming them top layer first."""

    def __init__(
        self,
        source: _Source,
        layers: list[Descriptor],
        *,
        max_scan: int,
        max_entries: int,
    ) -> None:
        self.source = source
        # Top layer first: that is the order lookups consult them and streams read them.
        self.layers = [_Layer(d, i + 1) for i, d in reversed(list(enumerate(layers)))]
        self.scan_left = max_scan
        self.max_scan = max_scan
        self.entries_left = max_entries
        self.max_entries = max_entries
        self.names_left = _NAMES_MAX
        self.heads_left = _HEADS_MAX
        self.layers_read: set[int] = set()

    def charge(self, n: int, name: str) -> None:
        self.scan_left -= n
        if self.scan_left < 0:
            raise SpecError(
                f"{name}: over {self.max_scan} decompressed bytes scanned for the entrypoint "
                "(MAX_LAYER_SCAN)"
            )
        self.source.check_deadline()

    # --- lookups over what is known ---------------------------------------------------

    def lookup(self, path: str, below: _Layer | None = None) -> _Loc | None:
        """The entry at ``path`` (no symlink followed), from the top layer down (or from the
        layer ``below`` names, for a hard link's target); ``None`` when absent. Raises
        :class:`_NeedMore` when a layer not yet read through would have to answer."""
        if not path:
            return _Loc("", _IMPLICIT_DIR, None)
        ancestors = _ancestors(path)
        parent_dirs = ["", *ancestors]
        start = 0 if below is None else self.layers.index(below)
        for layer in self.layers[start:]:
            entry = layer.entries.get(path)
            if entry is not None:
                return _Loc(path, entry, layer)
            if not layer.complete:
                raise _NeedMore(path)  # what follows in this layer may still hold it
            # Absent from this layer: do the layers below show through?
            if path in layer.whiteouts or any(a in layer.whiteouts for a in ancestors):
                return None
            if any(d in layer.opaque for d in parent_dirs):
                return None
            for a in ancestors:
                above = layer.entries.get(a)
                if above is not None and above.kind != "dir":
                    return None  # a file over a directory hides what is under it
        return None

    def resolve(self, path: str, shown: str) -> _Loc | None:
        """``path`` with every symlink followed inside the image (``..`` clamped at the root);
        ``None`` when a component is missing or not a directory. :class:`SpecError` for a
        symlink loop."""
        pending = [p for p in reversed(path.split("/")) if p and p != "."]
        resolved: list[str] = []
        hops = 0
        loc: _Loc | None = None  # the entry at ``resolved``; None: look it up at the end
        while pending:
            part = pending.pop()
            if part == "..":
                if resolved:
                    resolved.pop()
                loc = None
                continue
            found = self.lookup("/".join([*resolved, part]))
            if found is None:
                return None
            if found.entry.kind == "symlink":
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise SpecError(
                        f"{shown}: too many levels of symbolic links (a loop at /{found.path})"
                    )
                target = found.entry.link
                if target.startswith("/"):
                    resolved.clear()
                pending.extend(p for p in reversed(target.split("/")) if p and p != ".")
                loc = None
                continue
            if pending and found.entry.kind != "dir":
                return None
            resolved.append(part)
            loc = found
        return loc if loc is not None else self.lookup("/".join(resolved))

    def regular(self, loc: _Loc) -> _Loc | None:
        """The regular file ``loc`` is (a hard link followed to its target), or ``None``."""
        for _ in range(8):
            if loc.entry.kind == "file":
                return loc
            if loc.entry.kind != "hardlink" or loc.layer is None:
                return None
            target = self.lookup(_norm(loc.entry.link), below=loc.layer)
            if target is None:
                return None
            loc = target
        return None

    def head(self, loc: _Loc) -> bytes:
        """The first bytes of the regular file ``loc`` (:class:`_NeedHead` if not kept)."""
        assert loc.layer is not None
        data = loc.layer.heads.get(loc.path)
        if data is None:
            raise _NeedHead(loc.layer, loc.path)
        return data

    # --- the search execvp would make ------------------------------------------------------

    def search(self, name: str, path_env: str, cwd: str) -> _Found:
        """What ``execvp(name)`` runs with ``PATH=path_env`` from ``cwd`` (see the module
        docstring); raises :class:`SpecError` when nothing runnable is found."""
        if "/" in name:
            shown = name
            loc = self.resolve(posixpath.join(cwd, name), shown)
            if loc is None:
                raise SpecError(f"entrypoint {name!r} is not in the image")
            file = self.regular(loc)
            if file is None:
                what = {"dir": "a directory", "symlink": "a symlink"}.get(
                    loc.entry.kind, "a device, FIFO or socket"
                )
                raise SpecError(f"entrypoint {name!r} is {what}, not a file")
            return _Found(file, self.head(file), f"{name!r}")
        directories = [entry or "." for entry in path_env.split(":")]
        for directory in directories:
            where = self.resolve(posixpath.join(cwd, directory), name)
            if where is None or where.entry.kind != "dir":
                continue
            if self.lookup(posixpath.join(where.path, name).lstrip("/")) is None:
                continue
            loc = self.resolve(posixpath.join(where.path, name), name)
            file = self.regular(loc) if loc is not None else None
            if file is not None and file.entry.mode & 0o111:
                return _Found(file, self.head(file), f"{name!r} in PATH={path_env}")
        # A Wasm file needs no execute bit (runwasi's order: PATH, then the working directory).
        for directory in [*directories, cwd]:
            loc = self.resolve(posixpath.join(cwd, directory, name), name)
            file = self.regular(loc) if loc is not None else None
            if file is not None:
                head = self.head(file)
                if sniff(head).is_wasm:
                    return _Found(file, head, f"{name!r} (a Wasm file without execute bit)")
        raise SpecError(
            f"entrypoint {name!r} is not an executable file in PATH={path_env} inside the image"
        )

    # --- streaming the layers -------------------------------------------------------------

    def find(self, name: str, path_env: str, cwd: str) -> _Found:
        """:meth:`search`, reading layers (top first) only until it can answer."""
        goal = (name, path_env, cwd)
        for _ in range(len(self.layers) + _MAX_RESCANS):
            try:
                return self.search(*goal)
            except _NeedMore as more:
                layer = next(layer for layer in self.layers if not layer.complete)
                found = self._scan(layer, goal, more.path, None)
            except _NeedHead as need:
                found = self._scan(need.layer, goal, need.path, need.path)
                if need.path not in need.layer.heads and found is None:
                    raise SpecError(
                        f"layer {need.layer.number} ({need.layer.descriptor.digest}) changed "
                        f"while read: /{need.path} is gone"
                    ) from None
            if found is not None:
                return found
        raise SpecError(f"entrypoint {name!r}: too many passes over the layers")

    def _scan(
        self, layer: _Layer, goal: tuple[str, str, str], blocked: str, want: str | None
    ) -> _Found | None:
        """Stream ``layer`` from its start, indexing what was not yet, keeping the first bytes
        of ``want`` and of files that may be the entrypoint. Stops as soon as :meth:`search`
        answers (returned); ``None`` when read to its end, or stopped early because the
        answer needs the first bytes of a file already passed (the caller reads again)."""
        self.layers_read.add(layer.number)
        name = f"layer {layer.number} ({layer.descriptor.digest})"
        with self.source.layer(layer.descriptor) as raw, _tar_reader(raw, self, name) as tar:
            try:
                position = 0
                while (member := tar.next()) is not None:
                    tar.members.clear()  # type: ignore[attr-defined]  # keep no header list
                    position += 1
                    if position > layer.seen:
                        layer.seen = position
                        touched = self._index(layer, member, name)
                    elif member.isreg() and _norm(member.name) == want:
                        touched = want  # indexed already: only its first bytes are wanted
                    else:
                        continue
                    if touched is None:
                        continue
                    if (
                        member.isreg()
                        and touched not in layer.heads
                        and (touched in (blocked, want) or self._worth_keeping(member, touched))
                    ):
                        self._keep_head(layer, touched, tar, member)
                    if touched != want and not _related(blocked, touched):
                        continue
                    for _ in range(2):
                        try:
                            return self.search(*goal)
                        except _NeedMore as more:
                            blocked = more.path
                            break
                        except _NeedHead as need:
                            if need.layer is layer and need.path == touched and member.isreg():
                                self._keep_head(layer, touched, tar, member)
                                continue
                            return None  # a file already passed: read again from the start
            except tarfile.TarError as exc:
                self.source.check_deadline(exc)
                raise SpecError(f"{name}: not a tar layer: {exc}") from exc
            except (EOFError, OSError, zlib.error) as exc:
                self.source.check_deadline(exc)
                raise SpecError(f"{name}: bad compressed data: {exc}") from exc
            except RecursionError as exc:
                raise SpecError(f"{name}: bad tar: headers nested too deeply") from exc
        layer.complete = True
        return None

    def _index(self, layer: _Layer, member: tarfile.TarInfo, name: str) -> str | None:
        """Record ``member`` in ``layer``; returns the path it speaks about (a whiteout's
        target, an opaque directory) or ``None`` for one that says nothing."""
        self.entries_left -= 1
        if self.entries_left < 0:
            raise SpecError(f"{name}: over {self.max_entries} tar headers (MAX_ENTRIES)")
        if len(member.name) > _PATH_MAX or len(member.linkname) > _PATH_MAX:
            raise SpecError(f"{name}: a tar member name or link over {_PATH_MAX} bytes")
        self.names_left -= len(member.name) + len(member.linkname) + _ENTRY_COST
        if self.names_left < 0:
            raise SpecError(f"{name}: over {_NAMES_MAX} bytes of tar member names indexed")
        path = _norm(member.name)
        base = posixpath.basename(path)
        parent = posixpath.dirname(path)
        if base.startswith(".wh."):
            if base == ".wh..wh..opq":
                layer.opaque.add(parent)
                self._parents(layer, parent)
                return parent
            if base.startswith(".wh..wh."):
                return None  # aufs metadata
            gone = posixpath.join(parent, base[4:])
            layer.whiteouts.add(gone)
            self._parents(layer, parent)
            return gone
        if not path:
            return None  # the root directory itself
        if member.issym():
            entry = _Entry("symlink", member.mode, member.linkname)
        elif member.islnk():
            entry = _Entry("hardlink", member.mode, member.linkname)
        elif member.isdir():
            entry = _Entry("dir", member.mode, "")
        elif member.isreg():
            entry = _Entry("file", member.mode, "")
            layer.heads.pop(path, None)  # a later copy replaces an earlier one
        else:
            entry = _Entry("other", member.mode, "")
        layer.entries[path] = entry
        self._parents(layer, parent)
        return path

    def _worth_keeping(self, member: tarfile.TarInfo, path: str) -> bool:
        """An executable or a ``.wasm`` file may turn out to be the entrypoint (a symlink
        met later names it): keep its first bytes while the budget for them lasts."""
        return self.heads_left > 0 and bool(member.mode & 0o111 or path.endswith(".wasm"))

    @staticmethod
    def _parents(layer: _Layer, parent: str) -> None:
        while parent and parent not in layer.entries:
            layer.entries[parent] = _IMPLICIT_DIR
            parent = posixpath.dirname(parent)

    def _keep_head(
        self, layer: _Layer, path: str, tar: tarfile.TarFile, member: tarfile.TarInfo
    ) -> None:
        extracted = tar.extractfile(member)
        data = extracted.read(_HEAD) if extracted is not None else b""
        layer.heads[path] = data
        self.heads_left -= len(path) + len(data)


@contextlib.contextmanager
def _tar_reader(
    buffered: io.BufferedReader, rootfs: _Rootfs, name: str
) -> Iterator[tarfile.TarFile]:
    """A tar reader over a layer's bytes, decompressed as their magic number says (as
    containerd does); an uncompressed local layer is read seekably (members skipped)."""
    from wasidispatch.oci.layout import _BoundedTarInfo

    source: Any = buffered
    seekable = False
    try:
        magic = buffered.peek(4)[:4]
        if magic[:2] == b"\x1f\x8b":
            source = gzip.GzipFile(fileobj=buffered, mode="rb")
        elif magic == b"\x28\xb5\x2f\xfd":
            try:
                zstandard: Any = importlib.import_module("zstandard")
            except ImportError:
                raise SpecError(
                    f"{name}: a zstd layer; reading it needs the zstandard module "
                    "(pip install zstandard)"
                ) from None
            source = zstandard.ZstdDecompressor().stream_reader(buffered, read_size=_BUFFER)
        else:
            seekable = buffered.seekable()
        stream: Any = _Stream(source, rootfs, name, seekable=seekable)
        # Closed in the finally below, whether the block reads the layer through or not.
        if seekable:
            tar = tarfile.open(fileobj=stream, mode="r:", tarinfo=_BoundedTarInfo)  # noqa: SIM115
        else:
            tar = tarfile.open(  # noqa: SIM115
                fileobj=stream, mode="r|", bufsize=_BUFFER, tarinfo=_BoundedTarInfo
            )
    except tarfile.TarError as exc:
        rootfs.source.check_deadline(exc)
        raise SpecError(f"{name}: not a tar layer: {exc}") from exc
    except (EOFError, OSError, zlib.error) as exc:
        rootfs.source.check_deadline(exc)
        raise SpecError(f"{name}: bad compressed data: {exc}") from exc
    try:
        yield tar
    finally:
        with contextlib.suppress(Exception):
            tar.close()
        if source is not buffered:
            with contextlib.suppress(Exception):
                source.close()


# --- where the image comes from ----------------------------------------------------------


class _Source(Protocol):
    """An image's documents and layers: a local layout or a registry repository."""

    scope: str  # the cache's scope: a layout directory, a registry repository
    bytes_read: int

    def digest(self) -> str | None:
        """The top manifest's digest when it is cheap to learn (for the cache)."""

    def top(self) -> tuple[str, bytes]:
        """The top manifest or index: its digest and verified bytes."""

    def document(self, descriptor: Descriptor, *, blob: bool) -> bytes:
        """A manifest or index (``blob`` false) or a config by descriptor: verified, capped."""

    def layer(self, descriptor: Descriptor) -> contextlib.AbstractContextManager[io.BufferedReader]:
        """A layer's bytes as a stream, closed (mid-way or not) when the block ends."""

    def prefetch(self, descriptor: Descriptor) -> None:
        """A hint: this layer is likely read next."""

    def check_deadline(self, cause: BaseException | None = None) -> None:
        """Raise the typed error of a passed deadline."""


class _LayoutSource:
    def __init__(self, path: str, tag: str | None, deadline_at: float | None) -> None:
        self.path = os.path.abspath(path)
        self.tag = tag
        self.scope = f"layout:{self.path}"
        self.deadline_at = deadline_at
        self.bytes_read = 0
        self._top: Descriptor | None = None

    @functools.cached_property
    def layout(self) -> ImageLayout:
        from wasidispatch.oci.layout import ImageLayout

        return ImageLayout(self.path)

    def _descriptor(self) -> Descriptor:
        if self._top is None:
            from wasidispatch.oci.layout import ImageLayout

            layout = ImageLayout.open(self.path)
            manifests = layout.index().manifests
            if self.tag is None:
                found = manifests
                if len(found) != 1:
                    raise SpecError(
                        f"{layout.path}: name a reference (DIR:TAG), the layout holds "
                        f"{len(found)} (refs: {', '.join(layout.refs()) or 'none'})"
                    )
            else:
                found = [d for d in manifests if d.ref_name == self.tag]
                if len(found) != 1:
                    refs = ", ".join(layout.refs()) or "none"
                    what = "no" if not found else "an ambiguous"
                    raise SpecError(f"{layout.path}: {what} reference {self.tag!r} (refs: {refs})")
            self._top = found[0]
        return self._top

    def digest(self) -> str | None:
        # index.json read once as plain JSON: enough to find a cached decision (its digest
        # names content already validated); a miss goes through the full, validating open.
        from wasidispatch import _fs
        from wasidispatch.oci.layout import MAX_MANIFEST_SIZE

        try:
            data = _fs.read_regular(
                os.path.join(self.path, "index.json"), limit=MAX_MANIFEST_SIZE, follow=False
            )
            manifests = json.loads(data)["manifests"]
            found = [
                d["digest"]
                for d in manifests
                if self.tag is None
                or (d.get("annotations") or {}).get("org.opencontainers.image.ref.name") == self.tag
            ]
        except (SpecError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None
        if len(found) == 1 and isinstance(found[0], str):
            return found[0]
        return None

    def top(self) -> tuple[str, bytes]:
        descriptor = self._descriptor()
        return str(descriptor.digest), self.document(descriptor, blob=False)

    def document(self, descriptor: Descriptor, *, blob: bool) -> bytes:
        from wasidispatch.oci.layout import MAX_MANIFEST_SIZE

        data = self.layout.read_blob(descriptor, max_size=MAX_MANIFEST_SIZE)
        self.bytes_read += len(data)
        return data

    def prefetch(self, descriptor: Descriptor) -> None:
        pass  # a local file opens at once

    @contextlib.contextmanager
    def layer(self, descriptor: Descriptor) -> Iterator[io.BufferedReader]:
        from wasidispatch.oci.layout import _open_regular

        path = self.layout.blob_path(descriptor.digest)
        try:
            raw = _open_regular(path, "layer blob")
        except FileNotFoundError:
            raise SpecError(f"{path}: missing layer blob {descriptor.digest}") from None
        except OSError as exc:
            raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
        with raw, _Counted(raw, self, descriptor.size) as counted:
            yield io.BufferedReader(counted, _BUFFER)

    def check_deadline(self, cause: BaseException | None = None) -> None:
        if self.deadline_at is not None and time.monotonic() >= self.deadline_at:
            raise SpecError(f"{self.layout.path}: classify did not finish in time") from cause


class _Counted(io.RawIOBase):
    """A blob's bytes, counted into ``source.bytes_read``, never past the descriptor's size
    (a local file is seekable, so tar members can be skipped without reading them)."""

    def __init__(self, raw: Any, source: _Source, size: int) -> None:
        super().__init__()
        self._raw = raw
        self._source = source
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(self._raw.seekable())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = int(self._raw.seek(offset, whence))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        n = int(self._raw.readinto(view[:want]) or 0)
        self._pos += n
        self._source.bytes_read += n
        return n


class _RegistrySource:
    def __init__(self, ref: str, client: _Client, deadline: Any) -> None:
        self.ref = ref
        self.client = client
        self.deadline = deadline
        container = client.container
        self.scope = f"registry:{container.registry}/{container.api_prefix}"
        self.bytes_read = 0
        self._digest: str | None = container.digest or None
        self._fetched: tuple[str, bytes] | None = None
        self._prefetched: dict[str, _Prefetch] = {}

    def digest(self) -> str | None:
        # By tag: the manifest itself is fetched (one request, as a HEAD would be), and its own
        # digest looked up in the cache; a miss goes on with the bytes already here.
        if self._digest is None and self._fetched is None:
            self._fetched = self._get(self.client.container.tag, blob=False)
        return self._digest or (self._fetched[0] if self._fetched else None)

    def top(self) -> tuple[str, bytes]:
        if self._fetched is None:
            self._fetched = self._get(self._digest or self.client.container.tag, blob=False)
        digest, body = self._fetched
        return self._digest or digest, body

    def document(self, descriptor: Descriptor, *, blob: bool) -> bytes:
        if descriptor.data is not None:
            return descriptor.decoded_data() or b""
        return self._get(str(descriptor.digest), blob=blob, size=descriptor.size)[1]

    def _get(self, reference: str, *, blob: bool, size: int | None = None) -> tuple[str, bytes]:
        """A manifest (or index) or a config blob: capped, verified against every digest
        claimed for it (the reference, the registry's ``Docker-Content-Digest``)."""
        from wasidispatch.oci.image import Digest
        from wasidispatch.oci.layout import MAX_MANIFEST_SIZE
        from wasidispatch.oci.registry import _ACCEPT

        client = self.client
        if size is not None and size > MAX_MANIFEST_SIZE:
            raise SpecError(f"{reference}: {size} bytes is over the {MAX_MANIFEST_SIZE}-byte cap")
        kind = "blobs" if blob else "manifests"
        response = client.request(
            "GET",
            client.url(kind, reference),
            headers={} if blob else {"Accept": _ACCEPT},
            stream=True,
        )
        try:
            client.check(response, f"{kind[:-1]} {reference}")
            body = self._read_body(response, MAX_MANIFEST_SIZE + 1)
        finally:
            response.close()
        self.bytes_read += len(body)
        if len(body) > MAX_MANIFEST_SIZE:
            raise SpecError(f"{reference} is over the {MAX_MANIFEST_SIZE}-byte cap")
        digest = Digest.of(body)
        claimed = [reference] if reference.startswith("sha") and ":" in reference else []
        if not blob and response.headers.get("Docker-Content-Digest"):
            claimed.append(response.headers["Docker-Content-Digest"])
        for want in claimed:
            expected = Digest.parse(want)
            actual = (
                digest if expected.algorithm == "sha256" else Digest.of(body, expected.algorithm)
            )
            if actual != expected:
                raise SpecError(f"digest mismatch: expected {expected}, content is {actual}")
        if size is not None and len(body) != size:
            raise SpecError(f"{reference}: {len(body)} bytes, its descriptor says {size}")
        return str(digest), body

    def _read_body(self, response: Any, limit: int) -> bytes:
        try:
            data: bytes = response.raw.read(limit, decode_content=True)
        except Exception as exc:
            self.check_deadline(exc)
            raise RegistryError(f"{self.ref}: transfer failed: {exc}") from exc
        self.check_deadline()
        return data

    def prefetch(self, descriptor: Descriptor) -> None:
        """Start the request for a layer in the background (a registry's answer takes longer
        than reading it here): :meth:`layer` takes the response over, :meth:`close` drops it
        when it was not needed."""
        if descriptor.data is None and descriptor.digest not in self._prefetched:
            self._prefetched[descriptor.digest] = _Prefetch(lambda: self._open_blob(descriptor))

    def _open_blob(self, descriptor: Descriptor) -> Any:
        client = self.client
        response = client.request("GET", client.url("blobs", descriptor.digest), stream=True)
        try:
            client.check(response, f"blob {descriptor.digest}")
        except BaseException:
            response.close()
            raise
        return response

    @contextlib.contextmanager
    def layer(self, descriptor: Descriptor) -> Iterator[io.BufferedReader]:
        if descriptor.data is not None:
            data = descriptor.decoded_data() or b""
            self.bytes_read += len(data)
            yield io.BufferedReader(io.BytesIO(data), _BUFFER)
            return
        pending = self._prefetched.pop(descriptor.digest, None)
        response = pending.result() if pending is not None else self._open_blob(descriptor)
        try:
            yield io.BufferedReader(_HTTPBody(response, self, descriptor.size), _BUFFER)
        finally:
            response.close()  # mid-body: the connection is dropped, nothing more is read

    def check_deadline(self, cause: BaseException | None = None) -> None:
        self.client.check_deadline(cause)

    def close(self) -> None:
        """Drop prefetched responses nobody read."""
        for pending in self._prefetched.values():
            pending.discard()
        self._prefetched.clear()


class _Prefetch:
    """One request made on a thread of its own; its response is taken or discarded."""

    def __init__(self, start: Any) -> None:
        self._lock = threading.Lock()
        self._response: Any = None
        self._error: BaseException | None = None
        self._discarded = False
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self._thread.start()

    def _run(self, start: Any) -> None:
        try:
            response = start()
        except BaseException as exc:
            self._error = exc
            return
        with self._lock:
            if not self._discarded:
                self._response = response
                return
        response.close()

    def result(self) -> Any:
        """The response (waiting for it), or the request's error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._response

    def discard(self) -> None:
        """Close the response now, or as soon as it arrives (without waiting for it)."""
        with self._lock:
            self._discarded = True
            response, self._response = self._response, None
        if response is not None:
            response.close()


class _HTTPBody(io.RawIOBase):
    """A blob's HTTP body, counted, never read past the descriptor's size."""

    def __init__(self, response: Any, source: _RegistrySource, size: int) -> None:
        super().__init__()
        self._response = response
        self._source = source
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._left)
        if want <= 0:
            return 0
        try:
            data: bytes = self._response.raw.read(want, decode_content=False)
        except Exception as exc:
            self._source.check_deadline(exc)
            raise RegistryError(f"{self._source.ref}: transfer failed: {exc}") from exc
        n = len(data)
        view[:n] = data
        self._left -= n
        self._source.bytes_read += n
        return n


# --- inputs -------------------------------------------------------------------------------


def _local(ref_or_layout: str | os.PathLike[str]) -> tuple[str, str | None] | None:
    """``(directory, tag)`` when the input names a local layout, else ``None``."""
    text = os.fspath(ref_or_layout)
    if os.path.isfile(os.path.join(text, "oci-layout")):
        return text, None
    head, sep, tag = text.rpartition(":")
    if sep and head and tag and "/" not in tag and os.path.isfile(os.path.join(head, "oci-layout")):
        return head, tag
    if not isinstance(ref_or_layout, str) or text.startswith(("/", "./", "../", "~")):
        return text, None  # a path, not a reference: opening it says what is wrong
    return None


def _parse_platform(value: str) -> tuple[str, str, str | None]:
    parts = value.split("/")
    if len(parts) not in (2, 3) or not all(parts) or any(c in value for c in "\0\n "):
        raise SpecError(f"platform {value!r}: give it as OS/ARCH or OS/ARCH/VARIANT")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _is_wasi(os_name: str, architecture: str) -> bool:
    return os_name.startswith("wasi") or architecture in ("wasm", "wasm32", "wasm64")


def _platform_text(os_name: str, architecture: str, variant: str | None) -> str:
    return f"{os_name}/{architecture}/{variant}" if variant else f"{os_name}/{architecture}"


_node: tuple[str, str, str | None] | None = None


def _node_platform() -> tuple[str, str, str | None]:
    global _node
    if _node is None:
        from wasidispatch.oci.layout import node_platform

        _node = _parse_platform(node_platform())
    return _node


# --- the decision --------------------------------------------------------------------------


class Classifier:
    """:func:`classify` with its own cache and bounds.

    ``cache_size``: decisions kept (0: none). ``max_scan``: decompressed layer bytes scanned
    per image. ``max_entries``: tar headers indexed per image. Thread-safe: one instance can
    serve concurrent callers (the cache has a lock; each call has its own connections).
    ``hits`` and ``misses`` count the answers the cache gave and could not give.
    """

    def __init__(
        self,
        *,
        cache_size: int = CACHE_SIZE,
        max_scan: int | None = None,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.cache_size = cache_size
        self.max_scan = max_scan  # None: MAX_LAYER_SCAN (read when needed: a light import)
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, str, str], ImageDecision] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def cache_clear(self) -> None:
        """Forget every cached decision."""
        with self._lock:
            self._cache.clear()

    def _cached(self, key: tuple[str, str, str]) -> ImageDecision | None:
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            return found

    def _store(self, key: tuple[str, str, str], decision: ImageDecision) -> None:
        if self.cache_size <= 0:
            return
        with self._lock:
            self._cache[key] = decision
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def classify(
        self,
        ref_or_layout: str | os.PathLike[str],
        *,
        platform: str | None = None,
        timeout: float | None = 60.0,
        insecure: bool = False,
    ) -> ImageDecision:
        """See :func:`classify`."""
        if timeout is not None and not (timeout > 0 and timeout < float("inf")):
            raise SpecError(f"classify timeout must be a positive number of seconds: {timeout}")
        want = _parse_platform(platform) if platform is not None else None
        wanted = platform or "node"
        reference = os.fspath(ref_or_layout)
        at = None if timeout is None else time.monotonic() + timeout
        local = _local(ref_or_layout)
        if local is not None:
            return self._decide(_LayoutSource(*local, at), reference, want, wanted)
        return self._from_registry(reference, want, wanted, timeout, insecure)

    def _from_registry(
        self,
        reference: str,
        want: tuple[str, str, str | None] | None,
        wanted: str,
        timeout: float | None,
        insecure: bool,
    ) -> ImageDecision:
        from wasidispatch.oci.registry import _bind_deadline, _Client, _Deadline

        scope_digest = _by_digest(reference)
        if scope_digest is not None:  # by digest: the cache answers without the network
            hit = self._cached((*scope_digest, wanted))
            if hit is not None:
                return dataclasses.replace(hit, reference=reference, bytes_read=0, cached=True)
        client = _Client(reference, True if insecure else None)
        with contextlib.ExitStack() as stack:
            deadline = None
            if timeout is not None:
                deadline = stack.enter_context(_Deadline(timeout, f"classify {reference}"))
                client.deadline = deadline
                _bind_deadline(client.registry.session, deadline)
            source = _RegistrySource(reference, client, deadline)
            stack.callback(source.close)  # before the deadline ends: its sockets are bound
            try:
                return self._decide(source, reference, want, wanted)
            except SpecError as exc:
                client.check_deadline(exc)
                raise

    def _decide(
        self,
        source: _Source,
        reference: str,
        want: tuple[str, str, str | None] | None,
        wanted: str,
    ) -> ImageDecision:
        known = source.digest()
        if known is not None:
            hit = self._cached((source.scope, known, wanted))
            if hit is not None:
                return dataclasses.replace(hit, reference=reference, bytes_read=0, cached=True)
        with self._lock:
            self.misses += 1
        digest, body = source.top()
        decision = _Decision(self, source, reference).top(digest, body, want)
        self._store((source.scope, digest, wanted), dataclasses.replace(decision, bytes_read=0))
        return decision


_parsed: dict[str, tuple[str, str] | None] = {}


def _by_digest(reference: str) -> tuple[str, str] | None:
    """``(cache scope, digest)`` of a registry reference by digest, else ``None`` (memoized:
    parsing a reference costs more than answering from the cache)."""
    if reference in _parsed:
        return _parsed[reference]
    found: tuple[str, str] | None = None
    if "@" in reference:
        try:
            import oras.provider

            container = oras.provider.Registry().get_container(reference)
            if container.digest:
                found = (f"registry:{container.registry}/{container.api_prefix}", container.digest)
        except Exception:
            found = None  # the full path below words the error
    if len(_parsed) >= 4096:
        _parsed.clear()
    _parsed[reference] = found
    return found


class _Decision:
    """One uncached decision: the rules of the module docstring, in order."""

    def __init__(self, classifier: Classifier, source: _Source, reference: str) -> None:
        self.classifier = classifier
        self.source = source
        self.reference = reference
        self.evidence: list[str] = []

    def result(
        self,
        kind: Kind,
        digest: str,
        *,
        architecture: str | None = None,
        entrypoint: str | None = None,
        platform: str | None = None,
    ) -> ImageDecision:
        return ImageDecision(
            kind=kind,
            evidence=tuple(self.evidence),
            architecture=architecture,
            digest=digest,
            reference=self.reference,
            entrypoint=entrypoint,
            platform=platform,
            bytes_read=self.source.bytes_read,
        )

    def top(
        self, digest: str, body: bytes, want: tuple[str, str, str | None] | None
    ) -> ImageDecision:
        from wasidispatch.oci.image import Index, Manifest
        from wasidispatch.oci.registry import MAX_INDEX_DEPTH

        for depth in range(MAX_INDEX_DEPTH + 1):
            if not _is_index(body):
                manifest = Manifest.parse(body, source=f"{self.reference} manifest {digest}")
                return self.manifest(digest, manifest)
            if depth == MAX_INDEX_DEPTH:
                break
            index = Index.parse(body, source=f"{self.reference} index {digest}")
            picked = self.pick(index, want)
            if picked is None:
                return self.result("unknown", digest)
            chosen = picked.platform
            assert chosen is not None  # pick() takes only entries with a platform
            if _is_wasi(chosen.os, chosen.architecture):
                shown = _platform_text(chosen.os, chosen.architecture, chosen.variant)
                self.evidence.append(f"platform {shown}: Wasm")
                return self.result("wasm", str(picked.digest), platform=shown)
            digest, body = str(picked.digest), self.source.document(picked, blob=False)
        raise SpecError(f"{self.reference}: indexes nested more than {MAX_INDEX_DEPTH} deep")

    def pick(self, index: Index, want: tuple[str, str, str | None] | None) -> Descriptor | None:
        """The index entry this node (or ``want``) would run; ``None`` (with evidence) when
        there is none."""
        entries = [
            d
            for d in index.manifests
            if d.platform is not None and d.platform.os not in ("", "unknown")
        ]
        target = want or _node_platform()
        os_name, arch, variant = target

        def fits(d: Descriptor) -> bool:
            p = d.platform
            assert p is not None
            if _is_wasi(os_name, arch):
                return _is_wasi(p.os, p.architecture)
            if (p.os, p.architecture) != (os_name, arch):
                return False
            return variant is None or p.variant is None or p.variant == variant

        matching = [d for d in entries if fits(d)]
        exact = [d for d in matching if d.platform is not None and d.platform.variant == variant]
        chosen = (exact or matching)[0] if matching else None
        shown = _platform_text(*target)
        if chosen is None and want is None:
            chosen = next(
                (
                    d
                    for d in entries
                    if d.platform and _is_wasi(d.platform.os, d.platform.architecture)
                ),
                None,
            )
            if chosen is not None:
                self.evidence.append(f"index: no {shown} entry, a Wasm one")
                return chosen
        if chosen is None:
            listed = sorted(
                {
                    _platform_text(d.platform.os, d.platform.architecture, d.platform.variant)
                    for d in entries
                    if d.platform is not None
                }
            )
            self.evidence.append(
                f"index: no manifest for {shown} (it has: {', '.join(listed) or 'none'})"
            )
            return None
        self.evidence.append(f"index: the {shown} entry {chosen.digest}")
        return chosen

    def manifest(self, digest: str, manifest: Manifest) -> ImageDecision:
        from wasidispatch.oci.image import ImageConfig
        from wasidispatch.oci.layout import is_wasm_image
        from wasidispatch.oci.wasm import (
            ANNOTATION_RUN_OCI_HANDLER,
            ANNOTATION_WASM_VARIANT,
            is_wasm_layer,
        )

        config_type = manifest.config.media_type
        if config_type in _WASM_CONFIG_TYPES:
            self.evidence.append(f"config media type {config_type} (a Wasm artifact)")
            return self.result("wasm", digest)
        wasm = [i for i, d in enumerate(manifest.layers) if is_wasm_layer(d.media_type)]
        if wasm:
            layer = manifest.layers[wasm[0]]
            self.evidence.append(f"layer {wasm[0] + 1} has media type {layer.media_type}")
            return self.result("wasm", digest)
        if config_type not in _IMAGE_CONFIG_TYPES:
            self.evidence.append(f"config media type {config_type}: neither an image nor Wasm")
            return self.result("unknown", digest)
        if not is_wasm_image(manifest):
            # Unless the config settles it, the top layer is read next: ask for it already.
            self.source.prefetch(manifest.layers[-1])
        config = ImageConfig.parse(
            self.source.document(manifest.config, blob=True), source=f"{self.reference} config"
        )
        shown = _platform_text(config.os, config.architecture, config.variant)
        if _is_wasi(config.os, config.architecture):
            self.evidence.append(f"config platform {shown}: Wasm")
            return self.result("wasm", digest, platform=shown)
        self.evidence.append(f"config platform {shown}")
        if config.os != "linux":
            self.evidence.append(f"a {config.os} image: neither Linux nor Wasm")
            return self.result("unknown", digest, platform=shown)
        run = config.config
        argv = [*(run.entrypoint or []), *(run.cmd or [])] if run is not None else []
        if is_wasm_image(manifest, config):
            marks = {**((run.labels or {}) if run else {}), **(manifest.annotations or {})}
            for key in (ANNOTATION_WASM_VARIANT, ANNOTATION_RUN_OCI_HANDLER):
                if key in marks:
                    self.evidence.append(f"annotation {key}={marks[key]}")
            return self.result("wasm", digest, entrypoint=argv[0] if argv else None, platform=shown)
        if not argv or not argv[0]:
            self.evidence.append("no Entrypoint or Cmd: nothing to run")
            return self.result("unknown", digest, platform=shown)
        return self.entrypoint(digest, manifest, config, argv[0], shown)

    def entrypoint(
        self, digest: str, manifest: Manifest, config: ImageConfig, name: str, shown: str
    ) -> ImageDecision:
        from wasidispatch._resolve import DEFAULT_PATH
        from wasidispatch.oci.layout import MAX_LAYER_SCAN

        run = config.config
        assert run is not None  # manifest() found an Entrypoint or Cmd in it
        path_env: str | None = None
        for entry in run.env or []:
            if entry.startswith("PATH="):
                path_env = entry[5:]  # the last one wins, as in the container's environment
        cwd = _norm(run.working_dir or "/")
        rootfs = _Rootfs(
            self.source,
            manifest.layers,
            max_scan=MAX_LAYER_SCAN
            if self.classifier.max_scan is None
            else self.classifier.max_scan,
            max_entries=self.classifier.max_entries,
        )
        search = path_env if path_env is not None else DEFAULT_PATH
        try:
            found = rootfs.find(name, search, "/" + cwd)
        except SpecError as exc:
            self.source.check_deadline(exc)
            raise SpecError(f"{self.reference}: {exc}") from exc
        layer = found.loc.layer
        assert layer is not None
        where = f"/{found.loc.path}"
        read = ", ".join(str(n) for n in sorted(rootfs.layers_read, reverse=True))
        self.evidence.append(
            f"entrypoint {found.how} resolves to {where} in layer {layer.number} of "
            f"{len(manifest.layers)} (layers read: {read or 'none'})"
        )
        detected: Detected = sniff(found.head)
        self.evidence.append(f"{where}: {detected}")
        if detected.is_wasm:
            return self.result("wasm", digest, entrypoint=where, platform=shown)
        if detected.elf is not None:
            return self.result(
                "linux",
                digest,
                architecture=detected.elf.architecture,
                entrypoint=where,
                platform=shown,
            )
        if detected.script is not None:
            return self.result(
                "linux",
                digest,
                architecture=config.architecture,
                entrypoint=where,
                platform=shown,
            )
        return self.result("unknown", digest, entrypoint=where, platform=shown)


def _is_index(body: bytes) -> bool:
    try:
        probe = json.loads(body)
    except (ValueError, RecursionError):
        return False  # the manifest's own parse says what is wrong
    if not isinstance(probe, dict):
        return False
    return probe.get("mediaType") in _INDEX_TYPES or "manifests" in probe


_default = Classifier()


def classify(
    ref_or_layout: str | os.PathLike[str],
    *,
    platform: str | None = None,
    timeout: float | None = 60.0,
    insecure: bool = False,
) -> ImageDecision:
    """Decide whether ``ref_or_layout`` runs as Wasm or Linux (see the module docstring).

    ``ref_or_layout``: a registry reference, or a local layout ``DIR`` / ``DIR:TAG`` (a path
    object is always a layout). ``platform``: ``OS/ARCH[/VARIANT]`` to pick from an index
    (default: this node's). ``timeout``: the deadline of the whole call in seconds (``None``:
    none). ``insecure``: plain HTTP to the registry (loopback registries get it anyway).
    Registry credentials are those ``pull`` uses (docker's config); a CA for a private
    registry is taken from ``REQUESTS_CA_BUNDLE``.

    Raises :class:`~wasidispatch.errors.RegistryError` (network, registry, auth, the deadline
    on a registry) or :class:`~wasidispatch.errors.SpecError` (an invalid or hostile image).
    """
    return _default.classify(ref_or_layout, platform=platform, timeout=timeout, insecure=insecure)
