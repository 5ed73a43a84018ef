"""Bounds on what is read from a bundle or an image layout (issue 11, item 2).

config.json and layout documents only as regular files under a cap (a FIFO never hangs, a
symlink to ``/dev/zero`` is never read); tar layers decompressed as a stream whatever they
hold. Memory is measured as a size, never a time: a child process runs the operation and
reports its peak RSS (``ru_maxrss``) before and after it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import wasmtime

from wasidispatch._bundles import wasm_bundle
from wasidispatch.errors import SpecError
from wasidispatch.oci import layout as layout_module
from wasidispatch.oci.bundle import Bundle
from wasidispatch.oci.image import (
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_MANIFEST,
    Descriptor,
    ImageConfig,
    Manifest,
)
from wasidispatch.oci.layout import MAX_WASM_SIZE, ImageLayout, pack_wasm, wasm_layers
from wasidispatch.oci.runtime import Spec

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
#: Peak RSS an operation may add over the interpreter that imported everything (KiB, as
#: ``ru_maxrss``): the unbounded code needed 2-4 GiB for the layers below (and ~100 MiB for
#: 100000 empty members); the streaming code measures 0-1 MiB.
RSS_BUDGET_KIB = 32 * 1024


@pytest.fixture
def module() -> bytes:
    return bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))


# --- config.json and layout documents -------------------------------------------------------


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_bundle_config_json_fifo_is_refused_not_waited_on(tmp_path: Path, module: bytes) -> None:
    bundle = wasm_bundle(tmp_path / "b", module)
    (bundle / "config.json").unlink()
    _fifo(bundle / "config.json")
    with pytest.raises(SpecError, match=r"config\.json .* is not a regular file \(FIFO\)"):
        Bundle.load(bundle)


def test_bundle_config_json_symlink_to_dev_zero_is_refused(tmp_path: Path, module: bytes) -> None:
    bundle = wasm_bundle(tmp_path / "b", module)
    (bundle / "config.json").unlink()
    (bundle / "config.json").symlink_to("/dev/zero")
    with pytest.raises(SpecError, match=r"config\.json .* \(character device\)"):
        Bundle.load(bundle)
    with pytest.raises(SpecError, match="character device"):
        Spec.load(bundle / "config.json")


def test_bundle_config_json_over_the_cap_is_refused(tmp_path: Path, module: bytes) -> None:
    bundle = wasm_bundle(tmp_path / "b", module)
    doc = json.loads((bundle / "config.json").read_text())
    doc["annotations"] = {"pad": "x" * (4 << 20)}
    (bundle / "config.json").write_text(json.dumps(doc))
    with pytest.raises(SpecError, match="over the 4194304-byte limit"):
        Bundle.load(bundle)


@pytest.mark.parametrize("name", ["oci-layout", "index.json"])
def test_layout_document_fifo_is_refused(tmp_path: Path, name: str) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    (layout.path / name).unlink()
    _fifo(layout.path / name)
    with pytest.raises(SpecError, match="not a regular file"):
        ImageLayout.open(layout.path)


@pytest.mark.parametrize("name", ["oci-layout", "index.json"])
def test_layout_document_symlink_is_refused(tmp_path: Path, name: str) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    (layout.path / name).unlink()
    (layout.path / name).symlink_to("/dev/zero")
    with pytest.raises(SpecError, match=rf"{name} .*: Too many levels of symbolic links"):
        ImageLayout.open(layout.path)


def test_blob_fifo_or_symlink_is_refused(tmp_path: Path, module: bytes) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    desc = pack_wasm(layout, module, "v1", created=None)
    blob = layout.blob_path(desc.digest)
    blob.unlink()
    _fifo(blob)
    with pytest.raises(SpecError, match="blob is not a regular file"):
        layout.resolve("v1")
    blob.unlink()
    blob.symlink_to("/dev/zero")
    with pytest.raises(SpecError, match="cannot read"):
        layout.resolve("v1")
    assert not layout.has_blob(desc.digest)


# --- tar layers: streamed, bounded ----------------------------------------------------------


def _gzip_tar_of_zeros(path: Path, member: str, size: int, entry: bytes | None = None) -> None:
    """A tar+gzip layer holding ``member`` of ``size`` zero bytes, then ``entry`` as
    ``/app.wasm``. Generated as a stream of concatenated gzip members (valid gzip: readers
    decompress them in turn), so 2 GiB of zeros cost ~2 MB on disk, no memory and no time."""
    chunk = 64 << 20
    assert size % chunk == 0
    zeros_member = gzip.compress(bytes(chunk), compresslevel=9)  # one 64 MiB member, ~64 KB
    with path.open("wb") as out:
        info = tarfile.TarInfo(member)
        info.size = size
        out.write(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT)))
        for _ in range(size // chunk):
            out.write(zeros_member)
        tail = b""
        if entry is not None:
            info = tarfile.TarInfo("app.wasm")
            info.size = len(entry)
            tail = info.tobuf(format=tarfile.GNU_FORMAT) + entry + bytes(-len(entry) % 512)
        out.write(gzip.compress(tail + bytes(1024)))  # end of archive


def _wasm_image(layout: ImageLayout, layer_file: Path, media_type: str, ref: str) -> None:
    """A plain OCI image marked ``run.oci.handler=wasm`` whose entrypoint is ``/app.wasm``."""
    with layer_file.open("rb") as f:
        layer = layout.write_blob(f, media_type=media_type)
    config = ImageConfig.model_validate(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/app.wasm"]},
            "rootfs": {"type": "layers", "diff_ids": [str(layer.digest)]},
        }
    )
    config_desc = layout.write_blob(config.to_json(), media_type=MEDIA_TYPE_IMAGE_CONFIG)
    manifest = Manifest(
        schema_version=2,
        media_type=MEDIA_TYPE_IMAGE_MANIFEST,
        config=config_desc,
        layers=[layer],
        annotations={"run.oci.handler": "wasm"},
    )
    desc = layout.write_blob(manifest.to_json(), media_type=MEDIA_TYPE_IMAGE_MANIFEST)
    layout.tag(desc, ref)


@pytest.fixture(scope="module")
def bomb_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layout with two gzip layers of zeros:

    - ``bomb``: 2 MB whose entrypoint ``/app.wasm`` is a 2 GiB member;
    - ``junk``: a 256 MiB ``/junk`` member, then a real ``/app.wasm`` (streamed past: the
      unbounded code held it twice, decompressed and extracted);
    - ``many``: 100000 empty members, then ``/app.wasm``.
    """
    base = tmp_path_factory.mktemp("bomb")
    layout = ImageLayout.create(base / "layout")
    module = bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))
    _gzip_tar_of_zeros(base / "bomb.tar.gz", "app.wasm", 2 * GIB)
    _gzip_tar_of_zeros(base / "junk.tar.gz", "junk", 256 << 20, entry=module)
    assert (base / "bomb.tar.gz").stat().st_size < 4 << 20
    _wasm_image(layout, base / "bomb.tar.gz", MEDIA_TYPE_IMAGE_LAYER_GZIP, "bomb")
    _wasm_image(layout, base / "junk.tar.gz", MEDIA_TYPE_IMAGE_LAYER_GZIP, "junk")
    # ``many``: 100000 empty members before /app.wasm (tarfile lists every member it reads).
    empty = tarfile.TarInfo("x").tobuf(format=tarfile.GNU_FORMAT)
    app = tarfile.TarInfo("app.wasm")
    app.size = len(module)
    entry = app.tobuf(format=tarfile.GNU_FORMAT) + module + bytes(-len(module) % 512)
    (base / "many.tar.gz").write_bytes(gzip.compress(empty * 100_000 + entry + bytes(1024)))
    _wasm_image(layout, base / "many.tar.gz", MEDIA_TYPE_IMAGE_LAYER_GZIP, "many")
    return layout.path


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from wasidispatch.errors import WasiDispatchError
    from wasidispatch.oci.layout import ImageLayout, wasm_layers
    from wasidispatch._cli import inspect as _inspect
    from wasidispatch.cli import main
    path, ref, what = sys.argv[1:4]
    layout = ImageLayout.open(path)
    layout.resolve(ref)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = "ok"
    try:
        if what == "wasm_layers":
            layers = wasm_layers(layout, ref)
            outcome = "ok " + " ".join(str(len(w.read_bytes())) for w in layers)
        else:
            outcome = "exit %d" % main(["inspect", path + ":" + ref])
    except WasiDispatchError as exc:
        outcome = type(exc).__name__ + ": " + str(exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before": before, "after": after, "outcome": outcome}))
    """
)


def _peak(layout: Path, ref: str, what: str) -> tuple[int, int, str]:
    """Run ``what`` on ``ref`` in a fresh interpreter: (its RSS before the operation, the
    growth the operation caused, the outcome), sizes in KiB. The parent checks the child's
    own figure against its ``RUSAGE_CHILDREN`` high-water mark."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(layout), ref, what],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert children >= report["after"]  # the child's own peak is among the children's
    return report["before"], report["after"] - report["before"], report["outcome"]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["wasm_layers", "inspect"])
