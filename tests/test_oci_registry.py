"""pull/push against a real registry: Debian's docker-registry on 127.0.0.1, and skopeo."""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import wasmtime

from tests.registry_harness import REGISTRY_BIN, LocalRegistry, local_registry
from tests.registry_harness import free_port as _free_port
from wasidispatch.errors import RegistryError, SpecError
from wasidispatch.oci import registry as registry_module
from wasidispatch.oci.image import (
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
    Descriptor,
    Digest,
    Index,
    Manifest,
)
from wasidispatch.oci.layout import ImageLayout, pack_wasm, wasm_layers
from wasidispatch.oci.registry import MAX_INDEX_DEPTH, MAX_PULL_MANIFESTS, pull, push

pytestmark = pytest.mark.skipif(
    not Path(REGISTRY_BIN).exists(), reason="docker-registry not installed (make system-deps)"
)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A real registry (distribution 2.8) serving plain HTTP on 127.0.0.1:<free port>."""
    base = tmp_path_factory.mktemp("registry")
    with local_registry(base, delete=True) as running:
        yield running


@pytest.fixture
def module() -> bytes:
    return bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))


@pytest.fixture
def packed(tmp_path: Path, module: bytes) -> ImageLayout:
    layout = ImageLayout.create(tmp_path / "src")
    pack_wasm(layout, module, "v1")
    return layout


def _skopeo(*args: str) -> None:
    subprocess.run(["skopeo", *args], check=True, capture_output=True, timeout=120)


def test_push_then_pull_keeps_digests(
    registry: LocalRegistry, packed: ImageLayout, tmp_path: Path, module: bytes
) -> None:
    pushed = push(packed.path, "v1", f"{registry.address}/wasm/app:1.0", plain_http=True)
    assert pushed.digest == packed.resolve("v1")[0].digest

    pulled = pull(f"{registry.address}/wasm/app:1.0", tmp_path / "dst", plain_http=True)
    assert pulled.digest == pushed.digest
    assert pulled.ref_name == "1.0"
    dst = ImageLayout.open(tmp_path / "dst")
    assert [w.read_bytes() for w in wasm_layers(dst, "1.0")] == [module]

    by_digest = pull(
        f"{registry.address}/wasm/app@{pushed.digest}",
        tmp_path / "d2",
        tag="pinned",
        plain_http=True,
    )
    assert by_digest.digest == pushed.digest
    assert ImageLayout.open(tmp_path / "d2").refs() == ["pinned"]


def test_pushing_twice_skips_existing_blobs(registry: LocalRegistry, packed: ImageLayout) -> None:
    first = push(packed.path, "v1", f"{registry.address}/wasm/twice:a", plain_http=True)
    again = push(packed.path, None, f"{registry.address}/wasm/twice:b", plain_http=True)
    assert first.digest == again.digest


def test_skopeo_push_wasidispatch_pull(
    registry: LocalRegistry, packed: ImageLayout, tmp_path: Path, module: bytes
) -> None:
    _skopeo(
        "copy", "--dest-tls-verify=false", f"oci:{packed.path}:v1",
        f"docker://{registry.address}/from/skopeo:v1",
    )  # fmt: skip
    pulled = pull(f"{registry.address}/from/skopeo:v1", tmp_path / "dst", plain_http=True)
    assert pulled.digest == packed.resolve("v1")[0].digest
    layers = wasm_layers(ImageLayout.open(tmp_path / "dst"), "v1")
    assert [w.read_bytes() for w in layers] == [module]


def test_wasidispatch_push_skopeo_pull(
    registry: LocalRegistry, packed: ImageLayout, tmp_path: Path, module: bytes
) -> None:
    pushed = push(packed.path, "v1", f"{registry.address}/to/skopeo:v1", plain_http=True)
    _skopeo(
        "copy", "--src-tls-verify=false", f"docker://{registry.address}/to/skopeo:v1",
        f"oci:{tmp_path / 'dst'}:v1",
    )  # fmt: skip
    dst = ImageLayout.open(tmp_path / "dst")
    assert dst.resolve("v1")[0].digest == pushed.digest
    assert wasm_layers(dst, "v1")[0].read_bytes() == module


def test_pull_progress_on_request(
    registry: LocalRegistry, packed: ImageLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    push(packed.path, "v1", f"{registry.address}/wasm/progress:v1", plain_http=True)
    pull(f"{registry.address}/wasm/progress:v1", tmp_path / "dst", plain_http=True, progress=True)
    err = capsys.readouterr().err
    assert "pulling sha256:" in err
    assert "MiB" in err


def test_pull_missing_tag_is_a_registry_error(registry: LocalRegistry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="HTTP 404"):
        pull(f"{registry.address}/wasm/absent:nope", tmp_path / "dst", plain_http=True)
    assert not (tmp_path / "dst").exists()  # the pull made it, the failed pull removed it


def test_unreachable_registry_is_a_registry_error(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    with pytest.raises(RegistryError, match=f"127.0.0.1:{port}"):
        pull(f"127.0.0.1:{port}/x/y:z", tmp_path / "dst", plain_http=True)


def test_invalid_reference_is_a_registry_error(tmp_path: Path, packed: ImageLayout) -> None:
    with pytest.raises(RegistryError, match="invalid reference"):
        pull("UPPER CASE:///", tmp_path / "dst", plain_http=True)
    with pytest.raises(RegistryError, match="no single manifest"):
        push(packed.path, "absent-tag", "127.0.0.1:1/x/y:z", plain_http=True)


def test_tampered_local_blob_is_not_pushed(
    registry: LocalRegistry, packed: ImageLayout, module: bytes
) -> None:
    layer = packed.blob_path(Digest.of(module))
    layer.write_bytes(module[:-1] + bytes([module[-1] ^ 1]))
    with pytest.raises((RegistryError, SpecError), match="digest mismatch"):
        push(packed.path, "v1", f"{registry.address}/wasm/tampered:v1", plain_http=True)
    # The manifest never got there, whatever the registry kept of the aborted upload.
    req = urllib.request.Request(
        f"http://{registry.address}/v2/wasm/tampered/manifests/v1", method="HEAD"
    )
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(req)


def test_corrupted_registry_content_leaves_nothing_half_written(
    registry: LocalRegistry, packed: ImageLayout, tmp_path: Path, module: bytes
) -> None:
    push(packed.path, "v1", f"{registry.address}/wasm/corrupt:v1", plain_http=True)
    # Corrupt the registry's own copy of the layer (same length, other bytes).
    digest = Digest.of(module)
    blobs = registry.storage / "docker/registry/v2/blobs/sha256"
    data = blobs / digest.encoded[:2] / digest.encoded / "data"
    original = data.read_bytes()
    try:
        data.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        dst = tmp_path / "dst"
        with pytest.raises(RegistryError, match="digest mismatch") as info:
            pull(f"{registry.address}/wasm/corrupt:v1", dst, plain_http=True)
        assert isinstance(info.value.__cause__, SpecError)
        assert not dst.exists()  # the pull made it, the failed pull removed it
        # Into an existing layout: nothing added, not even the blobs that were fine.
        existing = ImageLayout.create(tmp_path / "existing")
        before = _tree(existing.path)
        with pytest.raises(RegistryError, match="digest mismatch"):
            pull(f"{registry.address}/wasm/corrupt:v1", existing.path, plain_http=True)
        assert _tree(existing.path) == before
        assert existing.refs() == []
    finally:
        data.write_bytes(original)


def test_cli_push_and_pull(
    registry: LocalRegistry, packed: ImageLayout, tmp_path: Path, module: bytes
) -> None:
    from wasidispatch.cli import main

    ref = f"{registry.address}/cli/app:v1"
    assert main(["push", f"{packed.path}:v1", ref]) == 0  # loopback: plain HTTP by default
    assert main(["pull", ref, str(tmp_path / "dst")]) == 0
    dst = ImageLayout.open(tmp_path / "dst")
    assert dst.resolve("v1")[0].digest == packed.resolve("v1")[0].digest
    assert wasm_layers(dst, "v1")[0].read_bytes() == module
    assert main(["pull", f"{registry.address}/cli/absent:v1", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()
    assert main(["pull", "--timeout", "30", ref, str(tmp_path / "d2")]) == 0
    assert main(["pull", "--timeout", "nan", ref, str(tmp_path / "d3")]) == 1


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) with its content."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- bounded pulls: de-duplicated, depth-limited, one deadline (issue 11, item 2) ------------


def _index_of(layout: ImageLayout, children: list[Descriptor], ref: str) -> Descriptor:
    index = Index(schema_version=2, media_type=MEDIA_TYPE_IMAGE_INDEX, manifests=children)
    desc = layout.write_blob(index.to_json(), media_type=MEDIA_TYPE_IMAGE_INDEX)
    return layout.tag(desc, ref)


class _Spy:
    """Counts the requests a pull makes (each still goes to the real registry)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.urls: list[str] = []
        original = registry_module._Client.request

        def request(client: Any, method: str, url: str, **kwargs: Any) -> Any:
            self.urls.append(f"{method} {url}")
            return original(client, method, url, **kwargs)

        monkeypatch.setattr(registry_module._Client, "request", request)


