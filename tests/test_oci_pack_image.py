"""``pack_image`` and ``wasidispatch pack --image``: a runnable OCI image of a ``.wasm``.

The image's structure (a gzip or plain tar layer whose sha256 is ``rootfs.diff_ids``, the
config's ``Entrypoint``, platform and ``history``, reproducible digests), the CLI, and what
other tools make of it: ``skopeo`` copies and inspects it; a private containerd 1.6
(`tests.containerd_harness`) imports it with ``ctr images import`` and runs it through our
shim with ``ctr run``, and its CRI plugin (`tests.cri_harness`) runs it in a pod with the
``wasidispatch`` handler. The Wasm artifact of ``pack_wasm`` is checked beside it, with the
exact errors containerd answers for it; so are the platforms containerd's matcher accepts.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containerd_harness import (
    SHIM_RUNTIME,
    PrivateContainerd,
    _tar_layout,
    missing_grpc,
    missing_shim,
)
from tests.guests import build_c, guest_bytes
from wasidispatch.cli import main
from wasidispatch.errors import SpecError
from wasidispatch.oci.image import (
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_MANIFEST,
    Descriptor,
    Digest,
    ImageConfig,
    Index,
    Manifest,
    Platform,
)
from wasidispatch.oci.layout import (
    IMAGE_CREATED_BY,
    IMAGE_WASM_PATH,
    ImageLayout,
    node_platform,
    pack_image,
    pack_wasm,
    wasm_layers,
)
from wasidispatch.oci.wasm import ANNOTATION_WASM_VARIANT

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo not installed (make system-deps)")
needs_shim = pytest.mark.skipif(missing_shim() is not None, reason=str(missing_shim()))
needs_grpc = pytest.mark.skipif(missing_grpc() is not None, reason=str(missing_grpc()))
EMPTY: dict[str, list[str]] = {
    "state": [],
    "cgroups": [],
    "processes": [],
    "mounts": [],
    "sockets": [],
    "fifos": [],
}
ARTIFACT_IMPORT_ERROR = "ctr: mismatched image rootfs and manifest layers\n"
"""What ``ctr images import`` (and ``ctr run``) of a Wasm artifact prints (containerd 1.6)."""


@pytest.fixture(scope="module")
def hello() -> bytes:
    return build_c("hello").read_bytes()


def _parts(layout: ImageLayout, ref: str) -> tuple[Manifest, ImageConfig, bytes]:
    """The manifest, the config and the uncompressed layer tar of ``ref``."""
    _, manifest = layout.resolve(ref)
    config = layout.read_json(manifest.config, ImageConfig)
    [layer] = manifest.layers
    blob = layout.read_blob(layer)
    return manifest, config, gzip.decompress(blob) if layer.media_type.endswith("gzip") else blob


def _members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        return {m.name: m for m in archive.getmembers()}


def _file(tar: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        extracted = archive.extractfile(name)
        assert extracted is not None
        return extracted.read()


def _index_of(layout: ImageLayout, manifest: Descriptor, platforms: list[str], ref: str) -> None:
    """Tag ``ref``: an image index listing ``manifest`` once under each of ``platforms``."""
    entries = []
    for value in platforms:
        os_name, arch = value.split("/")
        entries.append(
            manifest.model_copy(
                update={"annotations": None, "platform": Platform(os=os_name, architecture=arch)}
            )
        )
    index = Index(schema_version=2, media_type=MEDIA_TYPE_IMAGE_INDEX, manifests=entries)
    layout.tag(layout.write_blob(index.to_json(), media_type=MEDIA_TYPE_IMAGE_INDEX), ref)


# ------------------------------------------------------------------------ structure


def test_image_structure(tmp_path: Path, hello: bytes) -> None:
    layout = ImageLayout.create(tmp_path / "layout")
    desc = pack_image(
        layout, hello, "v1", path="/bin/hello.wasm", files={"/etc/greeting.txt": b"hi\n"}
    )
    assert desc.media_type == MEDIA_TYPE_IMAGE_MANIFEST
    assert desc.ref_name == "v1"
    manifest, config, tar = _parts(layout, "v1")
    assert manifest.media_type == MEDIA_TYPE_IMAGE_MANIFEST
    assert manifest.config.media_type == MEDIA_TYPE_IMAGE_CONFIG
    assert manifest.annotations == {ANNOTATION_WASM_VARIANT: "compat"}
    [layer] = manifest.layers
    assert layer.media_type == MEDIA_TYPE_IMAGE_LAYER_GZIP
    # diff_ids name the uncompressed tar, the layer descriptor the gzip blob
    assert config.rootfs.type == "layers"
    assert config.rootfs.diff_ids == [Digest.of(tar)]
    assert layer.digest == Digest.of(layout.read_blob(layer)) != Digest.of(tar)
    assert config.config is not None
    assert config.config.entrypoint == ["/bin/hello.wasm"]
    assert config.config.cmd is None
    assert f"{config.os}/{config.architecture}" == node_platform()
    assert config.created is not None
    assert config.history is not None
    [history] = config.history
    assert history.created_by == IMAGE_CREATED_BY
    assert history.created == config.created
    assert not history.empty_layer

    members = _members(tar)
    assert sorted(members) == ["bin", "bin/hello.wasm", "etc", "etc/greeting.txt"]
    assert {n: (m.type, m.mode) for n, m in members.items()} == {
        "bin": (tarfile.DIRTYPE, 0o755),
        "bin/hello.wasm": (tarfile.REGTYPE, 0o755),
        "etc": (tarfile.DIRTYPE, 0o755),
        "etc/greeting.txt": (tarfile.REGTYPE, 0o644),
    }
    assert {(m.uid, m.gid, m.mtime) for m in members.values()} == {(0, 0, 0)}
    assert _file(tar, "bin/hello.wasm") == hello
    assert _file(tar, "etc/greeting.txt") == b"hi\n"


def test_default_path_and_uncompressed_layer(tmp_path: Path, hello: bytes) -> None:
    layout = ImageLayout.create(tmp_path)
    pack_image(layout, hello, "plain", compress=False)
    manifest, config, tar = _parts(layout, "plain")
    [layer] = manifest.layers
    assert layer.media_type == MEDIA_TYPE_IMAGE_LAYER
    assert config.rootfs.diff_ids == [layer.digest] == [Digest.of(tar)]
    assert config.config is not None
    assert config.config.entrypoint == [IMAGE_WASM_PATH] == ["/app.wasm"]
    assert sorted(_members(tar)) == ["app.wasm"]


def test_reproducible_without_created(tmp_path: Path, hello: bytes) -> None:
    first = pack_image(ImageLayout.create(tmp_path / "a"), hello, "v1", created=None)
    second = pack_image(ImageLayout.create(tmp_path / "b"), hello, "v1", created=None)
    assert first.digest == second.digest
    _, config, _ = _parts(ImageLayout.open(tmp_path / "a"), "v1")
    assert config.created is None
    assert config.history is not None
    assert config.history[0].created is None
    # a timestamp changes the config, never the layer (its entries have mtime 0)
    stamped = ImageLayout.create(tmp_path / "c")
    pack_image(stamped, hello, "v1", created="2026-01-02T03:04:05Z")
    manifest, config, _ = _parts(stamped, "v1")
    assert config.created == "2026-01-02T03:04:05Z"
    assert manifest.layers == ImageLayout.open(tmp_path / "a").resolve("v1")[1].layers
    assert stamped.resolve("v1")[0].digest != first.digest


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        ("wasi/wasm", ("wasi", "wasm", None)),
        ("linux/arm64", ("linux", "arm64", None)),
        ("linux/arm/v7", ("linux", "arm", "v7")),
    ],
)
def test_platform(
    tmp_path: Path, hello: bytes, platform: str, expected: tuple[str, str, str | None]
) -> None:
    layout = ImageLayout.create(tmp_path)
    pack_image(layout, hello, "v1", platform=platform)
    _, config, _ = _parts(layout, "v1")
    assert (config.os, config.architecture, config.variant) == expected


@pytest.mark.parametrize("platform", ["linux", "linux/", "/amd64", "a/b/c/d", "linux/amd 64"])
def test_bad_platform(tmp_path: Path, hello: bytes, platform: str) -> None:
    with pytest.raises(SpecError, match="OS/ARCH"):
        pack_image(ImageLayout.create(tmp_path), hello, "v1", platform=platform)


@pytest.mark.parametrize(
    ("path", "files", "message"),
    [
        ("/", None, "not a file path inside the image"),
        ("", None, "not a file path inside the image"),
        ("/../app.wasm", None, "not a file path inside the image"),
        ("/app.wasm", {"/a/../../etc/passwd": b""}, "not a file path inside the image"),
        ("/app.wasm", {"app.wasm": b""}, "given twice"),
        ("/app.wasm", {"/lib": b"", "/lib/x": b""}, "both a file and a directory"),
        ("/bin", {"/bin/sh": b""}, "both a file and a directory"),
    ],
)
def test_bad_paths(
    tmp_path: Path, hello: bytes, path: str, files: dict[str, bytes] | None, message: str
) -> None:
    layout = ImageLayout.create(tmp_path)
    with pytest.raises(SpecError, match=message):
        pack_image(layout, hello, "v1", path=path, files=files)
    assert layout.refs() == []


def test_not_wasm(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not a Wasm module or component"):
        pack_image(ImageLayout.create(tmp_path), b"#!/bin/sh\necho hi\n", "v1")


def test_component_image(tmp_path: Path) -> None:
    component = guest_bytes("wat", "component_hello")
    layout = ImageLayout.create(tmp_path)
    pack_image(layout, component, "v1", path="/hello.wasm")
    _, _, tar = _parts(layout, "v1")
    assert _file(tar, "hello.wasm") == component


def test_marked_image_is_found_by_wasm_layers(tmp_path: Path, hello: bytes) -> None:
    layout = ImageLayout.create(tmp_path)
    pack_image(layout, hello, "marked", annotations={"org.example/team": "a"})
    [found] = wasm_layers(layout, "marked")
    assert found.read_bytes() == hello
    assert found.origin.endswith(":/app.wasm")
    assert layout.resolve("marked")[1].annotations == {
        ANNOTATION_WASM_VARIANT: "compat",
        "org.example/team": "a",
    }
    pack_image(layout, hello, "unmarked", variant=None)
    assert layout.resolve("unmarked")[1].annotations is None
    assert wasm_layers(layout, "unmarked") == []  # an ordinary image to the annotation rule


# ------------------------------------------------------------------------ the CLI


def test_cli_pack_image(tmp_path: Path, hello: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    wasm = tmp_path / "hello.wasm"
    wasm.write_bytes(hello)
    extra = tmp_path / "motd"
    extra.write_bytes(b"welcome\n")
    target = tmp_path / "layout"
    argv = ["pack", "--image", "--no-created", "--path", "/bin/hello.wasm"]
    argv += ["--add", f"{extra}:/etc/motd", str(wasm), f"{target}:v1"]
    assert main(argv) == 0
    layout = ImageLayout.open(target)
    desc, _ = layout.resolve("v1")
    assert capsys.readouterr().out == f"{target}:v1 {desc.digest}\n"
    manifest, config, tar = _parts(layout, "v1")
    assert config.config is not None
    assert config.config.entrypoint == ["/bin/hello.wasm"]
    assert _file(tar, "etc/motd") == b"welcome\n"
    assert _file(tar, "bin/hello.wasm") == hello
    # the same through the API: the same digest (no timestamp)
    again = pack_image(
        ImageLayout.create(tmp_path / "api"),
        hello,
        "v1",
        path="/bin/hello.wasm",
        files={"/etc/motd": b"welcome\n"},
        created=None,
    )
    assert again.digest == desc.digest

    argv = ["pack", "--image", "--no-gzip", "--unmarked", "--platform", "wasi/wasm"]
    assert main([*argv, str(wasm), f"{target}:v2"]) == 0
    manifest, config, _ = _parts(layout, "v2")
    assert manifest.layers[0].media_type == MEDIA_TYPE_IMAGE_LAYER
    assert manifest.annotations is None
    assert (config.os, config.architecture) == ("wasi", "wasm")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--add", "x:/y"], "--add: only with --image"),
        (["--platform", "wasi/wasm"], "--platform: only with --image"),
        (["--image", "--title", "t"], "--title: only for an artifact"),
        (["--image", "--add", "nocolon"], "give it as SRC:DEST"),
        (["--image", "--add", "/dev/zero:/zero"], "not a regular file"),
        (["--image", "--path", "/"], "not a file path inside the image"),
    ],
)
def test_cli_refusals(
    tmp_path: Path,
    hello: bytes,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    wasm = tmp_path / "hello.wasm"
    wasm.write_bytes(hello)
    assert main(["pack", *extra, str(wasm), f"{tmp_path / 'layout'}:v1"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "layout").exists()  # a failed pack leaves no layout it made


# ------------------------------------------------------------------------ skopeo


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    assert SKOPEO is not None
    return subprocess.run([SKOPEO, *args], capture_output=True, text=True, check=False, timeout=120)


@needs_skopeo
def test_skopeo_copies_and_inspects(tmp_path: Path, hello: bytes) -> None:
    layout = ImageLayout.create(tmp_path / "src")
    desc = pack_image(layout, hello, "v1", files={"/data/x": b"x"})
    _, config, _ = _parts(layout, "v1")
    copied = _skopeo("copy", f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:copy")
    assert copied.returncode == 0, copied.stderr
    # nothing to convert: the same manifest (and so the same blobs) arrives
    assert ImageLayout.open(tmp_path / "dst").resolve("copy")[0].digest == desc.digest
    seen = _skopeo("inspect", f"oci:{tmp_path / 'dst'}:copy")
    assert seen.returncode == 0, seen.stderr
    report = json.loads(seen.stdout)
    assert report["Digest"] == desc.digest
    assert f"{report['Os']}/{report['Architecture']}" == node_platform()
    assert report["Layers"] == [str(layout.resolve("v1")[1].layers[0].digest)]
    seen = _skopeo("inspect", "--config", f"oci:{tmp_path / 'dst'}:copy")
    assert seen.returncode == 0, seen.stderr
    assert json.loads(seen.stdout)["rootfs"]["diff_ids"] == config.rootfs.diff_ids


@needs_skopeo
def test_skopeo_on_the_artifact_and_a_wasi_index(tmp_path: Path, hello: bytes) -> None:
    """skopeo copies the artifact but cannot inspect it as an image; an index holding only
    a ``wasi/wasm`` manifest has nothing for this node's platform."""
    layout = ImageLayout.create(tmp_path / "src")
    pack_wasm(layout, hello, "artifact")
    copied = _skopeo("copy", f"oci:{tmp_path / 'src'}:artifact", f"oci:{tmp_path / 'dst'}:a")
    assert copied.returncode == 0, copied.stderr
    seen = _skopeo("inspect", f"oci:{tmp_path / 'src'}:artifact")
    assert seen.returncode != 0
    assert (
        'unsupported image-specific operation on artifact with type \\"'
        'application/vnd.wasm.config.v0+json\\"' in seen.stderr
    )
    desc = pack_image(layout, hello, "wasi", platform="wasi/wasm")
    _index_of(layout, desc, ["wasi/wasm"], "index")
    seen = _skopeo("inspect", f"oci:{tmp_path / 'src'}:index")
    assert seen.returncode != 0
    arch, _, _ = node_platform().removeprefix("linux/").partition("/")
    assert f"no image found in image index for architecture {arch}" in seen.stderr