def test_a_2_gib_entrypoint_in_a_2_mb_layer_is_refused_without_memory(
    bomb_layout: Path, what: str
) -> None:
    _, growth, outcome = _peak(bomb_layout, "bomb", what)
    assert growth < RSS_BUDGET_KIB, f"{what} grew RSS by {growth} KiB ({outcome})"
    if what == "wasm_layers":
        assert outcome.startswith("SpecError: ")
        assert f"over the {MAX_WASM_SIZE}-byte cap" in outcome
    else:
        assert outcome == "exit 1"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ref", "what"), [("junk", "wasm_layers"), ("junk", "inspect"), ("many", "wasm_layers")]
)
def test_a_large_junk_member_or_many_members_are_streamed_past(
    bomb_layout: Path, ref: str, what: str
) -> None:
    _, growth, outcome = _peak(bomb_layout, ref, what)
    assert growth < RSS_BUDGET_KIB, f"{what} grew RSS by {growth} KiB ({outcome})"
    if what == "wasm_layers":
        module = wasmtime.wat2wasm('(module (func (export "_start")))')
        assert outcome == f"ok {len(module)}"
    else:
        assert outcome == "exit 0"


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], *, compress: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue()) if compress else buf.getvalue()


def _image_from_tar(tmp_path: Path, data: bytes, *, compress: bool) -> ImageLayout:
    layout = ImageLayout.create(tmp_path / "layout")
    (tmp_path / "layer").write_bytes(data)
    media = MEDIA_TYPE_IMAGE_LAYER_GZIP if compress else MEDIA_TYPE_IMAGE_LAYER
    _wasm_image(layout, tmp_path / "layer", media, "v1")
    return layout


