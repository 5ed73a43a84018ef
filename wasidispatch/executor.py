"""Executors: run one container's bundle, Wasm in-process or Linux through a real OCI runtime.

Modelled on youki's libcontainer ``Executor`` as runwasi uses it: an executor either refuses a
bundle (``validate`` raises `CantHandle` with the reason) or runs it (``exec`` returns the exit
code). `DispatchExecutor` asks its executors in order, like runwasi's executor that picks Wasm
or Linux per container, and can explain its choice.

The decision rule (`decide`, documented in ``docs/dispatch.md``):

1. OCI Wasm layers passed by the caller (an image or artifact pulled with
   :mod:`wasidispatch.oci.layout`) -> Wasm.
2. ``run.oci.handler`` (crun's handler annotation): ``wasm`` or a Wasm engine name -> Wasm;
   any other value is refused, as crun refuses a handler it does not know.
3. ``module.wasm.image/variant``: ``compat`` -> Wasm; ``compat-smart`` -> Wasm only when the
   entrypoint's bytes are Wasm (crun looks at a ``.wasm`` suffix; we read the magic bytes).
4. Otherwise resolve ``process.args[0]`` inside the rootfs with the spec's own ``PATH`` and
   sniff it: Wasm -> Wasm; ELF or ``#!`` -> Linux; anything else -> `CantHandle`.
"""

from __future__ import annotations

import contextlib  # free: typing imports it
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from wasidispatch.detect import Detected, sniff_path
from wasidispatch.engines._api import (
    Cancel,
    Engine,
    Limits,
    Preopen,
    RunResult,
    Stdio,
    Workload,
)
from wasidispatch.errors import CantHandle, DetectionError, SpecError

if TYPE_CHECKING:
    import subprocess

    from wasidispatch.cache import PrecompileCache
    from wasidispatch.oci.layout import WasmLayer

__all__ = [
    "ANNOTATION_ENGINE",
    "ANNOTATION_HANDLER",
    "ANNOTATION_TIMEOUT",
    "ANNOTATION_VARIANT",
    "BundleLike",
    "Decision",
    "DispatchExecutor",
    "DispatchRun",
    "Evidence",
    "Executor",
    "LinuxExecutor",
    "WasmExecutor",
    "decide",
]

#: crun's handler annotation: ``wasm`` (or an engine name) selects the Wasm handler.
ANNOTATION_HANDLER = "run.oci.handler"
#: The Wasm image "compat" variant annotation, as crun and WasmEdge read it.
ANNOTATION_VARIANT = "module.wasm.image/variant"
#: Ours: wall-clock limit for a Wasm container, in seconds (``"2.5"``) or with a unit
#: (``"500ms"``, ``"30s"``, ``"2m"``).
ANNOTATION_TIMEOUT = "dev.wasidispatch.timeout"
#: Ours: the Wasm engine to use for this container (a registry name such as ``wasmer``).
ANNOTATION_ENGINE = "dev.wasidispatch.engine"

#: Engines tried by `WasmExecutor` when none is named: the cffi fast path first, then the
#: wasmtime-py engine (it does components), then Wasmer.
DEFAULT_ENGINES: tuple[str, ...] = ("wasmtime-fast", "wasmtime", "wasmer")

#: Options the executor gives engines it loads by name (see `WasmExecutor`).
_ENGINE_OPTIONS: dict[str, dict[str, object]] = {"wasmer": {"discard_writes": True}}
#: What those options change, for the decision's evidence.
_ENGINE_CAVEATS: dict[str, str] = {
    "wasmer": "wasmer: the rootfs and read-only mounts are copy-on-write mirrors (guest writes "
    "to them succeed and are discarded; the host is never changed)",
}

_WASM_HANDLERS = frozenset({"wasm", "wasi", "wasmtime", "wasmer", "wasmedge", "wamr"})
_WASM_FORMATS = frozenset({"wasm-module", "wasm-component"})

Kind = Literal["wasm", "linux"]


# ---------------------------------------------------------------------------------- bundles


class ProcessLike(Protocol):
    """The part of ``process`` the executors read."""

    @property
    def args(self) -> Sequence[str] | None: ...
    @property
    def cwd(self) -> str: ...
    def env_dict(self) -> dict[str, str]: ...


