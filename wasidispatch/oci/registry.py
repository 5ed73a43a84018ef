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

Bounds of a pull: one overall deadline (``timeout``, default :data:`PULL_TIMEOUT`, 10 minutes;
not per read: a server trickling a byte a second is cut off when it expires, its sockets shut
down), every manifest fetched once however often indexes list it, indexes nested at most
:data:`MAX_INDEX_DEPTH` deep and at most :data:`MAX_PULL_MANIFESTS` distinct manifests per
pull. Everything is downloaded into a scratch directory inside the layout and moved in only
when all of it is verified: a failed pull leaves no blob, no temporary file and, when it
created the layout directory, no directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import sys
import threading
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

__all__ = ["MAX_INDEX_DEPTH", "MAX_PULL_MANIFESTS", "PULL_TIMEOUT", "pull", "push"]

PULL_TIMEOUT = 600.0
"""The default overall deadline of a :func:`pull`, in seconds (10 minutes)."""

MAX_INDEX_DEPTH = 4
"""Indexes nested deeper than this (an index of indexes of ...) are refused."""

MAX_PULL_MANIFESTS = 256
"""A pull fetching more distinct manifests and indexes than this is refused."""

_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_INDEX_TYPES = (MEDIA_TYPE_IMAGE_INDEX, _DOCKER_LIST)
_ACCEPT = ", ".join(
    [MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_IMAGE_INDEX, _DOCKER_MANIFEST, _DOCKER_LIST]
)
_TIMEOUT = (10.0, 120.0)  # connect, read (seconds): per request, within any deadline
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


class _Deadline:
    """One deadline for everything a pull does on the network.

    Per-read timeouts cannot bound a transfer (a byte a second resets them), so every socket
    the session opens is registered here and a timer thread shuts them all down when the
    deadline passes: a read blocked in the kernel returns at once. ``check`` raises the
    :class:`RegistryError` once expired.
    """

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join()
        with self._lock:
            self._sockets.clear()

    def register(self, sock: Any) -> None:
        """Shut ``sock`` down when the deadline passes (at once if it already has)."""
        with self._lock:
            self._sockets = [s for s in self._sockets if s.fileno() != -1]
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def remaining(self) -> float:
        """Seconds left (``check`` first: never negative)."""
        self.check()
        return max(0.001, self.at - time.monotonic())

    def check(self) -> None:
        """:class:`RegistryError` when the deadline has passed."""
        if self.expired or time.monotonic() >= self.at:
            self.expired = True
            raise RegistryError(
                f"{self.what}: did not finish within the {self.seconds:g} s deadline"
            )


def _shutdown(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _bind_deadline(session: Any, deadline: _Deadline) -> None:
    """Mount adapters on ``session`` whose connections register their sockets with
    ``deadline`` (the raw TCP socket at once, the TLS one when the handshake is done)."""
    import requests.adapters
    import urllib3.connection
    import urllib3.connectionpool

    class _Registered:
        def _new_conn(self) -> Any:
            sock = super()._new_conn()  # type: ignore[misc]
            deadline.register(sock)
            return sock

        def connect(self) -> None:
            super().connect()  # type: ignore[misc]
            deadline.register(self.sock)  # type: ignore[attr-defined]

    class _HTTP(_Registered, urllib3.connection.HTTPConnection):
        pass

    class _HTTPS(_Registered, urllib3.connection.HTTPSConnection):
        pass

    class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
        ConnectionCls = _HTTP

    class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
        ConnectionCls = _HTTPS

    class _Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    adapter = _Adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)


class _Client:
    """One repository of one registry, through oras's session and auth."""

    deadline: _Deadline | None = None

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
                method, url, headers=sent, data=data, stream=stream, timeout=self._timeout()
            )
            if response.status_code == 401 and not hasattr(data, "read"):
                sent, changed = auth.authenticate_request(response, sent)
                if changed:
                    response = self.registry.session.request(
                        method,
                        url,
                        headers=sent,
                        data=data,
                        stream=stream,
                        timeout=self._timeout(),
                    )
        except requests.RequestException as exc:
            self.check_deadline(exc)
            raise RegistryError(f"{self.ref}: {method} {url}: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "AuthenticationException":
                raise RegistryError(f"{self.ref}: authentication failed: {exc}") from exc
            raise
        return response

    def _timeout(self) -> tuple[float, float]:
        if self.deadline is None:
            return _TIMEOUT
        left = self.deadline.remaining()
        return (min(_TIMEOUT[0], left), min(_TIMEOUT[1], left))

    def check_deadline(self, cause: BaseException | None = None) -> None:
        """Raise the deadline's :class:`RegistryError` (chaining ``cause``) once it passed."""
        if self.deadline is not None:
            try:
                self.deadline.check()
            except RegistryError as exc:
                raise exc from cause

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
    timeout: float | None = PULL_TIMEOUT,
) -> Descriptor:
    """Copy ``ref`` (``host[:port]/repo:tag`` or ``...@sha256:...``) into an image layout.

    The layout is created when missing. The manifest (or index, with every manifest it lists)
    and all blobs are verified against their digests and sizes; the top descriptor is tagged
    ``tag`` (default: the reference's tag) and returned. ``progress``: ``None`` shows progress
    for large blobs when standard error is a terminal. ``timeout``: the deadline of the whole
    pull in seconds (``None``: none; each request still has its own timeouts).

    Raises :class:`RegistryError`; a failed pull leaves the layout as it was (and removes it
    when the pull created it).
    """
    if timeout is not None and not (timeout > 0 and timeout < float("inf")):
        raise RegistryError(f"pull timeout must be a positive number of seconds, not {timeout}")
    if not os.fspath(layout_dir):
        raise RegistryError(f"pull {ref}: name the layout directory")
    client = _Client(ref, plain_http)
    created = not os.path.lexists(layout_dir)
    try:
        layout = ImageLayout.create(layout_dir)
        deadline = _Deadline(timeout, f"pull {ref}") if timeout is not None else None
        with contextlib.ExitStack() as stack:
            if deadline is not None:
                stack.enter_context(deadline)
                client.deadline = deadline
                _bind_deadline(client.registry.session, deadline)
            stage = stack.enter_context(layout.staged())
            walk = _Walk(client, layout, stage, progress)
            reference = client.container.digest or client.container.tag
            top = walk.manifest(reference, depth=0)
        # Every blob is now in the layout, verified; only the tag is left to write.
        return layout.tag(top, tag or client.container.tag)
    except BaseException as exc:
        if created:  # a failed pull leaves no layout it made
            shutil.rmtree(layout_dir, ignore_errors=True)
        if isinstance(exc, RegistryError):
            raise
        if isinstance(exc, SpecError):
            client.check_deadline(exc)
            raise RegistryError(f"{ref}: bad content from the registry: {exc}") from exc
        if _is_requests_error(exc):
            client.check_deadline(exc)
            raise RegistryError(f"{ref}: transfer failed: {exc}") from exc
        raise


