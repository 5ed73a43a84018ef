"""OCI image layouts on disk: ``oci-layout``, ``index.json`` and ``blobs/<alg>/<encoded>``.

:class:`ImageLayout` opens or creates a layout, writes blobs atomically (a temporary file in
the blob's own directory, fsync, rename, fsync of the directory: an interrupted write leaves no
visible blob), reads blobs as streams whose size and digest are verified, resolves a reference
by its ``org.opencontainers.image.ref.name`` annotation and tags descriptors. Blob paths are
only ever built from validated :class:`~wasidispatch.oci.image.Digest` values.

:func:`pack_wasm` turns ``.wasm`` bytes into a Wasm OCI artifact (CNCF TAG Runtime layout)
inside a layout, :func:`pack_image` into a runnable OCI image (one tar layer holding the
``.wasm``, ``Entrypoint`` naming it: the form containerd unpacks and CRI runs), and
:func:`wasm_layers` gives an executor the Wasm binaries a reference holds: the
``application/wasm`` layers of an artifact, or, for a plain OCI image marked with
``run.oci.handler``/``module.wasm.image/variant``, the entrypoint file found in its rootfs tar
layers.

Bounds: ``oci-layout``, ``index.json`` and every manifest, index and config are read only as
regular files (never through a symlink, never a FIFO or a device) of at most
:data:`MAX_MANIFEST_SIZE`; blobs are opened only when they are regular files and are read as
streams. Tar layers are decompressed as a stream (memory stays at a few MiB whatever the
layer), a Wasm file inside one may be at most :data:`MAX_WASM_SIZE` bytes, and at most
:data:`MAX_LAYER_SCAN` decompressed bytes are scanned per reference. Files are written through
:mod:`wasidispatch._fs`: a symlink or a file planted at a final or a temporary name is replaced,
never followed, and ``blobs/`` or ``blobs/<algorithm>`` being a symlink is refused.

Example::

    >>> import tempfile, wasmtime
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     layout = ImageLayout.create(tmp)
    ...     desc = pack_wasm(layout, wasmtime.wat2wasm("(module)"), "v1", created=None)
    ...     [(w.media_type, w.size) for w in wasm_layers(layout, "v1")]
    [('application/wasm', 8)]
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import gzip
import io
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

from wasidispatch import _fs
from wasidispatch.errors import SpecError
from wasidispatch.oci._base import OCIModel
from wasidispatch.oci.image import (
    ANNOTATION_REF_NAME,
    ANNOTATION_TITLE,
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_MANIFEST,
    Descriptor,
    Digest,
    ImageConfig,
    Index,
    LayoutHeader,
    Manifest,
)
from wasidispatch.oci.wasm import (
    ANNOTATION_RUN_OCI_HANDLER,
    ANNOTATION_WASM_VARIANT,
    MEDIA_TYPE_WASM,
    MEDIA_TYPE_WASM_CONFIG,
    MEDIA_TYPE_WASM_CONFIG_V1_LEGACY,
    OS_COMPONENT,
    OS_MODULE,
    WASM_ARCHITECTURE,
    WasmComponent,
    WasmConfig,
    is_wasm_layer,
)

__all__ = [
    "IMAGE_CREATED_BY",
    "IMAGE_WASM_PATH",
    "MAX_LAYER_SCAN",
    "MAX_MANIFEST_SIZE",
    "MAX_WASM_SIZE",
    "BlobReader",
    "ImageLayout",
    "WasmLayer",
    "node_platform",
    "pack_image",
    "pack_wasm",
    "wasm_layers",
]

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
"""Manifests, indexes and configs larger than this are refused (registries use 4 MiB)."""

MAX_WASM_SIZE = 1 << 30
"""A Wasm binary (an artifact layer or a file inside a tar layer) larger than 1 GiB is refused."""

MAX_LAYER_SCAN = 4 << 30
"""At most 4 GiB of decompressed tar data is scanned to find a Wasm image's entrypoint."""

_CHUNK = 1 << 20
_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_INDEX_TYPES = frozenset({MEDIA_TYPE_IMAGE_INDEX, _DOCKER_MANIFEST_LIST})
_TAR_LAYER_SUFFIXES = ("tar", "tar+gzip", "tar.gzip", "tar+zstd")