class RootLike(Protocol):
    """The part of ``root`` the executors read."""

    @property
    def readonly(self) -> bool | None: ...


class MountLike(Protocol):
    """The part of a mount the executors read."""

    @property
    def destination(self) -> str: ...
    @property
    def source(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def options(self) -> Sequence[str] | None: ...


class MemoryLike(Protocol):
    """``linux.resources.memory``: its ``limit``."""

    @property
    def limit(self) -> int | None: ...


class ResourcesLike(Protocol):
    """``linux.resources``: its ``memory``."""

    @property
    def memory(self) -> MemoryLike | None: ...


class LinuxLike(Protocol):
    """``linux``: its ``resources``."""

    @property
    def resources(self) -> ResourcesLike | None: ...


class SpecLike(Protocol):
    """The part of config.json the executors read."""

    @property
    def process(self) -> ProcessLike | None: ...
    @property
    def root(self) -> RootLike | None: ...
    @property
    def mounts(self) -> Sequence[MountLike] | None: ...
    @property
    def linux(self) -> LinuxLike | None: ...


class BundleLike(Protocol):
    """What the executors need of a bundle: `wasidispatch.oci.bundle.Bundle` (pydantic
    models) is one, ``wasidispatch-runc``'s stdlib ``LeanBundle`` another.

    ``path`` is the bundle directory, ``rootfs`` the host path of its root filesystem,
    ``spec`` its config.json (the fields of `SpecLike`), and ``resolve_entrypoint(name)`` the
    host path of ``name`` (``process.args[0]`` by default) inside the rootfs, raising
    `SpecError` when there is none.
    """

    @property
    def path(self) -> Path: ...
    @property
    def rootfs(self) -> Path: ...
    @property
    def annotations(self) -> Mapping[str, str]: ...
    @property
    def spec(self) -> SpecLike: ...
    def resolve_entrypoint(self, name: str | None = None) -> Path: ...


@dataclass(frozen=True, slots=True)
class Evidence:
    """One fact a decision rests on: ``source`` is ``layers``, ``annotation``, ``path`` or
    ``magic``; ``detail`` says what was seen.

    Example::

        >>> str(Evidence("annotation", "run.oci.handler=wasm"))
        'annotation: run.oci.handler=wasm'
    """

    source: Literal["layers", "media-type", "annotation", "path", "magic", "engine"]
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a container goes and why.

    ``kind`` is ``"wasm"`` or ``"linux"``; ``executor`` names the executor that accepted it
    (empty from `decide`, which picks no executor); ``evidence`` lists the facts in the order
    they were used; ``entrypoint`` is the resolved host path of ``process.args[0]`` when it was
    looked at, ``detected`` its sniffed format.
    """

    kind: Kind
    evidence: tuple[Evidence, ...]
    executor: str = ""
    entrypoint: Path | None = None
    detected: Detected | None = None

    @property
    def reason(self) -> str:
        """The evidence in one line, for logs and ``wasidispatch explain``."""
        return "; ".join(str(e) for e in self.evidence)


@runtime_checkable
class Executor(Protocol):
    """Runs a container's bundle, or refuses it (after youki's libcontainer ``Executor``)."""

    @property
    def name(self) -> str:
        """Short name used in decisions, e.g. ``"wasm"`` or ``"linux"``."""
        ...

    def validate(self, bundle: BundleLike, *, layers: Sequence[WasmLayer] = ()) -> Decision:
        """Return the decision when this executor takes ``bundle``; raise `CantHandle` with
        the reason when it does not."""
        ...

    def exec(self, bundle: BundleLike, *, layers: Sequence[WasmLayer] = ()) -> int:
        """Run ``bundle`` to completion and return its exit code."""
        ...


# ---------------------------------------------------------------------------------- decision


def _load(bundle: BundleLike | str | os.PathLike[str]) -> BundleLike:
    """A path is loaded as a `wasidispatch.oci.bundle.Bundle`; a bundle passes through."""
    if isinstance(bundle, str | os.PathLike):
        from wasidispatch.oci.bundle import Bundle

        return Bundle.load(bundle)
    return bundle


def _entry_path(args0: str) -> tuple[str, str | None]:
    """Split runwasi's ``path#func`` entry syntax."""
    path, sep, func = args0.partition("#")
    return (path, func) if sep and func else (args0, None)


