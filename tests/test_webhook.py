"""The admission webhook: its decisions on real AdmissionReview documents
(tests/data/admission/), then the server over real TLS (a CA and a server certificate made
here with the ``openssl`` CLI) against a real registry (Debian's docker-registry on
127.0.0.1) holding a Wasm image and busybox, classified by `wasidispatch.classify`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import http.client
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import wasmtime

from tests.containerd_harness import busybox_layout, wasm_layout
from tests.registry_harness import REGISTRY_BIN, local_registry
from tests.registry_harness import free_port as _free_port
from wasidispatch._cli import webhook as webhook_cli
from wasidispatch.classify import ImageDecision
from wasidispatch.errors import RegistryError, SpecError
from wasidispatch.webhook import (
    MAX_REVIEW_BYTES,
    Admission,
    Outcome,
    Review,
    TlsFiles,
    WebhookServer,
    normalize_image,
    parse_review,
    tls_context,
)

DATA = Path(__file__).parent / "data" / "admission"
OPENSSL = shutil.which("openssl")
SPEC = "/spec/runtimeClassName"
TEMPLATE = "/spec/template/spec/runtimeClassName"
CRON = "/spec/jobTemplate/spec/template/spec/runtimeClassName"
#: fixture -> the patched path (None: allowed without a patch)
EXPECTED: dict[str, str | None] = {
    "pod-wasm": SPEC,
    "pod-busybox": None,
    "pod-mixed-from-replicaset": SPEC,
    "pod-wasm-init": SPEC,
    "pod-named-runtimeclass": None,
    "pod-update-labels": None,
    "pod-ephemeral-subresource": None,
    "pod-delete": None,
    "deployment-wasm": TEMPLATE,
    "deployment-update-wasm": TEMPLATE,
    "replicaset-wasm": TEMPLATE,
    "replicaset-from-deployment": None,
    "daemonset-wasm": TEMPLATE,
    "job-wasm": TEMPLATE,
    "cronjob-wasm": CRON,
    "statefulset-busybox": None,
}
WASM_REPO, BUSYBOX_REPO = "wasm/hello:1", "library/busybox:1"


def _fixture(name: str, registry: str = "127.0.0.1:5000") -> dict[str, Any]:
    text = (DATA / f"{name}.json").read_text().replace("{registry}", registry)
    doc: dict[str, Any] = json.loads(text)
    return doc


def _body(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def _apply(obj: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add`` operations (all the webhook answers), on a copy."""
    result = copy.deepcopy(obj)
    for op in patch:
        assert op["op"] == "add"
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]
        ]
        target = result
        for p in parents:
            target = target[p]  # the parent must exist: "add" does not create it
        target[last] = op["value"]
    return result


def _at(obj: Mapping[str, Any], pointer: str) -> Any:
    value: Any = obj
    for p in pointer.split("/")[1:]:
        value = value[p]
    return value


def _patch_of(answer: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    response = answer["response"]
    if "patch" not in response:
        assert "patchType" not in response
        return None
    assert response["patchType"] == "JSONPatch"
    patch: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return patch


# --- the logic, with a classifier standing in for the registry ---------------------------------


def _decision(reference: str, kind: str) -> ImageDecision:
    return ImageDecision(
        kind=kind,  # type: ignore[arg-type]
        evidence=(f"{kind} evidence for {reference}",),
        architecture=None if kind == "wasm" else "amd64",
        digest="sha256:" + format(abs(hash(reference)), "x").rjust(64, "0"),
        reference=reference,
        entrypoint="/hello.wasm" if kind == "wasm" else "/bin/sh",
    )


class Catalog:
    """A classifier over a fixed set of references (the others: RegistryError), counting
    calls; ``gate``, when set, holds each call until it is set."""

    def __init__(self, kinds: Mapping[str, str], gate: threading.Event | None = None) -> None:
        self.kinds = dict(kinds)
        self.calls: list[tuple[str, float]] = []
        self.gate = gate
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, reference: str, timeout: float) -> ImageDecision:
        with self._lock:
            self.calls.append((reference, timeout))
        self.started.set()
        if self.gate is not None:
            self.gate.wait()
        if reference not in self.kinds:
            raise RegistryError(f"{reference}: manifest unknown")
        return _decision(reference, self.kinds[reference])