def test_the_scan_of_decompressed_bytes_is_capped(
    tmp_path: Path, module: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _tar(
        [(tarfile.TarInfo("junk"), bytes(1 << 20)), (tarfile.TarInfo("app.wasm"), module)],
        compress=True,
    )
    layout = _image_from_tar(tmp_path, data, compress=True)
    assert [w.read_bytes() for w in wasm_layers(layout, "v1")] == [module]
    monkeypatch.setattr(layout_module, "MAX_LAYER_SCAN", 512 << 10)
    with pytest.raises(SpecError, match="decompressed bytes scanned"):
        wasm_layers(layout, "v1")


def test_a_huge_pax_header_is_refused(tmp_path: Path, module: bytes) -> None:
    info = tarfile.TarInfo("app.wasm")
    info.pax_headers = {"comment": "x" * (2 << 20)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info.size = len(module)
        tar.addfile(info, io.BytesIO(module))
    layout = _image_from_tar(tmp_path, buf.getvalue(), compress=False)
    with pytest.raises(SpecError, match=r"extended tar header of .* bytes, over the"):
        wasm_layers(layout, "v1")


def test_a_chain_of_long_name_headers_is_a_spec_error_not_recursion(
    tmp_path: Path, module: bytes
) -> None:
    # tarfile follows each GNU long-name header by recursion: 3000 of them in a row would be a
    # RecursionError (and each one's data is read whole).
    longname = tarfile.TarInfo("././@LongLink")
    longname.type = tarfile.GNUTYPE_LONGNAME
    name = b"app.wasm\0"
    longname.size = len(name)
    header = longname.tobuf(format=tarfile.GNU_FORMAT) + name + bytes(-len(name) % 512)
    info = tarfile.TarInfo("app.wasm")
    info.size = len(module)
    data = (
        header * 3000
        + info.tobuf(format=tarfile.GNU_FORMAT)
        + module
        + bytes(-len(module) % 512)
        + bytes(1024)
    )
    layout = _image_from_tar(tmp_path, data, compress=False)
    with pytest.raises(SpecError, match="extended tar headers in a row"):
        wasm_layers(layout, "v1")


def test_a_corrupted_layer_is_refused_even_after_the_entrypoint(
    tmp_path: Path, module: bytes
) -> None:
    data = _tar([(tarfile.TarInfo("app.wasm"), module)], compress=False) + b"\0" * 4096
    layout = _image_from_tar(tmp_path, data, compress=False)
    layer = layout.resolve("v1")[1].layers[0]
    blob = layout.blob_path(layer.digest)
    tampered = bytearray(blob.read_bytes())
    tampered[-1] ^= 1  # after the end of the archive: the tar is fine, the digest is not
    blob.write_bytes(bytes(tampered))
    with pytest.raises(SpecError, match="digest mismatch"):
        wasm_layers(layout, "v1")


def test_bad_gzip_is_a_spec_error(tmp_path: Path) -> None:
    layout = _image_from_tar(tmp_path, b"\x1f\x8b\x08\x00garbage" * 100, compress=True)
    with pytest.raises(SpecError, match=r"bad (gzip|tar).*(zlib|gzip)"):
        wasm_layers(layout, "v1")


def test_an_artifact_layer_over_the_wasm_cap_is_refused_before_reading(
    tmp_path: Path, module: bytes
) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    pack_wasm(layout, module, "v1", created=None)
    (wasm,) = wasm_layers(layout, "v1")
    big = Descriptor(media_type=wasm.media_type, digest=wasm.digest, size=MAX_WASM_SIZE + 1)
    with pytest.raises(SpecError, match=f"over the {MAX_WASM_SIZE}-byte cap"):
        layout_module.WasmLayer(layout, big).read_bytes()