def _args0(bundle: BundleLike) -> str:
    process = bundle.spec.process
    if process is None or not process.args:
        raise CantHandle(f"{bundle.path}: config.json has no process.args to run")
    return process.args[0]


MemoKey = tuple[str, tuple[str, ...], int, int, int]


def _memo_key(bundle: BundleLike, layers: Sequence[WasmLayer]) -> MemoKey:
    """Identity of a bundle's decision: its path, the layers, and config.json's inode, mtime
    and size (an edited config.json is decided again)."""
    try:
        st = (bundle.path / "config.json").stat()
        ident = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        ident = (0, 0, 0)
    return (str(bundle.path), tuple(layer.digest for layer in layers), *ident)


def decide(bundle: BundleLike, *, layers: Sequence[WasmLayer] = ()) -> Decision:
    """Apply the decision rule (module docstring) to ``bundle``; no executor is consulted.

    Raises `CantHandle` when the rule reaches no verdict (entrypoint missing, escaping the
    rootfs, or of an unknown format), with a message a user can act on.
    """
    if layers:
        media = ", ".join(sorted({layer.media_type for layer in layers}))
        return Decision("wasm", (Evidence("layers", f"{len(layers)} Wasm layer(s): {media}"),))

    notes = bundle.annotations
    handler = notes.get(ANNOTATION_HANDLER)
    if handler is not None:
        if handler.strip().lower() in _WASM_HANDLERS:
            return Decision("wasm", (Evidence("annotation", f"{ANNOTATION_HANDLER}={handler}"),))
        raise CantHandle(
            f"annotation {ANNOTATION_HANDLER}={handler!r} names a handler wasidispatch does not "
            f"have (known: {', '.join(sorted(_WASM_HANDLERS))}); remove the annotation to "
            "dispatch by the entrypoint's bytes"
        )

    variant = notes.get(ANNOTATION_VARIANT)
    evidence: list[Evidence] = []
    if variant == "compat":
        return Decision("wasm", (Evidence("annotation", f"{ANNOTATION_VARIANT}=compat"),))
    if variant is not None:
        evidence.append(Evidence("annotation", f"{ANNOTATION_VARIANT}={variant}"))

    args0 = _args0(bundle)
    entry, detected = _sniff_entrypoint(bundle, args0)
    evidence.append(Evidence("path", f"{args0!r} -> {entry}"))
    evidence.append(Evidence("magic", str(detected)))
    if detected.format in _WASM_FORMATS:
        return Decision("wasm", tuple(evidence), entrypoint=entry, detected=detected)
    # compat-smart over Linux bytes: crun falls back to a Linux container, and so do we.
    if detected.is_linux:
        return Decision("linux", tuple(evidence), entrypoint=entry, detected=detected)
    raise CantHandle(
        f"entrypoint {args0!r} ({entry}) is neither Wasm nor a Linux executable: {detected}"
    )


def _sniff_entrypoint(bundle: BundleLike, args0: str) -> tuple[Path, Detected]:
    try:
        entry = bundle.resolve_entrypoint(_entry_path(args0)[0])
        return entry, sniff_path(entry)
    except (DetectionError, SpecError) as exc:
        raise CantHandle(f"cannot use the entrypoint of {bundle.path}: {exc}") from exc


