"""classify: real images in layouts (busybox from Debian's busybox-static, Wasm from WAT), a
real registry (Debian's docker-registry on 127.0.0.1), hostile images and servers, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import wasmtime

from tests.containerd_harness import busybox_layout
from tests.registry_harness import REGISTRY_BIN, local_registry
from tests.registry_harness import free_port as _free_port
from wasidispatch._cli import classify as classify_cli
from wasidispatch.classify import Classifier, ImageDecision, classify
from wasidispatch.errors import RegistryError, SpecError
from wasidispatch.oci.image import (
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_LAYER_ZSTD,
    MEDIA_TYPE_IMAGE_MANIFEST,
    Descriptor,
    Digest,
)
from wasidispatch.oci.layout import ImageLayout, node_platform, pack_image, pack_wasm
from wasidispatch.oci.registry import push

NODE_OS, NODE_ARCH = node_platform().split("/")[:2]
WASM = bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))
COMPONENT = b"\0asm\x0d\0\x01\0"  # a component preamble (what a real component starts with)
BUSYBOX = shutil.which("busybox")
ARM64_BUSYBOX = Path(__file__).parent / ".fixtures" / "arm64" / "busybox"

needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed")
needs_registry = pytest.mark.skipif(
    not Path(REGISTRY_BIN).exists(), reason="docker-registry not installed (make system-deps)"
)


def _elf() -> bytes:
    """A real ELF executable of this machine (Debian's /usr/bin/true)."""
    return Path(shutil.which("true") or "/usr/bin/true").read_bytes()


# --- building images ---------------------------------------------------------------------

Member = tuple[
    Any, ...
]  # ("file", path, data[, mode]) ("dir", path) ("symlink"|"hardlink", path, target)


def tar_of(*members: Member) -> bytes:
    """An uncompressed layer tar of ``members``, in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, path, *rest in members:
            info = tarfile.TarInfo(path)
            info.mtime = 0
            if kind == "file":
                data: bytes = rest[0]
                info.size, info.mode = len(data), rest[1] if len(rest) > 1 else 0o755
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, rest[0]
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, rest[0]
            else:
                raise AssertionError(kind)
            tar.addfile(info)
    return buf.getvalue()


def whiteout(path: str) -> Member:
    parent, _, name = path.rpartition("/")
    return ("file", f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"", 0o644)


def opaque(directory: str) -> Member:
    return ("file", f"{directory}/.wh..wh..opq", b"", 0o644)


def make_image(
    directory: Path,
    ref: str,
    layers: list[bytes],
    run: Mapping[str, Any] | None,
    *,
    compress: bool = True,
    os_name: str = NODE_OS,
    arch: str = NODE_ARCH,
    annotations: Mapping[str, str] | None = None,
    raw_layers: list[tuple[bytes, str]] | None = None,
) -> Descriptor:
    """An image in the layout at ``directory`` tagged ``ref``: ``layers`` bottom first (gzip
    unless ``compress`` is false; ``raw_layers`` as given, media type and all)."""
    layout = ImageLayout.create(directory)
    descriptors: list[Descriptor] = []
    diff_ids: list[str] = []
    for tar in layers:
        diff_ids.append(str(Digest.of(tar)))
        if compress:
            data = gzip.compress(tar, mtime=0)
            descriptors.append(layout.write_blob(data, media_type=MEDIA_TYPE_IMAGE_LAYER_GZIP))
        else:
            descriptors.append(layout.write_blob(tar, media_type=MEDIA_TYPE_IMAGE_LAYER))
    for data, media_type in raw_layers or []:
        diff_ids.append(str(Digest.of(data)))
        descriptors.append(layout.write_blob(data, media_type=media_type))
    config: dict[str, Any] = {
        "architecture": arch,
        "os": os_name,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if run is not None:
        config["config"] = dict(run)
    config_desc = layout.write_blob(json.dumps(config).encode(), media_type=MEDIA_TYPE_IMAGE_CONFIG)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": config_desc.dump(),
        "layers": [d.dump() for d in descriptors],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    desc = layout.write_blob(json.dumps(manifest).encode(), media_type=MEDIA_TYPE_IMAGE_MANIFEST)
    return layout.tag(desc, ref)


def make_index(directory: Path, ref: str, entries: list[tuple[Descriptor, str]]) -> Descriptor:
    """An index tagged ``ref`` over manifests already in the layout, each with a platform."""
    layout = ImageLayout.create(directory)
    manifests = []
    for desc, platform in entries:
        os_name, arch, *variant = platform.split("/")
        entry = Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size).dump()
        entry["platform"] = {"os": os_name, "architecture": arch}
        if variant:
            entry["platform"]["variant"] = variant[0]
        manifests.append(entry)
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": MEDIA_TYPE_IMAGE_INDEX, "manifests": manifests}
    ).encode()
    return layout.tag(layout.write_blob(body, media_type=MEDIA_TYPE_IMAGE_INDEX), ref)


@pytest.fixture
def fresh() -> Classifier:
    """A classifier with its own empty cache (the module's default one is shared)."""
    return Classifier()


# --- the rules before the bytes ----------------------------------------------------------


def test_a_cncf_wasm_artifact_is_wasm_without_reading_its_layer(
    tmp_path: Path, fresh: Classifier
) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    desc = pack_wasm(layout, WASM, "v1")
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert decision.kind == "wasm"
    assert decision.digest == desc.digest
    assert "application/vnd.wasm.config.v0+json" in decision.evidence[-1]
    assert decision.bytes_read == desc.size  # the manifest alone: no config, no layer
    assert decision.entrypoint is None


def test_a_manifest_with_a_wasm_layer_is_wasm(tmp_path: Path, fresh: Classifier) -> None:
    make_image(tmp_path / "l", "v1", [], None, raw_layers=[(WASM, "application/wasm")])
    decision = fresh.classify(tmp_path / "l")
    assert decision.kind == "wasm"
    assert decision.evidence[-1] == "layer 1 has media type application/wasm"


@pytest.mark.parametrize(
    ("os_name", "arch"), [("wasip1", "wasm"), ("wasip2", "wasm"), ("wasi", "wasm")]
)
def test_a_wasi_config_platform_is_wasm(
    tmp_path: Path, fresh: Classifier, os_name: str, arch: str
) -> None:
    # The entrypoint is an ELF file: the platform decides before the bytes are looked at.
    make_image(
        tmp_path / "l",
        "v1",
        [tar_of(("file", "app", _elf()))],
        {"Entrypoint": ["/app"]},
        os_name=os_name,
        arch=arch,
    )
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.platform) == ("wasm", f"{os_name}/{arch}")
    assert decision.evidence[-1] == f"config platform {os_name}/{arch}: Wasm"


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("manifest", "module.wasm.image/variant", "compat"),
        ("manifest", "run.oci.handler", "wasm"),
        ("label", "module.wasm.image/variant", "compat-smart"),
        ("label", "run.oci.handler", "wasm"),
    ],
)
def test_crun_annotations_and_labels_mark_wasm(
    tmp_path: Path, fresh: Classifier, where: str, key: str, value: str
) -> None:
    run: dict[str, Any] = {"Entrypoint": ["/app"]}
    if where == "label":
        run["Labels"] = {key: value}
    layer = tar_of(("file", "app", _elf()))
    make_image(
        tmp_path / "l",
        "v1",
        [layer],
        run,
        annotations={key: value} if where == "manifest" else None,
    )
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert decision.kind == "wasm"
    assert decision.evidence[-1] == f"annotation {key}={value}"
    assert decision.entrypoint == "/app"
    assert decision.bytes_read < len(layer) // 2  # decided without the layer


