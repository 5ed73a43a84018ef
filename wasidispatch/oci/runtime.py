"""Typed models of the OCI runtime-spec (v1.3): ``config.json``, ``state`` and ``features``.

Every object of the upstream JSON schema (``schema/config-schema.json`` and its platform
files) has a model here: the process (user, env, cwd, capabilities, rlimits, scheduler, I/O
priority, CPU affinity), root, mounts, hooks, annotations, and the Linux, FreeBSD, z/OS,
Solaris, Windows and VM sections. Integer fields carry the schema's ranges (``uint32`` etc.),
enumerations are ``Literal`` types, and unknown fields survive a load/dump round trip.

Example::

    >>> from wasidispatch.oci.runtime import Spec
    >>> spec = Spec.parse(b'{"ociVersion": "1.3.0", "process": {"cwd": "/",'
    ...     b' "args": ["/app.wasm"], "env": ["PATH=/bin"]}, "root": {"path": "rootfs"}}')
    >>> spec.process.args, spec.root.path
    (['/app.wasm'], 'rootfs')
    >>> Spec.parse(b'{"ociVersion": "1.3.0", "process": {"cwd": 7}}')
    Traceback (most recent call last):
    ...
    wasidispatch.errors.SpecError: <document>: process.cwd: Input should be a valid string
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from wasidispatch._resolve import DEFAULT_PATH
from wasidispatch.oci._base import (
    CString,
    Int32,
    Int64,
    OCIModel,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
)

__all__ = [
    "DEFAULT_PATH",
    "Device",
    "Features",
    "Hook",
    "Hooks",
    "IDMapping",
    "Linux",
    "LinuxResources",
    "Mount",
    "Namespace",
    "Process",
    "Rlimit",
    "Root",
    "Seccomp",
    "Spec",
    "State",
    "User",
]

FileMode = Annotated[int, Field(ge=0, le=511)]
Percent = Annotated[int, Field(ge=0, le=100)]

SeccompAction = Literal[
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
]
SeccompArch = Literal[
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X86_64",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_LOONGARCH64",
    "SCMP_ARCH_M68K",
    "SCMP_ARCH_MIPS",
    "SCMP_ARCH_MIPS64",
    "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32",
    "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X",
    "SCMP_ARCH_SH",
    "SCMP_ARCH_SHEB",
    "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64",
    "SCMP_ARCH_RISCV64",
]
SeccompFlag = Literal[
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
]
SeccompOperator = Literal[
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
]
NamespaceType = Literal["mount", "pid", "network", "uts", "ipc", "user", "cgroup", "time"]
SchedulerPolicy = Literal[
    "SCHED_OTHER",
    "SCHED_FIFO",
    "SCHED_RR",
    "SCHED_BATCH",
    "SCHED_ISO",
    "SCHED_IDLE",
    "SCHED_DEADLINE",
]
SchedulerFlag = Literal[
    "SCHED_FLAG_RESET_ON_FORK",
    "SCHED_FLAG_RECLAIM",
    "SCHED_FLAG_DL_OVERRUN",
    "SCHED_FLAG_KEEP_POLICY",
    "SCHED_FLAG_KEEP_PARAMS",
    "SCHED_FLAG_UTIL_CLAMP_MIN",
    "SCHED_FLAG_UTIL_CLAMP_MAX",
]
MemoryPolicyMode = Literal[
    "MPOL_DEFAULT",
    "MPOL_BIND",
    "MPOL_INTERLEAVE",
    "MPOL_WEIGHTED_INTERLEAVE",
    "MPOL_PREFERRED",
    "MPOL_PREFERRED_MANY",
    "MPOL_LOCAL",
]
MemoryPolicyFlag = Literal["MPOL_F_NUMA_BALANCING", "MPOL_F_RELATIVE_NODES", "MPOL_F_STATIC_NODES"]
CpuList = Annotated[str, StringConstraints(pattern=r"^[0-9, -]*$")]


# --- common ------------------------------------------------------------------------------


class IDMapping(OCIModel):
    """A user or group ID mapping (``containerID`` -> ``hostID`` for ``size`` IDs)."""

    container_id: Uint32 = Field(validation_alias="containerID", serialization_alias="containerID")
    host_id: Uint32 = Field(validation_alias="hostID", serialization_alias="hostID")
    size: Uint32


class Mount(OCIModel):
    """One entry of ``mounts``."""

    destination: CString
    source: CString | None = None
    options: list[CString] | None = None
    type: CString | None = None
    uid_mappings: list[IDMapping] | None = None
    gid_mappings: list[IDMapping] | None = None


class Hook(OCIModel):
    """A lifecycle hook: a host binary run with ``args``/``env`` and an optional timeout."""

    path: CString
    args: list[CString] | None = None
    env: list[CString] | None = None
    timeout: Annotated[int, Field(ge=1)] | None = None


class Hooks(OCIModel):
    """The ``hooks`` object, one list per lifecycle point."""

    prestart: list[Hook] | None = None
    create_runtime: list[Hook] | None = None
    create_container: list[Hook] | None = None
    start_container: list[Hook] | None = None
    poststart: list[Hook] | None = None
    poststop: list[Hook] | None = None


class Root(OCIModel):
    """The container's root filesystem: ``path`` (relative to the bundle or absolute)."""

    path: CString
    readonly: bool | None = None