def _is_requests_error(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, requests.RequestException)


class _Walk:
    """One pull's walk: each manifest and blob fetched at most once, bounded depth and count."""

    def __init__(
        self, client: _Client, layout: ImageLayout, stage: ImageLayout, progress: bool | None
    ) -> None:
        self.client = client
        self.layout = layout
        self.stage = stage
        self.progress = progress
        self.manifests: dict[str, Descriptor] = {}  # digest or tag -> descriptor written
        self.blobs: set[str] = set()

    def manifest(self, reference: str, depth: int) -> Descriptor:
        done = self.manifests.get(reference)
        if done is not None:
            return done
        if len(self.manifests) >= MAX_PULL_MANIFESTS:
            raise SpecError(f"more than {MAX_PULL_MANIFESTS} manifests (MAX_PULL_MANIFESTS)")
        client = self.client
        response = client.request(
            "GET", client.url("manifests", reference), headers={"Accept": _ACCEPT}, stream=True
        )
        try:
            client.check(response, f"manifest {reference}")
            body = response.raw.read(MAX_MANIFEST_SIZE + 1, decode_content=True)
        finally:
            response.close()
        client.check_deadline()
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
        probe: Any = {}
        try:
            import json

            probe = json.loads(body)
        except (ValueError, RecursionError):
            pass  # the model's parse below says what is wrong
        if not isinstance(probe, dict):
            probe = {}
        media_type = str(probe.get("mediaType") or media_type or MEDIA_TYPE_IMAGE_MANIFEST)
        if media_type in _INDEX_TYPES or "manifests" in probe:
            if depth >= MAX_INDEX_DEPTH:
                raise SpecError(
                    f"indexes nested more than {MAX_INDEX_DEPTH} deep (MAX_INDEX_DEPTH)"
                )
            index = Index.parse(body, source=f"{client.ref} index")
            children = list(dict.fromkeys(child.digest for child in index.manifests))
            if len(children) + len(self.manifests) > MAX_PULL_MANIFESTS:
                raise SpecError(
                    f"index {digest} lists {len(children)} distinct manifests, over the "
                    f"{MAX_PULL_MANIFESTS} a pull takes (MAX_PULL_MANIFESTS)"
                )
            for child in children:
                self.manifest(child, depth + 1)
        else:
            manifest = Manifest.parse(body, source=f"{client.ref} manifest")
            for blob in [manifest.config, *manifest.layers]:
                self.blob(blob)
        desc = self.stage.write_blob(body, media_type=media_type, expected=digest, size=len(body))
        self.manifests[reference] = self.manifests[str(digest)] = desc
        return desc

    def blob(self, blob: Descriptor) -> None:
        if blob.digest in self.blobs:
            return
        self.blobs.add(blob.digest)
        if self.layout.has_blob(blob.digest) or self.stage.has_blob(blob.digest):
            return
        if blob.data is not None:
            self.stage.write_blob(blob.decoded_data() or b"", expected=blob.digest, size=blob.size)
            return
        client = self.client
        response = client.request("GET", client.url("blobs", blob.digest), stream=True)
        try:
            client.check(response, f"blob {blob.digest}")
            meter = _Progress("pulling", blob.digest, blob.size, self.progress)
            reader = _ChunkReader(response.iter_content(chunk_size=1 << 16), meter)
            self.stage.write_blob(reader, expected=blob.digest, size=blob.size)
        finally:
            response.close()
        client.check_deadline()


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
        _push_manifest(client, layout, top, target, progress, seen=set(), depth=0)
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
    *,
    seen: set[str],
    depth: int,
) -> None:
    # Each manifest and blob is pushed once however often indexes list it; depth is bounded.
    body = layout.read_blob(desc, max_size=MAX_MANIFEST_SIZE)
    if desc.media_type in _INDEX_TYPES:
        if depth >= MAX_INDEX_DEPTH:
            raise SpecError(f"indexes nested more than {MAX_INDEX_DEPTH} deep (MAX_INDEX_DEPTH)")
        index = Index.parse(body, source=str(layout.blob_path(desc.digest)))
        for child in index.manifests:
            if child.digest not in seen:
                seen.add(child.digest)
                _push_manifest(
                    client, layout, child, child.digest, progress, seen=seen, depth=depth + 1
                )
    else:
        manifest = Manifest.parse(body, source=str(layout.blob_path(desc.digest)))
        for blob in [manifest.config, *manifest.layers]:
            if blob.digest not in seen:
                seen.add(blob.digest)
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