def test_an_annotated_pack_image_is_wasm_by_its_annotation(
    tmp_path: Path, fresh: Classifier
) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    pack_image(layout, WASM, "v1")
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.evidence[-1]) == (
        "wasm",
        "annotation module.wasm.image/variant=compat",
    )


def test_an_artifact_that_is_no_image_is_unknown(tmp_path: Path, fresh: Classifier) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    config = layout.write_blob(b"{}", media_type="application/vnd.cncf.helm.config.v1+json")
    layer = layout.write_blob(
        b"chart", media_type="application/vnd.cncf.helm.chart.content.v1.tar+gzip"
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": config.dump(),
        "layers": [layer.dump()],
    }
    layout.tag(
        layout.write_blob(json.dumps(manifest).encode(), media_type=MEDIA_TYPE_IMAGE_MANIFEST), "c"
    )
    decision = fresh.classify(f"{tmp_path / 'l'}:c")
    assert decision.kind == "unknown"
    assert "neither an image nor Wasm" in decision.evidence[-1]


# --- the entrypoint's first bytes ---------------------------------------------------------


@needs_busybox
def test_busybox_is_linux_through_its_sh_symlink(tmp_path: Path, fresh: Classifier) -> None:
    busybox_layout(tmp_path / "bb")
    decision = fresh.classify(f"{tmp_path / 'bb'}:test")
    assert decision.kind == "linux"
    assert decision.architecture == NODE_ARCH
    assert decision.entrypoint == "/bin/busybox"
    assert "'sh' in PATH=/bin" in decision.evidence[-2]
    assert decision.evidence[-1].startswith(f"/bin/busybox: elf {NODE_ARCH} 64-bit")
    # An uncompressed local layer is read seekably: busybox's 2 MB are skipped, not read.
    assert decision.bytes_read < os.path.getsize(str(BUSYBOX)) // 4


@pytest.mark.skipif(not ARM64_BUSYBOX.exists(), reason="make fixtures (Debian's arm64 busybox)")
def test_an_arm64_binary_gives_its_architecture(tmp_path: Path, fresh: Classifier) -> None:
    layer = tar_of(
        ("dir", "bin"),
        ("file", "bin/busybox", ARM64_BUSYBOX.read_bytes()),
        ("hardlink", "bin/sh", "bin/busybox"),
    )
    make_image(tmp_path / "l", "v1", [layer], {"Cmd": ["sh"]}, arch="arm64")
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.architecture, decision.entrypoint) == (
        "linux",
        "arm64",
        "/bin/busybox",
    )


def test_an_unannotated_runnable_wasm_image_is_wasm_by_its_bytes(
    tmp_path: Path, fresh: Classifier
) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    desc = pack_image(layout, WASM, "v1", variant=None, files={"etc/data.txt": b"x" * 100})
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert decision.kind == "wasm"
    assert decision.digest == desc.digest
    assert decision.entrypoint == "/app.wasm"
    assert decision.evidence[-1] == "/app.wasm: wasm-module version=0x01 layer=0"
    assert decision.architecture is None


def test_a_component_entrypoint_is_wasm(tmp_path: Path, fresh: Classifier) -> None:
    make_image(
        tmp_path / "l", "v1", [tar_of(("file", "c.wasm", COMPONENT))], {"Entrypoint": ["/c.wasm"]}
    )
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert decision.kind == "wasm"
    assert decision.evidence[-1].startswith("/c.wasm: wasm-component")


def test_the_top_layer_wins_and_lower_layers_are_not_read(
    tmp_path: Path, fresh: Classifier
) -> None:
    big = os.urandom(4 << 20)  # incompressible: the bottom layer stays 4 MiB gzipped
    bottom = tar_of(("dir", "bin"), ("file", "bin/app", _elf()), ("file", "data.bin", big))
    top = tar_of(("dir", "bin"), ("file", "bin/app", WASM))
    make_image(tmp_path / "l", "v1", [bottom, top], {"Entrypoint": ["/bin/app"]})
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert decision.kind == "wasm"
    assert "in layer 2 of 2 (layers read: 2)" in decision.evidence[-2]
    assert decision.bytes_read < 64 << 10


