"""Pull from and push to OCI registries (extra ``registry``).

Install with ``pip install 'wasidispatch[registry]'``.

Built on the maintained ``oras`` client: it parses references, holds the HTTP session and does
registry authentication (``docker login`` credentials, bearer tokens). The manifest bytes are
moved verbatim (never re-serialized), so digests stay the same end to end, and every blob and
manifest is verified against its digest before it becomes visible in a layout.

All failures are :class:`~wasidispatch.errors.RegistryError`: registry unreachable, request
refused, or content that does not match its digest/size or is not a valid OCI document (the
:class:`~wasidispatch.errors.SpecError` is chained). Progress is shown on standard error for
long transfers when it is a terminal.

``plain_http=True`` talks HTTP instead of HTTPS; the default (``None``) does so only for a
loopback registry (``localhost``, ``127.0.0.1``, ``[::1]``), as Docker and containerd do.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from wasidispatch.errors import RegistryError, SpecError
from wasidispatch.oci.image import (
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
    Descriptor,
    Digest,
    Index,
    Manifest,
)
from wasidispatch.oci.layout import MAX_MANIFEST_SIZE, ImageLayout

__all__ = ["pull", "push"]

_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_INDEX_TYPES = (MEDIA_TYPE_IMAGE_INDEX, _DOCKER_LIST)
_ACCEPT = ", ".join(
    [MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_IMAGE_INDEX, _DOCKER_MANIFEST, _DOCKER_LIST]
)
_TIMEOUT = (10.0, 120.0)  # connect, read (seconds)
_PROGRESS_MIN = 4 << 20  # show progress for blobs of 4 MiB and more


def _oras() -> Any:
    try:
        import oras.provider
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RegistryError(
            "registry support needs the 'registry' extra: pip install 'wasidispatch[registry]'"
        ) from exc
    return oras.provider


class _Progress:
    """``pulling sha256:abcd… 12.0/40.0 MiB`` on a terminal, nothing otherwise."""

    def __init__(self, verb: str, digest: str, total: int, enabled: bool | None) -> None:
        if enabled is None:
            enabled = total >= _PROGRESS_MIN and sys.stderr.isatty()
        self.enabled = enabled
        self.label = f"{verb} {digest[:19]}"
        self.total = total
        self.done = 0
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            mib = 1 << 20
            sys.stderr.write(f"\r{self.label} {self.done / mib:.1f}/{self.total / mib:.1f} MiB")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


class _ChunkReader(io.RawIOBase):
    """A binary stream over an iterator of chunks (a streamed HTTP body), counting progress."""

    def __init__(self, chunks: Iterator[bytes], progress: _Progress) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = b""
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._progress.advance(n)
        return n


# distribution/reference grammar: repository path components, tags.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _check_reference(ref: str, container: Any) -> None:
    path = f"{container.namespace}/{container.repository}" if container.namespace else ""
    components = (path or container.repository).split("/")
    if not all(_PATH_COMPONENT.fullmatch(c) for c in components):
        raise RegistryError(f"invalid reference {ref!r}: bad repository name")
    if container.tag and not _TAG.fullmatch(container.tag):
        raise RegistryError(f"invalid reference {ref!r}: bad tag {container.tag!r}")
    if container.digest:
        try:
            Digest.parse(container.digest)
        except SpecError as exc:
            raise RegistryError(f"invalid reference {ref!r}: {exc}") from exc


def _is_loopback(registry: str) -> bool:
    """``localhost[:port]``, ``127.0.0.1[:port]`` or ``[::1][:port]``.

    >>> _is_loopback("127.0.0.1:5000"), _is_loopback("[::1]:80"), _is_loopback("ghcr.io")
    (True, True, False)
    """
    host = registry.split("]")[0] + "]" if registry.startswith("[") else registry.split(":")[0]
    return host in ("localhost", "127.0.0.1", "[::1]")


class _Client:
    """One repository of one registry, through oras's session and auth."""

    def __init__(self, ref: str, plain_http: bool | None) -> None:
        provider = _oras()
        try:
            self.container = provider.Registry().get_container(ref)
        except ValueError as exc:
            raise RegistryError(f"invalid reference {ref!r}: {exc}") from exc
        _check_reference(ref, self.container)
        if plain_http is None:
            plain_http = _is_loopback(str(self.container.registry))
        self.registry = provider.Registry(insecure=plain_http)
        self.ref = ref
        self.prefix = "http" if plain_http else "https"
        # No docker config is fine: anonymous access is tried.
        with contextlib.suppress(Exception):
            self.registry.auth.load_configs(self.container)

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | IO[bytes] | io.RawIOBase | None = None,
        stream: bool = False,
    ) -> Any:
        import requests

        # Not oras's do_request: its retry decorator sleeps minutes on a refused connection and
        # re-sends a consumed body. Auth is still oras's: a 401 is answered once.
        sent = dict(headers or {})
        auth = self.registry.auth
        if getattr(auth, "token", None):
            sent.update(auth.get_auth_header())
        try:
            response = self.registry.session.request(
                method, url, headers=sent, data=data, stream=stream, timeout=_TIMEOUT
            )
            if response.status_code == 401 and not hasattr(data, "read"):
                sent, changed = auth.authenticate_request(response, sent)
                if changed:
                    response = self.registry.session.request(
                        method, url, headers=sent, data=data, stream=stream, timeout=_TIMEOUT
                    )
        except requests.RequestException as exc:
            raise RegistryError(f"{self.ref}: {method} {url}: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "AuthenticationException":
                raise RegistryError(f"{self.ref}: authentication failed: {exc}") from exc
            raise
        return response

    def check(self, response: Any, what: str, ok: tuple[int, ...] = (200,)) -> None:
        if response.status_code in ok:
            return
        detail = ""
        try:
            errors = response.json().get("errors", [])
            detail = "; ".join(str(e.get("message", e)) for e in errors if isinstance(e, dict))
        except Exception:
            detail = (response.text or "")[:200]
        raise RegistryError(
            f"{self.ref}: {what}: HTTP {response.status_code} {response.reason}"
            + (f": {detail}" if detail else "")
        )

    def url(self, kind: str, reference: str) -> str:
        c = self.container
        return f"{self.prefix}://{c.registry}/v2/{c.api_prefix}/{kind}/{reference}"


# --- pull --------------------------------------------------------------------------------------


def pull(
    ref: str,
    layout_dir: str | os.PathLike[str],
    *,
    tag: str | None = None,
    plain_http: bool | None = None,
    progress: bool | None = None,
) -> Descriptor:
    """Copy ``ref`` (``host[:port]/repo:tag`` or ``...@sha256:...``) into an image layout.

    The layout is created when missing. The manifest (or index, with every manifest it lists)
    and all blobs are verified against their digests and sizes; the top descriptor is tagged
    ``tag`` (default: the reference's tag) and returned. ``progress``: ``None`` shows progress
    for large blobs when standard error is a terminal.
    """
    client = _Client(ref, plain_http)
    layout = ImageLayout.create(layout_dir)
    reference = client.container.digest or client.container.tag
    try:
        top = _pull_manifest(client, layout, reference, progress)
        return layout.tag(top, tag or client.container.tag)
    except SpecError as exc:
        raise RegistryError(f"{ref}: bad content from the registry: {exc}") from exc


def _pull_manifest(
    client: _Client, layout: ImageLayout, reference: str, progress: bool | None
) -> Descriptor:
    response = client.request(
        "GET", client.url("manifests", reference), headers={"Accept": _ACCEPT}, stream=True
    )
    client.check(response, f"manifest {reference}")
    body = response.raw.read(MAX_MANIFEST_SIZE + 1, decode_content=True)
    response.close()
    if len(body) > MAX_MANIFEST_SIZE:
        raise SpecError(f"manifest {reference} is over the {MAX_MANIFEST_SIZE}-byte cap")
    digest = Digest.of(body)
    claimed = [reference] if reference.startswith("sha") and ":" in reference else []
    if response.headers.get("Docker-Content-Digest"):
        claimed.append(response.headers["Docker-Content-Digest"])
    for want in claimed:
        if Digest.parse(want).algorithm == "sha256" and want != digest:
            raise SpecError(f"manifest digest mismatch: expected {want}, content is {digest}")
    media_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
    probe: dict[str, Any] = {}
    try:
        import json

        probe = json.loads(body)
    except ValueError:
        pass
    media_type = str(probe.get("mediaType") or media_type or MEDIA_TYPE_IMAGE_MANIFEST)
    if media_type in _INDEX_TYPES or "manifests" in probe:
        index = Index.parse(body, source=f"{client.ref} index")
        for child in index.manifests:
            _pull_manifest(client, layout, child.digest, progress)
    else:
        manifest = Manifest.parse(body, source=f"{client.ref} manifest")
        for blob in [manifest.config, *manifest.layers]:
            _pull_blob(client, layout, blob, progress)
    return layout.write_blob(body, media_type=media_type, expected=digest, size=len(body))


def _pull_blob(
    client: _Client, layout: ImageLayout, blob: Descriptor, progress: bool | None
) -> None:
    if blob.data is not None and not layout.has_blob(blob.digest):
        layout.write_blob(blob.decoded_data() or b"", expected=blob.digest, size=blob.size)
        return
    if layout.has_blob(blob.digest):
        return
    response = client.request("GET", client.url("blobs", blob.digest), stream=True)
    client.check(response, f"blob {blob.digest}")
    meter = _Progress("pulling", blob.digest, blob.size, progress)
    try:
        reader = _ChunkReader(response.iter_content(chunk_size=1 << 20), meter)
        layout.write_blob(reader, expected=blob.digest, size=blob.size)
    finally:
        response.close()


# --- push --------------------------------------------------------------------------------------


def push(
    layout_dir: str | os.PathLike[str],
    tag: str | None,
    ref: str,
    *,
    plain_http: bool | None = None,
    progress: bool | None = None,
) -> Descriptor:
    """Push the manifest tagged ``tag`` in a layout (and everything it references) to ``ref``.

    ``tag`` may be ``None`` when the layout holds exactly one reference. Blobs the registry
    already has are skipped. Every blob is verified as it is read from the layout; the
    registry's ``Docker-Content-Digest`` for the manifest must equal the layout's. Returns the
    pushed manifest descriptor.
    """
    try:
        layout = ImageLayout.open(layout_dir)
        top = _tagged(layout, tag)
    except SpecError as exc:
        raise RegistryError(f"cannot push {layout_dir}: {exc}") from exc
    client = _Client(ref, plain_http)
    target = client.container.tag
    try:
        _push_manifest(client, layout, top, target, progress)
    except SpecError as exc:
        raise RegistryError(f"cannot push {layout_dir}: {exc}") from exc
    return top


def _tagged(layout: ImageLayout, tag: str | None) -> Descriptor:
    manifests = layout.index().manifests
    found = manifests if tag is None else [d for d in manifests if d.ref_name == tag]
    if len(found) != 1:
        refs = ", ".join(layout.refs()) or "none"
        raise SpecError(f"{layout.path}: no single manifest for {tag!r} (refs: {refs})")
    return found[0]


def _push_manifest(
    client: _Client,
    layout: ImageLayout,
    desc: Descriptor,
    reference: str,
    progress: bool | None,
) -> None:
    body = layout.read_blob(desc, max_size=MAX_MANIFEST_SIZE)
    if desc.media_type in _INDEX_TYPES:
        index = Index.parse(body, source=str(layout.blob_path(desc.digest)))
        for child in index.manifests:
            _push_manifest(client, layout, child, child.digest, progress)
    else:
        manifest = Manifest.parse(body, source=str(layout.blob_path(desc.digest)))
        for blob in [manifest.config, *manifest.layers]:
            _push_blob(client, layout, blob, progress)
    response = client.request(
        "PUT",
        client.url("manifests", reference),
        headers={"Content-Type": desc.media_type},
        data=body,
    )
    client.check(response, f"manifest upload {reference}", ok=(200, 201))
    echoed = response.headers.get("Docker-Content-Digest")
    if echoed and echoed != desc.digest:
        raise RegistryError(
            f"{client.ref}: registry stored the manifest as {echoed}, expected {desc.digest}"
        )


def _push_blob(
    client: _Client, layout: ImageLayout, blob: Descriptor, progress: bool | None
) -> None:
    head = client.request("HEAD", client.url("blobs", blob.digest))
    if head.status_code == 200:
        return
    start = client.request(
        "POST",
        client.url("blobs", "uploads/"),
        headers={"Content-Length": "0"},
    )
    client.check(start, f"blob upload {blob.digest}", ok=(202,))
    location = start.headers.get("Location", "")
    if not location:
        raise RegistryError(f"{client.ref}: registry gave no upload location")
    if not location.startswith("http"):
        location = f"{client.prefix}://{client.container.registry}{location}"
    separator = "&" if "?" in location else "?"
    meter = _Progress("pushing", blob.digest, blob.size, progress)
    with layout.open_blob(blob) as reader:
        body = _CountingReader(reader, blob.size, meter)
        response = client.request(
            "PUT",
            f"{location}{separator}digest={blob.digest}",
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(blob.size),
            },
            data=body,
        )
    client.check(response, f"blob upload {blob.digest}", ok=(201,))


class _CountingReader(io.RawIOBase):
    """The upload body: a verified blob reader with a length (so requests sends
    ``Content-Length`` rather than chunked encoding) that reports progress."""

    def __init__(self, inner: io.RawIOBase, size: int, progress: _Progress) -> None:
        super().__init__()
        self._inner = inner
        self._size = size
        self._progress = progress
        self._sent = 0

    def __len__(self) -> int:
        return self._size

    def tell(self) -> int:
        # requests sizes a body as len() - tell(); RawIOBase.tell() would raise.
        return self._sent

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._inner.readinto(buffer) or 0
        self._sent += n
        self._progress.advance(n)
        return n