REG = "127.0.0.1:5000"
KINDS = {f"{REG}/{WASM_REPO}": "wasm", f"{REG}/{BUSYBOX_REPO}": "linux"}


def _decide(admission: Admission, review: Review) -> Outcome:
    return asyncio.run(admission.decide(review))


def _review(name: str) -> Review:
    return parse_review(_body(_fixture(name)), "application/json")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_decisions(name: str) -> None:
    admission = Admission("wasidispatch", classifier=Catalog(KINDS))
    doc = _fixture(name)
    outcome = _decide(admission, _review(name))
    answer = outcome.review()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == doc["request"]["uid"]
    assert answer["response"]["allowed"] is True
    patch = _patch_of(answer)
    expected = EXPECTED[name]
    if expected is None:
        assert patch is None, outcome.reason
    else:
        assert patch == [{"op": "add", "path": expected, "value": "wasidispatch"}]
        patched = _apply(doc["request"]["object"], patch)
        assert _at(patched, expected) == "wasidispatch"


def test_parse_reads_images_of_containers_and_init_containers_once() -> None:
    review = _review("pod-mixed-from-replicaset")
    assert review.images == (f"{REG}/{BUSYBOX_REPO}", f"{REG}/{WASM_REPO}")
    assert (review.namespace, review.name) == ("shop", "hello-7d9c8b6f5-*")
    assert review.subject == "CREATE Pod shop/hello-7d9c8b6f5-*"
    cron = _review("cronjob-wasm")
    assert cron.spec_path == ("spec", "jobTemplate", "spec", "template", "spec")
    assert _review("pod-named-runtimeclass").runtime_class == "gvisor"
    # ephemeral containers are not read; a subresource, a DELETE, a Pod UPDATE: no pod spec
    for name in ("pod-ephemeral-subresource", "pod-delete", "pod-update-labels"):
        assert _review(name).spec_path is None, name
    assert _review("deployment-update-wasm").spec_path == ("spec", "template", "spec")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("pod-ephemeral-subresource", "the ephemeralcontainers subresource"),
        ("pod-delete", "a DELETE"),
        ("pod-update-labels", "an UPDATE: a Pod's pod spec keeps the runtimeClassName"),
        ("replicaset-from-deployment", "controlled by Deployment/hello: its Pods are reviewed"),
    ],
)
def test_what_is_left_alone_says_why(name: str, reason: str) -> None:
    catalog = Catalog(KINDS)
    outcome = _decide(Admission("wasidispatch", classifier=catalog), _review(name))
    assert outcome.allowed
    assert outcome.patch == ()
    assert reason in outcome.reason
    assert catalog.calls == []


def test_a_named_runtime_class_is_left_alone_without_reading_the_registry() -> None:
    catalog = Catalog(KINDS)
    outcome = _decide(
        Admission("wasidispatch", classifier=catalog), _review("pod-named-runtimeclass")
    )
    assert outcome.allowed
    assert outcome.patch == ()
    assert "gvisor" in outcome.reason
    assert catalog.calls == []


def test_evidence_is_kept_per_image() -> None:
    outcome = _decide(
        Admission("wasidispatch", classifier=Catalog(KINDS)), _review("pod-mixed-from-replicaset")
    )
    assert [(v.reference, v.kind) for v in outcome.images] == [
        (f"{REG}/{BUSYBOX_REPO}", "linux"),
        (f"{REG}/{WASM_REPO}", "wasm"),
    ]
    line = outcome.images[1].line()
    assert line.startswith(f"image {REG}/{WASM_REPO}: wasm sha256:")
    assert f"evidence: wasm evidence for {REG}/{WASM_REPO}" in line


