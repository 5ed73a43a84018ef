"""A mutating admission webhook: Pods with a Wasm image get the Wasm RuntimeClass.

Kubernetes sends an ``AdmissionReview`` (``admission.k8s.io/v1``) for each Pod, or for the
pod template of a Deployment, ReplicaSet, StatefulSet, DaemonSet, Job, CronJob,
ReplicationController or PodTemplate. When any of its containers or init containers
(ephemeral containers are ignored) has an image that `wasidispatch.classify` calls ``wasm``,
the answer allows the object with a JSON patch adding ``runtimeClassName`` to its pod spec.
An object that already names a RuntimeClass is left alone, and so is anything else.

The logic is apart from the server: `parse_review` reads a request body (raising
`SpecError`, which the server answers with HTTP 400), `Admission.decide` classifies the
images (in threads, cached per image, all within one deadline) and returns an `Outcome`,
whose `Outcome.review` is the answer. `WebhookServer` and `serve` put it on HTTPS with
aiohttp (``pip install 'wasidispatch[webhook]'``; imported only there), `TlsFiles` a
certificate that follows its renewals.

Example::

    >>> review = parse_review(json.dumps({
    ...     "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
    ...     "request": {"uid": "u1", "operation": "CREATE",
    ...                 "kind": {"group": "", "version": "v1", "kind": "Pod"},
    ...                 "object": {"spec": {"containers": [{"image": "app:1"}]}}},
    ... }).encode(), "application/json")
    >>> review.spec_path, review.images
    (('spec',), ('app:1',))
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import logging
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from wasidispatch.errors import SpecError, WasiDispatchError

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "API_VERSION",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_TIMEOUT",
    "HEALTH_PATH",
    "MAX_REVIEW_BYTES",
    "MUTATE_PATH",
    "POD_SPEC_PATHS",
    "RELOAD_INTERVAL",
    "Admission",
    "Classifier",
    "Decision",
    "ImageVerdict",
    "Outcome",
    "Review",
    "TlsFiles",
    "WebhookServer",
    "make_app",
    "normalize_image",
    "parse_review",
    "registry_host",
    "serve",
    "tls_context",
]

log = logging.getLogger("wasidispatch.webhook")

API_VERSION = "admission.k8s.io/v1"
#: Where the server takes reviews (the webhook configuration's ``service.path``).
MUTATE_PATH = "/mutate"
#: ``GET`` answers ``ok``: for the Deployment's probes.
HEALTH_PATH = "/healthz"
#: A review holds the object (and, for an UPDATE, the old one): the apiserver caps a request
#: at 3 MiB and etcd an object at 1.5 MiB, so twice the request cap is room enough.
MAX_REVIEW_BYTES = 6 << 20
#: The deadline of one review, seconds: below the apiserver's default ``timeoutSeconds`` (10).
DEFAULT_TIMEOUT = 8.0
#: How long a decision for an image named by tag is reused; one pinned by digest is kept.
DEFAULT_CACHE_TTL = 300.0
DEFAULT_CACHE_SIZE = 4096
#: The apiserver sends the body at once; a peer that dribbles it is not the apiserver.
_BODY_TIMEOUT = 10.0
#: The apiserver cuts a warning at 256 characters (and logs that it did).
_WARNING_LIMIT = 256

_TEMPLATE = ("spec", "template", "spec")
#: (API group, kind) -> the path of the pod spec in the object.
POD_SPEC_PATHS: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): ("spec",),
    ("", "PodTemplate"): ("template", "spec"),
    ("", "ReplicationController"): _TEMPLATE,
    ("apps", "Deployment"): _TEMPLATE,
    ("apps", "ReplicaSet"): _TEMPLATE,
    ("apps", "StatefulSet"): _TEMPLATE,
    ("apps", "DaemonSet"): _TEMPLATE,
    ("batch", "Job"): _TEMPLATE,
    ("batch", "CronJob"): ("spec", "jobTemplate", "spec", "template", "spec"),
}
#: A Pod's ``runtimeClassName`` and a Job's template cannot change after creation: an UPDATE
#: patched there would be refused by validation.
_CREATE_ONLY = frozenset({("", "Pod"), ("batch", "Job")})
#: A RuntimeClass's name is a DNS subdomain (RFC 1123).
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
#: Image references, as containerd (distribution's reference grammar) reads them.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.?)+(?::[0-9]+)?|\[[0-9a-fA-F:.]+\](?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")


class Decision(Protocol):
    """What the webhook reads of `wasidispatch.classify.ImageDecision`."""

    @property
    def kind(self) -> str: ...

    @property
    def evidence(self) -> tuple[str, ...]: ...

    @property
    def digest(self) -> str: ...


#: ``(normalized reference, timeout in seconds) -> Decision``; raises on failure.
Classifier = Callable[[str, float], Decision]


def normalize_image(image: str) -> str:
    """The reference containerd pulls for a container's ``image``: the registry made explicit
    (``docker.io``, with ``library/`` for an official image), ``:latest`` when there is neither
    tag nor digest, and only the digest when there are both. Raises `SpecError` for a
    reference containerd would not parse.

    Example::

        >>> normalize_image("busybox")
        'docker.io/library/busybox:latest'
        >>> normalize_image("127.0.0.1:5000/wasm/app:1")
        '127.0.0.1:5000/wasm/app:1'
        >>> normalize_image("ghcr.io/o/app:v2@sha256:" + "a" * 64)[:32]
        'ghcr.io/o/app@sha256:aaaaaaaaaaa'
    """
    name, at, digest = image.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise SpecError(f"image {image!r}: not a digest after '@'")
    tag = ""
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise SpecError(f"image {image!r}: not a tag: {tag!r}")
    first, sep, rest = name.partition("/")
    is_domain = "." in first or ":" in first or first == "localhost" or first != first.lower()
    domain, path = (first, rest) if sep and is_domain else ("docker.io", name)
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path:
        path = f"library/{path}"
    if not _DOMAIN.fullmatch(domain) or not _PATH.fullmatch(path):
        raise SpecError(f"image {image!r}: not an image reference")
    if at:
        return f"{domain}/{path}@{digest}"
    return f"{domain}/{path}:{tag or 'latest'}"


def registry_host(reference: str) -> str:
    """The registry (``host[:port]``) of a normalized reference.

    >>> registry_host("127.0.0.1:5000/wasm/app:1")
    '127.0.0.1:5000'
    """
    return reference.split("/", 1)[0]


# --- the request -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Review:
    """What the webhook reads of one ``AdmissionReview`` request.

    ``spec_path`` is the path of the pod spec in the object (see `POD_SPEC_PATHS`), ``None``
    for an object without one, an operation other than CREATE or UPDATE, or a subresource.
    ``images`` are those of ``containers`` and ``initContainers``, in order, each once.
    ``runtime_class`` is the pod spec's ``runtimeClassName`` when it names one. ``skipped``
    says why there is no ``spec_path`` (a DELETE, a subresource, an UPDATE of a Pod or Job, a
    workload that another controls).
    """

    uid: str
    operation: str
    group: str
    kind: str
    namespace: str
    name: str
    sub_resource: str = ""
    spec_path: tuple[str, ...] | None = None
    runtime_class: str | None = None
    images: tuple[str, ...] = ()
    skipped: str = ""

    @property
    def subject(self) -> str:
        """``OPERATION Kind namespace/name`` for log lines."""
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        sub = f"/{self.sub_resource}" if self.sub_resource else ""
        return f"{self.operation} {self.kind}{sub} {where}"


_JSON_NAMES: Mapping[type, str] = {dict: "an object", list: "an array", str: "a string"}


def _field(doc: Mapping[str, Any], key: str, kind: type, where: str, required: bool) -> Any:
    value = doc.get(key)
    if value is None:
        if required:
            raise SpecError(f"{where}.{key} is missing")
        return None
    if not isinstance(value, kind):
        raise SpecError(f"{where}.{key}: expected {_JSON_NAMES[kind]}")
    return value


def _controller(meta: Mapping[str, Any]) -> str:
    """``Kind/name`` of the object's controller (its ``ownerReferences``), or ``""``."""
    owners = _field(meta, "ownerReferences", list, "request.object.metadata", False) or []
    for owner in owners:
        if isinstance(owner, dict) and owner.get("controller") is True:
            return f"{owner.get('kind')}/{owner.get('name')}"
    return ""


