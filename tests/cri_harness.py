"""A CRI (Kubernetes' Container Runtime Interface, ``runtime.v1``) client and a private
containerd serving it, for the pod tests.

`cri_containerd` starts a `CriContainerd`: a `tests.containerd_harness.PrivateContainerd`
whose config also sets containerd's CRI plugin up (sandbox image, runtime handlers, CNI
directories under the daemon's own directory), in the ``k8s.io`` namespace CRI works in,
with a pause image built here already imported. `CriClient` calls the CRI over gRPC on
containerd's socket (the CRI socket is containerd's own); the messages come from
``tests/cri/runtime_v1.proto``, compiled once per process with ``grpc_tools.protoc``.

Images are built here, not pulled: `build_pause_image` compiles ``tests/guests/pause.c``
(a static binary: the pod's sandbox process), `import_busybox` and `import_wasm` pack the
images of `tests.containerd_harness`; `import_k8s` imports an archive with ``ctr -n k8s.io
images import`` and waits until the CRI plugin sees it (CRI wants full references such as
``docker.io/library/busybox:test``, and would try to pull a sandbox image it does not know).
The registry tests pull through CRI instead (`CriClient.pull_image`), from a local registry
that `CriContainerd`'s ``registry_hosts`` lets containerd reach over plain HTTP.

Cleanup: every pod gets a cgroup parent of its own below the daemon's unique top-level path
(`CriContainerd.pod_cgroup`); containerd removes the containers' cgroups, not that parent, so
`CriClient.remove_pod` removes it. `CriContainerd.stop` first removes whatever pods are left
through CRI, then does what `PrivateContainerd.stop` does; `CriContainerd.states` adds the
CRI plugin's per-pod and per-container directories to the leftovers, and of our shim's runc
state in ``/run/containerd/wasidispatch/k8s.io`` only the entries of this daemon's pods and
containers (that directory is shared by every daemon using the ``k8s.io`` namespace).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from tests.containerd_harness import (
    RUNC_RUNTIME,
    SHIM_RUNC_ROOT,
    SHIM_RUNTIME,
    PrivateContainerd,
    _image,
    _tar,
    _tar_layout,
    busybox_layout,
    wasm_layout,
)

__all__ = [
    "BUSYBOX_REF",
    "CRI_NAMESPACE",
    "DEFAULT_RUNTIMES",
    "PAUSE_REF",
    "RUNC_HANDLER",
    "SHIM_HANDLER",
    "WASM_REF",
    "CriClient",
    "CriContainerd",
    "CriError",
    "LogLine",
    "Pod",
    "build_pause_image",
    "cri",
    "cri_containerd",
    "import_busybox",
    "import_k8s",
    "import_wasm",
    "read_log",
    "remove_cgroup",
]

CRI_NAMESPACE = "k8s.io"
PAUSE_REF = "localhost/wasidispatch/pause:test"
BUSYBOX_REF = "docker.io/library/busybox:test"
WASM_REF = "localhost/wasm-hello:test"
RUNC_HANDLER = "runc"
SHIM_HANDLER = "wasidispatch"
DEFAULT_RUNTIMES: Mapping[str, str] = {RUNC_HANDLER: RUNC_RUNTIME, SHIM_HANDLER: SHIM_RUNTIME}
"""Runtime handler (``RunPodSandbox``'s ``runtime_handler``) -> containerd runtime type."""

PROTO = Path(__file__).resolve().parent / "cri" / "runtime_v1.proto"
PAUSE_SOURCE = Path(__file__).resolve().parent / "guests" / "pause.c"
_CRI_PLUGIN = "io.containerd.grpc.v1.cri"
_RUNTIME_SERVICE = "runtime.v1.RuntimeService"
_IMAGE_SERVICE = "runtime.v1.ImageService"


class CriError(RuntimeError):
    """The CRI setup failed: no CRI plugin, an image CRI does not see, a container that does
    not exit in time."""


# ------------------------------------------------------------------------ messages

_pb_lock = threading.Lock()
_pb_module: ModuleType | None = None


def cri() -> ModuleType:
    """The generated ``runtime.v1`` message module (built once per process).

    The file is compiled under a name of its own (``wasidispatch_tests_cri_runtime_v1``):
    the default descriptor pool holds every generated file of the process by name, and the
    shim's modules and `tests.containerd_harness`'s are there too.
    """
    global _pb_module
    with _pb_lock:
        if _pb_module is None:
            import importlib.resources
            import importlib.util

            from grpc_tools import protoc

            name = "wasidispatch_tests_cri_runtime_v1"
            with tempfile.TemporaryDirectory(prefix="wasidispatch-cri-proto-") as tmp:
                source = Path(tmp) / f"{name}.proto"
                source.write_bytes(PROTO.read_bytes())
                include = str(importlib.resources.files("grpc_tools") / "_proto")
                code = protoc.main(
                    ["protoc", f"-I{tmp}", f"-I{include}", f"--python_out={tmp}", str(source)]
                )
                if code != 0:
                    raise CriError(f"protoc failed ({code}) on {PROTO}")
                spec = importlib.util.spec_from_file_location(
                    f"{name}_pb2", Path(tmp) / f"{name}_pb2.py"
                )
                assert spec is not None
                assert spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            _pb_module = module
        return _pb_module


# ------------------------------------------------------------------------ the client


class Pod(NamedTuple):
    """A pod `CriClient.run_pod` started: its id and the config it was made with (which
    ``CreateContainer`` takes again)."""

    id: str
    config: Any


class LogLine(NamedTuple):
    """One line of a CRI container log: ``<RFC 3339 time> <stream> <tag> <text>``; the tag
    is ``F`` for a full line, ``P`` for a part of one."""

    time: str
    stream: str
    tag: str
    text: str


def read_log(path: Path) -> list[LogLine]:
    """The lines of a CRI container log file."""
    lines = []
    for raw in path.read_text().splitlines():
        stamp, stream, tag, *text = raw.split(" ", 3)
        lines.append(LogLine(stamp, stream, tag, text[0] if text else ""))
    return lines


def remove_cgroup(path: str) -> list[Path]:
    """rmdir cgroup ``path`` (absolute, as a ``cgroup_parent``) in every hierarchy; returns
    the directories that are still there (busy, or holding children)."""
    left = []
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        directory = hierarchy / path.lstrip("/")
        if directory.is_dir():
            try:
                directory.rmdir()
            except OSError:
                left.append(directory)
    return left


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _seccomp(pb: ModuleType, profile: str | None) -> Any:
    """``RuntimeDefault``, ``Unconfined`` or ``localhost/<path>`` as a SecurityProfile."""
    if profile is None:
        return None
    kinds = pb.SecurityProfile.ProfileType
    if profile.startswith("localhost/"):
        return pb.SecurityProfile(
            profile_type=kinds.Value("Localhost"), localhost_ref=profile[len("localhost/") :]
        )
    return pb.SecurityProfile(profile_type=kinds.Value(profile))


class CriClient:
    """The CRI's RuntimeService and ImageService on ``socket_path``.

    The thin methods take the request's fields and return the response message; gRPC errors
    are raised as ``grpc.RpcError``. The helpers (`run_pod`, `create_container`,
    `wait_exited`, `remove_pod`) build the messages a kubelet would. Every pod and container
    id this client got is in `created` (`CriContainerd` finds its shim state by them).
    """

    def __init__(self, socket_path: Path | str, *, timeout: float = 60.0) -> None:
        import grpc  # type: ignore[import-untyped]

        self.pb = cri()
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.created: set[str] = set()
        self.pod_cgroups: dict[str, str] = {}
        """Pod id -> the cgroup parent it was run with (removed by `remove_pod`)."""
        self._stubs: dict[str, Any] = {}
        for service_name in (_RUNTIME_SERVICE, _IMAGE_SERVICE):
            service = self.pb.DESCRIPTOR.services_by_name.get(service_name.split(".")[-1])
            if service is None:
                continue
            for method in service.methods:
                response = getattr(self.pb, method.output_type.name)
                self._stubs[method.name] = self.channel.unary_unary(
                    f"/{service_name}/{method.name}",
                    request_serializer=_serialize,
                    response_deserializer=response.FromString,
                )

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """One unary call by its RPC name (``Version``, ``RunPodSandbox``...)."""
        return self._stubs[method](request, timeout=timeout or self.timeout)

    # ----------------------------------------------------------------- runtime

    def version(self) -> Any:
        """``VersionResponse`` (runtime name and version, CRI API version)."""
        return self.call("Version", self.pb.VersionRequest(version="v1"))

    def status(self, verbose: bool = False) -> Any:
        """``StatusResponse``: RuntimeReady and NetworkReady conditions (``info`` if verbose)."""
        return self.call("Status", self.pb.StatusRequest(verbose=verbose))

    def conditions(self) -> dict[str, bool]:
        """`status`'s conditions by type."""
        return {c.type: c.status for c in self.status().status.conditions}

    def image_status(self, ref: str, verbose: bool = False) -> Any:
        """``ImageStatusResponse`` (its ``image`` unset when CRI does not know ``ref``;
        ``info["info"]``, containerd's JSON with the image's config, with ``verbose``)."""
        request = self.pb.ImageStatusRequest(image=self.pb.ImageSpec(image=ref), verbose=verbose)
        return self.call("ImageStatus", request)

    def pull_image(
        self,
        ref: str,
        sandbox_config: Any = None,
        auth: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> str:
        """``PullImage`` of ``ref`` (in the context of a pod's ``sandbox_config``, as a
        kubelet sends it, when given; ``auth``: ``AuthConfig`` fields); returns the
        response's ``image_ref``."""
        request = self.pb.PullImageRequest(image=self.pb.ImageSpec(image=ref))
        if sandbox_config is not None:
            request.sandbox_config.CopyFrom(sandbox_config)
        if auth:
            request.auth.CopyFrom(self.pb.AuthConfig(**dict(auth)))
        image_ref: str = self.call("PullImage", request, timeout=timeout).image_ref
        return image_ref

    def list_images(self, ref: str = "") -> list[Any]:
        """``Image`` messages CRI knows (the filter, ``ref``, is sent when given: containerd
        1.6 ignores it and lists every image)."""
        request = self.pb.ListImagesRequest()
        if ref:
            request.filter.image.image = ref
        return list(self.call("ListImages", request).images)

    def remove_image(self, ref: str) -> Any:
        """``RemoveImage`` of ``ref`` (a name, a digest reference or an image id)."""
        request = self.pb.RemoveImageRequest(image=self.pb.ImageSpec(image=ref))
        return self.call("RemoveImage", request)

    # ----------------------------------------------------------------- pod sandboxes

    def run_pod_sandbox(self, config: Any, runtime_handler: str = "") -> Any:
        """``RunPodSandboxResponse`` (``pod_sandbox_id``)."""
        request = self.pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        response = self.call("RunPodSandbox", request)
        self.created.add(response.pod_sandbox_id)
        return response

    def stop_pod_sandbox(self, pod_id: str) -> Any:
        """``StopPodSandbox``: stops every container of the pod, then the sandbox."""
        return self.call("StopPodSandbox", self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod_sandbox(self, pod_id: str) -> Any:
        """``RemovePodSandbox``: removes the pod's containers and the sandbox."""
        request = self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
        return self.call("RemovePodSandbox", request)

    def pod_sandbox_status(self, pod_id: str, verbose: bool = False) -> Any:
        """``PodSandboxStatusResponse`` (``info["info"]``, JSON, with ``verbose``)."""
        request = self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self.call("PodSandboxStatus", request)

    def pod_info(self, pod_id: str) -> dict[str, Any]:
        """The verbose ``PodSandboxStatus``'s ``info["info"]`` (containerd's JSON: the
        sandbox's ``pid``, its config and OCI spec, the runtime...)."""
        info: dict[str, Any] = json.loads(self.pod_sandbox_status(pod_id, True).info["info"])
        return info

    def list_pod_sandbox(self) -> list[Any]:
        """Every pod sandbox (``PodSandbox`` messages)."""
        return list(self.call("ListPodSandbox", self.pb.ListPodSandboxRequest()).items)

    # ----------------------------------------------------------------- containers

    def create_container_with(self, pod_id: str, config: Any, sandbox_config: Any) -> Any:
        """``CreateContainerResponse`` (``container_id``) for a ready ``ContainerConfig``."""
        request = self.pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config
        )
        response = self.call("CreateContainer", request)
        self.created.add(response.container_id)
        return response

    def start_container(self, container_id: str) -> Any:
        """``StartContainer``."""
        request = self.pb.StartContainerRequest(container_id=container_id)
        return self.call("StartContainer", request)

    def stop_container(self, container_id: str, timeout: int = 0) -> Any:
        """``StopContainer``: the stop signal, then SIGKILL after ``timeout`` seconds."""
        request = self.pb.StopContainerRequest(container_id=container_id, timeout=timeout)
        return self.call("StopContainer", request, timeout=self.timeout + timeout)

    def remove_container(self, container_id: str) -> Any:
        """``RemoveContainer``."""
        request = self.pb.RemoveContainerRequest(container_id=container_id)
        return self.call("RemoveContainer", request)

    def container_status(self, container_id: str, verbose: bool = False) -> Any:
        """The ``ContainerStatus`` message (not the response around it)."""
        request = self.pb.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self.call("ContainerStatus", request).status

    def container_info(self, container_id: str) -> dict[str, Any]:
        """The verbose ``ContainerStatus``'s ``info["info"]`` (containerd's JSON: pid, the
        OCI spec, the runtime...)."""
        request = self.pb.ContainerStatusRequest(container_id=container_id, verbose=True)
        info: dict[str, Any] = json.loads(self.call("ContainerStatus", request).info["info"])
        return info

    def list_containers(self, pod_id: str = "", state: int | None = None) -> list[Any]:
        """``Container`` messages, of one pod and in one state (``CONTAINER_RUNNING``...)
        when given."""
        pb = self.pb
        condition = pb.ContainerFilter(pod_sandbox_id=pod_id)
        if state is not None:
            condition.state.state = state
        response = self.call("ListContainers", pb.ListContainersRequest(filter=condition))
        return list(response.containers)

    def update_container_resources(
        self,
        container_id: str,
        resources: Mapping[str, Any],
        annotations: Mapping[str, str] | None = None,
    ) -> Any:
        """``UpdateContainerResources`` with ``LinuxContainerResources(**resources)``."""
        request = self.pb.UpdateContainerResourcesRequest(
            container_id=container_id,
            linux=self.pb.LinuxContainerResources(**resources),
            annotations=dict(annotations or {}),
        )
        return self.call("UpdateContainerResources", request)

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 30) -> Any:
        """``ExecSyncResponse`` (``stdout``, ``stderr``, ``exit_code``); ``timeout`` in
        seconds (0: none)."""
        request = self.pb.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        return self.call("ExecSync", request, timeout=self.timeout + timeout)

    def container_stats(self, container_id: str) -> Any:
        """The ``ContainerStats`` message (cpu, memory, writable layer)."""
        request = self.pb.ContainerStatsRequest(container_id=container_id)
        return self.call("ContainerStats", request).stats

    # ----------------------------------------------------------------- helpers

    def namespaces(
        self, *, host_network: bool = True, share_pid: bool = False, host_ipc: bool = False
    ) -> Any:
        """A ``NamespaceOption``: the network of the node (there is no CNI here) or of the
        pod; a PID namespace per container or one for the pod; IPC of the pod or the node."""
        mode = self.pb.NamespaceMode
        return self.pb.NamespaceOption(
            network=mode.Value("NODE" if host_network else "POD"),
            pid=mode.Value("POD" if share_pid else "CONTAINER"),
            ipc=mode.Value("NODE" if host_ipc else "POD"),
        )

    def pod_config(
        self,
        name: str,
        *,
        log_directory: Path | str = "",
        cgroup_parent: str = "",
        namespace: str = "default",
        uid: str = "",
        attempt: int = 0,
        hostname: str = "",
        host_network: bool = True,
        share_pid: bool = False,
        host_ipc: bool = False,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        sysctls: Mapping[str, str] | None = None,
        privileged: bool = False,
        seccomp: str | None = None,
    ) -> Any:
        """A ``PodSandboxConfig``. With host network the hostname must stay empty (runc
        cannot set one without a UTS namespace of the pod); ``uid`` defaults to one derived
        from ``namespace/name``; ``seccomp``: ``RuntimeDefault``, ``Unconfined`` or
        ``localhost/<path>`` (unset: unconfined)."""
        pb = self.pb
        security = pb.LinuxSandboxSecurityContext(
            namespace_options=self.namespaces(
                host_network=host_network, share_pid=share_pid, host_ipc=host_ipc
            ),
            privileged=privileged,
        )
        profile = _seccomp(pb, seccomp)
        if profile is not None:
            security.seccomp.CopyFrom(profile)
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(
                name=name,
                uid=uid or f"uid-{namespace}-{name}",
                namespace=namespace,
                attempt=attempt,
            ),
            hostname=hostname,
            log_directory=str(log_directory),
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=security,
                sysctls=dict(sysctls or {}),
            ),
        )

    def run_pod(
        self,
        name: str,
        *,
        runtime_handler: str,
        log_directory: Path | str,
        cgroup_parent: str,
        **config: Any,
    ) -> Pod:
        """Run a pod sandbox made by `pod_config` (``config``: its other arguments) with
        ``runtime_handler``; the log directory is created."""
        Path(log_directory).mkdir(parents=True, exist_ok=True)
        sandbox = self.pod_config(
            name, log_directory=log_directory, cgroup_parent=cgroup_parent, **config
        )
        pod_id: str = self.run_pod_sandbox(sandbox, runtime_handler).pod_sandbox_id
        self.pod_cgroups[pod_id] = cgroup_parent
        return Pod(pod_id, sandbox)

    def container_config(
        self,
        pod_config: Any,
        name: str,
        image: str,
        command: Sequence[str] = (),
        args: Sequence[str] = (),
        *,
        mounts: Sequence[Any] = (),
        log_path: str = "",
        envs: Mapping[str, str] | None = None,
        working_dir: str = "",
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        attempt: int = 0,
        stdin: bool = False,
        stdin_once: bool = False,
        tty: bool = False,
        resources: Mapping[str, Any] | None = None,
        privileged: bool = False,
        add_capabilities: Sequence[str] = (),
        drop_capabilities: Sequence[str] = (),
        run_as_user: int | None = None,
        run_as_group: int | None = None,
        run_as_username: str = "",
        supplemental_groups: Sequence[int] = (),
        readonly_rootfs: bool = False,
        no_new_privs: bool = False,
        seccomp: str | None = None,
        namespace_options: Any = None,
    ) -> Any:
        """A ``ContainerConfig`` for a container of the pod made with ``pod_config``.

        ``command`` replaces the image's entrypoint and ``args`` its cmd (as a pod spec's
        ``command``/``args``); ``mounts``: ``Mount`` messages (see `mount`); ``log_path``:
        relative to the pod's log directory; ``resources``: ``LinuxContainerResources``
        fields (``memory_limit_in_bytes``, ``cpu_quota``...); namespaces default to the
        pod's, as a kubelet sets them.
        """
        pb = self.pb
        security = pb.LinuxContainerSecurityContext(
            capabilities=pb.Capability(
                add_capabilities=list(add_capabilities),
                drop_capabilities=list(drop_capabilities),
            ),
            privileged=privileged,
            namespace_options=(
                namespace_options
                if namespace_options is not None
                else pod_config.linux.security_context.namespace_options
            ),
            run_as_username=run_as_username,
            supplemental_groups=list(supplemental_groups),
            readonly_rootfs=readonly_rootfs,
            no_new_privs=no_new_privs,
        )
        if run_as_user is not None:
            security.run_as_user.value = run_as_user
        if run_as_group is not None:
            security.run_as_group.value = run_as_group
        profile = _seccomp(pb, seccomp)
        if profile is not None:
            security.seccomp.CopyFrom(profile)
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt),
            image=pb.ImageSpec(image=image),
            command=list(command),
            args=list(args),
            working_dir=working_dir,
            envs=[pb.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
            mounts=list(mounts),
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            log_path=log_path,
            stdin=stdin,
            stdin_once=stdin_once,
            tty=tty,
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(**dict(resources or {})),
                security_context=security,
            ),
        )

    def mount(
        self,
        host_path: Path | str,
        container_path: str,
        *,
        readonly: bool = False,
        propagation: str = "PROPAGATION_PRIVATE",
    ) -> Any:
        """A ``Mount`` (a bind mount of ``host_path``)."""
        return self.pb.Mount(
            container_path=container_path,
            host_path=str(host_path),
            readonly=readonly,
            propagation=self.pb.MountPropagation.Value(propagation),
        )

    def create_container(
        self,
        pod_id: str,
        pod_config: Any,
        name: str,
        image: str,
        command: Sequence[str] = (),
        args: Sequence[str] = (),
        **config: Any,
    ) -> str:
        """Create a container made by `container_config` (``config``: its other arguments)
        in pod ``pod_id``; returns its id."""
        made = self.container_config(pod_config, name, image, command, args, **config)
        container_id: str = self.create_container_with(pod_id, made, pod_config).container_id
        return container_id

    def wait_exited(self, container_id: str, timeout: float = 60.0) -> Any:
        """Poll ``ContainerStatus`` until the container has exited; its status. Raises
        `CriError` after ``timeout`` seconds."""
        exited = self.pb.ContainerState.Value("CONTAINER_EXITED")
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container_id)
            if status.state == exited:
                return status
            if time.monotonic() >= deadline:
                state = self.pb.ContainerState.Name(status.state)
                raise CriError(f"container {container_id} still {state} after {timeout} s")
            time.sleep(0.02)

    def remove_pod(self, pod_id: str, cgroup_parent: str | None = None) -> list[Path]:
        """Stop and remove the pod (with its containers), then its cgroup parent (the one
        `run_pod` got, unless given); returns the cgroup directories that would not go."""
        self.stop_pod_sandbox(pod_id)
        self.remove_pod_sandbox(pod_id)
        parent = self.pod_cgroups.pop(pod_id, "") if cgroup_parent is None else cgroup_parent
        return remove_cgroup(parent) if parent else []