def test_a_stream_stops_at_the_entrypoint(tmp_path: Path, fresh: Classifier) -> None:
    # One gzip layer: the entrypoint first, then 8 MiB that need not be read.
    layer = tar_of(("file", "app.wasm", WASM), ("file", "z/blob", os.urandom(8 << 20)))
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/app.wasm"]})
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert decision.kind == "wasm"
    assert decision.bytes_read < 512 << 10


def test_an_entrypoint_in_a_lower_layer_is_found_under_upper_ones(
    tmp_path: Path, fresh: Classifier
) -> None:
    bottom = tar_of(("dir", "usr"), ("dir", "usr/bin"), ("file", "usr/bin/tool", _elf()))
    middle = tar_of(("dir", "etc"), ("file", "etc/conf", b"a=1\n", 0o644))
    top = tar_of(("dir", "srv"), ("file", "srv/index.html", b"<p>", 0o644))
    make_image(tmp_path / "l", "v1", [bottom, middle, top], {"Entrypoint": ["/usr/bin/tool"]})
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.architecture) == ("linux", NODE_ARCH)
    assert "in layer 1 of 3 (layers read: 3, 2, 1)" in decision.evidence[-2]


def test_a_whiteout_hides_a_lower_file_from_the_path_search(
    tmp_path: Path, fresh: Classifier
) -> None:
    bottom = tar_of(
        ("dir", "app"),
        ("file", "app/run", WASM),
        ("dir", "bin"),
        ("file", "bin/run", _elf()),
    )
    top = tar_of(("dir", "app"), whiteout("app/run"))
    run = {"Env": ["PATH=/app:/bin"], "Cmd": ["run"]}
    make_image(tmp_path / "l", "v1", [bottom, top], run)
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.entrypoint) == ("linux", "/bin/run")
    # Without the whiteout the first PATH entry wins.
    make_image(tmp_path / "m", "v1", [bottom], run)
    assert fresh.classify(f"{tmp_path / 'm'}:v1").entrypoint == "/app/run"


def test_a_whiteout_of_a_directory_hides_everything_under_it(
    tmp_path: Path, fresh: Classifier
) -> None:
    bottom = tar_of(("dir", "opt"), ("dir", "opt/app"), ("file", "opt/app/main", WASM))
    top = tar_of(("dir", "opt"), whiteout("opt/app"))
    make_image(tmp_path / "l", "v1", [bottom, top], {"Entrypoint": ["/opt/app/main"]})
    with pytest.raises(SpecError, match="'/opt/app/main' is not in the image"):
        fresh.classify(f"{tmp_path / 'l'}:v1")


def test_an_opaque_directory_hides_the_lower_one(tmp_path: Path, fresh: Classifier) -> None:
    bottom = tar_of(("dir", "opt"), ("file", "opt/tool", _elf()), ("file", "opt/old", _elf()))
    top = tar_of(("dir", "opt"), opaque("opt"), ("file", "opt/tool", WASM))
    make_image(tmp_path / "l", "v1", [bottom, top], {"Entrypoint": ["/opt/tool"]})
    assert fresh.classify(f"{tmp_path / 'l'}:v1").kind == "wasm"
    make_image(tmp_path / "m", "v1", [bottom, top], {"Entrypoint": ["/opt/old"]})
    with pytest.raises(SpecError, match="not in the image"):
        fresh.classify(f"{tmp_path / 'm'}:v1")


def test_symlinks_resolve_inside_the_image(tmp_path: Path, fresh: Classifier) -> None:
    # usrmerge in the base layer (/bin -> usr/bin), the binary in the top layer under usr/,
    # an absolute link to it, and a relative link climbing out of the root (clamped at /).
    bottom = tar_of(("dir", "usr"), ("dir", "usr/bin"), ("symlink", "bin", "usr/bin"))
    top = tar_of(
        ("dir", "usr/bin"),
        ("dir", "opt"),
        ("file", "opt/main.wasm", WASM, 0o644),
        ("symlink", "usr/bin/app", "/opt/main.wasm"),
        ("symlink", "srv", "../../../../../opt"),
    )
    for n, entry in enumerate(["/bin/app", "/srv/main.wasm", "/../../opt/./main.wasm"]):
        make_image(tmp_path / "l", f"e{n}", [bottom, top], {"Entrypoint": [entry]})
        decision = fresh.classify(f"{tmp_path / 'l'}:e{n}")
        assert (decision.kind, decision.entrypoint) == ("wasm", "/opt/main.wasm")


def test_a_bare_name_with_runcs_default_path(tmp_path: Path, fresh: Classifier) -> None:
    bottom = tar_of(("dir", "usr"), ("dir", "usr/bin"), ("file", "usr/bin/tool", _elf()))
    top = tar_of(
        ("dir", "usr/local"), ("dir", "usr/local/bin"), ("file", "usr/local/bin/tool", WASM)
    )
    make_image(tmp_path / "l", "v1", [bottom, top], {"Cmd": ["tool"]})
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    # /usr/local/bin comes before /usr/bin in runc's PATH.
    assert (decision.kind, decision.entrypoint) == ("wasm", "/usr/local/bin/tool")
    assert (
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in decision.evidence[-2]
    )


def test_the_path_search_needs_an_execute_bit_but_wasm_does_not(
    tmp_path: Path, fresh: Classifier
) -> None:
    layer = tar_of(
        ("dir", "a"),
        ("file", "a/tool", _elf(), 0o644),  # not executable: execvp skips it
        ("dir", "b"),
        ("file", "b/tool", _elf(), 0o755),
    )
    make_image(tmp_path / "l", "v1", [layer], {"Env": ["PATH=/a:/b"], "Cmd": ["tool"]})
    assert fresh.classify(f"{tmp_path / 'l'}:v1").entrypoint == "/b/tool"
    wasm_only = tar_of(("dir", "a"), ("file", "a/mod", WASM, 0o644))
    make_image(tmp_path / "m", "v1", [wasm_only], {"Env": ["PATH=/a"], "Cmd": ["mod"]})
    decision = fresh.classify(f"{tmp_path / 'm'}:v1")
    assert (decision.kind, decision.entrypoint) == ("wasm", "/a/mod")
    assert "without execute bit" in decision.evidence[-2]