def parse_review(
    body: bytes, content_type: str | None, *, max_bytes: int = MAX_REVIEW_BYTES
) -> Review:
    """Read an ``AdmissionReview`` v1 request body sent as ``content_type``.

    Raises `SpecError`, saying what is wrong, for a body over ``max_bytes``, a content type
    other than ``application/json``, a body that is not JSON, not an ``admission.k8s.io/v1``
    ``AdmissionReview``, without ``request.uid``, or with a malformed pod spec.
    """
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime != "application/json":
        raise SpecError(f"content type {content_type or '(none)'!r}: expected application/json")
    if len(body) > max_bytes:
        raise SpecError(f"body of {len(body)} bytes: over the limit of {max_bytes}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise SpecError(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SpecError("body is not a JSON object")
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if kind != "AdmissionReview" or api != API_VERSION:
        raise SpecError(
            f"expected an AdmissionReview of {API_VERSION}, got kind {kind!r} of {api!r} "
            "(set admissionReviewVersions: [v1] in the webhook configuration)"
        )
    request = _field(doc, "request", dict, "AdmissionReview", True)
    uid = _field(request, "uid", str, "request", True)
    if not uid:
        raise SpecError("request.uid is empty")
    operation = _field(request, "operation", str, "request", True)
    gvk = _field(request, "kind", dict, "request", True)
    group = _field(gvk, "group", str, "request.kind", False) or ""
    kind_name = _field(gvk, "kind", str, "request.kind", True)
    sub_resource = _field(request, "subResource", str, "request", False) or ""
    namespace = _field(request, "namespace", str, "request", False) or ""
    obj = _field(request, "object", dict, "request", False)
    meta = (_field(obj, "metadata", dict, "request.object", False) or {}) if obj else {}
    name = _field(request, "name", str, "request", False) or ""
    if not name:
        name = _field(meta, "name", str, "request.object.metadata", False) or ""
        if not name:
            generate = _field(meta, "generateName", str, "request.object.metadata", False)
            name = f"{generate}*" if generate else ""
    review = Review(uid, operation, group, kind_name, namespace, name, sub_resource)
    path = POD_SPEC_PATHS.get((group, kind_name))
    skip = ""
    if path is None:
        skip = f"a {kind_name} has no pod spec"
    elif operation not in ("CREATE", "UPDATE"):
        skip = f"a {operation}"
    elif sub_resource:
        skip = f"the {sub_resource} subresource"
    elif obj is None:
        skip = "no object in the request"
    elif operation == "UPDATE" and (group, kind_name) in _CREATE_ONLY:
        skip = f"an UPDATE: a {kind_name}'s pod spec keeps the runtimeClassName it was created with"
    elif (group, kind_name) != ("", "Pod") and (owner := _controller(meta)):
        # Its controller compares the template with its own (a Deployment's ReplicaSets): a
        # patch here would start a fight. The Pods it makes are reviewed instead.
        skip = f"controlled by {owner}: its Pods are reviewed instead"
    if skip or path is None or obj is None:
        return dataclasses.replace(review, skipped=skip)
    spec: dict[str, Any] = obj
    where = "request.object"
    for key in path:
        spec = _field(spec, key, dict, where, True)
        where += f".{key}"
    runtime_class = _field(spec, "runtimeClassName", str, where, False) or None
    images: dict[str, None] = {}
    for key in ("initContainers", "containers"):
        containers = _field(spec, key, list, where, False) or []
        for i, container in enumerate(containers):
            if not isinstance(container, dict):
                raise SpecError(f"{where}.{key}[{i}] is not an object")
            image = _field(container, "image", str, f"{where}.{key}[{i}]", False)
            if image:
                images[image] = None
    return Review(
        uid,
        operation,
        group,
        kind_name,
        namespace,
        name,
        sub_resource,
        spec_path=path,
        runtime_class=runtime_class,
        images=tuple(images),
    )


# --- the answer --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageVerdict:
    """One image's classification: ``kind`` (``wasm``, ``linux``, ``unknown``) with its
    ``evidence`` and manifest ``digest``, or ``error`` when it could not be classified."""

    image: str
    reference: str
    kind: str | None = None
    evidence: tuple[str, ...] = ()
    digest: str = ""
    error: str | None = None
    cached: bool = False

    def line(self) -> str:
        """The log line: ``image REF: KIND DIGEST (cached); evidence: ...`` or the error."""
        if self.error is not None:
            return f"image {self.image}: error: {self.error}"
        shown = self.image if self.image == self.reference else f"{self.image} ({self.reference})"
        cached = " (cached)" if self.cached else ""
        evidence = "; ".join(self.evidence) or "none"
        return f"image {shown}: {self.kind} {self.digest}{cached}; evidence: {evidence}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision on one review: ``allowed``, the JSON ``patch`` operations (empty: none),
    ``reason`` (one line for the log), ``message`` (why a request is denied), ``warnings``
    (shown to the client) and each image's verdict."""

    uid: str
    allowed: bool
    reason: str
    patch: tuple[Mapping[str, str], ...] = ()
    message: str = ""
    warnings: tuple[str, ...] = ()
    images: tuple[ImageVerdict, ...] = field(default=())

    def review(self) -> dict[str, Any]:
        """The ``AdmissionReview`` answer (same ``uid``; the patch base64, ``JSONPatch``)."""
        response: dict[str, Any] = {"uid": self.uid, "allowed": self.allowed}
        if self.patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(list(self.patch)).encode()).decode()
        if not self.allowed:
            response["status"] = {"code": 403, "reason": "Forbidden", "message": self.message}
        if self.warnings:
            response["warnings"] = list(self.warnings)
        return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _pointer(path: Iterable[str]) -> str:
    """A JSON pointer (RFC 6901) to ``path``."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in path)


class _Cache:
    """Decisions per normalized reference, least recently used first out; one named by tag
    expires after ``ttl`` seconds (the tag may move), one pinned by digest does not."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[str, tuple[float, Decision]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, reference: str) -> Decision | None:
        with self._lock:
            entry = self._entries.get(reference)
            if entry is None:
                return None
            stored, decision = entry
            if "@" not in reference and time.monotonic() - stored >= self.ttl:
                del self._entries[reference]
                return None
            self._entries.move_to_end(reference)
            return decision

    def put(self, reference: str, decision: Decision) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries[reference] = (time.monotonic(), decision)
            self._entries.move_to_end(reference)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def _classify_with(platform: str | None, insecure: frozenset[str]) -> Classifier:
    """`wasidispatch.classify.classify`, plain HTTP for the ``insecure`` registries."""

    def run(reference: str, timeout: float) -> Decision:
        from wasidispatch.classify import classify

        is_insecure = registry_host(reference) in insecure
        return classify(reference, platform=platform, timeout=timeout, insecure=is_insecure)

    return run