# ------------------------------------------------------------------------ ctr


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    daemon = PrivateContainerd(namespace=f"wdx-pack-{uuid.uuid4().hex[:8]}", debug=True)
    try:
        daemon.start()
        yield daemon
        assert daemon.alive(), daemon.log()
        assert daemon.settle() == EMPTY
    finally:
        daemon.stop()
    assert not daemon.base.exists()


def _import(d: PrivateContainerd, layout: Path, name: str) -> subprocess.CompletedProcess[str]:
    archive = _tar_layout(layout, d.base / f"{layout.name}.tar")
    return d.ctr("images", "import", "--base-name", name, str(archive))


def _platforms(d: PrivateContainerd, ref: str) -> str:
    """The PLATFORMS column of ``ctr images ls`` for ``ref``."""
    for line in d.ctr("images", "ls").stdout.splitlines()[1:]:
        words = line.split()
        if words and words[0] == ref:
            return words[-2]  # SIZE is two words ("15.6 KiB"), LABELS one
    raise AssertionError(f"{ref} not in ctr images ls")


@pytest.mark.e2e
@needs_shim
def test_ctr_imports_and_runs_the_image(containerd: PrivateContainerd, hello: bytes) -> None:
    base = containerd.base
    layout = ImageLayout.create(base / "hello")
    pack_image(layout, hello, "test")
    imported = _import(containerd, base / "hello", "localhost/pack/hello")
    assert imported.returncode == 0, imported.stderr
    assert "...done" in imported.stdout
    assert _platforms(containerd, "localhost/pack/hello:test") == node_platform()
    out = containerd.run("localhost/pack/hello:test", "pack-hello", runtime_type=SHIM_RUNTIME)
    assert (out.returncode, out.stdout) == (0, "hello from wasi\n"), containerd.log()

    # extra files land in the rootfs the guest sees as /
    layout = ImageLayout.create(base / "files")
    files = build_c("files").read_bytes()
    pack_image(layout, files, "test", path="/bin/files.wasm", files={"/data/msg": b"packed\n"})
    assert _import(containerd, base / "files", "localhost/pack/files").returncode == 0
    out = containerd.run(
        "localhost/pack/files:test",
        "pack-files",
        "/bin/files.wasm",
        "read",
        "/data/msg",
        runtime_type=SHIM_RUNTIME,
    )
    assert (out.returncode, out.stdout) == (0, "packed\n"), f"{out.stderr}\n{containerd.log()}"