def test_a_relative_entrypoint_from_the_working_directory(
    tmp_path: Path, fresh: Classifier
) -> None:
    layer = tar_of(("dir", "work"), ("file", "work/run.wasm", WASM))
    run = {"WorkingDir": "/work", "Entrypoint": ["./run.wasm"]}
    make_image(tmp_path / "l", "v1", [layer], run)
    assert fresh.classify(f"{tmp_path / 'l'}:v1").entrypoint == "/work/run.wasm"


def test_a_hard_link_reads_its_target(tmp_path: Path, fresh: Classifier) -> None:
    layer = tar_of(
        ("dir", "bin"),
        ("file", "bin/real", WASM, 0o644),  # not executable, so not kept on sight
        ("hardlink", "bin/app", "bin/real"),
    )
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/bin/app"]})
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.entrypoint) == ("wasm", "/bin/real")


def test_a_file_named_by_a_later_symlink_is_read_again(tmp_path: Path, fresh: Classifier) -> None:
    # data.bin is neither executable nor .wasm: its first bytes are not kept when it passes;
    # the symlink met later names it, so the layer is streamed a second time up to it.
    layer = tar_of(("file", "data.bin", WASM, 0o644), ("symlink", "start", "data.bin"))
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/start"]})
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.entrypoint) == ("wasm", "/data.bin")


def test_a_script_is_linux_with_the_configs_architecture(tmp_path: Path, fresh: Classifier) -> None:
    layer = tar_of(("file", "entry.sh", b"#!/bin/sh -e\nexec app\n"))
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/entry.sh"]}, arch="riscv64")
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.architecture) == ("linux", "riscv64")
    assert decision.evidence[-1] == "/entry.sh: script #!/bin/sh -e"


def test_text_or_nothing_to_run_is_unknown(tmp_path: Path, fresh: Classifier) -> None:
    make_image(tmp_path / "l", "v1", [tar_of(("file", "notes", b"hello\n"))], {"Cmd": ["/notes"]})
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.entrypoint) == ("unknown", "/notes")
    make_image(tmp_path / "m", "v1", [tar_of(("file", "notes", b"hello\n"))], {"Env": ["A=b"]})
    decision = fresh.classify(f"{tmp_path / 'm'}:v1")
    assert decision.kind == "unknown"
    assert decision.evidence[-1] == "no Entrypoint or Cmd: nothing to run"


def test_an_uncompressed_layer_is_read(tmp_path: Path, fresh: Classifier) -> None:
    layer = tar_of(("file", "app", WASM))
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/app"]}, compress=False)
    assert fresh.classify(f"{tmp_path / 'l'}:v1").kind == "wasm"


def test_zstd_layers_need_the_zstandard_module(tmp_path: Path, fresh: Classifier) -> None:
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        zstandard = None
    zstd = shutil.which("zstd")
    if zstandard is None and zstd is None:
        pytest.skip("neither the zstandard module nor the zstd tool to make a zstd layer")
    layer = tar_of(("file", "app", WASM))
    if zstandard is not None:
        data = zstandard.ZstdCompressor().compress(layer)
    else:
        assert zstd is not None
        data = subprocess.run(
            [zstd, "-q", "-c"], input=layer, capture_output=True, check=True
        ).stdout
    make_image(
        tmp_path / "l",
        "v1",
        [],
        {"Entrypoint": ["/app"]},
        raw_layers=[(data, MEDIA_TYPE_IMAGE_LAYER_ZSTD)],
    )
    if zstandard is None:
        with pytest.raises(SpecError, match="zstd layer; reading it needs the zstandard module"):
            fresh.classify(f"{tmp_path / 'l'}:v1")
    else:
        assert fresh.classify(f"{tmp_path / 'l'}:v1").kind == "wasm"


# --- multi-platform indexes ---------------------------------------------------------------


@pytest.fixture
def multi(tmp_path: Path) -> Path:
    """An index of a linux image for this node, a linux/riscv64 one and a Wasm artifact."""
    root = tmp_path / "multi"
    here = make_image(root, "here", [tar_of(("file", "app", _elf()))], {"Entrypoint": ["/app"]})
    other = make_image(
        root,
        "other",
        [tar_of(("file", "app", b"#!/bin/sh\n"))],
        {"Entrypoint": ["/app"]},
        arch="riscv64",
    )
    wasm = pack_wasm(ImageLayout.open(root), WASM, "wasm")
    make_index(
        root, "all", [(here, f"linux/{NODE_ARCH}"), (other, "linux/riscv64"), (wasm, "wasip1/wasm")]
    )
    make_index(root, "wasm-only", [(other, "linux/riscv64"), (wasm, "wasip1/wasm")])
    make_index(root, "foreign", [(other, "linux/riscv64")])
    return root


def test_an_index_gives_this_nodes_image(multi: Path, fresh: Classifier) -> None:
    decision = fresh.classify(f"{multi}:all")
    here = ImageLayout.open(multi).resolve("here")[0]
    assert (decision.kind, decision.digest, decision.architecture) == (
        "linux",
        here.digest,
        NODE_ARCH,
    )
    assert decision.evidence[0] == f"index: the linux/{NODE_ARCH} entry {here.digest}"


def test_an_index_gives_the_platform_asked_for(multi: Path, fresh: Classifier) -> None:
    riscv = fresh.classify(f"{multi}:all", platform="linux/riscv64")
    assert (riscv.kind, riscv.architecture, riscv.platform) == ("linux", "riscv64", "linux/riscv64")
    wasm = fresh.classify(f"{multi}:all", platform="wasip2/wasm")  # any wasi OS matches
    assert (wasm.kind, wasm.platform) == ("wasm", "wasip1/wasm")
    assert wasm.digest == ImageLayout.open(multi).resolve("wasm")[0].digest