def test_an_index_listing_one_child_1000_times_fetches_it_once(
    registry: LocalRegistry, packed: ImageLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child, _ = packed.resolve("v1")
    child = child.model_copy(update={"annotations": None})
    top = _index_of(packed, [child] * 1000, "fat")
    ref = f"{registry.address}/wasm/fat:v1"
    spy = _Spy(monkeypatch)
    push(packed.path, "fat", ref, plain_http=True)
    assert sum(child.digest in u and "/manifests/" in u for u in spy.urls) == 1
    spy.urls.clear()
    pulled = pull(ref, tmp_path / "dst", plain_http=True)
    assert pulled.digest == top.digest
    fetched = [u for u in spy.urls if u.startswith("GET ")]
    assert sum(f"/manifests/{child.digest}" in u for u in fetched) == 1
    assert len(fetched) == 4  # the index, the manifest, its config, its layer


def test_indexes_nested_too_deep_are_refused(
    registry: LocalRegistry, packed: ImageLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    desc, _ = packed.resolve("v1")
    for level in range(MAX_INDEX_DEPTH + 1):  # an index of an index of ... of the manifest
        desc = _index_of(packed, [desc.model_copy(update={"annotations": None})], f"l{level}")
    with pytest.raises(RegistryError, match="nested more than"):
        push(packed.path, desc.ref_name, f"{registry.address}/wasm/deep:v1", plain_http=True)
    with monkeypatch.context() as m:  # get it into the registry anyway
        m.setattr(registry_module, "MAX_INDEX_DEPTH", MAX_INDEX_DEPTH + 2)
        push(packed.path, desc.ref_name, f"{registry.address}/wasm/deep:v1", plain_http=True)
    with pytest.raises(RegistryError, match=r"nested more than 4 deep \(MAX_INDEX_DEPTH\)"):
        pull(f"{registry.address}/wasm/deep:v1", tmp_path / "dst", plain_http=True)
    assert not (tmp_path / "dst").exists()
    one_less = f"l{MAX_INDEX_DEPTH - 1}"
    push(packed.path, one_less, f"{registry.address}/wasm/deep:ok", plain_http=True)
    assert pull(f"{registry.address}/wasm/deep:ok", tmp_path / "ok", plain_http=True)


# --- hostile servers: a protocol-edge fake speaking just enough of the distribution API ------


class _Hostile(NamedTuple):
    address: str
    requests: list[str]


def _serve(routes: dict[str, Any]) -> Generator[_Hostile, None, None]:
    """A threaded HTTP server on 127.0.0.1: ``routes[path](handler)`` answers each GET."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.path)
            answer = routes.get(self.path)
            try:
                if answer is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    answer(self)
            except OSError:
                pass  # the client hung up: what a deadline does

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield _Hostile(f"127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _json_answer(body: bytes, media_type: str) -> Any:
    def answer(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", media_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return answer


_TRICKLED = 400  # bytes, one every 25 ms: 10 s, then the server gives up (short of the size)


def _trickle(h: http.server.BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(_TRICKLED * 2))
    h.end_headers()
    for _ in range(_TRICKLED):
        h.wfile.write(b"x")
        h.wfile.flush()
        time.sleep(0.025)


def _trickle_headers(h: http.server.BaseHTTPRequestHandler) -> None:
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(_TRICKLED):
        h.wfile.write(b"x")
        h.wfile.flush()
        time.sleep(0.025)
    h.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")


def _manifest_of(blob: Descriptor) -> bytes:
    config = blob.model_copy(update={"media_type": MEDIA_TYPE_IMAGE_CONFIG})
    return Manifest(
        schema_version=2, media_type=MEDIA_TYPE_IMAGE_MANIFEST, config=config, layers=[blob]
    ).to_json()


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_trickling_server_is_cut_off_by_the_overall_deadline(tmp_path: Path, where: str) -> None:
    blob = Descriptor(
        media_type="application/wasm", digest=Digest.of(b"x" * _TRICKLED * 2), size=_TRICKLED * 2
    )
    routes = {
        "/v2/slow/app/manifests/v1": _json_answer(_manifest_of(blob), MEDIA_TYPE_IMAGE_MANIFEST),
        f"/v2/slow/app/blobs/{blob.digest}": _trickle if where == "body" else _trickle_headers,
    }
    server = _serve(routes)
    hostile = next(server)
    try:
        # Each read gets a byte within 25 ms: only an overall deadline ends this early.
        with pytest.raises(RegistryError, match=r"did not finish within the 1 s deadline"):
            pull(f"{hostile.address}/slow/app:v1", tmp_path / "dst", timeout=1)
        assert not (tmp_path / "dst").exists()
        existing = ImageLayout.create(tmp_path / "existing")
        before = _tree(existing.path)
        with pytest.raises(RegistryError, match="deadline"):
            pull(f"{hostile.address}/slow/app:v1", existing.path, timeout=0.5)
        assert _tree(existing.path) == before  # no partial blob, no temporary file
        assert sorted(p.name for p in existing.path.iterdir()) == [
            "blobs",
            "index.json",
            "oci-layout",
        ]  # no scratch directory left
    finally:
        server.close()


def test_the_deadline_is_validated() -> None:
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(RegistryError, match="timeout must be a positive number"):
            pull("127.0.0.1:1/x/y:z", "/nonexistent/never-made", timeout=bad)


def test_an_index_of_too_many_children_fetches_none_of_them(tmp_path: Path) -> None:
    children = [
        Descriptor(media_type=MEDIA_TYPE_IMAGE_MANIFEST, digest=Digest.of(str(i).encode()), size=2)
        for i in range(MAX_PULL_MANIFESTS + 1)
    ]
    index = Index(schema_version=2, media_type=MEDIA_TYPE_IMAGE_INDEX, manifests=children)
    routes = {"/v2/wide/app/manifests/v1": _json_answer(index.to_json(), MEDIA_TYPE_IMAGE_INDEX)}
    server = _serve(routes)
    hostile = next(server)
    try:
        with pytest.raises(RegistryError, match="MAX_PULL_MANIFESTS"):
            pull(f"{hostile.address}/wide/app:v1", tmp_path / "dst")
        assert hostile.requests == ["/v2/wide/app/manifests/v1"]
        assert not (tmp_path / "dst").exists()
    finally:
        server.close()


def test_deeply_nested_json_from_a_registry_is_a_registry_error(tmp_path: Path) -> None:
    body = b'{"schemaVersion": 2, "manifests": [], "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    routes = {"/v2/deep/app/manifests/v1": _json_answer(body, MEDIA_TYPE_IMAGE_INDEX)}
    server = _serve(routes)
    hostile = next(server)
    try:
        with pytest.raises(RegistryError, match="bad content from the registry"):
            pull(f"{hostile.address}/deep/app:v1", tmp_path / "dst")
    finally:
        server.close()