def test_fail_open_allows_and_warns() -> None:
    admission = Admission("wasidispatch", classifier=Catalog(KINDS), fail="open")
    outcome = _decide(admission, _review("pod-missing-image"))
    answer = outcome.review()["response"]
    assert answer["allowed"] is True
    assert "patch" not in answer
    assert len(answer["warnings"]) == 1
    assert "does-not-exist" in answer["warnings"][0]
    assert "manifest unknown" in answer["warnings"][0]


def test_fail_closed_denies_with_the_reason() -> None:
    admission = Admission("wasidispatch", classifier=Catalog(KINDS), fail="closed")
    answer = _decide(admission, _review("pod-missing-image")).review()["response"]
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 403
    assert "does-not-exist" in answer["status"]["message"]
    assert "manifest unknown" in answer["status"]["message"]


def test_a_wasm_image_wins_over_an_unclassified_one_even_failing_closed() -> None:
    doc = _fixture("pod-wasm")
    spec = doc["request"]["object"]["spec"]
    spec["containers"].append({"name": "x", "image": f"{REG}/wasm/does-not-exist:1"})
    review = parse_review(_body(doc), "application/json")
    admission = Admission("wasidispatch", classifier=Catalog(KINDS), fail="closed")
    outcome = _decide(admission, review)
    assert outcome.allowed
    assert [dict(op) for op in outcome.patch] == [
        {"op": "add", "path": SPEC, "value": "wasidispatch"}
    ]
    assert any("does-not-exist" in w for w in outcome.warnings)


def test_an_invalid_image_reference_is_an_unclassified_image() -> None:
    doc = _fixture("pod-busybox")
    doc["request"]["object"]["spec"]["containers"][0]["image"] = "Not A/Reference"
    catalog = Catalog(KINDS)
    admission = Admission("wasidispatch", classifier=catalog, fail="closed")
    outcome = _decide(admission, parse_review(_body(doc), "application/json"))
    assert not outcome.allowed
    assert "not an image reference" in outcome.message
    assert catalog.calls == []


def test_decisions_are_cached_per_image() -> None:
    catalog = Catalog(KINDS)
    admission = Admission("wasidispatch", classifier=catalog)
    first = _decide(admission, _review("pod-wasm"))
    again = _decide(admission, _review("deployment-wasm"))  # the same image
    assert [v.cached for v in first.images] == [False]
    assert [v.cached for v in again.images] == [True]
    assert [r for r, _ in catalog.calls] == [f"{REG}/{WASM_REPO}"]
    assert again.patch  # a cached Wasm decision still patches


def test_a_tag_expires_and_a_digest_does_not() -> None:
    pinned = f"{REG}/wasm/hello@sha256:" + "b" * 64
    catalog = Catalog({**KINDS, pinned: "wasm"})
    admission = Admission("wasidispatch", classifier=catalog, cache_ttl=0.0)
    doc = _fixture("pod-wasm")
    by_digest = copy.deepcopy(doc)
    by_digest["request"]["object"]["spec"]["containers"][0]["image"] = pinned
    for _ in range(2):
        _decide(admission, parse_review(_body(doc), "application/json"))
        _decide(admission, parse_review(_body(by_digest), "application/json"))
    refs = [r for r, _ in catalog.calls]
    assert refs.count(f"{REG}/{WASM_REPO}") == 2  # a tag may move: asked again
    assert refs.count(pinned) == 1


def test_concurrent_reviews_of_one_image_share_one_classify() -> None:
    gate = threading.Event()
    catalog = Catalog(KINDS, gate)
    admission = Admission("wasidispatch", classifier=catalog, timeout=30)

    async def both() -> list[Outcome]:
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(admission.decide(_review("pod-wasm")))
        await loop.run_in_executor(None, catalog.started.wait)
        second = asyncio.create_task(admission.decide(_review("job-wasm")))
        for _ in range(10):  # let the second review reach its wait
            await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(first, second))

    outcomes = asyncio.run(both())
    assert [o.patch[0]["path"] for o in outcomes] == [SPEC, TEMPLATE]
    assert len(catalog.calls) == 1
    # the second waited on the first's classify: not answered from the cache
    assert [v.cached for o in outcomes for v in o.images] == [False, False]