def test_a_wasi_entry_is_wasm_when_none_is_for_this_node(multi: Path, fresh: Classifier) -> None:
    decision = fresh.classify(f"{multi}:wasm-only")
    assert decision.kind == "wasm"
    assert decision.evidence == (
        f"index: no linux/{NODE_ARCH} entry, a Wasm one",
        "platform wasip1/wasm: Wasm",
    )


def test_an_index_without_the_platform_is_unknown(multi: Path, fresh: Classifier) -> None:
    decision = fresh.classify(f"{multi}:foreign")
    assert decision.kind == "unknown"
    assert decision.evidence == (
        f"index: no manifest for linux/{NODE_ARCH} (it has: linux/riscv64)",
    )
    index = next(d for d in ImageLayout.open(multi).index().manifests if d.ref_name == "foreign")
    assert decision.digest == index.digest
    with pytest.raises(SpecError, match="give it as OS/ARCH"):
        fresh.classify(f"{multi}:all", platform="linux")


# --- hostile images -----------------------------------------------------------------------


def test_a_layer_that_is_not_a_tar(tmp_path: Path, fresh: Classifier) -> None:
    junk = os.urandom(4096)
    make_image(
        tmp_path / "a",
        "v1",
        [],
        {"Entrypoint": ["/app"]},
        raw_layers=[(junk, MEDIA_TYPE_IMAGE_LAYER)],
    )
    with pytest.raises(SpecError, match=r"layer 1 .*: not a tar layer"):
        fresh.classify(f"{tmp_path / 'a'}:v1")
    gz = gzip.compress(junk)
    make_image(
        tmp_path / "b",
        "v1",
        [],
        {"Entrypoint": ["/app"]},
        raw_layers=[(gz, MEDIA_TYPE_IMAGE_LAYER_GZIP)],
    )
    with pytest.raises(SpecError, match=r"layer 1 .*: not a tar layer"):
        fresh.classify(f"{tmp_path / 'b'}:v1")
    broken = b"\x1f\x8b\x08\x00" + os.urandom(4096)  # a gzip header, then garbage
    make_image(
        tmp_path / "c",
        "v1",
        [],
        {"Entrypoint": ["/app"]},
        raw_layers=[(broken, MEDIA_TYPE_IMAGE_LAYER_GZIP)],
    )
    with pytest.raises(SpecError, match="layer 1 "):
        fresh.classify(f"{tmp_path / 'c'}:v1")


def test_a_symlink_loop(tmp_path: Path, fresh: Classifier) -> None:
    layer = tar_of(("symlink", "a", "/b"), ("symlink", "b", "a"))
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/a"]})
    with pytest.raises(SpecError, match="too many levels of symbolic links"):
        fresh.classify(f"{tmp_path / 'l'}:v1")


def test_an_entrypoint_escaping_the_root_stays_in_the_image(
    tmp_path: Path, fresh: Classifier
) -> None:
    # /etc/passwd exists on the host, never in this image: ".." stops at the image's root.
    layer = tar_of(("symlink", "app", "../../../../../../etc/passwd"))
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/app"]})
    with pytest.raises(SpecError, match="'/app' is not in the image"):
        fresh.classify(f"{tmp_path / 'l'}:v1")
    make_image(tmp_path / "m", "v1", [layer], {"Entrypoint": ["../../../etc/passwd"]})
    with pytest.raises(SpecError, match="not in the image"):
        fresh.classify(f"{tmp_path / 'm'}:v1")


def test_a_directory_or_device_entrypoint(tmp_path: Path, fresh: Classifier) -> None:
    make_image(tmp_path / "l", "v1", [tar_of(("dir", "bin"))], {"Entrypoint": ["/bin"]})
    with pytest.raises(SpecError, match="is a directory, not a file"):
        fresh.classify(f"{tmp_path / 'l'}:v1")


def test_a_windows_image_is_unknown(tmp_path: Path, fresh: Classifier) -> None:
    layer = tar_of(("file", "Files/app.exe", b"MZ\x90\0"))
    run = {"Entrypoint": ["C:\\app.exe"]}
    make_image(tmp_path / "l", "v1", [layer], run, os_name="windows", arch="amd64")
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.evidence[-1]) == (
        "unknown",
        "a windows image: neither Linux nor Wasm",
    )
    assert decision.bytes_read < len(layer)  # its layers are not looked into


def test_overlong_names_are_refused(tmp_path: Path, fresh: Classifier) -> None:
    layer = tar_of(("symlink", "app", "x/" * 3000))
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/app"]})
    with pytest.raises(SpecError, match="a tar member name or link over 4096 bytes"):
        fresh.classify(f"{tmp_path / 'l'}:v1")


def _sparse_tar_layer(layout: ImageLayout, member_size: int) -> Descriptor:
    """An uncompressed layer whose one member claims ``member_size`` bytes of zeros, written
    as a sparse file (its digest is not computed: classify does not read layers to their
    end, so it never checks; the name only has to be a valid digest)."""
    info = tarfile.TarInfo("huge")
    info.size, info.mtime = member_size, 0
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    total = len(header) + member_size + (-member_size % 512) + 1024
    digest = Digest("sha256:" + hashlib.sha256(header).hexdigest())
    path = layout.blob_path(digest)
    with open(path, "wb") as out:
        out.write(header)
        out.truncate(total)
    return Descriptor(media_type=MEDIA_TYPE_IMAGE_LAYER, digest=digest, size=total)


def _image_with_layers(
    directory: Path, ref: str, layers: list[Descriptor], run: Mapping[str, Any]
) -> None:
    layout = ImageLayout.open(directory)
    config = {
        "architecture": NODE_ARCH,
        "os": "linux",
        "config": dict(run),
        "rootfs": {"type": "layers", "diff_ids": [str(d.digest) for d in layers]},
    }
    config_desc = layout.write_blob(json.dumps(config).encode(), media_type=MEDIA_TYPE_IMAGE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": config_desc.dump(),
        "layers": [d.dump() for d in layers],
    }
    layout.tag(
        layout.write_blob(json.dumps(manifest).encode(), media_type=MEDIA_TYPE_IMAGE_MANIFEST), ref
    )