# --- process -----------------------------------------------------------------------------


class ConsoleSize(OCIModel):
    """Terminal size for ``process.terminal``."""

    height: Uint64
    width: Uint64


class User(OCIModel):
    """The process's user: numeric IDs on POSIX platforms, ``username`` on Windows."""

    uid: Uint32 | None = None
    gid: Uint32 | None = None
    umask: Uint32 | None = None
    additional_gids: list[Uint32] | None = None
    username: str | None = None


class Capabilities(OCIModel):
    """Linux capability sets of the process (names like ``CAP_KILL``)."""

    bounding: list[str] | None = None
    permitted: list[str] | None = None
    effective: list[str] | None = None
    inheritable: list[str] | None = None
    ambient: list[str] | None = None


class IOPriority(OCIModel):
    """``process.ioPriority``."""

    class_: Literal["IOPRIO_CLASS_RT", "IOPRIO_CLASS_BE", "IOPRIO_CLASS_IDLE"] = Field(
        validation_alias="class", serialization_alias="class"
    )
    priority: Int32 | None = None


class Scheduler(OCIModel):
    """``process.scheduler`` (sched_setattr(2))."""

    policy: SchedulerPolicy
    nice: Int32 | None = None
    priority: Int32 | None = None
    flags: list[SchedulerFlag] | None = None
    runtime: Uint64 | None = None
    deadline: Uint64 | None = None
    period: Uint64 | None = None


class Rlimit(OCIModel):
    """One POSIX resource limit (``RLIMIT_NOFILE`` etc.)."""

    type: Annotated[str, StringConstraints(pattern=r"^RLIMIT_[A-Z]+$")]
    soft: Uint64
    hard: Uint64


class ExecCPUAffinity(OCIModel):
    """``process.execCPUAffinity``: CPU lists for the exec'd process."""

    initial: CpuList | None = None
    final: CpuList | None = None


class Process(OCIModel):
    """The container process: ``args``, ``env`` (exactly the spec's), ``cwd`` and the rest."""

    cwd: CString
    args: list[CString] | None = None
    command_line: str | None = None
    console_size: ConsoleSize | None = None
    env: list[CString] | None = None
    terminal: bool | None = None
    user: User | None = None
    capabilities: Capabilities | None = None
    apparmor_profile: str | None = None
    oom_score_adj: int | None = None
    selinux_label: str | None = None
    io_priority: IOPriority | None = None
    no_new_privileges: bool | None = None
    scheduler: Scheduler | None = None
    rlimits: list[Rlimit] | None = None
    exec_cpu_affinity: ExecCPUAffinity | None = Field(
        default=None, validation_alias="execCPUAffinity", serialization_alias="execCPUAffinity"
    )

    def env_dict(self) -> dict[str, str]:
        """``env`` as a dict (later entries win; an entry without ``=`` maps to ``""``).

        >>> Process(cwd="/", env=["A=1", "B=x=y", "A=2"]).env_dict()
        {'A': '2', 'B': 'x=y'}
        """
        out: dict[str, str] = {}
        for entry in self.env or ():
            key, _, value = entry.partition("=")
            out[key] = value
        return out


