"""Image layouts: atomic verified blobs, references, Wasm artifacts and images, skopeo interop."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import wasmtime

from wasidispatch.errors import SpecError
from wasidispatch.oci.image import (
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_MANIFEST,
    Descriptor,
    Digest,
    ImageConfig,
    Index,
    Manifest,
)
from wasidispatch.oci.layout import MAX_MANIFEST_SIZE, ImageLayout, pack_wasm, wasm_layers
from wasidispatch.oci.wasm import MEDIA_TYPE_WASM, MEDIA_TYPE_WASM_CONFIG, WasmConfig

MODULE_WAT = '(module (func (export "_start")))'
COMPONENT_WAT = "(component)"


@pytest.fixture
def module() -> bytes:
    return bytes(wasmtime.wat2wasm(MODULE_WAT))


@pytest.fixture
def layout(tmp_path: Path) -> ImageLayout:
    return ImageLayout.create(tmp_path / "layout")


def _visible_blobs(layout: ImageLayout) -> list[str]:
    return sorted(p.name for p in (layout.path / "blobs" / "sha256").iterdir())


# --- create / open ---------------------------------------------------------------------------


def test_create_writes_a_valid_empty_layout(tmp_path: Path) -> None:
    layout = ImageLayout.create(tmp_path / "new" / "dir")
    assert json.loads((layout.path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads((layout.path / "index.json").read_text()) == {
        "schemaVersion": 2,
        "manifests": [],
    }
    assert ImageLayout.create(layout.path).refs() == []  # idempotent


@pytest.mark.parametrize(
    ("file", "content", "field"),
    [
        ("oci-layout", b'{"imageLayoutVersion": "9"}', "imageLayoutVersion"),
        ("oci-layout", b"{", "malformed JSON"),
        ("index.json", b'{"schemaVersion": 2, "manifests": [{"size": 1}]}', "manifests.0"),
        ("index.json", b"[]", "Input should be an object"),
    ],
)
def test_open_rejects_bad_layout_files(
    layout: ImageLayout, file: str, content: bytes, field: str
) -> None:
    (layout.path / file).write_bytes(content)
    with pytest.raises(SpecError, match=field) as info:
        ImageLayout.open(layout.path)
    assert file in str(info.value)


def test_open_rejects_missing_layout(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not an image layout"):
        ImageLayout.open(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"oci-layout .* does not exist"):
        ImageLayout.open(tmp_path / "empty")


def test_oversized_index_is_refused(layout: ImageLayout) -> None:
    (layout.path / "index.json").write_bytes(b" " * (MAX_MANIFEST_SIZE + 1))
    with pytest.raises(SpecError, match="over the 4194304-byte limit"):
        layout.index()


# --- blobs -------------------------------------------------------------------------------------


def test_write_and_read_blob_round_trip(layout: ImageLayout) -> None:
    desc = layout.write_blob(b"hello", media_type="text/plain")
    assert desc.digest == Digest.of(b"hello")
    assert desc.size == 5
    assert layout.blob_path(desc.digest).read_bytes() == b"hello"
    assert layout.read_blob(desc) == b"hello"
    streamed = layout.write_blob(io.BytesIO(b"x" * 3_000_000))
    with layout.open_blob(streamed) as reader:
        chunks = []
        while chunk := reader.read(65536):
            chunks.append(chunk)
        assert reader.verified
    assert b"".join(chunks) == b"x" * 3_000_000


def test_write_blob_with_wrong_expected_digest_stores_nothing(layout: ImageLayout) -> None:
    before = _visible_blobs(layout)
    with pytest.raises(SpecError, match="digest mismatch"):
        layout.write_blob(b"content", expected=Digest.of(b"other"))
    assert _visible_blobs(layout) == before


def test_interrupted_write_leaves_no_visible_blob(layout: ImageLayout) -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError("connection reset")
            return b"a" * 1024

    before = _visible_blobs(layout)
    with pytest.raises(OSError, match="connection reset"):
        layout.write_blob(Broken())
    assert _visible_blobs(layout) == before  # no blob and no temporary file left


def test_digest_mismatch_on_read(layout: ImageLayout) -> None:
    desc = layout.write_blob(b"original")
    layout.blob_path(desc.digest).write_bytes(b"tampered")  # same length
    with pytest.raises(SpecError, match="digest mismatch") as info:
        layout.read_blob(desc)
    assert str(desc.digest.encoded) in str(info.value)


def test_truncated_blob(layout: ImageLayout) -> None:
    desc = layout.write_blob(b"0123456789")
    layout.blob_path(desc.digest).write_bytes(b"01234")
    with pytest.raises(SpecError, match="truncated blob: 5 of 10"):
        layout.read_blob(desc)


def test_blob_longer_than_descriptor(layout: ImageLayout) -> None:
    desc = layout.write_blob(b"0123")
    layout.blob_path(desc.digest).write_bytes(b"0123456")
    with pytest.raises(SpecError, match="larger than"):
        layout.read_blob(desc)


def test_missing_blob(layout: ImageLayout) -> None:
    desc = Descriptor(media_type="text/plain", digest=Digest.of(b"nothing here"), size=12)
    with pytest.raises(SpecError, match="missing blob") as info:
        layout.read_blob(desc)
    assert desc.digest.encoded in str(info.value)


def test_embedded_data_serves_a_missing_blob_and_is_verified(layout: ImageLayout) -> None:
    good = Descriptor.parse(
        {"mediaType": "text/plain", "digest": Digest.of(b"hi"), "size": 2, "data": "aGk="}
    )
    assert layout.read_blob(good) == b"hi"
    bad = good.model_copy(update={"data": "aGo="})  # "hj"
    with pytest.raises(SpecError, match="digest mismatch"):
        layout.read_blob(bad)


def test_path_traversal_digest_never_becomes_a_path(layout: ImageLayout, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="invalid digest"):
        layout.blob_path("sha256:../../etc/passwd")
    with pytest.raises(SpecError, match="invalid digest"):
        Descriptor.parse({"mediaType": "a/b", "digest": "sha256:../../../x", "size": 1})
    evil = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
                "digest": "sha256:../../../../etc/passwd",
                "size": 10,
                "annotations": {ANNOTATION_REF_NAME: "evil"},
            }
        ],
    }
    (layout.path / "index.json").write_text(json.dumps(evil))
    with pytest.raises(SpecError, match=r"index\.json: manifests\.0\.digest"):
        layout.resolve("evil")


def test_unverifiable_algorithm_is_refused(layout: ImageLayout) -> None:
    desc = Descriptor(media_type="a/b", digest=Digest.parse("blake3:" + "a" * 64), size=1)
    layout.blob_path(desc.digest).parent.mkdir()
    layout.blob_path(desc.digest).write_bytes(b"x")
    with pytest.raises(SpecError, match="cannot verify"):
        layout.read_blob(desc)


def test_oversized_manifest_is_refused_before_reading(layout: ImageLayout) -> None:
    big = Descriptor(
        media_type=MEDIA_TYPE_IMAGE_MANIFEST, digest=Digest.of(b"x"), size=MAX_MANIFEST_SIZE + 1
    )
    with pytest.raises(SpecError, match="cap"):
        layout.read_json(big, Manifest)


def test_malformed_manifest_blob_names_the_blob(layout: ImageLayout) -> None:
    desc = layout.write_blob(b'{"schemaVersion": 2, "layers": "no"}', media_type="a/b")
    with pytest.raises(SpecError, match="layers") as info:
        layout.read_json(desc, Manifest)
    assert desc.digest.encoded in str(info.value)


# --- refs ----------------------------------------------------------------------------------------


def test_tag_replaces_and_resolve_finds(layout: ImageLayout, module: bytes) -> None:
    first = pack_wasm(layout, module, "v1", created=None)
    second = pack_wasm(layout, module + b"", "v2", created="2024-01-01T00:00:00Z")
    assert layout.refs() == ["v1", "v2"]
    assert layout.resolve("v1")[0].digest == first.digest
    assert layout.resolve("v2")[0].digest == second.digest
    layout.tag(second, "v1")
    assert layout.refs() == ["v2", "v1"]
    assert layout.resolve("v1")[0].digest == second.digest
    with pytest.raises(SpecError, match="no reference 'nope'"):
        layout.resolve("nope")
    with pytest.raises(SpecError, match="name a reference"):
        layout.resolve(None)
    with pytest.raises(SpecError, match="invalid reference"):
        layout.tag(second, "")


def test_tag_refuses_a_missing_blob(layout: ImageLayout) -> None:
    desc = Descriptor(media_type=MEDIA_TYPE_IMAGE_MANIFEST, digest=Digest.of(b"?"), size=1)
    with pytest.raises(SpecError, match="missing"):
        layout.tag(desc, "v1")
    assert layout.refs() == []


def test_resolve_goes_through_a_single_manifest_index(layout: ImageLayout, module: bytes) -> None:
    inner = pack_wasm(layout, module, "inner", created=None)
    index = Index(
        schema_version=2,
        media_type=MEDIA_TYPE_IMAGE_INDEX,
        manifests=[inner.model_copy(update={"annotations": None})],
    )
    desc = layout.write_blob(index.to_json(), media_type=MEDIA_TYPE_IMAGE_INDEX)
    layout.tag(desc, "multi")
    assert layout.resolve("multi")[0].digest == inner.digest


# --- Wasm artifact ---------------------------------------------------------------------------


def test_pack_module_builds_a_cncf_wasm_artifact(layout: ImageLayout, module: bytes) -> None:
    desc = pack_wasm(layout, module, "v1", title="app.wasm", annotations={"a": "b"})
    assert desc.ref_name == "v1"
    got, manifest = layout.resolve("v1")
    assert got.digest == desc.digest
    assert manifest.media_type == MEDIA_TYPE_IMAGE_MANIFEST
    assert manifest.annotations == {"a": "b"}
    assert manifest.config.media_type == MEDIA_TYPE_WASM_CONFIG
    assert [la.media_type for la in manifest.layers] == [MEDIA_TYPE_WASM]
    assert manifest.layers[0].digest == Digest.of(module)
    config = layout.read_json(manifest.config, WasmConfig)
    assert (config.architecture, config.os) == ("wasm", "wasip1")
    assert config.layer_digests == [Digest.of(module)]
    assert config.created is not None
    assert config.component is None
    layers = wasm_layers(layout, "v1")
    assert len(layers) == 1
    assert layers[0].read_bytes() == module
    assert layers[0].digest == Digest.of(module)


def test_pack_component_is_wasip2(layout: ImageLayout) -> None:
    component = bytes(wasmtime.wat2wasm(COMPONENT_WAT))
    pack_wasm(layout, component, "c", created=None)
    _, manifest = layout.resolve("c")
    config = layout.read_json(manifest.config, WasmConfig)
    assert config.os == "wasip2"
    assert config.component is not None
    assert config.created is None


def test_pack_is_reproducible_without_created(tmp_path: Path, module: bytes) -> None:
    a = pack_wasm(ImageLayout.create(tmp_path / "a"), module, "v1", created=None)
    b = pack_wasm(ImageLayout.create(tmp_path / "b"), module, "v1", created=None)
    assert a.digest == b.digest


@pytest.mark.parametrize("data", [b"", b"\x7fELF\x02\x01\x01", b"(module)", b"hello"])
def test_pack_refuses_non_wasm(layout: ImageLayout, data: bytes) -> None:
    with pytest.raises(SpecError, match="not a Wasm"):
        pack_wasm(layout, data, "v1")
    assert layout.refs() == []


def test_wasm_layer_bytes_are_verified(layout: ImageLayout, module: bytes) -> None:
    pack_wasm(layout, module, "v1", created=None)
    layer = wasm_layers(layout, "v1")[0]
    tampered = bytearray(module)
    tampered[-1] ^= 0xFF
    layout.blob_path(layer.digest).write_bytes(bytes(tampered))
    with pytest.raises(SpecError, match="digest mismatch"):
        layer.read_bytes()


# --- Wasm image (rootfs tar layer + crun annotations) --------------------------------------


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


def _write_image(
    layout: ImageLayout, files: dict[str, bytes], ref: str, annotations: dict[str, str]
) -> None:
    layer_bytes = _tar_gz(files)
    layer = layout.write_blob(layer_bytes, media_type=MEDIA_TYPE_IMAGE_LAYER_GZIP)
    diff_id = Digest.of(gzip.decompress(layer_bytes))
    config = ImageConfig.parse(
        {
            "architecture": "wasm",
            "os": "wasip1",
            "config": {"Entrypoint": ["/app.wasm"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    )
    config_desc = layout.write_blob(config.to_json(), media_type=MEDIA_TYPE_IMAGE_CONFIG)
    manifest = Manifest(
        schema_version=2,
        media_type=MEDIA_TYPE_IMAGE_MANIFEST,
        config=config_desc,
        layers=[layer],
        annotations=annotations,
    )
    layout.tag(layout.write_blob(manifest.to_json(), media_type=MEDIA_TYPE_IMAGE_MANIFEST), ref)


@pytest.mark.parametrize(
    "annotations",
    [{"run.oci.handler": "wasm"}, {"module.wasm.image/variant": "compat"}],
)
def test_wasm_image_entrypoint_comes_from_the_tar_layer(
    layout: ImageLayout, module: bytes, annotations: dict[str, str]
) -> None:
    _write_image(layout, {"app.wasm": module, "etc/x": b"x"}, "img", annotations)
    [layer] = wasm_layers(layout, "img")
    assert layer.read_bytes() == module
    assert layer.digest == Digest.of(module)
    assert layer.origin.endswith(":/app.wasm")


def test_plain_image_has_no_wasm_layers(layout: ImageLayout, module: bytes) -> None:
    _write_image(layout, {"app.wasm": module}, "img", {})
    assert wasm_layers(layout, "img") == []


def test_wasm_image_without_the_entrypoint_file(layout: ImageLayout, module: bytes) -> None:
    _write_image(layout, {"other.wasm": module}, "img", {"run.oci.handler": "wasm"})
    with pytest.raises(SpecError, match=r"'/app\.wasm' is in no layer"):
        wasm_layers(layout, "img")


# --- skopeo accepts what we write, and we read what it writes ---------------------------------

needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")


def _skopeo_copy(src: str, dst: str) -> None:
    subprocess.run(
        ["skopeo", "copy", "--quiet", src, dst],
        check=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "TMPDIR": os.environ.get("TMPDIR", "/tmp")},
    )


@needs_skopeo
def test_skopeo_round_trip_keeps_digests(tmp_path: Path, module: bytes) -> None:
    ours = ImageLayout.create(tmp_path / "ours")
    desc = pack_wasm(ours, module, "v1")
    _skopeo_copy(f"oci:{ours.path}:v1", f"oci:{tmp_path / 'theirs'}:v2")

    theirs = ImageLayout.open(tmp_path / "theirs")
    their_desc, _ = theirs.resolve("v2")
    assert their_desc.digest == desc.digest  # same manifest bytes
    assert theirs.read_blob(their_desc) == ours.read_blob(desc)
    assert wasm_layers(theirs, "v2")[0].read_bytes() == module

    # ...and back into our existing layout under a new tag.
    _skopeo_copy(f"oci:{theirs.path}:v2", f"oci:{ours.path}:back")
    assert ours.resolve("back")[0].digest == desc.digest
    assert set(ours.refs()) == {"v1", "back"}
    ImageLayout.open(ours.path)  # still a valid layout for us


@needs_skopeo
def test_skopeo_accepts_a_wasm_image(tmp_path: Path, module: bytes) -> None:
    ours = ImageLayout.create(tmp_path / "ours")
    _write_image(ours, {"app.wasm": module}, "img", {"run.oci.handler": "wasm"})
    _skopeo_copy(f"oci:{ours.path}:img", f"oci:{tmp_path / 'theirs'}:img")
    theirs = ImageLayout.open(tmp_path / "theirs")
    assert theirs.resolve("img")[0].digest == ours.resolve("img")[0].digest
    assert wasm_layers(theirs, "img")[0].read_bytes() == module