def test_a_10_gb_layer_is_skipped_not_read(tmp_path: Path, fresh: Classifier) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    huge = _sparse_tar_layer(layout, 10 << 30)
    top = layout.write_blob(tar_of(("file", "app", WASM)), media_type=MEDIA_TYPE_IMAGE_LAYER)
    _image_with_layers(tmp_path / "l", "found", [huge, top], {"Entrypoint": ["/app"]})
    assert fresh.classify(f"{tmp_path / 'l'}:found").kind == "wasm"
    _image_with_layers(tmp_path / "l", "absent", [huge, top], {"Entrypoint": ["/nowhere"]})
    with pytest.raises(SpecError, match="not in the image"):
        fresh.classify(f"{tmp_path / 'l'}:absent")


def test_a_decompression_bomb_is_cut_at_the_scan_cap(tmp_path: Path) -> None:
    # 64 MiB of zeros in one member, gzipped to ~64 KiB; the cap here is 16 MiB.
    info = tarfile.TarInfo("zeros")
    info.size = 64 << 20
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(info.tobuf(format=tarfile.PAX_FORMAT))
        for _ in range(64):
            gz.write(bytes(1 << 20))
        gz.write(bytes(1024))
    make_image(
        tmp_path / "l",
        "v1",
        [],
        {"Entrypoint": ["/app"]},
        raw_layers=[(buf.getvalue(), MEDIA_TYPE_IMAGE_LAYER_GZIP)],
    )
    capped = Classifier(max_scan=16 << 20)
    with pytest.raises(SpecError, match="over 16777216 decompressed bytes scanned"):
        capped.classify(f"{tmp_path / 'l'}:v1")


def test_too_many_tar_headers(tmp_path: Path) -> None:
    layer = tar_of(*[("file", f"f{i}", b"", 0o644) for i in range(200)])
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/app"]})
    with pytest.raises(SpecError, match="over 100 tar headers"):
        Classifier(max_entries=100).classify(f"{tmp_path / 'l'}:v1")


def test_a_manifest_over_the_cap(tmp_path: Path, fresh: Classifier) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    config = layout.write_blob(b"{}", media_type=MEDIA_TYPE_IMAGE_CONFIG)
    body = json.dumps(
        {
            "schemaVersion": 2,
            "config": config.dump(),
            "layers": [config.dump()],
            "annotations": {"pad": "x" * (5 << 20)},
        }
    ).encode()
    layout.tag(layout.write_blob(body, media_type=MEDIA_TYPE_IMAGE_MANIFEST), "big")
    with pytest.raises(SpecError, match="over the 4194304-byte cap"):
        fresh.classify(f"{tmp_path / 'l'}:big")


def test_a_layout_without_the_tag(tmp_path: Path, fresh: Classifier) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    pack_wasm(layout, WASM, "a")
    pack_wasm(layout, WASM, "b", created=None)
    with pytest.raises(SpecError, match=r"no reference 'c' \(refs: a, b\)"):
        fresh.classify(f"{tmp_path / 'l'}:c")
    with pytest.raises(SpecError, match="name a reference"):
        fresh.classify(tmp_path / "l")
    with pytest.raises(SpecError, match="not an image layout directory"):
        fresh.classify(tmp_path / "missing")


def test_a_timeout_must_be_positive(tmp_path: Path, fresh: Classifier) -> None:
    layer = tar_of(("file", "app", WASM))
    make_image(tmp_path / "l", "v1", [layer], {"Entrypoint": ["/app"]})
    with pytest.raises(SpecError, match="timeout must be a positive"):
        fresh.classify(f"{tmp_path / 'l'}:v1", timeout=0)


# --- the cache ----------------------------------------------------------------------------


def test_a_repeated_classify_is_answered_from_the_cache(tmp_path: Path) -> None:
    classifier = Classifier(cache_size=2)
    layout = ImageLayout.create(tmp_path / "l")
    for ref in ("a", "b", "c"):
        pack_image(layout, WASM, ref, variant=None, files={"tag": ref.encode()})
    first = classifier.classify(f"{tmp_path / 'l'}:a")
    again = classifier.classify(f"{tmp_path / 'l'}:a")
    assert (first.cached, again.cached) == (False, True)
    assert again == first  # bytes_read and cached take no part in equality
    assert (first.bytes_read > 0, again.bytes_read) == (True, 0)
    classifier.classify(f"{tmp_path / 'l'}:b")
    classifier.classify(f"{tmp_path / 'l'}:c")  # evicts a, the least recently used
    assert classifier.classify(f"{tmp_path / 'l'}:c").cached
    assert not classifier.classify(f"{tmp_path / 'l'}:a").cached
    classifier.cache_clear()
    assert not classifier.classify(f"{tmp_path / 'l'}:a").cached


def test_the_cache_is_scoped_to_its_source(tmp_path: Path, fresh: Classifier) -> None:
    # The same manifest digest in two layouts: layer bytes are read unverified, so one
    # layout's answer is not reused for the other.
    for name in ("one", "two"):
        pack_image(ImageLayout.create(tmp_path / name), WASM, "v1", variant=None, created=None)
    one = fresh.classify(f"{tmp_path / 'one'}:v1")
    two = fresh.classify(f"{tmp_path / 'two'}:v1")
    assert one.digest == two.digest
    assert (one.cached, two.cached) == (False, False)
    assert fresh.classify(f"{tmp_path / 'two'}:v1").cached


def test_a_retagged_layout_is_decided_again(tmp_path: Path, fresh: Classifier) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    pack_image(layout, WASM, "v1", variant=None)
    assert fresh.classify(f"{tmp_path / 'l'}:v1").kind == "wasm"
    make_image(tmp_path / "l", "v1", [tar_of(("file", "app", _elf()))], {"Entrypoint": ["/app"]})
    decision = fresh.classify(f"{tmp_path / 'l'}:v1")
    assert (decision.kind, decision.cached) == ("linux", False)


