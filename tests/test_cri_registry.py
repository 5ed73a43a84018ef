"""Wasm images pulled by Kubernetes: pushed to a registry, pulled through CRI, run in a pod.

A real registry (Debian's ``docker-registry`` on 127.0.0.1) and a private containerd with its
CRI plugin (`tests.cri_harness`; handler ``wasidispatch`` = our shim) whose registry config
(``config_path``, one ``hosts.toml`` per host) reaches that registry over plain HTTP, under
its own address and under a name only that config knows. As a kubelet does it:
``RunPodSandbox``, ``PullImage`` with the pod's config, then the containers.

- The runnable Wasm image (`wasidispatch.oci.layout.pack_image`, pushed with ``wasidispatch
  push``) and busybox, pushed and pulled the same way: CRI knows them by the pushed manifest
  digest, the Wasm app runs through the shim beside the busybox sidecar, its output in the
  CRI log and its exit codes in ``ContainerStatus``.
- The CNCF Wasm artifact (`wasidispatch.oci.layout.pack_wasm`): containerd 1.6 fetches it,
  then refuses to unpack it, and ``PullImage`` fails; what the failed pull leaves behind
  (an image CRI reports, an empty rootfs for a container naming it) is asserted too.

Images are removed through CRI afterwards: containerd's content store and snapshots are as
they were, and no process, mount, cgroup, socket, FIFO or state is left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import grpc  # type: ignore[import-untyped]
import pytest

from tests.containerd_harness import (
    busybox_layout,
    missing_grpc,
    missing_requirements,
    missing_shim,
)
from tests.cri_harness import SHIM_HANDLER, CriClient, CriContainerd, cri_containerd, read_log
from tests.registry_harness import REGISTRY_BIN, local_registry
from wasidispatch.oci.image import Digest
from wasidispatch.oci.layout import IMAGE_WASM_PATH, ImageLayout, pack_image, pack_wasm
from wasidispatch.oci.registry import push

ALIAS = "registry.wasm.test:5000"
"""A registry host no resolver knows (RFC 2606 ``.test``): only the hosts.toml maps it."""
GREETING = "hello from the registry"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
    pytest.mark.skipif(missing_grpc() is not None, reason=str(missing_grpc())),
    pytest.mark.skipif(missing_shim() is not None, reason=str(missing_shim())),
    pytest.mark.skipif(
        not Path(REGISTRY_BIN).exists(), reason="docker-registry not installed (make system-deps)"
    ),
]

EMPTY: dict[str, list[str]] = {
    "state": [],
    "cgroups": [],
    "processes": [],
    "mounts": [],
    "sockets": [],
    "fifos": [],
}
UNPACK_REFUSED = (
    'failed to pull and unpack image "{ref}": failed to unpack image on snapshotter '
    "overlayfs: mismatched image rootfs and manifest layers"
)
"""containerd 1.6.20's ``PullImage`` error for a CNCF Wasm artifact."""


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real registry (distribution 2.8) on 127.0.0.1:<free port>, plain HTTP; its address."""
    base = tmp_path_factory.mktemp("cri-registry")
    with local_registry(base) as running:
        address = running.address
        yield address


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: str) -> Iterator[CriContainerd]:
    base = tmp_path_factory.mktemp("cri-registry-node")
    hosts = {registry: registry, ALIAS: registry}
    with cri_containerd(base, registry_hosts=hosts, debug=True) as daemon:
        yield daemon
    assert not daemon.base.exists()
    assert daemon.processes() == []


@pytest.fixture
def cri(node: CriContainerd) -> Iterator[CriClient]:
    client = node.client()
    yield client
    for pod in client.list_pod_sandbox():
        client.remove_pod(pod.id)
    assert node.settle() == EMPTY, node.log()


@pytest.fixture(scope="module")
def files_wasm() -> bytes:
    from tests.guests import build_c

    return build_c("files").read_bytes()


class Stored(NamedTuple):
    """What containerd holds in the ``k8s.io`` namespace."""

    images: list[str]
    content: list[str]
    snapshots: list[str]


def _stored(node: CriContainerd) -> Stored:
    snapshots = node.ctr("snapshots", "ls").stdout.splitlines()[1:]
    return Stored(
        sorted(node.ctr("images", "ls", "-q").stdout.split()),
        sorted(node.ctr("content", "ls", "-q").stdout.split()),
        sorted(line.split()[0] for line in snapshots if line.strip()),
    )


def _nothing_added(node: CriContainerd, before: Stored) -> None:
    """No image, content or snapshot more than ``before`` (containerd's garbage collector,
    asynchronous, may meanwhile remove blobs an earlier test left unreferenced: fewer is
    fine)."""
    now = _stored(node)
    assert now.images == before.images
    assert set(now.content) <= set(before.content), sorted(set(now.content) - set(before.content))
    assert set(now.snapshots) <= set(before.snapshots)


def _config_digest(layout: ImageLayout, tag: str) -> Digest:
    return layout.resolve(tag)[1].config.digest


def _repository(ref: str) -> str:
    return ref.rpartition(":")[0]


def _wait_log(path: Path, text: str, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line.text for line in read_log(path)] if path.exists() else []
        if text in lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _pushed_wasm_image(
    registry: str, files_wasm: bytes, directory: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, ImageLayout]:
    """The runnable image of ``files.wasm`` with ``/etc/greeting``, pushed with ``wasidispatch
    push`` as ``<registry>/wasm/files:v1``."""
    from wasidispatch.cli import main

    layout = ImageLayout.create(directory)
    pack_image(layout, files_wasm, "v1", files={"/etc/greeting": f"{GREETING}\n".encode()})
    ref = f"{registry}/wasm/files:v1"
    capsys.readouterr()
    assert main(["push", f"{layout.path}:v1", ref]) == 0  # loopback: plain HTTP
    assert capsys.readouterr().out == f"{ref} {layout.resolve('v1')[0].digest}\n"
    return ref, layout


# ------------------------------------------------------------------------ tests


def test_pushed_wasm_image_is_pulled_and_runs_in_a_pod(
    cri: CriClient,
    node: CriContainerd,
    registry: str,
    files_wasm: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wasm_ref, wasm_layout = _pushed_wasm_image(registry, files_wasm, tmp_path / "wasm", capsys)
    busybox = ImageLayout.open(busybox_layout(tmp_path / "busybox", "1"))
    linux_ref = f"{registry}/library/busybox:1"
    pushed_busybox = push(busybox.path, "1", linux_ref, plain_http=True)
    before = _stored(node)
    known = [image.id for image in cri.list_images()]

    logs = tmp_path / "logs"
    pod = cri.run_pod(
        "pulled",
        runtime_handler=SHIM_HANDLER,
        log_directory=logs,
        cgroup_parent=node.pod_cgroup("pulled"),
    )
    # the kubelet pulls each image in the pod's context, then creates the containers
    pulled = {}
    for ref, layout in ((wasm_ref, wasm_layout), (linux_ref, busybox)):
        assert not cri.image_status(ref).HasField("image")
        image_ref = cri.pull_image(ref, pod.config)
        manifest = layout.resolve(layout.refs()[0])[0].digest
        status = cri.image_status(ref, verbose=True)
        assert status.image.id == image_ref == str(_config_digest(layout, layout.refs()[0]))
        assert list(status.image.repo_tags) == [ref]
        assert list(status.image.repo_digests) == [f"{_repository(ref)}@{manifest}"]
        assert image_ref in [image.id for image in cri.list_images()]
        pulled[ref] = image_ref, json.loads(status.info["info"])
    assert str(pushed_busybox.digest) in cri.image_status(linux_ref).image.repo_digests[0]
    spec = pulled[wasm_ref][1]["imageSpec"]
    assert spec["config"]["Entrypoint"] == [IMAGE_WASM_PATH]
    assert (spec["os"], spec["architecture"]) == (
        pulled[linux_ref][1]["imageSpec"]["os"],
        pulled[linux_ref][1]["imageSpec"]["architecture"],
    )  # the node's platform, as containerd 1.6 wants it

    sidecar = cri.create_container(
        pod.id,
        pod.config,
        "sidecar",
        linux_ref,
        ["sh", "-c", "echo from-busybox; exec sleep 300"],
        log_path="sidecar.log",
    )
    cri.start_container(sidecar)
    app = cri.create_container(
        pod.id, pod.config, "app", wasm_ref, args=["read", "/etc/greeting"], log_path="app.log"
    )
    cri.start_container(app)
    done = cri.wait_exited(app)
    assert (done.exit_code, done.reason) == (0, "Completed"), node.log()
    assert done.image_ref == f"{_repository(wasm_ref)}@{wasm_layout.resolve('v1')[0].digest}"
    assert [(x.stream, x.tag, x.text) for x in read_log(logs / "app.log")] == [
        ("stdout", "F", GREETING)
    ]
    failing = cri.create_container(
        pod.id, pod.config, "failing", wasm_ref, args=["read", "/no/such"], log_path="f.log"
    )
    cri.start_container(failing)
    done = cri.wait_exited(failing)
    assert (done.exit_code, done.reason) == (1, "Error")
    assert [(x.stream, x.tag) for x in read_log(logs / "f.log")] == [("stderr", "F")]
    assert _wait_log(logs / "sidecar.log", "from-busybox") == ["from-busybox"]
    log = node.log(tail=1 << 24)
    assert f"create {app}: wasm" in log
    assert f"create {failing}: wasm" in log
    assert f"create {sidecar}: linux" in log
    cri.stop_container(sidecar, timeout=1)
    assert cri.wait_exited(sidecar).exit_code == 137  # sleep as pid 1 ignores SIGTERM

    assert cri.remove_pod(pod.id) == []
    for ref, (image_ref, _) in pulled.items():
        cri.remove_image(ref)
        assert not cri.image_status(ref).HasField("image")
        assert not cri.image_status(image_ref).HasField("image")
    assert [image.id for image in cri.list_images()] == known
    _nothing_added(node, before)
    assert node.settle() == EMPTY, node.log()


def test_registry_named_only_in_the_hosts_config(
    cri: CriClient,
    node: CriContainerd,
    registry: str,
    files_wasm: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, layout = _pushed_wasm_image(registry, files_wasm, tmp_path / "wasm", capsys)
    hosts = node.registry_config / ALIAS / "hosts.toml"
    assert f'server = "http://{registry}"' in hosts.read_text()
    before = _stored(node)
    ref = f"{ALIAS}/wasm/files:v1"
    image_ref = cri.pull_image(ref)
    status = cri.image_status(ref).image
    assert status.id == image_ref == str(_config_digest(layout, "v1"))
    assert list(status.repo_digests) == [f"{ALIAS}/wasm/files@{layout.resolve('v1')[0].digest}"]
    cri.remove_image(ref)
    assert not cri.image_status(ref).HasField("image")
    _nothing_added(node, before)
    cri.remove_image(ref)  # idempotent, as the CRI wants it


def _pushed_artifact(registry: str, files_wasm: bytes, directory: Path) -> tuple[str, ImageLayout]:
    layout = ImageLayout.create(directory)
    pack_wasm(layout, files_wasm, "v1", title="files.wasm")
    ref = f"{registry}/wasm/artifact:v1"
    push(layout.path, "v1", ref, plain_http=True)
    return ref, layout


def test_cncf_artifact_is_fetched_then_refused_by_containerd(
    cri: CriClient, node: CriContainerd, registry: str, files_wasm: bytes, tmp_path: Path
) -> None:
    ref, layout = _pushed_artifact(registry, files_wasm, tmp_path / "artifact")
    manifest = layout.resolve("v1")[1]
    before = _stored(node)

    with pytest.raises(grpc.RpcError) as refused:
        cri.pull_image(ref)
    assert refused.value.code() == grpc.StatusCode.UNKNOWN
    assert refused.value.details() == UNPACK_REFUSED.format(ref=ref)

    # the fetch went through before the unpack failed: containerd keeps the image and every
    # blob (the Wasm layer among them), and CRI reports the image as present
    stored = _stored(node)
    assert ref in stored.images
    blobs = {str(layout.resolve("v1")[0].digest), str(manifest.config.digest)}
    blobs |= {str(layer.digest) for layer in manifest.layers}
    assert blobs <= set(stored.content)
    assert stored.snapshots == before.snapshots  # nothing unpacked
    status = cri.image_status(ref, verbose=True)
    assert status.image.id == str(manifest.config.digest)
    info = json.loads(status.info["info"])
    assert info["chainID"] == ""
    assert (info["imageSpec"]["os"], info["imageSpec"]["architecture"]) == ("wasip1", "wasm")
    assert info["imageSpec"]["rootfs"]["diff_ids"] is None

    # a second attempt (a kubelet's retry) fails the same way
    with pytest.raises(grpc.RpcError) as again:
        cri.pull_image(ref)
    assert again.value.details() == UNPACK_REFUSED.format(ref=ref)

    cri.remove_image(ref)
    assert not cri.image_status(ref).HasField("image")
    _nothing_added(node, before)


def test_artifact_left_by_a_failed_pull_gives_a_container_an_empty_rootfs(
    cri: CriClient, node: CriContainerd, registry: str, files_wasm: bytes, tmp_path: Path
) -> None:
    """What a kubelet with ``imagePullPolicy: IfNotPresent`` would do on its next try: the
    image is "present" (`test_cncf_artifact_is_fetched_then_refused_by_containerd`), so it
    creates the container. CRI gives it an empty snapshot (the artifact has no diff_ids) and
    the image's name in an annotation; today the shim finds no ``/files.wasm`` in that
    rootfs (reading the Wasm layer from containerd's content store would run it)."""
    ref, _ = _pushed_artifact(registry, files_wasm, tmp_path / "artifact")
    before = _stored(node)
    with pytest.raises(grpc.RpcError):
        cri.pull_image(ref)
    logs = tmp_path / "logs"
    pod = cri.run_pod(
        "artifact",
        runtime_handler=SHIM_HANDLER,
        log_directory=logs,
        cgroup_parent=node.pod_cgroup("artifact"),
    )

    with pytest.raises(grpc.RpcError) as no_command:
        cri.create_container(pod.id, pod.config, "bare", ref, log_path="bare.log")
    assert no_command.value.details().endswith("failed to generate spec: no command specified")

    app = cri.create_container(
        pod.id, pod.config, "app", ref, ["/files.wasm", "read", "/etc/hostname"], log_path="a.log"
    )
    info = cri.container_info(app)
    assert info["runtimeSpec"]["annotations"]["io.kubernetes.cri.image-name"] == ref
    rows = [line.split() for line in node.ctr("snapshots", "ls").stdout.splitlines()]
    assert [app, "Active"] in rows  # no parent: an empty rootfs
    with pytest.raises(grpc.RpcError) as failed:
        cri.start_container(app)
    assert "/files.wasm: no such file or directory" in failed.value.details()

    assert cri.remove_pod(pod.id) == []
    cri.remove_image(ref)
    _nothing_added(node, before)
    assert node.settle() == EMPTY, node.log()