@pytest.mark.e2e
@needs_shim
def test_ctr_runs_a_component_image(containerd: PrivateContainerd) -> None:
    """A WASI preview 2 component in an image (the wasmtime engine runs components)."""
    layout = ImageLayout.create(containerd.base / "component")
    pack_image(layout, guest_bytes("wat", "component_hello"), "test")
    assert _import(containerd, layout.path, "localhost/pack/component").returncode == 0
    out = containerd.run("localhost/pack/component:test", "pack-comp", runtime_type=SHIM_RUNTIME)
    assert "a thread would stay outside the sandbox" not in out.stderr
    assert (out.returncode, out.stdout) == (0, "hello from a component\n"), containerd.log()


@pytest.mark.e2e
@needs_shim
def test_ctr_and_platforms(containerd: PrivateContainerd, hello: bytes) -> None:
    """A single manifest is imported and run whatever its config's platform; inside an image
    index only an entry matching the node's platform is picked."""
    base = containerd.base
    layout = ImageLayout.create(base / "platforms")
    wasi = pack_image(layout, hello, "test", platform="wasi/wasm")
    assert _import(containerd, base / "platforms", "localhost/pack/wasi").returncode == 0
    assert _platforms(containerd, "localhost/pack/wasi:test") == "wasi/wasm"
    out = containerd.run("localhost/pack/wasi:test", "pack-wasi", runtime_type=SHIM_RUNTIME)
    assert (out.returncode, out.stdout) == (0, "hello from wasi\n"), containerd.log()

    only_wasi = ImageLayout.create(base / "index-wasi")
    shutil.copytree(layout.path / "blobs", only_wasi.path / "blobs", dirs_exist_ok=True)
    _index_of(only_wasi, wasi, ["wasi/wasm"], "test")
    index_digest = only_wasi.index().manifests[0].digest
    refused = _import(containerd, only_wasi.path, "localhost/pack/index-wasi")
    assert refused.returncode == 1
    assert refused.stderr == f"ctr: no match for platform in manifest {index_digest}: not found\n"

    # one manifest listed under several platforms: the node's entry is found
    many = ImageLayout.create(base / "index-many")
    shutil.copytree(layout.path / "blobs", many.path / "blobs", dirs_exist_ok=True)
    _index_of(many, wasi, ["wasi/wasm", "linux/arm64", "linux/amd64", "linux/riscv64"], "test")
    imported = _import(containerd, many.path, "localhost/pack/index-many")
    assert imported.returncode == 0, imported.stderr
    out = containerd.run("localhost/pack/index-many:test", "pack-many", runtime_type=SHIM_RUNTIME)
    assert (out.returncode, out.stdout) == (0, "hello from wasi\n"), containerd.log()