def test_the_module_function_uses_one_shared_cache(tmp_path: Path) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    pack_image(layout, WASM, "v1", variant=None, files={"id": os.urandom(16)})
    first = classify(f"{tmp_path / 'l'}:v1")
    assert isinstance(first, ImageDecision)
    assert classify(f"{tmp_path / 'l'}:v1").cached
    json.dumps(first.to_json())  # JSON-ready


# --- a real registry ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real registry (distribution 2.8) serving plain HTTP on 127.0.0.1:<free port>."""
    if not Path(REGISTRY_BIN).exists():
        pytest.skip("docker-registry not installed (make system-deps)")
    base = tmp_path_factory.mktemp("registry")
    with local_registry(base) as running:
        address = running.address
        yield address


@needs_registry
@needs_busybox
def test_busybox_and_wasm_from_a_registry(registry: str, tmp_path: Path, fresh: Classifier) -> None:
    busybox_layout(tmp_path / "bb")
    bb = push(tmp_path / "bb", "test", f"{registry}/lib/busybox:1")
    layout = ImageLayout.create(tmp_path / "w")
    pack_image(layout, WASM, "v1", variant=None)
    pack_wasm(layout, WASM, "artifact")
    wasm = push(tmp_path / "w", "v1", f"{registry}/apps/hello:1")
    push(tmp_path / "w", "artifact", f"{registry}/apps/hello:artifact")

    linux = fresh.classify(f"{registry}/lib/busybox:1")
    assert (linux.kind, linux.architecture, linux.digest) == ("linux", NODE_ARCH, bb.digest)
    assert linux.entrypoint == "/bin/busybox"
    wasm_decision = fresh.classify(f"{registry}/apps/hello:1")
    assert (wasm_decision.kind, wasm_decision.digest) == ("wasm", wasm.digest)
    assert wasm_decision.entrypoint == "/app.wasm"
    artifact = fresh.classify(f"{registry}/apps/hello:artifact", insecure=True)
    assert artifact.kind == "wasm"
    assert "a Wasm artifact" in artifact.evidence[-1]


@needs_registry
def test_a_registry_stream_stops_at_the_entrypoint(
    registry: str, tmp_path: Path, fresh: Classifier
) -> None:
    big = tar_of(("file", "data.bin", os.urandom(8 << 20), 0o644))
    top = tar_of(("file", "app.wasm", WASM), ("file", "more.bin", os.urandom(4 << 20), 0o644))
    make_image(tmp_path / "l", "v1", [big, top], {"Entrypoint": ["/app.wasm"]})
    push(tmp_path / "l", "v1", f"{registry}/apps/layered:1")
    decision = fresh.classify(f"{registry}/apps/layered:1")
    assert decision.kind == "wasm"
    assert decision.bytes_read < 1 << 20  # of 12 MiB of layers


@needs_registry
def test_a_registry_reference_by_digest_is_cached_without_a_request(
    registry: str, tmp_path: Path
) -> None:
    classifier = Classifier()
    layout = ImageLayout.create(tmp_path / "w")
    pack_image(layout, WASM, "v1", variant=None, files={"id": os.urandom(8)})
    pushed = push(tmp_path / "w", "v1", f"{registry}/apps/pinned:1")
    by_tag = classifier.classify(f"{registry}/apps/pinned:1")
    by_digest = classifier.classify(f"{registry}/apps/pinned@{pushed.digest}")
    assert (by_tag.cached, by_digest.cached) == (False, True)
    assert by_digest.reference == f"{registry}/apps/pinned@{pushed.digest}"
    assert classifier.classify(f"{registry}/apps/pinned:1").cached  # after one HEAD
    # Another repository of the same registry holding the same manifest is its own scope.
    push(tmp_path / "w", "v1", f"{registry}/apps/copy:1")
    assert not classifier.classify(f"{registry}/apps/copy:1").cached


@needs_registry
def test_a_multi_platform_index_from_a_registry(
    registry: str, multi: Path, fresh: Classifier
) -> None:
    pushed = push(multi, "all", f"{registry}/apps/multi:1")
    here = ImageLayout.open(multi).resolve("here")[0]
    decision = fresh.classify(f"{registry}/apps/multi:1")
    assert (decision.kind, decision.digest, decision.architecture) == (
        "linux",
        here.digest,
        NODE_ARCH,
    )
    riscv = fresh.classify(f"{registry}/apps/multi@{pushed.digest}", platform="linux/riscv64")
    assert (riscv.kind, riscv.architecture) == ("linux", "riscv64")
    wasm = fresh.classify(f"{registry}/apps/multi:1", platform="wasi/wasm")
    assert wasm.kind == "wasm"
    assert wasm.bytes_read == pushed.size  # the index alone: the Wasm entry decides


@needs_registry
def test_registry_errors_are_typed(registry: str, fresh: Classifier) -> None:
    with pytest.raises(RegistryError, match="HTTP 404"):
        fresh.classify(f"{registry}/apps/none:1")
    with pytest.raises(RegistryError, match="invalid reference"):
        fresh.classify(f"{registry}/Bad Name:1")
    with pytest.raises(RegistryError):
        fresh.classify(f"127.0.0.1:{_free_port()}/apps/none:1", timeout=5)


# --- hostile servers ----------------------------------------------------------------------


class _Server(NamedTuple):
    address: str
    requests: list[str]


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-body is what classify does once it knows


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, Callable[[Any], None]]], _Server]]:
    """Start a threaded HTTP server on 127.0.0.1 answering GETs from ``routes[path](h)``."""
    servers: list[_QuietServer] = []
    threads: list[threading.Thread] = []

    def start(routes: dict[str, Callable[[Any], None]]) -> _Server:
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
                    pass  # the client hung up, as classify does once it knows

            def log_message(self, *args: Any) -> None:
                pass

        server = _QuietServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
        return _Server(f"127.0.0.1:{server.server_address[1]}", seen)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join()