# ---------------------------------------------------------------------------------- Wasm


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a bare number is seconds; ``ms``, ``s``, ``m`` suffixes allowed.

    Example::

        >>> parse_duration("500ms"), parse_duration("2m"), parse_duration("1.5")
        (0.5, 120.0, 1.5)

    Anything else raises `SpecError` naming the annotation: not a string, empty, NUL or lone
    surrogates, ``inf``, ``nan``, zero, negative, or a value that overflows to infinity
    (``1e308m``); a huge finite value (``1e308``) is returned as is (engines treat a timeout
    beyond their clock's range as none).
    """
    if not isinstance(text, str):
        raise SpecError(
            f"annotation {ANNOTATION_TIMEOUT} must be a string, not {type(text).__name__}"
        )
    shown = repr(text) if len(text) <= 64 else f"{text[:64]!r}... ({len(text)} characters)"
    value = text.strip().lower()
    scale = 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if value.endswith(suffix):
            value, scale = value[: -len(suffix)], factor
            break
    try:
        seconds = float(value) * scale
    except (ValueError, OverflowError):
        raise SpecError(f"annotation {ANNOTATION_TIMEOUT}={shown} is not a duration") from None
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise SpecError(f"annotation {ANNOTATION_TIMEOUT}={shown} must be a positive duration")
    return seconds


def _is_bind(mount_type: str | None, options: Sequence[str]) -> bool:
    return mount_type == "bind" or "bind" in options or "rbind" in options


@dataclass
class Prepared:
    """A Wasm container ready to start: its workload (precompiled when a cache was used), the
    engine that will run it and the decision that sent it there."""

    workload: Workload
    engine: Engine
    decision: Decision
    notes: tuple[str, ...] = ()


class WasmExecutor:
    """Runs Wasm containers in-process on a Wasm engine.

    The bundle's spec becomes a `Workload`: argv is ``process.args`` as given (``path#func``
    picks an export to call, as runwasi does), env exactly ``process.env``, cwd
    ``process.cwd``, the rootfs preopened as ``/`` (read-only when ``root.readonly``), bind
    mounts preopened at their destination (read-only with ``ro``); nothing else of the host is
    visible. ``linux.resources.memory.limit`` caps memory, the ``dev.wasidispatch.timeout``
    annotation sets a wall-clock limit. With ``cache``, modules are precompiled once and
    loaded from the cache.

    ``engine`` is a registry name, an `Engine`, or a sequence of them in order of preference;
    the first one that can honour the workload runs it (the others' refusals are kept as notes
    in the decision). The default prefers the cffi fast path and falls back to wasmtime-py
    (components) and Wasmer. ``engine_options`` gives the constructor arguments of engines
    the executor makes by name (``{"wasmtime": {"parallel_compilation": False}}``).

    Example::

        >>> WasmExecutor(engine="wasmtime").name
        'wasm'
    """

    name = "wasm"

    def __init__(
        self,
        engine: str | Engine | Sequence[str | Engine] | None = None,
        *,
        cache: PrecompileCache | None = None,
        stdin: Stdio | None = None,
        stdout: Stdio | None = None,
        stderr: Stdio | None = None,
        engine_options: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        # per registry name: keyword arguments for the engine's constructor, over the defaults
        self._options = {
            name: {**_ENGINE_OPTIONS.get(name, {}), **(engine_options or {}).get(name, {})}
            for name in {*_ENGINE_OPTIONS, *(engine_options or {})}
        }
        if engine is None:
            choices: Sequence[str | Engine] = DEFAULT_ENGINES
            self._explicit = False
        elif isinstance(engine, str | Engine):
            choices = (engine,)
            self._explicit = True
        else:
            choices = tuple(engine)
            self._explicit = True
        self._choices = tuple(choices)
        self._loaded: dict[str, Engine | Exception] = {}
        self._plans: dict[MemoKey, Prepared] = {}
        self.cache = cache
        self._stdio = (
            stdin or Stdio.inherit(),
            stdout or Stdio.inherit(),
            stderr or Stdio.inherit(),
        )

    # -- engines

    def _engine(self, choice: str | Engine) -> Engine:
        if not isinstance(choice, str):
            return choice
        got = self._loaded.get(choice)
        if got is None:
            from wasidispatch import engines

            try:
                # Wasmer cannot make a read-only preopen refuse writes; for a container the
                # promise that matters is that the host rootfs is never changed, which its
                # copy-on-write mirror keeps (docs/dispatch.md, "Engines that mirror").
                got = engines.get(choice, **self._options.get(choice, {}))
            except Exception as exc:  # EngineUnavailable and friends: remembered, reported
                got = exc
            self._loaded[choice] = got
        if isinstance(got, Exception):
            raise got
        return got

    def _candidates(self, bundle: BundleLike) -> tuple[str | Engine, ...]:
        named = bundle.annotations.get(ANNOTATION_ENGINE)
        if named:
            return (named,)
        return self._choices

    def select_engine(
        self, workload: Workload, bundle: BundleLike
    ) -> tuple[Engine, Workload, tuple[str, ...]]:
        """The first engine that honours ``workload`` (with the caveats in the notes), and
        why the earlier ones were passed over."""
        notes: list[str] = []
        for choice in self._candidates(bundle):
            label = choice if isinstance(choice, str) else choice.name
            try:
                engine = self._engine(choice)
            except Exception as exc:
                notes.append(f"passed over {label}: unavailable ({exc})")
                continue
            verdict = engine.can_handle(workload)
            caveat = _ENGINE_CAVEATS.get(choice) if isinstance(choice, str) else None
            if verdict:
                return engine, workload, (*notes, *([caveat] if caveat else []))
            notes.append(f"passed over {label}: {verdict.reason}")
        raise CantHandle("no Wasm engine can run this container: " + "; ".join(notes))

    # -- mapping

    def workload(
        self,
        bundle: BundleLike | str | os.PathLike[str],
        *,
        layers: Sequence[WasmLayer] = (),
        entrypoint: Path | None = None,
    ) -> Workload:
        """The `Workload` for ``bundle`` (see the class docstring for the mapping)."""
        bundle = _load(bundle)
        spec = bundle.spec
        process = spec.process
        if process is None or not process.args:
            raise CantHandle(f"{bundle.path}: config.json has no process.args to run")
        args = tuple(process.args)
        path, func = _entry_path(args[0])
        wasm: bytes | Path = (
            layers[0].read_bytes() if layers else entrypoint or bundle.resolve_entrypoint(path)
        )

        preopens = [Preopen(bundle.rootfs, "/", readonly=bool(spec.root and spec.root.readonly))]
        for mount in spec.mounts or ():
            options = tuple(mount.options or ())
            if not mount.source or not _is_bind(mount.type, options):
                continue  # proc, tmpfs, devpts...: kernel filesystems have no WASI meaning
            source = Path(mount.source)
            if not source.is_absolute():
                source = bundle.path / source
            if not source.is_dir():
                continue  # file binds (resolv.conf, hosts): WASI preopens are directories
            preopens.append(Preopen(source, mount.destination, readonly="ro" in options))

        limits = Limits()
        memory = _memory_limit(spec)
        if memory is not None and memory > 0:
            limits = replace(limits, memory_bytes=memory)
        timeout = bundle.annotations.get(ANNOTATION_TIMEOUT)
        if timeout is not None:
            limits = replace(limits, timeout=parse_duration(timeout))

        stdin, stdout, stderr = self._stdio
        return Workload(
            wasm=wasm,
            argv=args,
            env=process.env_dict(),
            preopens=tuple(preopens),
            cwd=process.cwd or "/",
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            entry=func,
            limits=limits,
        )

    # -- executor protocol

    def plan(self, bundle: BundleLike, *, layers: Sequence[WasmLayer] = ()) -> Prepared:
        """Decide, map and pick the engine (memoized per bundle); nothing is compiled."""
        key = _memo_key(bundle, layers)
        planned = self._plans.get(key)
        if planned is not None:
            return planned
        decision = decide(bundle, layers=layers)
        if decision.kind != "wasm":
            raise CantHandle(f"not a Wasm container ({decision.reason})")
        workload = self.workload(bundle, layers=layers, entrypoint=decision.entrypoint)
        engine, workload, notes = self.select_engine(workload, bundle)
        evidence = (
            *decision.evidence,
            *(Evidence("engine", note) for note in notes),
            Evidence("engine", f"runs on {engine.name}"),
        )
        decision = replace(decision, executor=self.name, evidence=evidence)
        planned = Prepared(workload, engine, decision, notes)
        self._plans[key] = planned
        return planned

    def validate(self, bundle: BundleLike, *, layers: Sequence[WasmLayer] = ()) -> Decision:
        """Accept ``bundle`` when the decision rule says Wasm and an engine can run it."""
        return self.plan(_load(bundle), layers=layers).decision

    def prepare(
        self, bundle: BundleLike | str | os.PathLike[str], *, layers: Sequence[WasmLayer] = ()
    ) -> Prepared:
        """`plan`, then precompile through the cache (when there is one): ready to `run`."""
        planned = self.plan(_load(bundle), layers=layers)
        engine, workload = planned.engine, planned.workload
        if self.cache is not None:
            digest = str(layers[0].digest) if layers else None
            workload = self.cache.with_precompiled(engine, workload, digest=digest)
            return replace(planned, workload=workload)
        return planned

    def run(
        self,
        prepared: Prepared,
        *,
        stdin: Stdio | None = None,
        stdout: Stdio | None = None,
        stderr: Stdio | None = None,
        cancel: Cancel | None = None,
    ) -> RunResult:
        """Run a prepared container to completion.

        ``stdin``/``stdout``/``stderr`` replace the executor's streams for this run only (e.g.
        ``Stdio.fd(n)`` for a shim's FIFOs); ``cancel`` stops the guest when fired from any
        thread (exit code 128+N, `ExitReason.CANCELLED`). ``prepared`` is not changed.
        """
        workload = prepared.workload
        if stdin is not None or stdout is not None or stderr is not None:
            workload = workload.with_stdio(stdin=stdin, stdout=stdout, stderr=stderr)
        if cancel is not None:
            workload = workload.with_cancel(cancel)
        return prepared.engine.run(workload)

    def exec(self, bundle: BundleLike, *, layers: Sequence[WasmLayer] = ()) -> int:
        """Run ``bundle`` on the selected engine; the guest's exit code (137 on a trap)."""
        return self.run(self.prepare(bundle, layers=layers)).exit_code