# --- linux -------------------------------------------------------------------------------


class Device(OCIModel):
    """A device node created in the container (``linux.devices``)."""

    type: Annotated[str, StringConstraints(pattern=r"^[cbup]$")]
    path: CString
    file_mode: FileMode | None = None
    major: Int64 | None = None
    minor: Int64 | None = None
    uid: Uint32 | None = None
    gid: Uint32 | None = None


class NetDevice(OCIModel):
    """A network device moved into the container (``linux.netDevices`` value)."""

    name: str | None = None


class Namespace(OCIModel):
    """A namespace to create (no ``path``) or join (``path``)."""

    type: NamespaceType
    path: CString | None = None


class DeviceCgroup(OCIModel):
    """A device cgroup rule (``linux.resources.devices``)."""

    allow: bool
    type: str | None = None
    major: Int64 | None = None
    minor: Int64 | None = None
    access: str | None = None


class Pids(OCIModel):
    """``linux.resources.pids``."""

    limit: Int64


class BlockIODeviceWeight(OCIModel):
    """Per-device block I/O weight."""

    major: Int64
    minor: Int64
    weight: Uint16 | None = None
    leaf_weight: Uint16 | None = None


class BlockIODeviceThrottle(OCIModel):
    """Per-device block I/O rate limit."""

    major: Int64
    minor: Int64
    rate: Uint64 | None = None


class BlockIO(OCIModel):
    """``linux.resources.blockIO``."""

    weight: Uint16 | None = None
    leaf_weight: Uint16 | None = None
    throttle_read_bps_device: list[BlockIODeviceThrottle] | None = None
    throttle_write_bps_device: list[BlockIODeviceThrottle] | None = None
    throttle_read_iops_device: list[BlockIODeviceThrottle] | None = Field(
        default=None,
        validation_alias="throttleReadIOPSDevice",
        serialization_alias="throttleReadIOPSDevice",
    )
    throttle_write_iops_device: list[BlockIODeviceThrottle] | None = Field(
        default=None,
        validation_alias="throttleWriteIOPSDevice",
        serialization_alias="throttleWriteIOPSDevice",
    )
    weight_device: list[BlockIODeviceWeight] | None = None


class CPU(OCIModel):
    """``linux.resources.cpu``."""

    cpus: str | None = None
    mems: str | None = None
    period: Uint64 | None = None
    quota: Int64 | None = None
    burst: Uint64 | None = None
    realtime_period: Uint64 | None = None
    realtime_runtime: Int64 | None = None
    shares: Uint64 | None = None
    idle: Int64 | None = None


class HugepageLimit(OCIModel):
    """One ``linux.resources.hugepageLimits`` entry (``pageSize`` like ``2MB``)."""

    page_size: Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*[KMG]B$")]
    limit: Uint64


class Memory(OCIModel):
    """``linux.resources.memory`` (bytes; -1 means unlimited where the kernel allows)."""

    kernel: Int64 | None = None
    kernel_tcp: Int64 | None = Field(
        default=None, validation_alias="kernelTCP", serialization_alias="kernelTCP"
    )
    limit: Int64 | None = None
    reservation: Int64 | None = None
    swap: Int64 | None = None
    swappiness: Uint64 | None = None
    disable_oom_killer: bool | None = Field(
        default=None, validation_alias="disableOOMKiller", serialization_alias="disableOOMKiller"
    )
    use_hierarchy: bool | None = None
    check_before_update: bool | None = None


class NetworkInterfacePriority(OCIModel):
    """``linux.resources.network.priorities`` entry."""

    name: str
    priority: Uint32


class Network(OCIModel):
    """``linux.resources.network``."""

    class_id: Uint32 | None = Field(
        default=None, validation_alias="classID", serialization_alias="classID"
    )
    priorities: list[NetworkInterfacePriority] | None = None


class Rdma(OCIModel):
    """``linux.resources.rdma`` value."""

    hca_handles: Uint32 | None = None
    hca_objects: Uint32 | None = None


