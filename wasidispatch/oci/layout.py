"""OCI image layouts on disk: ``oci-layout``, ``index.json`` and ``blobs/<alg>/<encoded>``.

:class:`ImageLayout` opens or creates a layout, writes blobs atomically (a temporary file in
the blob's own directory, fsync, rename, fsync of the directory: an interrupted write leaves no
visible blob), reads blobs as streams whose size and digest are verified, resolves a reference
by its ``org.opencontainers.image.ref.name`` annotation and tags descriptors. Blob paths are
only ever built from validated :class:`~wasidispatch.oci.image.Digest` values.

:func:`pack_wasm` turns ``.wasm`` bytes into a Wasm OCI artifact (CNCF TAG Runtime layout)
inside a layout, and :func:`wasm_layers` gives an executor the Wasm binaries a reference
holds: the ``application/wasm`` layers of an artifact, or, for a plain OCI image marked with
``run.oci.handler``/``module.wasm.image/variant``, the entrypoint file found in its rootfs
tar layers.

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
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

from wasidispatch.errors import SpecError
from wasidispatch.oci._base import OCIModel
from wasidispatch.oci.image import (
    ANNOTATION_REF_NAME,
    ANNOTATION_TITLE,
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_INDEX,
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
    "MAX_MANIFEST_SIZE",
    "BlobReader",
    "ImageLayout",
    "WasmLayer",
    "pack_wasm",
    "wasm_layers",
]

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
"""Manifests, indexes and configs larger than this are refused (registries use 4 MiB)."""

_CHUNK = 1 << 20
_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_INDEX_TYPES = frozenset({MEDIA_TYPE_IMAGE_INDEX, _DOCKER_MANIFEST_LIST})
_TAR_LAYER_SUFFIXES = ("tar", "tar+gzip", "tar.gzip", "tar+zstd")

_M = TypeVar("_M", bound=OCIModel)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="-" + path.name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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
    """

    __slots__ = ("_data", "_layout", "descriptor", "digest", "media_type", "origin", "size")

    def __init__(
        self,
        layout: ImageLayout,
        descriptor: Descriptor,
        *,
        origin: str = "layer",
        data: bytes | None = None,
    ) -> None:
        self._layout = layout
        self._data = data
        self.descriptor = descriptor
        self.digest: Digest = descriptor.digest
        self.media_type: str = descriptor.media_type
        self.size: int = descriptor.size
        self.origin = origin

    def read_bytes(self) -> bytes:
        """The Wasm bytes, read from the layout and verified against ``digest``."""
        if self._data is not None:
            return self._data
        return self._layout.read_blob(self.descriptor)

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
            (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpecError(f"{root}: cannot create image layout: {exc.strerror}") from exc
        layout = cls(root)
        if not (root / "oci-layout").exists():
            _atomic_write(root / "oci-layout", LayoutHeader(image_layout_version="1.0.0").to_json())
        if not (root / "index.json").exists():
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
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise SpecError(f"{path}: missing") from None
        except OSError as exc:
            raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
        if len(data) > limit:
            raise SpecError(f"{path}: larger than the {limit}-byte cap")
        return data

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
        fd = os.open(self.path / "oci-layout", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def tag(self, descriptor: Descriptor, ref: str) -> Descriptor:
        """Point ``ref`` at ``descriptor`` in ``index.json`` (replacing an older ``ref``).

        The blob must already be in the layout. Returns the descriptor as written (with the
        ``org.opencontainers.image.ref.name`` annotation).
        """
        if not ref or any(c in ref for c in "\0\n"):
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

    # --- blobs -------------------------------------------------------------------------

    def blob_path(self, digest: Digest | str) -> Path:
        """Where the blob with ``digest`` lives (the digest is validated first)."""
        d = digest if isinstance(digest, Digest) else Digest.parse(digest)
        return self.path / "blobs" / d.algorithm / d.encoded

    def has_blob(self, digest: Digest | str) -> bool:
        """Whether the blob file exists (its content is not checked)."""
        return self.blob_path(digest).is_file()

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

        The bytes go to a temporary file next to the final path, are fsynced, then renamed; a
        failure or interruption leaves no visible blob. With ``expected`` (and ``size``),
        content whose digest (or length) differs raises :class:`SpecError`; nothing is stored.
        """
        want = None if expected is None else Digest.parse(str(expected))
        algorithm = want.algorithm if want is not None else algorithm
        hasher = Digest.of(b"", algorithm).hasher()  # validates the algorithm
        directory = self.path / "blobs" / algorithm
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(content, bytes | bytearray | memoryview):
                    out.write(content)
                    hasher.update(content)
                    written = len(content)
                else:
                    while chunk := content.read(_CHUNK):
                        out.write(chunk)
                        hasher.update(chunk)
                        written += len(chunk)
                        if size is not None and written > size:
                            raise SpecError(f"blob is larger than the expected {size} bytes")
                out.flush()
                os.fsync(out.fileno())
            digest = Digest(f"{algorithm}:{hasher.hexdigest()}")
            if size is not None and written != size:
                raise SpecError(f"blob size mismatch: expected {size} bytes, got {written}")
            if want is not None and digest != want:
                raise SpecError(f"blob digest mismatch: expected {want}, content is {digest}")
            final = self.blob_path(digest)
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)
        descriptor = Descriptor(media_type=media_type, digest=digest, size=written)
        if annotations:
            descriptor.annotations = dict(annotations)
        return descriptor

    def open_blob(self, descriptor: Descriptor) -> BlobReader:
        """A :class:`BlobReader` over the blob: size and digest verified while reading.

        A descriptor with embedded ``data`` is served from it when the blob file is absent.
        """
        path = self.blob_path(descriptor.digest)
        name = f"{path}"
        try:
            raw: IO[bytes] = open(path, "rb")  # noqa: SIM115 - owned by the BlobReader
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
    found: tuple[Descriptor, bytes] | None = None
    for layer in manifest.layers:
        if not layer.media_type.endswith(_TAR_LAYER_SUFFIXES):
            continue
        if layer.media_type.endswith("zstd"):
            raise SpecError(f"{layout.path}: {ref}: zstd layers are not supported")
        data = layout.read_blob(layer)
        if layer.media_type.endswith("gzip"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise SpecError(f"{layout.path}: layer {layer.digest}: bad gzip: {exc}") from exc
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    name = posixpath.normpath("/" + member.name).lstrip("/")
                    if name == wanted and member.isfile():
                        extracted = tar.extractfile(member)
                        if extracted is not None:
                            found = (layer, extracted.read())
        except tarfile.TarError as exc:
            raise SpecError(f"{layout.path}: layer {layer.digest}: bad tar: {exc}") from exc
    if found is None:
        raise SpecError(f"{layout.path}: {ref}: entrypoint {entry!r} is in no layer")
    layer, wasm = found
    descriptor = Descriptor(media_type=MEDIA_TYPE_WASM, digest=Digest.of(wasm), size=len(wasm))
    return WasmLayer(layout, descriptor, origin=f"tar:{layer.digest}:/{wanted}", data=wasm)