def _memory_limit(spec: SpecLike) -> int | None:
    linux = spec.linux
    resources = linux.resources if linux is not None else None
    memory = resources.memory if resources is not None else None
    return memory.limit if memory is not None else None


# ---------------------------------------------------------------------------------- Linux


class LinuxExecutor:
    """Hands Linux containers to a real OCI runtime (runc by default; crun works too).

    Each ``exec`` runs ``RUNTIME --root STATE run --bundle DIR ID`` with the caller's stdio,
    under a fresh unique id and (unless ``root`` is given) a private state directory, and
    always finishes with ``RUNTIME delete --force ID`` — also when the caller is interrupted
    (Ctrl-C, or SIGTERM / SIGHUP received by this process while it waits for runc, in the main
    thread), in which case the container is killed first; SIGTERM and SIGHUP are then given
    their previous disposition (by default this process dies by them, a handler runs).
    The runtime's exit code is returned (the container's own, or 128+n for a signal).

    Example::

        >>> LinuxExecutor("runc").runtime
        'runc'
    """

    name = "linux"

    def __init__(
        self,
        runtime: str = "runc",
        *,
        root: str | os.PathLike[str] | None = None,
        id_prefix: str = "wasidispatch-",
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.root = Path(root) if root is not None else None
        self.id_prefix = id_prefix
        self._stdio = (stdin, stdout, stderr)
        self._accepted: dict[MemoKey, tuple[Decision, str]] = {}

    def _binary(self) -> str:
        import shutil

        found = shutil.which(self.runtime)
        if found is None:
            raise CantHandle(
                f"OCI runtime {self.runtime!r} not found on PATH (install Debian's runc, or "
                "pass runtime=/path/to/runtime)"
            )
        return found

    def validate(self, bundle: BundleLike, *, layers: Sequence[WasmLayer] = ()) -> Decision:
        """Accept ``bundle`` when the rule says Linux and the entrypoint is executable
        (memoized per bundle, as `WasmExecutor.plan` is)."""
        return self._accept(_load(bundle), layers)[0]

    def _accept(self, bundle: BundleLike, layers: Sequence[WasmLayer]) -> tuple[Decision, str]:
        """The decision and the runtime binary, from the memo when this bundle was accepted."""
        key = _memo_key(bundle, layers)
        accepted = self._accepted.get(key)
        if accepted is not None:
            return accepted
        decision = decide(bundle, layers=layers)
        if decision.kind != "linux":
            raise CantHandle(f"not a Linux container ({decision.reason})")
        entry = decision.entrypoint
        if entry is not None and not os.access(entry, os.X_OK):
            raise CantHandle(
                f"entrypoint {entry} is a Linux executable by its bytes but lacks the execute "
                "permission (chmod +x it in the rootfs)"
            )
        if entry is not None and decision.detected is not None:
            from wasidispatch._binfmt import foreign_elf_refusal

            # Refused here, before runc: runc would create the container and fail only at
            # exec, with "exec format error" and no word of the architecture.
            refusal = foreign_elf_refusal(
                decision.detected,
                entrypoint=_entry_path(_args0(bundle))[0],
                path=entry,
                rootfs=bundle.rootfs,
            )
            if refusal is not None:
                raise CantHandle(refusal)
        accepted = replace(decision, executor=self.name), self._binary()
        self._accepted[key] = accepted
        return accepted

    def exec(
        self,
        bundle: BundleLike,
        *,
        layers: Sequence[WasmLayer] = (),
        container_id: str | None = None,
    ) -> int:
        """Run ``bundle`` with the OCI runtime and return the container's exit code."""
        # Imported here: the Wasm path (``wasidispatch-runc create``) never needs them.
        import shutil
        import subprocess
        import tempfile

        bundle = _load(bundle)
        binary = self._accept(bundle, layers)[1]
        cid = container_id or f"{self.id_prefix}{os.urandom(8).hex()}"
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            root, private = self.root, False
        else:
            root, private = Path(tempfile.mkdtemp(prefix="wasidispatch-linux-")), True
        base = [binary, "--root", str(root)]
        stop = _StopSignals(_STOP_SIGNALS)
        with stop:
            try:
                stdin, stdout, stderr = self._stdio
                try:
                    proc = subprocess.Popen(
                        [*base, "run", "--bundle", str(bundle.path), cid],
                        stdin=stdin,
                        stdout=stdout,
                        stderr=stderr,
                    )
                    try:
                        stop.armed = True
                        code = _wait_exit_code(proc)
                        stop.armed = False
                        return code
                    except BaseException:
                        stop.armed = False  # a second signal must not cut the cleanup short
                        _run_quietly([*base, "kill", cid, "KILL"])
                        try:
                            proc.wait(timeout=10)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                        raise
                    finally:
                        _run_quietly([*base, "delete", "--force", cid])
                finally:
                    if private:
                        shutil.rmtree(root, ignore_errors=True)
            except _Stopped:
                pass
        # Stopped by SIGTERM/SIGHUP: the container is gone and leaving the block gave the
        # signal its original disposition (the default kills this process by it; a Python
        # handler ran). When that handler returns, so does exec, as a shell would report it.
        assert stop.signum is not None
        return 128 + stop.signum


#: Signals that stop a Linux container run as Ctrl-C does (SIGINT is KeyboardInterrupt).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Stopped(BaseException):
    """Raised by `_StopSignals`' handler; never escapes `LinuxExecutor.exec`."""


class _StopSignals:
    """For a ``with`` block, each of ``signums`` is recorded in ``signum`` (the first one) and,
    while ``armed``, raises `_Stopped`; a signal that arrives unarmed is raised again when the
    block ends (``pending``). The previous handlers are restored on exit. Only in the main
    thread (the only one Python runs handlers in), and never over an ignored signal (``nohup``
    keeps SIGHUP ignored)."""

    def __init__(self, signums: Sequence[int]) -> None:
        self.signums = signums
        self.armed = False
        self.signum: int | None = None
        self._previous: dict[int, signal._HANDLER] = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            if self.armed:
                self.armed = False
                raise _Stopped

    def __enter__(self) -> _StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                old = signal.getsignal(signum)
                if old is not signal.SIG_IGN:
                    self._previous[signum] = old
                    signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, old in self._previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
        self._previous.clear()
        if self.signum is not None and exc[0] is None:
            # Arrived while unarmed (before runc started, or during the cleanup): delivered
            # now, to the original disposition, once the container is gone.
            signal.raise_signal(self.signum)


def _wait_exit_code(proc: subprocess.Popen[bytes]) -> int:
    code = proc.wait()
    return 128 + -code if code < 0 else code


def _run_quietly(argv: list[str]) -> None:
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)