# ------------------------------------------------------------------------ images


def _run(argv: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise CriError(f"{what} failed ({done.returncode}): {done.stderr}{done.stdout}")
    return done


def build_pause_image(directory: Path) -> Path:
    """Compile ``tests/guests/pause.c`` (``gcc -static -O2``) and write a one-layer OCI
    image of it (``/pause``, the entrypoint), tagged ``test``, in a layout archive under
    ``directory``; returns the archive."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "pause"
    _run(
        [
            "gcc",
            "-static",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(binary),
            str(PAUSE_SOURCE),
        ],
        "gcc on pause.c",
    )
    layer = _tar([("pause", binary.read_bytes(), None)])
    layout = _image(directory / "pause-layout", "test", layer, {"Entrypoint": ["/pause"]})
    return _tar_layout(layout, directory / "pause.tar")


def _split_ref(ref: str) -> tuple[str, str]:
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        raise ValueError(f"{ref!r}: a reference with a tag is needed (name:tag)")
    return name, tag


def import_k8s(containerd: PrivateContainerd, archive: Path, ref: str) -> str:
    """Import a layout archive tagged with ``ref``'s tag as ``ref`` into containerd's
    ``k8s.io`` namespace, and wait until CRI's ``ImageStatus`` knows it; returns ``ref``."""
    name, _ = _split_ref(ref)
    _run(
        [
            "ctr",
            "-a",
            str(containerd.sock),
            "-n",
            CRI_NAMESPACE,
            "images",
            "import",
            "--base-name",
            name,
            str(archive),
        ],
        f"ctr images import {ref}",
    )
    # CRI learns about images from containerd's events, after the import has returned
    with CriClient(containerd.sock) as client:
        deadline = time.monotonic() + 30
        while not client.image_status(ref).HasField("image"):
            if time.monotonic() > deadline:
                raise CriError(f"CRI does not see {ref} after its import")
            time.sleep(0.02)
    return ref


def import_busybox(containerd: PrivateContainerd, directory: Path, ref: str = BUSYBOX_REF) -> str:
    """`tests.containerd_harness.busybox_layout` imported as ``ref``."""
    _, tag = _split_ref(ref)
    layout = busybox_layout(directory / "busybox-layout", tag)
    return import_k8s(containerd, _tar_layout(layout, directory / "busybox.tar"), ref)


def import_wasm(
    containerd: PrivateContainerd,
    directory: Path,
    files: Mapping[str, bytes],
    entrypoint: str,
    ref: str = WASM_REF,
) -> str:
    """`tests.containerd_harness.wasm_layout` (``files`` at ``/``) imported as ``ref``."""
    _, tag = _split_ref(ref)
    safe = ref.replace("/", "_").replace(":", "_")
    layout = wasm_layout(directory / f"{safe}-layout", files, entrypoint, tag)
    return import_k8s(containerd, _tar_layout(layout, directory / f"{safe}.tar"), ref)


# ------------------------------------------------------------------------ the daemon


def _toml(value: object) -> str:
    """A TOML value for a string, bool, int or list of those (JSON spells them alike)."""
    return json.dumps(value)


class CriContainerd(PrivateContainerd):
    """`PrivateContainerd` in the ``k8s.io`` namespace with its CRI plugin configured.

    ``runtimes``: runtime handler -> runtime type (`DEFAULT_RUNTIMES` unless given); a
    handler of ``io.containerd.runc.v2`` gets the daemon's runc root (``Root``).
    ``runtime_options``: more ``[...runtimes.<handler>.options]`` keys (``BinaryName``,
    ``ConfigPath``...); ``runtime_settings``: more keys of the handler's own table
    (``pod_annotations``, ``container_annotations``, ``privileged_without_host_devices``).
    ``sandbox_image``: the pause image's reference (`cri_containerd` imports it).
    ``registry_hosts``: registry host as image references name it -> the ``host:port``
    containerd pulls it from over plain HTTP (the same host, or a loopback address for a
    name nothing resolves): each gets a ``hosts.toml`` in `registry_config`, the directory
    the CRI plugin's ``registry.config_path`` names (set only when hosts are given).
    """

    def __init__(
        self,
        base: Path | None = None,
        *,
        runtimes: Mapping[str, str] | None = None,
        runtime_options: Mapping[str, Mapping[str, object]] | None = None,
        runtime_settings: Mapping[str, Mapping[str, object]] | None = None,
        sandbox_image: str = PAUSE_REF,
        registry_hosts: Mapping[str, str] | None = None,
        debug: bool = False,
        bytecode: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(base, namespace=CRI_NAMESPACE, debug=debug, bytecode=bytecode, env=env)
        self.runtimes = dict(DEFAULT_RUNTIMES if runtimes is None else runtimes)
        self.runtime_options = {k: dict(v) for k, v in (runtime_options or {}).items()}
        self.runtime_settings = {k: dict(v) for k, v in (runtime_settings or {}).items()}
        self.sandbox_image = sandbox_image
        self.registry_hosts = dict(registry_hosts or {})
        self.registry_config = self.base / "registry-hosts"
        self._clients: list[CriClient] = []
        self._shim_states_before: set[str] = set()

    def _config(self) -> str:
        cri = f'  [plugins."{_CRI_PLUGIN}"]'
        lines = [
            super()._config().rstrip("\n"),
            f"    sandbox_image = {_toml(self.sandbox_image)}",
            # CRI's CNI watcher creates its config directory: keep it in ours
            f"{cri[:-1]}.cni]",
            f'      bin_dir = "{self.base}/cni/bin"',
            f'      conf_dir = "{self.base}/cni/net.d"',
            f"{cri[:-1]}.containerd]",
            f"      default_runtime_name = {_toml(next(iter(self.runtimes), 'runc'))}",
        ]
        for handler, runtime_type in self.runtimes.items():
            table = f"{cri[:-1]}.containerd.runtimes.{_toml(handler)}]"
            lines += [table, f"        runtime_type = {_toml(runtime_type)}"]
            lines += [
                f"        {k} = {_toml(v)}"
                for k, v in self.runtime_settings.get(handler, {}).items()
            ]
            options = dict(self.runtime_options.get(handler, {}))
            if runtime_type == RUNC_RUNTIME:
                options.setdefault("Root", str(self.runc_root))
            if options:
                lines.append(f"{table[:-1]}.options]")
                lines += [f"          {k} = {_toml(v)}" for k, v in options.items()]
        if self.registry_hosts:
            lines += [
                f"{cri[:-1]}.registry]",
                f"      config_path = {_toml(str(self.registry_config))}",
            ]
        return "\n".join([*lines, ""])

    def _write_registry_hosts(self) -> None:
        """``<registry_config>/<host>/hosts.toml`` per `registry_hosts` entry: its address
        over HTTP as the server and the one host, for pulls and resolving tags."""
        for host, address in self.registry_hosts.items():
            url = f"http://{address}"
            directory = self.registry_config / host
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts.toml").write_text(
                "\n".join(
                    [
                        f"server = {_toml(url)}",
                        f"[host.{_toml(url)}]",
                        '  capabilities = ["pull", "resolve"]',
                        "",
                    ]
                )
            )

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemon; raises `CriError` when its CRI plugin did not load."""
        self._shim_states_before = set(_listdir(SHIM_RUNC_ROOT / CRI_NAMESPACE))
        self._write_registry_hosts()
        super().start(timeout)
        why = self.cri_plugin_error()
        if why is not None:
            raise CriError(f"containerd's CRI plugin is not running: {why}\n{self.log()}")

    def cri_plugin_error(self) -> str | None:
        """Why the CRI plugin is not up (its line in ``ctr plugins ls``), or ``None``."""
        out = self.ctr("plugins", "ls")
        for line in out.stdout.splitlines():
            words = line.split()
            if words[:2] == ["io.containerd.grpc.v1", "cri"]:
                return None if words[-1] == "ok" else line
        return f"not in ctr plugins ls: {out.stdout}{out.stderr}"

    def client(self, timeout: float = 60.0) -> CriClient:
        """A `CriClient` on this daemon (closed by `stop`)."""
        made = CriClient(self.sock, timeout=timeout)
        self._clients.append(made)
        return made

    def pod_cgroup(self, name: str) -> str:
        """A pod's own cgroup parent, below the daemon's top-level cgroup path."""
        return f"{self.cgroup_parent}/{name}"

    def known_ids(self) -> set[str]:
        """Pod and container ids of this daemon: those its clients got and those containerd
        still lists."""
        ids = {i for c in self._clients for i in c.created}
        if self.proc is not None and self.proc.poll() is None:
            ids |= set(self.ctr("containers", "ls", "-q").stdout.split())
        return ids

    def _shim_states(self, ids: set[str]) -> list[Path]:
        """Our shim's runc state dirs of ``ids`` that were not there at `start`."""
        top = SHIM_RUNC_ROOT / CRI_NAMESPACE
        new = set(_listdir(top)) - self._shim_states_before
        return sorted(top / name for name in new & ids)

    def states(self) -> list[str]:
        """`PrivateContainerd.states` with the CRI plugin's pod and container directories,
        and only this daemon's entries of our shim's shared ``k8s.io`` runc root."""
        shared = str(SHIM_RUNC_ROOT / CRI_NAMESPACE) + "/"
        found = [p for p in super().states() if not p.startswith(shared)]
        found += [str(p) for p in self._shim_states(self.known_ids())]
        for top in (self.base / "root", self.base / "state"):
            for kind in ("sandboxes", "containers"):
                found += sorted(str(p) for p in (top / _CRI_PLUGIN / kind).glob("*"))
        return found

    def remove_pods(self) -> None:
        """Stop and remove every pod CRI lists, and the cgroup parents of the pods run
        through this daemon's clients (cleanup for tests: errors are ignored)."""
        import grpc

        with CriClient(self.sock, timeout=30) as client, contextlib.suppress(grpc.RpcError):
            for pod in client.list_pod_sandbox():
                with contextlib.suppress(grpc.RpcError):
                    client.stop_pod_sandbox(pod.id)
                with contextlib.suppress(grpc.RpcError):
                    client.remove_pod_sandbox(pod.id)
        for made in self._clients:
            for parent in made.pod_cgroups.values():
                remove_cgroup(parent)
            made.pod_cgroups.clear()

    def stop(self) -> None:
        """Remove what pods are left (`remove_pods`), then do what `PrivateContainerd.stop`
        does, except that of our shim's shared ``k8s.io`` runc root only this daemon's
        entries are removed."""
        import shutil

        if self.alive():
            self.remove_pods()
        ids = self.known_ids()
        for made in self._clients:
            made.close()
        self._shutdown()
        for state in self._shim_states(ids):
            shutil.rmtree(state, ignore_errors=True)
        with contextlib.suppress(OSError):
            (SHIM_RUNC_ROOT / CRI_NAMESPACE).rmdir()  # only when empty
        shutil.rmtree(self.base, ignore_errors=True)


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def cri_containerd(
    tmp_path: Path,
    runtimes: Mapping[str, str] | None = None,
    **options: Any,
) -> Iterator[CriContainerd]:
    """A started `CriContainerd` (``options``: its other arguments) with the pause image
    (built under ``tmp_path``) imported as its sandbox image; stopped on the way out."""
    daemon = CriContainerd(runtimes=runtimes, **options)
    try:
        daemon.start()
        import_k8s(daemon, build_pause_image(tmp_path / "pause"), daemon.sandbox_image)
        yield daemon
    finally:
        daemon.stop()