@pytest.mark.e2e
@needs_shim
def test_ctr_refuses_the_artifact(containerd: PrivateContainerd, hello: bytes) -> None:
    layout = ImageLayout.create(containerd.base / "artifact")
    pack_wasm(layout, hello, "test")
    refused = _import(containerd, layout.path, "localhost/pack/artifact")
    assert (refused.returncode, refused.stderr) == (1, ARTIFACT_IMPORT_ERROR)
    # the image record is made before the unpack fails; ctr run unpacks again, and fails so
    assert _platforms(containerd, "localhost/pack/artifact:test") == "-"
    out = containerd.run("localhost/pack/artifact:test", "pack-art", runtime_type=SHIM_RUNTIME)
    assert (out.returncode, out.stderr) == (1, ARTIFACT_IMPORT_ERROR)
    assert containerd.ctr("containers", "ls", "-q").stdout == ""


# ------------------------------------------------------------------------ CRI


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.cri_harness import cri_containerd

    with cri_containerd(tmp_path_factory.mktemp("pack-cri"), debug=True) as daemon:
        yield daemon
    assert not daemon.base.exists()
    assert daemon.processes() == []


@pytest.fixture
def cri(node: Any) -> Iterator[Any]:
    client = node.client()
    yield client
    for pod in client.list_pod_sandbox():
        client.remove_pod(pod.id)
    assert node.settle() == EMPTY, node.log()