# ---------------------------------------------------------------------------------- dispatch


class DispatchExecutor:
    """Tries its executors in order and runs the bundle on the first that accepts it.

    The decision is memoized per bundle (keyed by the bundle path and config.json's identity,
    so an edited config.json is decided again). `explain` returns the decision and its
    evidence without running anything.

    Example::

        >>> d = DispatchExecutor([WasmExecutor("wasmtime"), LinuxExecutor("runc")])
        >>> [e.name for e in d.executors]
        ['wasm', 'linux']
    """

    name = "dispatch"

    def __init__(self, executors: Sequence[Executor] | None = None) -> None:
        self.executors: tuple[Executor, ...] = (
            tuple(executors) if executors is not None else (WasmExecutor(), LinuxExecutor())
        )
        self._memo: dict[MemoKey, tuple[Decision, Executor]] = {}

    def _choose(self, bundle: BundleLike, layers: Sequence[WasmLayer]) -> tuple[Decision, Executor]:
        key = _memo_key(bundle, layers)
        memo = self._memo.get(key)
        if memo is not None:
            return memo
        refusals: list[str] = []
        for executor in self.executors:
            try:
                decision = executor.validate(bundle, layers=layers)
            except CantHandle as exc:
                refusals.append(f"{executor.name}: {exc.reason}")
                continue
            self._memo[key] = memo = (decision, executor)
            return memo
        raise CantHandle(f"no executor takes {bundle.path}: " + " | ".join(refusals))

    def explain(
        self, bundle: BundleLike | str | os.PathLike[str], *, layers: Sequence[WasmLayer] = ()
    ) -> Decision:
        """The executor ``bundle`` would run on, and the evidence; raises `CantHandle`."""
        return self._choose(_load(bundle), layers)[0]

    def validate(self, bundle: BundleLike, *, layers: Sequence[WasmLayer] = ()) -> Decision:
        """Same as `explain`: raises `CantHandle` when no executor takes the bundle."""
        return self.explain(bundle, layers=layers)

    def exec(
        self, bundle: BundleLike | str | os.PathLike[str], *, layers: Sequence[WasmLayer] = ()
    ) -> int:
        """Run ``bundle`` on the chosen executor; its exit code."""
        loaded = _load(bundle)
        return self._choose(loaded, layers)[1].exec(loaded, layers=layers)

    def run(
        self,
        bundle: BundleLike | str | os.PathLike[str],
        *,
        layers: Sequence[WasmLayer] = (),
        container_id: str | None = None,
        cancel: Cancel | None = None,
    ) -> DispatchRun:
        """Run ``bundle`` and say how it went: the decision, exit code, wall seconds and, when
        the Wasm executor ran it, the engine's `RunResult` (why a 137 is a 137) — what the demo
        and ``wasidispatch run`` print. ``container_id`` is the OCI runtime's container id for
        a Linux bundle (a fresh one by default). ``cancel`` stops a Wasm guest from another
        thread (on engines with the ``cancel`` capability; a Linux container is stopped by
        signalling this process, see `LinuxExecutor.exec`)."""
        start = time.perf_counter()
        loaded = _load(bundle)
        decision, executor = self._choose(loaded, layers)
        result: RunResult | None = None
        if isinstance(executor, WasmExecutor):
            prepared = executor.prepare(loaded, layers=layers)
            if cancel is not None and not prepared.engine.capabilities.cancel:
                cancel = None
            result = executor.run(prepared, cancel=cancel)
            code = result.exit_code
        elif isinstance(executor, LinuxExecutor):
            code = executor.exec(loaded, layers=layers, container_id=container_id)
        else:
            code = executor.exec(loaded, layers=layers)
        return DispatchRun(decision, code, time.perf_counter() - start, result)