_M = TypeVar("_M", bound=OCIModel)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one (durably;
    a symlink or file planted at ``path`` or at the temporary name is never followed)."""
    try:
        _fs.write_atomic(path, data, durable=True)
    except OSError as exc:
        raise SpecError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _real_dir(path: Path) -> None:
    """Make ``path`` a directory (not a symlink to one): a planted symlink is refused."""
    try:
        path.mkdir(exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise SpecError(f"{path}: cannot create directory: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SpecError(f"{path}: not a directory (a symlink or a file is in the way)")


def _write_or_spec_error(out: IO[bytes], data: bytes | None, directory: Path) -> None:
    """Write ``data`` (``None``: flush, chmod 0644 and fsync); :class:`SpecError` on failure."""
    try:
        if data is not None:
            out.write(data)
        else:
            out.flush()
            os.fchmod(out.fileno(), 0o644)
            os.fsync(out.fileno())
    except OSError as exc:
        raise SpecError(f"{directory}: cannot write a blob: {exc.strerror or exc}") from exc


def _open_regular(path: Path, what: str) -> IO[bytes]:
    """``path`` opened for reading when it is a regular file: never through a symlink, never
    blocking on a FIFO; :class:`SpecError` otherwise."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags)  # OSError for the caller to word
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{path}: {what} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _utf8(text: str) -> bool:
    """Whether ``text`` has a UTF-8 form (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _now_rfc3339() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch and epoch.isdigit()
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class BlobReader(io.RawIOBase):
    """A readable blob whose size and digest are checked as it is read.

    Reading more bytes than the descriptor's ``size`` or reaching end of file early raises
    :class:`SpecError` at that point; at end of file the digest is compared and a mismatch
    raises :class:`SpecError`. Only a blob read to its end has been verified.
    """

    def __init__(self, raw: IO[bytes], descriptor: Descriptor, name: str) -> None:
        super().__init__()
        self._raw = raw
        self._descriptor = descriptor
        self._name = name
        self._hasher = descriptor.digest.hasher()
        self._seen = 0
        self._verified = False

    def readable(self) -> bool:
        return True

    @property
    def verified(self) -> bool:
        """Whether the whole blob has been read and matched its digest."""
        return self._verified

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = self._descriptor.size - self._seen
        if want <= 0:
            # Past the declared size: one more byte proves the blob is too long.
            if not self._verified and self._raw.read(1):
                raise SpecError(
                    f"{self._name}: blob is larger than its descriptor's size "
                    f"{self._descriptor.size}"
                )
            self._finish()
            return 0
        n = self._raw.readinto(view[: min(len(view), want)])  # type: ignore[attr-defined]
        if not n:
            raise SpecError(
                f"{self._name}: truncated blob: {self._seen} of {self._descriptor.size} bytes"
            )
        self._hasher.update(view[:n])
        self._seen += n
        return int(n)

    def _finish(self) -> None:
        if self._verified:
            return
        actual = f"{self._descriptor.digest.algorithm}:{self._hasher.hexdigest()}"
        if actual != self._descriptor.digest:
            raise SpecError(
                f"{self._name}: digest mismatch: descriptor says {self._descriptor.digest}, "
                f"content is {actual}"
            )
        self._verified = True

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class WasmLayer:
    """One Wasm binary of an OCI reference, with a verified way to get its bytes.

    ``digest``/``size`` are those of the Wasm bytes themselves; ``media_type`` is the layer's
    (``application/wasm`` for an artifact). ``origin`` says where the bytes live: ``layer`` for
    an artifact layer, or ``tar:<layer digest>:<path>`` for a file inside an image's rootfs.
    Only a small file found in a tar layer (up to 16 MiB) is held in memory; otherwise
    :meth:`read_bytes` reads the blob (or streams through the tar layer again) when called.
    """

    __slots__ = (
        "_data",
        "_layout",
        "_source",
        "descriptor",
        "digest",
        "media_type",
        "origin",
        "size",
    )

    def __init__(
        self,
        layout: ImageLayout,
        descriptor: Descriptor,
        *,
        origin: str = "layer",
        data: bytes | None = None,
        source: tuple[Descriptor, str] | None = None,
    ) -> None:
        self._layout = layout
        self._data = data
        self._source = source  # (tar layer, member path) the bytes are read from
        self.descriptor = descriptor
        self.digest: Digest = descriptor.digest
        self.media_type: str = descriptor.media_type
        self.size: int = descriptor.size
        self.origin = origin

    def read_bytes(self) -> bytes:
        """The Wasm bytes, read from the layout and verified against ``digest``.

        Raises :class:`SpecError` when they are over :data:`MAX_WASM_SIZE`, do not match, or
        the layer holding them is bad.
        """
        if self._data is not None:
            return self._data
        if self.size > MAX_WASM_SIZE:
            raise SpecError(
                f"{self._layout.path}: Wasm layer {self.digest} is {self.size} bytes, over the "
                f"{MAX_WASM_SIZE}-byte cap"
            )
        if self._source is None:
            return self._layout.read_blob(self.descriptor)
        layer, member = self._source
        found = _scan_tar_layer(self._layout, layer, member, [MAX_LAYER_SCAN], MAX_WASM_SIZE)
        if found is None or found[2] is None or found[0] != self.digest:
            raise SpecError(f"{self._layout.path}: layer {layer.digest} changed: /{member}")
        return found[2]

    def __repr__(self) -> str:
        return f"WasmLayer({self.digest}, {self.media_type!r}, size={self.size}, {self.origin!r})"


class ImageLayout:
    """An OCI image layout directory. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()

    # --- opening -----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> ImageLayout:
        """Create a layout at ``path`` (made if missing), or open the one already there."""
        root = Path(path)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpecError(f"{root}: cannot create image layout: {exc.strerror}") from exc
        except ValueError as exc:  # a NUL or a lone surrogate in the path
            raise SpecError(f"{root!r}: cannot create image layout: {exc}") from exc
        _real_dir(root / "blobs")
        _real_dir(root / "blobs" / "sha256")
        layout = cls(root)
        # lexists: a planted (even dangling) symlink is not "missing"; open() refuses it.
        if not os.path.lexists(root / "oci-layout"):
            _atomic_write(root / "oci-layout", LayoutHeader(image_layout_version="1.0.0").to_json())
        if not os.path.lexists(root / "index.json"):
            _atomic_write(root / "index.json", Index(schema_version=2, manifests=[]).to_json())
        return cls.open(layout.path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ImageLayout:
        """Open an existing layout; :class:`SpecError` if ``oci-layout``/``index.json`` are bad."""
        layout = cls(path)
        if not layout.path.is_dir():
            raise SpecError(f"{layout.path}: not an image layout directory")
        LayoutHeader.parse(
            layout._read_small(layout.path / "oci-layout"), source=str(layout.path / "oci-layout")
        )
        layout.index()
        return layout

    def _read_small(self, path: Path, limit: int = MAX_MANIFEST_SIZE) -> bytes:
        # A regular file, not a symlink, FIFO or device, of at most ``limit`` bytes.
        return _fs.read_regular(path, limit=limit, what=path.name, follow=False)

    # --- index -------------------------------------------------------------------------

    def index(self) -> Index:
        """The current ``index.json``."""
        path = self.path / "index.json"
        return Index.parse(self._read_small(path), source=str(path))

    def refs(self) -> list[str]:
        """The reference names in ``index.json``, in index order."""
        return [d.ref_name for d in self.index().manifests if d.ref_name is not None]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Serialize our own read-modify-write of index.json (the oci-layout file is the lock,
        # so the layout gains no extra file).
        path = self.path / "oci-layout"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SpecError(f"{path}: cannot open: {exc.strerror or exc}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SpecError(f"{path}: not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def tag(self, descriptor: Descriptor, ref: str) -> Descriptor:
        """Point ``ref`` at ``descriptor`` in ``index.json`` (replacing an older ``ref``).

        The blob must already be in the layout. Returns the descriptor as written (with the
        ``org.opencontainers.image.ref.name`` annotation).
        """
        if not ref or any(c in ref for c in "\0\n") or not _utf8(ref):
            raise SpecError(f"invalid reference name {ref!r}")
        if not self.has_blob(descriptor.digest):
            raise SpecError(f"{self.path}: cannot tag {ref!r}: blob {descriptor.digest} missing")
        tagged = descriptor.model_copy(
            update={"annotations": {**(descriptor.annotations or {}), ANNOTATION_REF_NAME: ref}}
        )
        with self._locked():
            index = self.index()
            kept = [d for d in index.manifests if d.ref_name != ref]
            updated = index.model_copy(update={"manifests": [*kept, tagged]})
            _atomic_write(self.path / "index.json", updated.to_json())
        return tagged

    def resolve(self, ref: str | None = None) -> tuple[Descriptor, Manifest]:
        """The manifest tagged ``ref`` (or the only one, when ``ref`` is ``None``).

        A reference to an image index resolves through it when it lists exactly one manifest.
        Raises :class:`SpecError` when nothing or more than one thing matches.
        """
        manifests = self.index().manifests
        if ref is None:
            found = manifests
            if len(found) != 1:
                raise SpecError(
                    f"{self.path}: name a reference, the layout holds {len(found)} "
                    f"(refs: {', '.join(self.refs()) or 'none'})"
                )
        else:
            found = [d for d in manifests if d.ref_name == ref]
            if not found:
                raise SpecError(
                    f"{self.path}: no reference {ref!r} (refs: {', '.join(self.refs()) or 'none'})"
                )
            if len(found) > 1:
                raise SpecError(f"{self.path}: reference {ref!r} is ambiguous")
        descriptor = found[0]
        for _ in range(8):  # nested indexes, bounded
            if descriptor.media_type not in _INDEX_TYPES:
                return descriptor, self.read_json(descriptor, Manifest)
            nested = self.read_json(descriptor, Index).manifests
            if len(nested) != 1:
                raise SpecError(
                    f"{self.path}: {ref or descriptor.digest} is an index of {len(nested)} "
                    "manifests; pick one by digest"
                )
            descriptor = nested[0]
        raise SpecError(f"{self.path}: {ref}: indexes nested too deeply")

    @contextlib.contextmanager
    def staged(self) -> Iterator[ImageLayout]:
        """A scratch layout (a hidden directory inside this one) to write blobs into.

        When the block ends normally its blobs are moved into this layout (each ``rename`` is
        atomic, so only whole, verified blobs ever appear); on an exception none are. The
        scratch directory is removed either way.
        """
        _real_dir(self.path / "blobs")
        try:
            scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.path))
        except OSError as exc:
            raise SpecError(f"{self.path}: cannot stage blobs: {exc.strerror}") from exc
        try:
            yield ImageLayout(scratch)
            blobs = scratch / "blobs"
            for algorithm in sorted(os.listdir(blobs)) if blobs.is_dir() else ():
                target = self.path / "blobs" / algorithm
                _real_dir(target)
                for name in sorted(os.listdir(blobs / algorithm)):
                    if not name.startswith("."):
                        os.replace(blobs / algorithm / name, target / name)
                _fs.fsync_dir(target)
        except OSError as exc:
            raise SpecError(f"{self.path}: cannot move staged blobs in: {exc.strerror}") from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # --- blobs -------------------------------------------------------------------------

    def blob_path(self, digest: Digest | str) -> Path:
        """Where the blob with ``digest`` lives (the digest is validated first)."""
        d = digest if isinstance(digest, Digest) else Digest.parse(digest)
        return self.path / "blobs" / d.algorithm / d.encoded

    def has_blob(self, digest: Digest | str) -> bool:
        """Whether the blob is there as a regular file, not a symlink (content not checked)."""
        try:
            return stat.S_ISREG(os.lstat(self.blob_path(digest)).st_mode)
        except OSError:
            return False

    def write_blob(
        self,
        content: bytes | BinaryIO | io.RawIOBase,
        *,
        media_type: str = "application/octet-stream",
        expected: Digest | str | None = None,
        size: int | None = None,
        algorithm: str = "sha256",
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store ``content`` (bytes or a binary stream) and return its descriptor.

        The bytes go to a temporary file next to the final path (created exclusively: a planted
        name is never followed), are fsynced, then renamed over the final name; a failure or
        interruption leaves no visible blob. With ``expected`` (and ``size``), content whose
        digest (or length) differs raises :class:`SpecError`; nothing is stored.
        """
        want = None if expected is None else Digest.parse(str(expected))
        algorithm = want.algorithm if want is not None else algorithm
        hasher = Digest.of(b"", algorithm).hasher()  # validates the algorithm
        _real_dir(self.path / "blobs")
        directory = self.path / "blobs" / algorithm
        _real_dir(directory)
        if isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
            written = len(data)
            hasher.update(data)
            digest = self._checked(Digest(f"{algorithm}:{hasher.hexdigest()}"), want, size, written)
            _atomic_write(self.blob_path(digest), data)
        else:
            written = 0
            try:
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")  # O_EXCL: no follow
            except OSError as exc:
                raise SpecError(f"{directory}: cannot write a blob: {exc.strerror}") from exc
            try:
                with os.fdopen(fd, "wb") as out:
                    while chunk := content.read(_CHUNK):  # a reader's own errors pass through
                        _write_or_spec_error(out, chunk, directory)
                        hasher.update(chunk)
                        written += len(chunk)
                        if size is not None and written > size:
                            raise SpecError(f"blob is larger than the expected {size} bytes")
                    _write_or_spec_error(out, None, directory)  # flush, chmod 0644, fsync
                digest = Digest(f"{algorithm}:{hasher.hexdigest()}")
                digest = self._checked(digest, want, size, written)
                final = self.blob_path(digest)
                try:
                    os.replace(tmp, final)
                except OSError as exc:
                    raise SpecError(f"{final}: cannot write a blob: {exc.strerror}") from exc
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            _fs.fsync_dir(directory)
        descriptor = Descriptor(media_type=media_type, digest=digest, size=written)
        if annotations:
            descriptor.annotations = dict(annotations)
        return descriptor

    @staticmethod
    def _checked(digest: Digest, want: Digest | None, size: int | None, written: int) -> Digest:
        if size is not None and written != size:
            raise SpecError(f"blob size mismatch: expected {size} bytes, got {written}")
        if want is not None and digest != want:
            raise SpecError(f"blob digest mismatch: expected {want}, content is {digest}")
        return digest

    def open_blob(self, descriptor: Descriptor) -> BlobReader:
        """A :class:`BlobReader` over the blob: size and digest verified while reading.

        A descriptor with embedded ``data`` is served from it when the blob file is absent.
        The blob must be a regular file (a symlink, FIFO or device is a :class:`SpecError`).
        """
        path = self.blob_path(descriptor.digest)
        name = f"{path}"
        try:
            raw: IO[bytes] = _open_regular(path, "blob")
        except FileNotFoundError:
            data = descriptor.decoded_data()
            if data is None:
                raise SpecError(f"{name}: missing blob {descriptor.digest}") from None
            raw = io.BytesIO(data)
        except OSError as exc:
            raise SpecError(f"{name}: cannot read: {exc.strerror}") from exc
        try:
            return BlobReader(raw, descriptor, name)
        except BaseException:
            raw.close()
            raise

    def read_blob(self, descriptor: Descriptor, *, max_size: int | None = None) -> bytes:
        """The whole blob, verified; ``max_size`` refuses larger descriptors up front."""
        if max_size is not None and descriptor.size > max_size:
            raise SpecError(
                f"{self.blob_path(descriptor.digest)}: {descriptor.size} bytes is over the "
                f"{max_size}-byte cap for {descriptor.media_type}"
            )
        with self.open_blob(descriptor) as reader:
            return reader.read()

    def read_json(self, descriptor: Descriptor, model: type[_M]) -> _M:
        """Read a JSON blob (manifest, index, config: capped at 4 MiB) into ``model``."""
        data = self.read_blob(descriptor, max_size=MAX_MANIFEST_SIZE)
        return model.parse(data, source=str(self.blob_path(descriptor.digest)))


# --- Wasm artifacts --------------------------------------------------------------------------


def pack_wasm(
    layout: ImageLayout,
    wasm: bytes | bytearray | memoryview,
    ref: str,
    *,
    created: str | bool | None = True,
    title: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Descriptor:
    """Store ``wasm`` as a Wasm OCI artifact tagged ``ref``; returns the manifest descriptor.

    The config is a :class:`WasmConfig` (``os`` is ``wasip1`` for a core module, ``wasip2``
    for a component, from :func:`wasidispatch.detect.sniff`); the single layer is
    ``application/wasm``. ``created``: ``True`` for now (or ``SOURCE_DATE_EPOCH``), a
    timestamp string, or ``None`` to omit it (reproducible output). ``title`` becomes the
    layer's ``org.opencontainers.image.title``; ``annotations`` go on the manifest.
    Raises :class:`SpecError` when ``wasm`` is not a Wasm module or component.
    """
    from wasidispatch.detect import sniff

    wasm = bytes(wasm)
    detected = sniff(wasm)
    if detected.format == "wasm-module":
        os_name, component = OS_MODULE, None
    elif detected.format == "wasm-component":
        os_name, component = OS_COMPONENT, WasmComponent()
    else:
        raise SpecError(f"not a Wasm module or component: {detected}")
    layer = layout.write_blob(
        wasm,
        media_type=MEDIA_TYPE_WASM,
        annotations={ANNOTATION_TITLE: title} if title else None,
    )
    fields: dict[str, Any] = {
        "architecture": WASM_ARCHITECTURE,
        "os": os_name,
        "layer_digests": [layer.digest],
    }
    if created is True:
        fields["created"] = _now_rfc3339()
    elif isinstance(created, str):
        fields["created"] = created
    if component is not None:
        fields["component"] = component
    config = WasmConfig.model_validate(fields)
    config_desc = layout.write_blob(config.to_json(), media_type=MEDIA_TYPE_WASM_CONFIG)
    manifest = Manifest(
        schema_version=2, media_type=MEDIA_TYPE_IMAGE_MANIFEST, config=config_desc, layers=[layer]
    )
    if annotations:
        manifest.annotations = dict(annotations)
    manifest_desc = layout.write_blob(manifest.to_json(), media_type=MEDIA_TYPE_IMAGE_MANIFEST)
    return layout.tag(manifest_desc, ref)


def is_wasm_image(manifest: Manifest, config: ImageConfig | None = None) -> bool:
    """Whether a plain OCI image asks for a Wasm handler (crun's annotations).

    Looks at the manifest's annotations and the image config's labels for
    ``run.oci.handler=wasm`` or ``module.wasm.image/variant=compat`` (or ``compat-smart``).
    """
    marks: dict[str, str] = dict(manifest.annotations or {})
    if config is not None and config.config is not None:
        marks.update(config.config.labels or {})
    handler = marks.get(ANNOTATION_RUN_OCI_HANDLER, "")
    variant = marks.get(ANNOTATION_WASM_VARIANT, "")
    return handler.startswith("wasm") or variant in ("compat", "compat-smart")


def wasm_layers(layout: ImageLayout, ref: str | None = None) -> list[WasmLayer]:
    """The Wasm binaries that ``ref`` holds, in manifest order.

    - A Wasm artifact (config ``application/vnd.wasm.config.v0+json``) or any manifest with
      Wasm layers: its ``application/wasm`` (and legacy Wasm) layers.
    - A plain OCI image marked as Wasm (see :func:`is_wasm_image`): the file named by the
      config's ``Entrypoint`` (or ``Cmd``) found in its tar layers, last layer winning.
    - Anything else: an empty list (not Wasm content).

    Bytes are verified against their digests when read. Raises :class:`SpecError` for a
    missing reference or bad content.
    """
    _, manifest = layout.resolve(ref)
    found = [WasmLayer(layout, d) for d in manifest.layers if is_wasm_layer(d.media_type)]
    if found or manifest.config.media_type in (
        MEDIA_TYPE_WASM_CONFIG,
        MEDIA_TYPE_WASM_CONFIG_V1_LEGACY,
    ):
        return found
    if manifest.config.media_type != MEDIA_TYPE_IMAGE_CONFIG:
        return []
    config = layout.read_json(manifest.config, ImageConfig)
    if not is_wasm_image(manifest, config):
        return []
    run = config.config
    argv = [*(run.entrypoint or []), *(run.cmd or [])] if run is not None else []
    if not argv:
        raise SpecError(f"{layout.path}: {ref}: Wasm image has no Entrypoint or Cmd")
    return [_wasm_from_image(layout, manifest, argv[0], ref)]


def _wasm_from_image(
    layout: ImageLayout, manifest: Manifest, entry: str, ref: str | None
) -> WasmLayer:
    wanted = posixpath.normpath("/" + entry).lstrip("/")
    found: tuple[Descriptor, Digest, int, bytes | None] | None = None
    budget = [MAX_LAYER_SCAN]  # decompressed bytes left to scan, over all layers
    for layer in manifest.layers:
        if not layer.media_type.endswith(_TAR_LAYER_SUFFIXES):
            continue
        if layer.media_type.endswith("zstd"):
            raise SpecError(f"{layout.path}: {ref}: zstd layers are not supported")
        hit = _scan_tar_layer(layout, layer, wanted, budget, _KEEP_INLINE)
        if hit is not None:
            found = (layer, *hit)
    if found is None:
        raise SpecError(f"{layout.path}: {ref}: entrypoint {entry!r} is in no layer")
    layer, digest, size, data = found
    descriptor = Descriptor(media_type=MEDIA_TYPE_WASM, digest=digest, size=size)
    return WasmLayer(
        layout,
        descriptor,
        origin=f"tar:{layer.digest}:/{wanted}",
        data=data,  # a small module is kept; a larger one is streamed again when read
        source=(layer, wanted),
    )


_KEEP_INLINE = 16 << 20  # a Wasm file found in a tar layer is kept in memory up to this size


_MAX_TAR_HEADER = 1 << 20  # a pax or GNU long-name header's own data
_MAX_HEADER_CHAIN = 8  # extended headers before one member
_EXTENDED_HEADERS = frozenset(
    {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, b"X"}
)


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended headers are bounded: tarfile reads a pax or long-name
    header's data whole, and chains them by recursion; a hostile layer would get gigabytes
    read into memory or a ``RecursionError``."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type not in _EXTENDED_HEADERS:
            return super()._proc_member(tar)  # type: ignore[misc,no-any-return]
        if self.size > _MAX_TAR_HEADER:
            raise SpecError(
                f"extended tar header of {self.size} bytes, over the {_MAX_TAR_HEADER}-byte cap"
            )
        depth = getattr(tar, "_wd_chain", 0) + 1
        if depth > _MAX_HEADER_CHAIN:
            raise SpecError(f"more than {_MAX_HEADER_CHAIN} extended tar headers in a row")
        setattr(tar, "_wd_chain", depth)  # noqa: B010 - private state on tarfile's object
        try:
            return super()._proc_member(tar)  # type: ignore[misc,no-any-return]
        finally:
            setattr(tar, "_wd_chain", depth - 1)  # noqa: B010


class _Budget(io.RawIOBase):
    """The decompressed stream of a layer, refusing to go past the scan budget."""

    def __init__(self, inner: IO[bytes], budget: list[int], name: str) -> None:
        super().__init__()
        self._inner = inner
        self._budget = budget
        self._name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._inner.readinto(buffer)  # type: ignore[attr-defined]
        self._budget[0] -= n
        if self._budget[0] < 0:
            raise SpecError(
                f"{self._name}: over {MAX_LAYER_SCAN} decompressed bytes scanned for the "
                "entrypoint (MAX_LAYER_SCAN)"
            )
        return int(n)


def _scan_tar_layer(
    layout: ImageLayout, layer: Descriptor, wanted: str, budget: list[int], keep: int
) -> tuple[Digest, int, bytes | None] | None:
    """Stream through a tar (or tar+gzip) layer for the last regular file named ``wanted``.

    Returns its digest, size and (when it is at most ``keep`` bytes) its bytes, or ``None``.
    Memory stays bounded: the layer is decompressed and read as a stream, a matching member
    over :data:`MAX_WASM_SIZE` is refused from its header, and the whole layer is read to its
    end so its digest is verified before anything found in it is used.
    """
    name = f"{layout.path}: layer {layer.digest}"
    found: tuple[Digest, int, bytes | None] | None = None
    with layout.open_blob(layer) as raw:
        try:
            source: Any = raw
            if layer.media_type.endswith("gzip"):
                source = gzip.GzipFile(fileobj=raw, mode="rb")
            stream: Any = _Budget(source, budget, name)
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar:
                while (member := tar.next()) is not None:
                    # Stream mode still lists every member: keep none (millions of headers).
                    tar.members.clear()  # type: ignore[attr-defined]
                    if posixpath.normpath("/" + member.name).lstrip("/") != wanted:
                        continue
                    if not member.isfile():
                        continue
                    if member.size > MAX_WASM_SIZE:
                        raise SpecError(
                            f"{name}: /{wanted} is {member.size} bytes, over the "
                            f"{MAX_WASM_SIZE}-byte cap for a Wasm file (MAX_WASM_SIZE)"
                        )
                    found = _read_member(tar, member, member.size <= keep)
            while raw.read(_CHUNK):  # the rest of the blob: verifies its size and digest
                pass
        except tarfile.TarError as exc:
            raise SpecError(f"{name}: bad tar: {exc}") from exc
        except (OSError, EOFError, zlib.error) as exc:
            raise SpecError(f"{name}: bad gzip or unreadable layer: {exc}") from exc
        except RecursionError as exc:
            raise SpecError(f"{name}: bad tar: headers nested too deeply") from exc
    return found


def _read_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, keep: bool
) -> tuple[Digest, int, bytes | None]:
    extracted = tar.extractfile(member)
    if extracted is None:  # pragma: no cover - a regular member always has a file object
        raise SpecError(f"cannot read /{member.name}")
    hasher = Digest.of(b"").hasher()
    chunks: list[bytes] = []
    size = 0
    with extracted:
        while chunk := extracted.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            if keep:
                chunks.append(chunk)
    return Digest(f"sha256:{hasher.hexdigest()}"), size, b"".join(chunks) if keep else None


# --- runnable Wasm images --------------------------------------------------------------------

IMAGE_WASM_PATH = "/app.wasm"
"""Where :func:`pack_image` puts the Wasm binary in the image's rootfs unless told otherwise."""

IMAGE_CREATED_BY = "wasidispatch pack --image"
"""The ``created_by`` of the history entry :func:`pack_image` writes for its layer."""

# Go's GOARCH (and GOARM variant) for the machine names Linux reports: what containerd's
# default platform matcher expects an image config to say.
_NODE_ARCH = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "loongarch64": ("loong64", None),
    "mips64": ("mips64", None),
}


def node_platform() -> str:
    """This machine's platform as containerd names it (``linux/amd64``, ``linux/arm/v7``...).

    >>> node_platform().startswith("linux/")
    True
    """
    machine = os.uname().machine
    arch, variant = _NODE_ARCH.get(machine, (machine, None))
    return f"linux/{arch}/{variant}" if variant else f"linux/{arch}"


def _parse_platform(value: str) -> tuple[str, str, str | None]:
    parts = value.split("/")
    if len(parts) not in (2, 3) or not all(parts) or any(c in value for c in "\0\n "):
        raise SpecError(f"platform {value!r}: give it as OS/ARCH or OS/ARCH/VARIANT")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _image_path(value: str, what: str) -> str:
    """``value`` as a path inside the image (``a/b`` for ``/a/b``); :class:`SpecError` for
    ``..``, NUL, an empty name or the root itself."""
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or "\0" in value or not _utf8(value):
        raise SpecError(f"{what} {value!r}: not a file path inside the image")
    return "/".join(parts)


def _layer_tar(out: IO[bytes], files: Mapping[str, tuple[bytes, int]]) -> None:
    """A reproducible tar of ``files`` (path -> bytes, mode) and their parent directories:
    sorted, owner 0:0, mtime 0, PAX headers."""
    dirs = {posixpath.dirname(p) for p in files}
    for d in list(dirs):
        while d:
            dirs.add(d)
            d = posixpath.dirname(d)
    dirs.discard("")
    clash = dirs & files.keys()
    if clash:
        raise SpecError(f"/{min(clash)} is both a file and a directory in the image")
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(dirs | files.keys()):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if name in dirs:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                data, info.mode = files[name]
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _sha256_of(stream: IO[bytes]) -> Digest:
    hasher = Digest.of(b"").hasher()
    stream.seek(0)
    while chunk := stream.read(_CHUNK):
        hasher.update(chunk)
    stream.seek(0)
    return Digest(f"sha256:{hasher.hexdigest()}")


def pack_image(
    layout: ImageLayout,
    wasm: bytes | bytearray | memoryview,
    ref: str,
    *,
    path: str = IMAGE_WASM_PATH,
    files: Mapping[str, bytes | bytearray | memoryview] | None = None,
    platform: str | None = None,
    created: str | bool | None = True,
    annotations: Mapping[str, str] | None = None,
    compress: bool = True,
    variant: str | None = "compat",
) -> Descriptor:
    """Store ``wasm`` as a runnable OCI image tagged ``ref``; returns the manifest descriptor.

    An ordinary image (the form containerd unpacks and CRI runs, unlike the artifact of
    :func:`pack_wasm`): one tar layer (gzip unless ``compress`` is false) holding ``wasm``
    at ``path`` (mode 0755) and ``files`` (image path -> bytes, mode 0644), with their parent
    directories; the config's ``Entrypoint`` is ``[path]``, ``rootfs.diff_ids`` the sha256 of
    the uncompressed tar, one ``history`` entry. ``platform`` (``OS/ARCH[/VARIANT]``) defaults
    to :func:`node_platform`: containerd 1.6 imports, unpacks and runs only images whose
    config matches the node's platform. ``created``: as for :func:`pack_wasm` (``None``: no
    timestamp; tar entries always have mtime 0, so the output is then reproducible).
    ``variant`` sets the manifest annotation ``module.wasm.image/variant`` (crun's mark of a
    Wasm image; ``None`` leaves the image unmarked); ``annotations`` go on the manifest too.
    Raises :class:`SpecError` when ``wasm`` is not Wasm or a path is not inside the image.
    """
    from wasidispatch.detect import sniff

    wasm = bytes(wasm)
    detected = sniff(wasm)
    if detected.format not in ("wasm-module", "wasm-component"):
        raise SpecError(f"not a Wasm module or component: {detected}")
    entry = _image_path(path, "path")
    members: dict[str, tuple[bytes, int]] = {}
    for dest, data in (files or {}).items():
        name = _image_path(dest, "file")
        if name in members or name == entry:
            raise SpecError(f"/{name} is given twice")
        members[name] = (bytes(data), 0o644)
    members[entry] = (wasm, 0o755)
    os_name, arch, arch_variant = _parse_platform(platform or node_platform())
    when = _now_rfc3339() if created is True else created or None

    with tempfile.TemporaryFile() as tar:
        _layer_tar(tar, members)
        diff_id = _sha256_of(tar)
        if compress:
            with tempfile.TemporaryFile() as packed:
                # No file name and mtime 0 in the gzip header: the same tar, the same blob.
                with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0) as gz:
                    shutil.copyfileobj(tar, gz, _CHUNK)
                packed.seek(0)
                layer = layout.write_blob(packed, media_type=MEDIA_TYPE_IMAGE_LAYER_GZIP)
        else:
            layer = layout.write_blob(tar, media_type=MEDIA_TYPE_IMAGE_LAYER)

    history: dict[str, Any] = {"created_by": IMAGE_CREATED_BY, "comment": f"/{entry}"}
    fields: dict[str, Any] = {
        "architecture": arch,
        "os": os_name,
        "config": {"Entrypoint": [f"/{entry}"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [history],
    }
    if arch_variant is not None:
        fields["variant"] = arch_variant
    if when is not None:
        fields["created"] = history["created"] = when
    config = ImageConfig.model_validate(fields)
    config_desc = layout.write_blob(config.to_json(), media_type=MEDIA_TYPE_IMAGE_CONFIG)
    manifest = Manifest(
        schema_version=2, media_type=MEDIA_TYPE_IMAGE_MANIFEST, config=config_desc, layers=[layer]
    )
    marks = {ANNOTATION_WASM_VARIANT: variant} if variant else {}
    marks.update(annotations or {})
    if marks:
        manifest.annotations = marks
    manifest_desc = layout.write_blob(manifest.to_json(), media_type=MEDIA_TYPE_IMAGE_MANIFEST)
    return layout.tag(manifest_desc, ref)