def test_the_deadline_answers_without_the_registry_and_a_late_answer_is_kept() -> None:
    gate = threading.Event()
    catalog = Catalog(KINDS, gate)
    admission = Admission("wasidispatch", classifier=catalog, timeout=0.2, fail="open")
    try:
        late = _decide(admission, _review("pod-wasm"))  # the classifier is held past it
        assert late.allowed
        assert late.patch == ()
        assert late.images[0].error == "no answer within the deadline of 0.2 s"
        assert 0 < catalog.calls[0][1] <= 0.2  # classify got what was left of the deadline
        gate.set()
        admission.timeout = 30.0
        again = _decide(admission, _review("pod-wasm"))
        assert again.patch
        assert len(catalog.calls) == 1  # the held call's answer served the second review
    finally:
        gate.set()
        admission.close()


@pytest.mark.parametrize(
    ("image", "reference"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/o/app", "docker.io/o/app:latest"),
        ("o/app:v1", "docker.io/o/app:v1"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/a/b:c", "localhost:5000/a/b:c"),
        ("Registry/app", "Registry/app:latest"),
        ("[::1]:5000/app:1", "[::1]:5000/app:1"),
        ("ghcr.io/o/app:1@sha256:" + "c" * 64, "ghcr.io/o/app@sha256:" + "c" * 64),
    ],
)
def test_normalize_image(image: str, reference: str) -> None:
    assert normalize_image(image) == reference


@pytest.mark.parametrize(
    "image", ["", "app:", "App", "a b", "app@sha256:short", "ghcr.io/", "app:" + "t" * 129]
)
def test_normalize_image_refuses(image: str) -> None:
    with pytest.raises(SpecError):
        normalize_image(image)


def _without(doc: dict[str, Any], *path: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


POD = _fixture("pod-wasm")
BAD: dict[str, tuple[bytes, str | None, str]] = {
    "content type": (_body(POD), "text/plain", "expected application/json"),
    "no content type": (_body(POD), None, "(none)"),
    "not JSON": (b"{not json", "application/json", "not JSON"),
    "not UTF-8": (b'{"a": "\xff"}', "application/json", "not JSON"),
    "not an object": (b"[1, 2]", "application/json", "not a JSON object"),
    "v1beta1": (
        _body(_fixture("pod-wasm-v1beta1")),
        "application/json",
        "admission.k8s.io/v1beta1",
    ),
    "another kind": (
        _body({**POD, "kind": "ConversionReview"}),
        "application/json",
        "'ConversionReview'",
    ),
    "no request": (_body(_without(POD, "request")), "application/json", "request is missing"),
    "no uid": (
        _body(_without(POD, "request", "uid")),
        "application/json",
        "request.uid is missing",
    ),
    "empty uid": (
        _body({**POD, "request": {**POD["request"], "uid": ""}}),
        "application/json",
        "request.uid is empty",
    ),
    "uid not a string": (
        _body({**POD, "request": {**POD["request"], "uid": 7}}),
        "application/json",
        "request.uid: expected a string",
    ),
    "containers not an array": (
        _body(
            {
                **POD,
                "request": {
                    **POD["request"],
                    "object": {"spec": {"containers": {"image": "x"}}},
                },
            }
        ),
        "application/json",
        "request.object.spec.containers: expected an array",
    ),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "application/json", "not JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_reviews_say_why(case: str) -> None:
    body, content_type, reason = BAD[case]
    with pytest.raises(SpecError) as info:
        parse_review(body, content_type)
    assert reason in str(info.value)


def test_a_body_over_the_limit() -> None:
    with pytest.raises(SpecError, match="over the limit of 100"):
        parse_review(b" " * 101, "application/json; charset=utf-8", max_bytes=100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runtime_class": "Wasm_Runtime"}, "DNS subdomain"),
        ({"runtime_class": "wasidispatch", "fail": "maybe"}, "'open' or 'closed'"),
        ({"runtime_class": "wasidispatch", "timeout": 31}, "at most 30"),
        ({"runtime_class": "wasidispatch", "timeout": 0}, "above 0"),
    ],
)
def test_admission_refuses_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        Admission(**kwargs)


def test_parse_listen() -> None:
    assert webhook_cli.parse_listen("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert webhook_cli.parse_listen("[::1]:9443") == ("::1", 9443)
    for bad in ("8443", "::1:8443", "host:port", "h:70000"):
        with pytest.raises(argparse.ArgumentTypeError):
            webhook_cli.parse_listen(bad)


# --- a real CA, a real registry, the server over TLS -------------------------------------------


class Pki(NamedTuple):
    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_pki(d: Path) -> Pki:
    """A self-signed CA and a server certificate for the webhook's Service name, localhost
    and 127.0.0.1 signed by it, as cert-manager or a setup script would make them."""
    if OPENSSL is None:
        pytest.skip("the openssl CLI is not installed")
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=wasidispatch test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "req", *ec, "-keyout", "tls.key", "-out", "tls.csr",
        "-subj", "/CN=wasidispatch-webhook.wasidispatch.svc", cwd=d,
    )  # fmt: skip
    (d / "ext.cnf").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "subjectAltName=DNS:wasidispatch-webhook.wasidispatch.svc,DNS:localhost,IP:127.0.0.1\n"
    )
    _openssl(
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d,
    )  # fmt: skip
    return Pki(d / "ca.crt", d / "tls.crt", d / "tls.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """`_make_pki` once for the module."""
    return _make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real registry (distribution 2.8) on 127.0.0.1 holding ``wasm/hello:1`` (a runnable
    Wasm image: an ordinary OCI image whose entrypoint is a .wasm, no annotation) and
    ``library/busybox:1``; yields its ``host:port``."""
    if not Path(REGISTRY_BIN).exists():
        pytest.skip("docker-registry not installed (make system-deps)")
    from wasidispatch.oci.registry import push

    base = tmp_path_factory.mktemp("registry")
    with local_registry(base) as running:
        address = running.address
        module = bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))
        wasm = wasm_layout(base / "wasm", {"hello.wasm": module}, "/hello.wasm")
        push(wasm, "test", f"{address}/{WASM_REPO}", plain_http=True)
        push(busybox_layout(base / "busybox"), "test", f"{address}/{BUSYBOX_REPO}", plain_http=True)
        yield address