class LinuxResources(OCIModel):
    """``linux.resources``: cgroup limits."""

    unified: dict[str, str] | None = None
    devices: list[DeviceCgroup] | None = None
    pids: Pids | None = None
    block_io: BlockIO | None = Field(
        default=None, validation_alias="blockIO", serialization_alias="blockIO"
    )
    cpu: CPU | None = None
    hugepage_limits: list[HugepageLimit] | None = None
    memory: Memory | None = None
    network: Network | None = None
    rdma: dict[str, Rdma] | None = None


class SyscallArg(OCIModel):
    """A seccomp syscall argument condition."""

    index: Uint32
    value: Uint64
    value_two: Uint64 | None = None
    op: SeccompOperator


class Syscall(OCIModel):
    """A seccomp rule: an action for a set of syscall names."""

    names: Annotated[list[str], Field(min_length=1)]
    action: SeccompAction
    errno_ret: Uint32 | None = None
    args: list[SyscallArg] | None = None


class Seccomp(OCIModel):
    """``linux.seccomp``."""

    default_action: SeccompAction
    default_errno_ret: Uint32 | None = None
    flags: list[SeccompFlag] | None = None
    listener_path: str | None = None
    listener_metadata: str | None = None
    architectures: list[SeccompArch] | None = None
    syscalls: list[Syscall] | None = None


class IntelRdt(OCIModel):
    """``linux.intelRdt``."""

    clos_id: str | None = Field(
        default=None, validation_alias="closID", serialization_alias="closID"
    )
    schemata: list[str] | None = None
    l3_cache_schema: str | None = None
    mem_bw_schema: Annotated[str, StringConstraints(pattern=r"^MB:[^\n]*$")] | None = None
    enable_monitoring: bool | None = None


class MemoryPolicy(OCIModel):
    """``linux.memoryPolicy`` (set_mempolicy(2))."""

    mode: MemoryPolicyMode | None = None
    nodes: str | None = None
    flags: list[MemoryPolicyFlag] | None = None


class Personality(OCIModel):
    """``linux.personality``."""

    domain: Literal["LINUX", "LINUX32"] | None = None
    flags: list[str] | None = None


class TimeOffset(OCIModel):
    """An offset of the time namespace's clock."""

    secs: Int64 | None = None
    nanosecs: Uint32 | None = None


class TimeOffsets(OCIModel):
    """``linux.timeOffsets``."""

    boottime: TimeOffset | None = None
    monotonic: TimeOffset | None = None


class Linux(OCIModel):
    """The ``linux`` section: namespaces, ID mappings, cgroups, devices, seccomp, ..."""

    devices: list[Device] | None = None
    net_devices: dict[str, NetDevice] | None = None
    uid_mappings: list[IDMapping] | None = None
    gid_mappings: list[IDMapping] | None = None
    namespaces: list[Namespace] | None = None
    resources: LinuxResources | None = None
    cgroups_path: CString | None = None
    rootfs_propagation: Literal["private", "shared", "slave", "unbindable"] | None = None
    seccomp: Seccomp | None = None
    sysctl: dict[str, str] | None = None
    masked_paths: list[CString] | None = None
    readonly_paths: list[CString] | None = None
    mount_label: str | None = None
    intel_rdt: IntelRdt | None = None
    memory_policy: MemoryPolicy | None = None
    personality: Personality | None = None
    time_offsets: TimeOffsets | None = None


# --- other platforms ---------------------------------------------------------------------

FreeBSDSharingMode = Literal["disable", "new", "inherit"]
FreeBSDSharingModeNoDisable = Literal["new", "inherit"]


class FreeBSDDevice(OCIModel):
    """A ``freebsd.devices`` entry."""

    path: str | None = None
    mode: FileMode | None = None


class FreeBSDJailAllow(OCIModel):
    """``freebsd.jail.allow``."""

    set_hostname: bool | None = None
    raw_sockets: bool | None = None
    chflags: bool | None = None
    mount: list[str] | None = None
    quotas: bool | None = None
    socket_af: bool | None = None
    mlock: bool | None = None
    reserved_ports: bool | None = None
    suser: bool | None = None


