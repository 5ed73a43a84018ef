"""pull/push against a real registry: Debian's docker-registry on 127.0.0.1, and skopeo."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import wasmtime

from wasidispatch.errors import RegistryError, SpecError
from wasidispatch.oci.image import Digest
from wasidispatch.oci.layout import ImageLayout, pack_wasm, wasm_layers
from wasidispatch.oci.registry import pull, push

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"

pytestmark = pytest.mark.skipif(
    not Path(REGISTRY_BIN).exists(), reason="docker-registry not installed (make system-deps)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalRegistry(NamedTuple):
    address: str  # host:port
    storage: Path  # the filesystem driver's root directory


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A real registry (distribution 2.8) serving plain HTTP on 127.0.0.1:<free port>."""
    base = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'storage'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = (base / "registry.log").open("wb")
    proc = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log, start_new_session=True
    )
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(200):  # wait until it answers (bounded; not a timing assertion)
            try:
                with urllib.request.urlopen(f"http://{address}/v2/", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((base / "registry.log").read_text()) from None
                time.sleep(0.05)
        else:
            raise RuntimeError("docker-registry did not start")
        yield LocalRegistry(address, base / "storage")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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
    assert ImageLayout.open(tmp_path / "dst").refs() == []


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
        layout = ImageLayout.open(dst)
        assert layout.refs() == []
        assert not layout.has_blob(digest)
        assert not [p for p in (dst / "blobs" / "sha256").iterdir() if p.name.startswith(".tmp")]
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