@dataclass(frozen=True, slots=True)
class DispatchRun:
    """How one `DispatchExecutor.run` went.

    ``result`` is the Wasm engine's `RunResult` (its ``reason`` and ``message`` say why a guest
    ended with 137: trapped, timed out, out of memory or fuel; or cancelled), None when the
    bundle ran elsewhere (a Linux container). ``why`` is that in one line, or None for a
    guest that simply exited.
    """

    decision: Decision
    exit_code: int
    seconds: float
    result: RunResult | None = None

    @property
    def why(self) -> str | None:
        """``"trapped: wasm trap: unreachable"``-style line for a guest that did not just exit
        (the wording ``wasidispatch-runc`` logs), else None."""
        from wasidispatch.engines._api import ExitReason

        result = self.result
        if result is None or result.reason is ExitReason.EXITED:
            return None
        message = _one_line(result.message or "")
        return f"{result.reason.value}: {message}" if message else result.reason.value


def _one_line(message: str) -> str:
    """An engine's message on one line: wasmtime's backtrace frames and ``Caused by:`` are
    dropped, the causes kept (``error while executing: wasm trap: wasm `unreachable`
    instruction executed``)."""
    parts = []
    for raw in message.splitlines():
        line = raw.strip()
        if not line or line == "Caused by:" or line.split(":", 1)[0].isdigit():
            continue
        parts.append(line.removesuffix(" at wasm backtrace:").rstrip(":"))
    return ": ".join(parts)