def _json(body: bytes, media_type: str) -> Callable[[Any], None]:
    def answer(h: Any) -> None:
        h.send_response(200)
        h.send_header("Content-Type", media_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return answer


def _endless_layer(h: Any) -> None:
    """A 10 GB layer: a tar header for a 10 GB file, then zeros for as long as it is read."""
    info = tarfile.TarInfo("huge")
    info.size = 10 << 30
    h.send_response(200)
    h.send_header("Content-Length", str(info.size + 2048))
    h.end_headers()
    h.wfile.write(info.tobuf(format=tarfile.PAX_FORMAT))
    zeros = bytes(1 << 20)
    for _ in range(10 << 10):
        h.wfile.write(zeros)


def _hostile_image(layer_size: int) -> tuple[dict[str, Callable[[Any], None]], Descriptor]:
    config = json.dumps(
        {
            "architecture": NODE_ARCH,
            "os": "linux",
            "config": {"Entrypoint": ["/app"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]},
        }
    ).encode()
    config_desc = Descriptor(
        media_type=MEDIA_TYPE_IMAGE_CONFIG, digest=Digest.of(config), size=len(config)
    )
    layer = Descriptor(
        media_type=MEDIA_TYPE_IMAGE_LAYER, digest=Digest("sha256:" + "1" * 64), size=layer_size
    )
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
            "config": config_desc.dump(),
            "layers": [layer.dump()],
        }
    ).encode()
    routes = {
        "/v2/evil/app/manifests/v1": _json(manifest, MEDIA_TYPE_IMAGE_MANIFEST),
        f"/v2/evil/app/blobs/{config_desc.digest}": _json(config, "application/octet-stream"),
        f"/v2/evil/app/blobs/{layer.digest}": _endless_layer,
    }
    return routes, layer


def test_a_10_gb_layer_from_a_server_is_cut_at_the_cap(serve: Any) -> None:
    routes, _ = _hostile_image((10 << 30) + 2048)
    server = serve(routes)
    with pytest.raises(SpecError, match="over 33554432 decompressed bytes scanned"):
        Classifier(max_scan=32 << 20).classify(f"{server.address}/evil/app:v1")


def test_a_10_gb_layer_from_a_server_is_cut_at_the_deadline(serve: Any) -> None:
    routes, _ = _hostile_image((10 << 30) + 2048)
    server = serve(routes)
    with pytest.raises(RegistryError, match="did not finish within the 1 s deadline"):
        Classifier().classify(f"{server.address}/evil/app:v1", timeout=1)


def test_a_manifest_over_the_cap_from_a_server(serve: Any, fresh: Classifier) -> None:
    body = b'{"schemaVersion": 2, "pad": "' + b"x" * (5 << 20) + b'"}'
    server = serve({"/v2/evil/big/manifests/v1": _json(body, MEDIA_TYPE_IMAGE_MANIFEST)})
    with pytest.raises(SpecError, match="over the 4194304-byte cap"):
        fresh.classify(f"{server.address}/evil/big:v1")


def test_a_server_lying_about_a_manifest_digest(serve: Any, fresh: Classifier) -> None:
    body = b'{"schemaVersion": 2}'
    claimed = "sha256:" + "2" * 64
    server = serve({f"/v2/evil/lie/manifests/{claimed}": _json(body, MEDIA_TYPE_IMAGE_MANIFEST)})
    with pytest.raises(SpecError, match="digest mismatch"):
        fresh.classify(f"{server.address}/evil/lie@{claimed}")


# --- the command line ---------------------------------------------------------------------


def test_the_cli_prints_the_decision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    desc = pack_image(layout, WASM, "v1", variant=None, files={"id": os.urandom(8)})
    assert classify_cli.main([f"{tmp_path / 'l'}:v1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wasm {tmp_path / 'l'}:v1 {desc.digest} linux/{NODE_ARCH}".replace(
        f"linux/{NODE_ARCH}", f"{NODE_OS}/{NODE_ARCH}"
    )
    assert out[1] == "  entrypoint: /app.wasm"
    assert out[-1] == "  - /app.wasm: wasm-module version=0x01 layer=0"


def test_the_cli_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    multi = tmp_path / "m"
    riscv = make_image(
        multi, "r", [tar_of(("file", "app", b"#!/bin/sh\n"))], {"Cmd": ["/app"]}, arch="riscv64"
    )
    make_index(multi, "all", [(riscv, "linux/riscv64")])
    assert classify_cli.main([f"{multi}:all", "--json", "--platform", "linux/riscv64"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "linux"
    assert printed["digest"] == riscv.digest
    assert printed["architecture"] == "riscv64"
    assert printed["evidence"][0] == f"index: the linux/riscv64 entry {riscv.digest}"
    assert set(printed) >= {"kind", "evidence", "architecture", "digest", "reference", "entrypoint"}


def test_the_cli_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image(tmp_path / "l", "v1", [tar_of(("symlink", "a", "a"))], {"Entrypoint": ["/a"]})
    assert classify_cli.main([f"{tmp_path / 'l'}:v1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wasidispatch: error: ")
    assert "too many levels of symbolic links" in err


def test_the_subcommand_registers_on_a_parser() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    classify_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["classify", "r/x:1", "--insecure", "--timeout", "5"])
    assert (args.ref, args.insecure, args.timeout, args.json, args.platform) == (
        "r/x:1",
        True,
        5.0,
        False,
        None,
    )
    assert args.func is classify_cli.run


def test_importing_classify_is_light() -> None:
    code = (
        "import wasidispatch.classify, wasidispatch._cli.classify, sys; print(sorted(sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    for heavy in ("pydantic", "oras", "requests", "wasmtime"):
        assert f"'{heavy}'" not in loaded, f"importing classify loads {heavy}"