def _archive(directory: Path, name: str) -> Path:
    return _tar_layout(directory, directory.parent / f"{name}.tar")


@pytest.mark.e2e
@needs_shim
@needs_grpc
def test_cri_runs_the_image(node: Any, cri: Any, hello: bytes, tmp_path: Path) -> None:
    from tests.cri_harness import SHIM_HANDLER, import_k8s, read_log

    images = {
        "hello": (hello, {}, "/app.wasm"),
        "files": (build_c("files").read_bytes(), {"/data/msg": b"packed\n"}, "/files.wasm"),
    }
    refs = {}
    for name, (wasm, files, path) in images.items():
        layout = ImageLayout.create(tmp_path / name)
        pack_image(layout, wasm, "test", path=path, files=files)
        refs[name] = import_k8s(node, _archive(layout.path, name), f"localhost/pack/{name}:test")
    logs = tmp_path / "logs"
    pod = cri.run_pod(
        "packed",
        runtime_handler=SHIM_HANDLER,
        log_directory=logs,
        cgroup_parent=node.pod_cgroup("p"),
    )
    runs = [
        ("hello", (), "hello from wasi"),  # no command: the image's Entrypoint
        ("files", ("/files.wasm", "read", "/data/msg"), "packed"),
    ]
    for name, command, line in runs:
        cid = cri.create_container(
            pod.id, pod.config, name, refs[name], command, log_path=f"{name}.log"
        )
        cri.start_container(cid)
        done = cri.wait_exited(cid)
        assert (done.exit_code, done.reason) == (0, "Completed"), node.log()
        assert [x.text for x in read_log(logs / f"{name}.log")] == [line]