class Admission:
    """The webhook's decisions, without HTTP.

    ``runtime_class``: the RuntimeClass to set. ``fail``: on an image that cannot be
    classified (and no other Wasm image), ``"open"`` allows without a patch and warns,
    ``"closed"`` denies. ``timeout``: the deadline of one review in seconds (each classify
    gets what is left). ``classifier``: replaces `wasidispatch.classify.classify` (then
    ``platform`` and ``insecure_registries`` are unused). Decisions are cached per image
    (``cache_ttl`` for a tag); concurrent reviews of one image share one classify.
    """

    def __init__(
        self,
        runtime_class: str,
        *,
        fail: Literal["open", "closed"] = "open",
        timeout: float = DEFAULT_TIMEOUT,
        insecure_registries: Iterable[str] = (),
        platform: str | None = None,
        classifier: Classifier | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
        workers: int = 8,
        max_bytes: int = MAX_REVIEW_BYTES,
    ) -> None:
        if len(runtime_class) > 253 or not _SUBDOMAIN.fullmatch(runtime_class):
            raise SpecError(
                f"runtime class {runtime_class!r}: a RuntimeClass name is a DNS subdomain "
                "(lower case letters, digits, '-' and '.', at most 253)"
            )
        if fail not in ("open", "closed"):
            raise SpecError(f"fail must be 'open' or 'closed', not {fail!r}")
        if not 0 < timeout <= 30:  # the apiserver's timeoutSeconds is at most 30
            raise SpecError(f"timeout must be above 0 and at most 30 seconds, not {timeout}")
        self.runtime_class = runtime_class
        self.fail = fail
        self.timeout = timeout
        self.max_bytes = max_bytes
        insecure = frozenset(insecure_registries)
        self._classifier = classifier or _classify_with(platform, insecure)
        self._cache = _Cache(cache_ttl, cache_size)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="webhook-classify")
        # Futures of the pool, not of an event loop: reviews on any loop can share them.
        self._inflight: dict[str, Future[Decision]] = {}
        self._lock = threading.RLock()  # a future done already runs its callback at once

    def close(self) -> None:
        """Stop the classify threads (those running finish on their own timeout)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def review(self, body: bytes, content_type: str | None) -> Outcome:
        """`parse_review` then `decide` (raises `SpecError` for a bad request)."""
        return await self.decide(parse_review(body, content_type, max_bytes=self.max_bytes))

    async def decide(self, review: Review) -> Outcome:
        """Classify the review's images within the deadline; log and return the outcome."""
        outcome = await self._decide(review)
        for verdict in outcome.images:
            log.info("uid=%s %s", review.uid, verdict.line())
        level = logging.INFO if outcome.allowed else logging.WARNING
        log.log(level, "uid=%s %s: %s", review.uid, review.subject, outcome.reason)
        return outcome

    async def _decide(self, review: Review) -> Outcome:
        if review.spec_path is None:
            return Outcome(review.uid, True, f"allowed as is: {review.skipped or 'no pod spec'}")
        if review.runtime_class is not None:
            reason = f"allowed as is: it names runtimeClassName {review.runtime_class}"
            return Outcome(review.uid, True, reason)
        if not review.images:
            return Outcome(review.uid, True, "allowed as is: no container images")
        verdicts = await self._classify_all(review.images)
        wasm = [v.image for v in verdicts if v.kind == "wasm"]
        failed = [v for v in verdicts if v.error is not None]
        warnings = tuple(
            f"wasidispatch webhook: cannot classify {v.image}: {v.error}"[:_WARNING_LIMIT]
            for v in failed
        )
        if wasm:  # one Wasm image is enough: the runtime runs Linux containers too
            path = _pointer((*review.spec_path, "runtimeClassName"))
            patch = ({"op": "add", "path": path, "value": self.runtime_class},)
            reason = f"patched {path}={self.runtime_class} (wasm: {', '.join(wasm)})"
            return Outcome(review.uid, True, reason, patch, warnings=warnings, images=verdicts)
        if failed and self.fail == "open":
            reason = f"allowed as is (fail open): {len(failed)} image(s) not classified"
            return Outcome(review.uid, True, reason, warnings=warnings, images=verdicts)
        if failed:
            message = "wasidispatch webhook (fail closed): " + "; ".join(
                f"cannot classify {v.image}: {v.error}" for v in failed
            )
            return Outcome(
                review.uid, False, "denied (fail closed)", message=message, images=verdicts
            )
        return Outcome(review.uid, True, "allowed as is: no Wasm image", images=verdicts)

    async def _classify_all(self, images: tuple[str, ...]) -> tuple[ImageVerdict, ...]:
        deadline = time.monotonic() + self.timeout
        verdicts: dict[str, ImageVerdict] = {}
        waiting: dict[str, tuple[str, Future[Decision]]] = {}
        for image in images:
            try:
                reference = normalize_image(image)
            except SpecError as exc:
                verdicts[image] = ImageVerdict(image, image, error=str(exc))
                continue
            decision = self._cache.get(reference)
            if decision is not None:
                verdicts[image] = _verdict(image, reference, decision, cached=True)
                continue
            waiting[image] = (reference, self._submit(reference, deadline))
        if waiting:
            # Waited for, never cancelled: a late answer still fills the cache.
            pending = {asyncio.wrap_future(f) for _, f in waiting.values()}
            for wrapper in pending:  # read below from the pool's future, and late ones never
                wrapper.add_done_callback(_retrieve)
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        for image, (reference, future) in waiting.items():
            if not future.done():
                error = f"no answer within the deadline of {self.timeout:g} s"
                verdicts[image] = ImageVerdict(image, reference, error=error)
            elif future.cancelled():
                verdicts[image] = ImageVerdict(image, reference, error="the webhook is stopping")
            elif (failure := future.exception()) is not None:
                verdicts[image] = ImageVerdict(image, reference, error=_describe(failure))
            else:
                verdicts[image] = _verdict(image, reference, future.result(), cached=False)
        return tuple(verdicts[image] for image in images)

    def _submit(self, reference: str, deadline: float) -> Future[Decision]:
        """The classify of ``reference`` under way (another review's), or a new one."""
        with self._lock:
            future = self._inflight.get(reference)
            if future is None:
                future = self._pool.submit(self._run, reference, deadline)
                self._inflight[reference] = future
                future.add_done_callback(functools.partial(self._settle, reference))
            return future

    def _run(self, reference: str, deadline: float) -> Decision:
        left = deadline - time.monotonic()  # queued behind other images: less is left
        if left <= 0:
            raise TimeoutError("the deadline passed before a thread was free")
        return self._classifier(reference, left)

    def _settle(self, reference: str, future: Future[Decision]) -> None:
        if not future.cancelled():
            exc = future.exception()
            if exc is None:
                self._cache.put(reference, future.result())
            elif not isinstance(exc, WasiDispatchError | OSError):
                log.error("classify %s failed unexpectedly", reference, exc_info=exc)
        with self._lock:
            self._inflight.pop(reference, None)