class Served(NamedTuple):
    """Where a webhook serves, the client's TLS context (trusting the test CA only) and the
    registry its fixtures name."""

    port: int
    client: ssl.SSLContext
    registry: str


def _serve(pki: Pki, registry: str, **kwargs: Any) -> Iterator[Served]:
    admission = Admission("wasidispatch", **kwargs)
    client = ssl.create_default_context(cafile=str(pki.ca))
    with WebhookServer(admission, tls_context(pki.cert, pki.key)) as server:
        yield Served(server.port, client, registry)


@pytest.fixture(scope="module")
def served(pki: Pki, registry: str) -> Iterator[Served]:
    """The webhook (fail open) over TLS, classifying with `wasidispatch.classify`."""
    yield from _serve(pki, registry, fail="open")


@pytest.fixture(scope="module")
def served_closed(pki: Pki, registry: str) -> Iterator[Served]:
    """The webhook failing closed, with a small body limit."""
    yield from _serve(pki, registry, fail="closed", max_bytes=64 << 10)


def _post(
    served: Served,
    body: bytes | Iterator[bytes],
    content_type: str | None = "application/json",
    path: str = "/mutate",
    method: str = "POST",
) -> tuple[int, str, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", served.port, context=served.client, timeout=60)
    try:
        headers = {} if content_type is None else {"Content-Type": content_type}
        if isinstance(body, bytes):
            conn.request(method, path, body=body, headers=headers)
        else:
            conn.request(method, path, body=body, headers=headers, encode_chunked=True)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def _admit(served: Served, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    doc = _fixture(name, served.registry)
    status, content_type, body = _post(served, _body(doc))
    assert status == 200, body
    assert content_type.startswith("application/json")
    answer: dict[str, Any] = json.loads(body)
    return doc, answer


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_served_fixture_decisions(served: Served, name: str) -> None:
    doc, answer = _admit(served, name)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == doc["request"]["uid"]
    assert answer["response"]["allowed"] is True
    assert "warnings" not in answer["response"]  # every image in them was classified
    patch = _patch_of(answer)
    expected = EXPECTED[name]
    if expected is None:
        assert patch is None
    else:
        assert patch == [{"op": "add", "path": expected, "value": "wasidispatch"}]
        assert _at(_apply(doc["request"]["object"], patch), expected) == "wasidispatch"


def test_served_logs_each_image_with_its_evidence(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wasidispatch.webhook")
    doc, _ = _admit(served, "pod-mixed-from-replicaset")
    uid = doc["request"]["uid"]
    lines = [r.getMessage() for r in caplog.records if r.name == "wasidispatch.webhook"]
    mine = [line for line in lines if line.startswith(f"uid={uid} ")]
    wasm = f"{served.registry}/{WASM_REPO}"
    busybox = f"{served.registry}/{BUSYBOX_REPO}"
    assert len(mine) == 3, lines
    assert mine[0].startswith(f"uid={uid} image {busybox}: linux sha256:")
    assert mine[1].startswith(f"uid={uid} image {wasm}: wasm sha256:")
    assert "evidence: " in mine[1]
    assert "evidence: none" not in mine[1]
    assert mine[2] == (
        f"uid={uid} CREATE Pod shop/hello-7d9c8b6f5-*: patched /spec/runtimeClassName="
        f"wasidispatch (wasm: {wasm})"
    )


def test_served_fail_open_warns(served: Served) -> None:
    _, answer = _admit(served, "pod-missing-image")
    response = answer["response"]
    assert response["allowed"] is True
    assert "patch" not in response
    assert "does-not-exist" in response["warnings"][0]


def test_served_fail_closed_denies(served_closed: Served) -> None:
    doc, answer = _admit(served_closed, "pod-missing-image")
    response = answer["response"]
    assert response["uid"] == doc["request"]["uid"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert "does-not-exist" in response["status"]["message"]
    _, wasm = _admit(served_closed, "pod-wasm")  # a Wasm pod is still patched
    assert _patch_of(wasm) == [{"op": "add", "path": SPEC, "value": "wasidispatch"}]


@pytest.mark.parametrize("case", ["content type", "not JSON", "v1beta1", "no uid", "no request"])
def test_served_bad_requests_get_400_with_the_reason(served: Served, case: str) -> None:
    body, content_type, reason = BAD[case]
    status, _, answer = _post(served, body, content_type)
    assert status == 400
    assert reason in answer.decode()


def test_served_body_over_the_limit(served_closed: Served) -> None:
    doc = _fixture("pod-wasm", served_closed.registry)
    doc["request"]["object"]["metadata"]["annotations"] = {"big": "x" * (64 << 10)}
    status, _, answer = _post(served_closed, _body(doc))
    assert status == 400
    assert b"over the limit of 65536" in answer
    chunks = iter([b"{", b" " * (40 << 10), b" " * (40 << 10), b"}"])  # no Content-Length
    status, _, answer = _post(served_closed, chunks)
    assert status == 400
    assert b"over the limit of 65536" in answer
    assert MAX_REVIEW_BYTES > 64 << 10  # the default is larger than this server's


def test_served_health_and_other_paths(served: Served) -> None:
    assert _post(served, b"", None, "/healthz", "GET")[::2] == (200, b"ok\n")
    assert _post(served, _body(POD), path="/other")[0] == 404
    assert _post(served, b"", None, "/mutate", "GET")[0] == 405


def test_served_certificate_is_checked(served: Served) -> None:
    untrusting = ssl.create_default_context()  # the system's CAs, not ours
    conn = http.client.HTTPSConnection("127.0.0.1", served.port, context=untrusting)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/healthz")
    conn.close()


def _health(port: int, ca: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    return _post(Served(port, context, ""), b"", None, "/healthz", "GET")[2]


def test_a_renewed_certificate_is_served_after_reload(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.cert, cert)
    shutil.copy(pki.key, key)
    files = TlsFiles(cert, key)
    admission = Admission("wasidispatch", classifier=Catalog(KINDS))
    with WebhookServer(admission, files) as server:
        assert _health(server.port, pki.ca) == b"ok\n"
        assert files.reload() is False  # unchanged
        key.write_text("not a key\n")  # renewal half done: the old pair stays
        assert files.reload() is False
        assert _health(server.port, pki.ca) == b"ok\n"
        renewed = _make_pki(tmp_path / "renewed")  # another CA, as after a CA rotation
        for src, dst in ((renewed.cert, cert), (renewed.key, key)):
            shutil.copy(src, dst.with_suffix(".new"))
            dst.with_suffix(".new").replace(dst)  # swapped, as a Secret volume does
        assert files.reload() is True
        assert _health(server.port, renewed.ca) == b"ok\n"
        with pytest.raises(ssl.SSLCertVerificationError):
            _health(server.port, pki.ca)


def test_tls_context_refuses_bad_files(pki: Pki) -> None:
    with pytest.raises(SpecError, match="cannot load the TLS certificate"):
        tls_context(pki.key, pki.cert)


# --- the command ------------------------------------------------------------------------------

_MAIN = (
    "import argparse, sys\n"
    "from wasidispatch._cli import webhook\n"
    "parser = argparse.ArgumentParser(prog='wasidispatch')\n"
    "webhook.register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def test_cli_serves_until_sigterm(pki: Pki, registry: str, tmp_path: Path) -> None:
    port = _free_port()
    stderr = (tmp_path / "stderr").open("w+b")
    cmd = [
        sys.executable, "-c", _MAIN, "webhook",
        "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
        "--runtime-class", "wasm-rc", "--listen", f"127.0.0.1:{port}",
        "--fail", "closed", "--timeout", "20", "--insecure-registry", "registry.example:5000",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=stderr, stdout=subprocess.DEVNULL, env=os.environ.copy())
    served = Served(port, ssl.create_default_context(cafile=str(pki.ca)), registry)
    try:
        for _ in range(400):  # until it answers (bounded; not a timing assertion)
            try:
                if _post(served, b"", None, "/healthz", "GET")[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                time.sleep(0.05)
        doc, answer = _admit(served, "cronjob-wasm")
        assert _patch_of(answer) == [{"op": "add", "path": CRON, "value": "wasm-rc"}]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    log = (tmp_path / "stderr").read_text()
    uid = doc["request"]["uid"]
    assert f"serving AdmissionReview v1 on https://127.0.0.1:{port}/mutate" in log
    assert f"uid={uid} image {registry}/{WASM_REPO}: wasm sha256:" in log
    assert f"uid={uid} CREATE CronJob batch-jobs/nightly: patched {CRON}=wasm-rc" in log
    assert "stopped" in log


def test_cli_refuses_a_bad_runtime_class(pki: Pki) -> None:
    parser = argparse.ArgumentParser(prog="wasidispatch")
    webhook_cli.register(parser.add_subparsers())
    tls = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    args = parser.parse_args(["webhook", *tls, "--runtime-class", "Bad_Name"])
    with pytest.raises(SpecError, match="DNS subdomain"):
        webhook_cli.run(args)