@pytest.mark.e2e
@needs_shim
@needs_grpc
def test_cri_runs_a_component_image(node: Any, cri: Any, tmp_path: Path) -> None:
    import grpc  # type: ignore[import-untyped,unused-ignore]

    from tests.cri_harness import SHIM_HANDLER, import_k8s, read_log

    layout = ImageLayout.create(tmp_path / "component")
    pack_image(layout, guest_bytes("wat", "component_hello"), "test")
    ref = import_k8s(node, _archive(layout.path, "component"), "localhost/pack/component:test")
    logs = tmp_path / "logs"
    pod = cri.run_pod(
        "component",
        runtime_handler=SHIM_HANDLER,
        log_directory=logs,
        cgroup_parent=node.pod_cgroup("c"),
    )
    cid = cri.create_container(pod.id, pod.config, "app", ref, log_path="app.log")
    try:
        cri.start_container(cid)
    except grpc.RpcError as exc:
        raise AssertionError(exc.details()) from exc
    done = cri.wait_exited(cid)
    assert (done.exit_code, done.reason) == (0, "Completed"), node.log()
    assert [x.text for x in read_log(logs / "app.log")] == ["hello from a component"]


@pytest.mark.e2e
@needs_shim
@needs_grpc
def test_cri_and_the_artifact(node: Any, cri: Any, hello: bytes, tmp_path: Path) -> None:
    """The import fails at the unpack, yet CRI lists the image; a container of it without a
    command is refused by CRI itself (the artifact config has no Entrypoint)."""
    import grpc  # type: ignore[import-untyped,unused-ignore]

    from tests.cri_harness import SHIM_HANDLER, CriError, import_k8s

    layout = ImageLayout.create(tmp_path / "artifact")
    pack_wasm(layout, hello, "test")
    ref = "localhost/pack/artifact:test"
    with pytest.raises(CriError) as refused:
        import_k8s(node, _archive(layout.path, "artifact"), ref)
    assert f"failed (1): {ARTIFACT_IMPORT_ERROR}" in str(refused.value)
    listed = cri.image_status(ref)
    for _ in range(600):  # CRI learns of the image from containerd's events (bounded wait)
        if listed.HasField("image"):
            break
        listed = cri.image_status(ref)
    assert listed.image.id == str(layout.resolve("test")[1].config.digest)
    pod = cri.run_pod(
        "artifact",
        runtime_handler=SHIM_HANDLER,
        log_directory=tmp_path / "logs",
        cgroup_parent=node.pod_cgroup("a"),
    )
    with pytest.raises(grpc.RpcError) as failed:
        cri.create_container(pod.id, pod.config, "app", ref, log_path="app.log")
    assert failed.value.details().endswith("failed to generate spec: no command specified")