def _retrieve(future: asyncio.Future[Decision]) -> None:
    if not future.cancelled():
        future.exception()


def _verdict(image: str, reference: str, decision: Decision, *, cached: bool) -> ImageVerdict:
    return ImageVerdict(
        image,
        reference,
        kind=decision.kind,
        evidence=tuple(decision.evidence),
        digest=decision.digest,
        cached=cached,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, WasiDispatchError) else f"{type(exc).__name__}: {text}"


# --- the server --------------------------------------------------------------------------------


def tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or later, HTTP/1.1 by ALPN) with the PEM ``cert``
    chain and ``key``; raises `SpecError` when they cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # the apiserver falls back from h2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SpecError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from exc
    return context


class TlsFiles:
    """A server TLS context for a PEM certificate chain and key on disk that follows their
    renewal: `context` hands each new connection the pair last loaded; `reload` loads the
    files again when they changed (a Secret volume swaps them, cert-manager renews them) and
    keeps the pair it has when the new one does not load. Raises `SpecError` when the
    first pair does not load."""

    def __init__(self, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> None:
        self.cert = cert
        self.key = key
        self._stamp = self._files()
        self._current = tls_context(cert, key)
        self.context = tls_context(cert, key)
        self.context.sni_callback = self._pick  # called for every ClientHello, SNI or not

    def _pick(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self._current

    def _files(self) -> tuple[tuple[int, int, int, int], ...]:
        stamps = []
        for path in (self.cert, self.key):
            try:
                st = os.stat(path)  # through the Secret volume's symlinks
            except OSError:
                stamps.append((0, 0, 0, 0))
            else:
                stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def reload(self) -> bool:
        """Load the files again if they changed since the last load; True when a new pair
        is now served."""
        stamp = self._files()
        if stamp == self._stamp:
            return False
        try:
            fresh = tls_context(self.cert, self.key)
        except SpecError as exc:  # half-written, or the key of another certificate
            log.warning("keeping the TLS certificate in use: %s", exc)
            return False
        self._current, self._stamp = fresh, stamp
        log.info("reloaded the TLS certificate %s", self.cert)
        return True


#: How often `serve` looks for a renewed certificate, seconds (SIGHUP: at once).
RELOAD_INTERVAL = 60.0


def make_app(admission: Admission) -> web.Application:
    """The aiohttp application: ``POST /mutate`` reviews, ``GET /healthz`` answers ``ok``."""
    from aiohttp import web

    async def mutate(request: web.Request) -> web.StreamResponse:
        try:
            body = await _read_body(request, admission.max_bytes)
            review = parse_review(
                body, request.headers.get("Content-Type"), max_bytes=admission.max_bytes
            )
        except SpecError as exc:
            log.warning("bad request from %s: %s", request.remote, exc)
            return web.Response(status=400, text=f"bad AdmissionReview request: {exc}\n")
        outcome = await admission.decide(review)
        return web.json_response(outcome.review())

    async def health(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=admission.max_bytes)
    app.router.add_post(MUTATE_PATH, mutate)
    app.router.add_get(HEALTH_PATH, health)
    return app


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, or `SpecError` when it is over ``limit`` or not sent in time."""
    length = request.content_length
    if length is not None and length > limit:
        raise SpecError(f"body of {length} bytes: over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(_BODY_TIMEOUT):
            while chunk := await request.content.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise SpecError(f"body over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise SpecError(f"body not received within {_BODY_TIMEOUT:g} s") from None
    return b"".join(chunks)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise SpecError(f"cannot listen on {host}:{port}: {exc}") from exc


class WebhookServer:
    """The webhook on HTTPS in a thread of its own (for embedding and tests): `start`
    binds ``host:port`` (``0``: a free port, see `port`) and returns once it serves; `stop`
    finishes the requests in flight, closes the `Admission` and returns. Also a context
    manager."""

    def __init__(
        self,
        admission: Admission,
        tls: ssl.SSLContext | TlsFiles,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.admission = admission
        self.tls = tls
        self._sock = _listen(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    def start(self) -> WebhookServer:
        """Serve; raises what made the server fail to start."""
        self._thread = threading.Thread(target=self._main, name="wasidispatch-webhook", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await _serve(self.admission, self._sock, self.tls, self._stop, self._ready)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._failure = exc
        finally:
            self._ready.set()


async def _serve(
    admission: Admission,
    sock: socket.socket,
    tls: ssl.SSLContext | TlsFiles,
    stop: asyncio.Event,
    ready: threading.Event | None = None,
) -> None:
    from aiohttp import web

    context = tls.context if isinstance(tls, TlsFiles) else tls
    runner = web.AppRunner(make_app(admission), access_log=None, shutdown_timeout=admission.timeout)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, ssl_context=context).start()
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await runner.cleanup()
        admission.close()


async def _follow(tls: TlsFiles) -> None:
    while True:
        await asyncio.sleep(RELOAD_INTERVAL)
        tls.reload()


def serve(admission: Admission, tls: ssl.SSLContext | TlsFiles, host: str, port: int) -> None:
    """Serve the webhook on ``host:port`` until SIGTERM or SIGINT, then finish the requests in
    flight (what a Kubernetes Deployment needs). With `TlsFiles`, a renewed certificate is
    picked up within `RELOAD_INTERVAL` seconds, or at once on SIGHUP."""
    sock = _listen(host, port)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info(
        "serving AdmissionReview v1 on https://%s%s (runtimeClassName %s, fail %s, deadline %g s)",
        where,
        MUTATE_PATH,
        admission.runtime_class,
        admission.fail,
        admission.timeout,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        follower = None
        if isinstance(tls, TlsFiles):
            loop.add_signal_handler(signal.SIGHUP, tls.reload)
            follower = asyncio.create_task(_follow(tls))
        try:
            await _serve(admission, sock, tls, stop)
        finally:
            if follower is not None:
                follower.cancel()
        log.info("stopped")

    asyncio.run(main())