class FreeBSDJail(OCIModel):
    """``freebsd.jail``."""

    parent: str | None = None
    host: FreeBSDSharingModeNoDisable | None = None
    ip4: FreeBSDSharingMode | None = None
    ip4_addr: list[str] | None = None
    ip6: FreeBSDSharingMode | None = None
    ip6_addr: list[str] | None = None
    vnet: FreeBSDSharingModeNoDisable | None = None
    interface: str | None = None
    vnet_interfaces: list[str] | None = None
    sysvmsg: FreeBSDSharingMode | None = None
    sysvsem: FreeBSDSharingMode | None = None
    sysvshm: FreeBSDSharingMode | None = None
    enforce_statfs: Uint8 | None = None
    allow: FreeBSDJailAllow | None = None


class FreeBSD(OCIModel):
    """The ``freebsd`` section."""

    devices: list[FreeBSDDevice] | None = None
    jail: FreeBSDJail | None = None


class ZOSNamespace(OCIModel):
    """A z/OS namespace."""

    type: Literal["mount", "pid", "uts", "ipc"]
    path: str | None = None


class ZOS(OCIModel):
    """The ``zos`` section."""

    namespaces: list[ZOSNamespace] | None = None


class SolarisCappedCPU(OCIModel):
    """``solaris.cappedCPU``."""

    ncpus: str | None = None


class SolarisCappedMemory(OCIModel):
    """``solaris.cappedMemory``."""

    physical: str | None = None
    swap: str | None = None


class SolarisAnet(OCIModel):
    """A ``solaris.anet`` entry."""

    linkname: str | None = None
    lower_link: str | None = None
    allowed_address: str | None = None
    configure_allowed_address: str | None = None
    defrouter: str | None = None
    mac_address: str | None = None
    link_protection: str | None = None


class Solaris(OCIModel):
    """The ``solaris`` section."""

    milestone: str | None = None
    limitpriv: str | None = None
    max_shm_memory: str | None = None
    capped_cpu: SolarisCappedCPU | None = Field(
        default=None, validation_alias="cappedCPU", serialization_alias="cappedCPU"
    )
    capped_memory: SolarisCappedMemory | None = None
    anet: list[SolarisAnet] | None = None


class WindowsDevice(OCIModel):
    """A ``windows.devices`` entry."""

    id: str
    id_type: Literal["class"]


class WindowsMemory(OCIModel):
    """``windows.resources.memory``."""

    limit: Uint64 | None = None


class WindowsCPUAffinity(OCIModel):
    """``windows.resources.cpu.affinity``."""

    mask: Uint64 | None = None
    group: Uint32 | None = None


class WindowsCPU(OCIModel):
    """``windows.resources.cpu``."""

    count: Uint64 | None = None
    shares: Uint16 | None = None
    maximum: Uint16 | None = None
    affinity: WindowsCPUAffinity | None = None


class WindowsStorage(OCIModel):
    """``windows.resources.storage``."""

    iops: Uint64 | None = None
    bps: Uint64 | None = None
    sandbox_size: Uint64 | None = None


class WindowsResources(OCIModel):
    """``windows.resources``."""

    memory: WindowsMemory | None = None
    cpu: WindowsCPU | None = None
    storage: WindowsStorage | None = None


class WindowsNetwork(OCIModel):
    """``windows.network``."""

    endpoint_list: list[str] | None = None
    allow_unqualified_dns_query: bool | None = Field(
        default=None,
        validation_alias="allowUnqualifiedDNSQuery",
        serialization_alias="allowUnqualifiedDNSQuery",
    )
    dns_search_list: list[str] | None = Field(
        default=None, validation_alias="DNSSearchList", serialization_alias="DNSSearchList"
    )
    network_shared_container_name: str | None = None
    network_namespace: str | None = None


class WindowsHyperV(OCIModel):
    """``windows.hyperv``."""

    utility_vm_path: str | None = Field(
        default=None, validation_alias="utilityVMPath", serialization_alias="utilityVMPath"
    )


class Windows(OCIModel):
    """The ``windows`` section."""

    layer_folders: list[str]
    devices: list[WindowsDevice] | None = None
    resources: WindowsResources | None = None
    network: WindowsNetwork | None = None
    credential_spec: dict[str, Any] | None = None
    servicing: bool | None = None
    ignore_flushes_during_boot: bool | None = None
    hyperv: WindowsHyperV | None = None


class VMHypervisor(OCIModel):
    """``vm.hypervisor``."""

    path: str
    parameters: list[str] | None = None


class VMKernel(OCIModel):
    """``vm.kernel``."""

    path: str
    parameters: list[str] | None = None
    initrd: str | None = None


class VMImage(OCIModel):
    """``vm.image``."""

    path: str
    format: Literal["raw", "qcow2", "vdi", "vmdk", "vhd"]


class VMIOMem(OCIModel):
    """``vm.hwConfig.iomems`` entry."""

    first_gfn: Uint64 | None = Field(
        default=None, validation_alias="firstGFN", serialization_alias="firstGFN"
    )
    first_mfn: Uint64 = Field(validation_alias="firstMFN", serialization_alias="firstMFN")
    nr_mfns: Uint64 = Field(validation_alias="nrMFNs", serialization_alias="nrMFNs")


class VMHWConfig(OCIModel):
    """``vm.hwConfig``."""

    device_tree: str | None = None
    vcpus: Uint32 | None = None
    memory: Uint64 | None = None
    dtdevs: list[str] | None = None
    iomems: list[VMIOMem] | None = None
    irqs: list[Uint32] | None = None


class VM(OCIModel):
    """The ``vm`` section (hardware-virtualized containers)."""

    hypervisor: VMHypervisor | None = None
    kernel: VMKernel
    image: VMImage | None = None
    hw_config: VMHWConfig | None = None


# --- documents ---------------------------------------------------------------------------


class Spec(OCIModel):
    """A runtime bundle's ``config.json``.

    Load with ``Spec.load(path)`` / ``Spec.parse(bytes)``; problems raise ``SpecError``.
    """

    oci_version: str
    hooks: Hooks | None = None
    annotations: dict[str, str] | None = None
    hostname: str | None = None
    domainname: str | None = None
    mounts: list[Mount] | None = None
    root: Root | None = None
    process: Process | None = None
    linux: Linux | None = None
    solaris: Solaris | None = None
    windows: Windows | None = None
    vm: VM | None = None
    zos: ZOS | None = None
    freebsd: FreeBSD | None = None


class State(OCIModel):
    """The runtime's ``state`` output for one container."""

    oci_version: str
    id: str
    status: Literal["creating", "created", "running", "stopped"]
    pid: Annotated[int, Field(ge=0)] | None = None
    bundle: str
    annotations: dict[str, str] | None = None


class FeaturesCgroup(OCIModel):
    """``features.linux.cgroup``."""

    v1: bool | None = None
    v2: bool | None = None
    systemd: bool | None = None
    systemd_user: bool | None = None
    rdma: bool | None = None


class FeaturesSeccomp(OCIModel):
    """``features.linux.seccomp``."""

    enabled: bool | None = None
    actions: list[SeccompAction] | None = None
    operators: list[SeccompOperator] | None = None
    archs: list[SeccompArch] | None = None
    known_flags: list[SeccompFlag] | None = None
    supported_flags: list[SeccompFlag] | None = None


class FeatureEnabled(OCIModel):
    """A ``{"enabled": bool}`` feature object."""

    enabled: bool | None = None


class FeaturesMountExtensions(OCIModel):
    """``features.linux.mountExtensions``."""

    idmap: FeatureEnabled | None = None


class FeaturesLinux(OCIModel):
    """``features.linux``."""

    namespaces: list[NamespaceType] | None = None
    capabilities: list[Annotated[str, StringConstraints(pattern=r"^CAP_[A-Z_]+$")]] | None = None
    cgroup: FeaturesCgroup | None = None
    seccomp: FeaturesSeccomp | None = None
    apparmor: FeatureEnabled | None = None
    selinux: FeatureEnabled | None = None
    intel_rdt: FeatureEnabled | None = None
    mount_extensions: FeaturesMountExtensions | None = None
    net_devices: FeatureEnabled | None = None


class Features(OCIModel):
    """The runtime's ``features`` output (what a runtime supports)."""

    oci_version_min: str
    oci_version_max: str
    hooks: list[str] | None = None
    mount_options: list[str] | None = None
    annotations: dict[str, str] | None = None
    potentially_unsafe_config_annotations: list[str] | None = None
    linux: FeaturesLinux | None = None
