"""``containerd-shim-wasidispatch-v1``: runtime type ``io.containerd.wasidispatch.v1``.

One long-lived shim per pod (or per container outside Kubernetes) built on
`wasidispatch.shim`: the containers of a group are served by one process. For each Create it
applies the `wasidispatch.executor.decide` rule to the bundle:

- Wasm (artifact annotations, or the entrypoint's first bytes are Wasm): a container process
  forked from the shim's warm zygote (`wasidispatch.wasmshim.zygote`), where the engine is
  loaded once and modules come precompiled from the cache;
- the CRI sandbox (``io.kubernetes.cri.container-type: sandbox``, the pause container) and
  every ELF or ``#!`` entrypoint: the real runc (`wasidispatch.wasmshim.linux`).

Runtime options: ``ctr --runc-root``/``--runc-binary`` (and the CRI's runc options) arrive as
``containerd.runc.v1.Options`` and are honoured for the Linux containers. Environment:
``WASIDISPATCH_ENGINE`` (engine order, e.g. ``wasmtime-fast``), ``WASIDISPATCH_CACHE_DIR`` /
``WASIDISPATCH_CACHE=off`` as for ``wasidispatch-runc``.

containerd 1.6 runs this binary twice per container besides the daemon: ``start`` (answered
from the group's live socket) and ``delete`` (after every container, even when its shim is
alive). Both import only ``os`` and ``sys`` unless there is real work: a fresh interpreter
is ~18 ms here and each common stdlib module costs milliseconds more.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from google.protobuf.any_pb2 import Any as AnyMessage

    from wasidispatch.shim.daemon import Options
    from wasidispatch.shim.instance import (
        CreateRequest,
        Exit,
        Factory,
        Instance,
        Process,
        Stdio,
    )
    from wasidispatch.wasmshim.zygote import Zygote

__all__ = ["RECORD", "WasiDispatchShim", "main"]

RECORD = "wasidispatch-shim.record"
"""The file in a bundle saying how its live container runs (``kind``, ``pid``, ``runc_root``,
``runc_binary`` lines), for ``delete`` after a dead shim; removed when the container is."""

SANDBOX_ANNOTATION = "io.kubernetes.cri.container-type"
_DEFAULT_RUNC_ROOT = "/run/containerd/wasidispatch"
_RUNC_OPTIONS = "containerd.runc.v1.Options"
_LOGGER = "wasidispatch.shim"


class WasiDispatchShim:
    """The `wasidispatch.shim.Shim` of ``containerd-shim-wasidispatch-v1``."""

    name = "wasidispatch"

    def __init__(self) -> None:
        self._zygote: Zygote | None = None

    def prepare(self, options: Options) -> None:
        """Fork the zygote while the daemon is single-threaded."""
        from wasidispatch.wasmshim.zygote import Zygote

        self._zygote = Zygote.start()

    def factory(self, options: Options) -> Factory:
        """Create's dispatch: sandbox and Linux to runc, Wasm to the zygote."""
        import threading

        # the dispatch rule's modules load while containerd connects, not in the first Create
        threading.Thread(target=_warm_imports, name="warm-imports", daemon=True).start()
        return lambda request: self._create(request, options)

    def _create(self, request: CreateRequest, options: Options) -> Instance:
        import logging

        kind, why = _kind(request)
        logging.getLogger(_LOGGER).info("create %s: %s (%s)", request.id, kind, why)
        runc = _runc_options(request, options)
        instance: Instance
        if kind == "wasm":
            from wasidispatch.wasmshim.wasm import create_wasm

            if self._zygote is None:
                raise RuntimeError("the zygote is not running")
            instance = create_wasm(request, self._zygote)
        else:
            from wasidispatch.wasmshim.linux import create_linux

            instance = create_linux(request, runc_root=runc["root"], runc_binary=runc["binary"])
        record = os.path.join(request.bundle, RECORD)
        _write_record(
            record,
            {
                "kind": kind,
                "pid": str(instance.pid),
                "runc_root": runc["root"],
                "runc_binary": runc["binary"],
            },
        )
        return _Recorded(instance, record)

    def cleanup(self, options: Options, bundle: str) -> None:
        """``delete`` after a dead shim: runc's state, or the Wasm process and its cgroup.
        Nothing to do (and nothing imported) when the shim deleted the container itself."""
        record = _read_record(os.path.join(bundle, RECORD))
        if record is None:
            return
        if record.get("kind") == "wasm":
            pid = record.get("pid", "")
            if pid.isdigit() and int(pid) > 1:
                _kill_if_ours(int(pid), bundle)
            _remove_cgroups(bundle)
        else:
            root = record.get("runc_root") or _default_root(options.namespace)
            binary = record.get("runc_binary") or "runc"
            if os.path.exists(os.path.join(root, options.id)):
                from wasidispatch.shim.reaper import Reaper

                reaper = Reaper()
                reaper.start()
                try:
                    reaper.run([binary, "--root", root, "delete", "--force", options.id])
                finally:
                    reaper.close()
        try:
            os.unlink(os.path.join(bundle, RECORD))
        except OSError:
            pass

    def close(self) -> None:
        """Stop the zygote."""
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None


class _Recorded:
    """An instance whose bundle record goes when it is deleted (so ``delete`` after a live
    shim has nothing to do); everything else is the instance's."""

    def __init__(self, instance: Instance, record: str) -> None:
        self._instance = instance
        self._record = record

    @property
    def pid(self) -> int:
        return self._instance.pid

    @property
    def oom_events(self) -> int:
        count = getattr(self._instance, "oom_events", 0)
        return count if isinstance(count, int) else 0

    def start(self) -> int:
        return self._instance.start()

    def kill(self, signal: int, all: bool = False) -> None:
        self._instance.kill(signal, all)

    def wait(self) -> Exit:
        return self._instance.wait()

    def delete(self) -> None:
        self._instance.delete()
        try:
            os.unlink(self._record)
        except OSError:
            pass

    def resize_pty(self, width: int, height: int) -> None:
        self._instance.resize_pty(width, height)

    def close_stdin(self) -> None:
        self._instance.close_stdin()

    def pids(self) -> list[int]:
        return self._instance.pids()

    def pause(self) -> None:
        self._instance.pause()

    def resume(self) -> None:
        self._instance.resume()

    def stats(self) -> AnyMessage:
        return self._instance.stats()

    def update(self, resources: AnyMessage) -> None:
        self._instance.update(resources)

    def exec(self, exec_id: str, process: Mapping[str, object], stdio: Stdio) -> Process:
        return self._instance.exec(exec_id, process, stdio)


def _write_record(path: str, fields: dict[str, str]) -> None:
    if any("\n" in v for v in fields.values()):
        return  # a path with a newline: no record (delete then finds nothing to clean)
    from wasidispatch import _fs

    data = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
    try:
        _fs.write_atomic(path, data, mode=0o600)
    except OSError:
        pass


def _read_record(path: str) -> dict[str, str] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if (os.fstat(fd).st_mode & 0o170000) != 0o100000:
            return None
        data = os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)
    out: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def _warm_imports() -> None:
    try:
        import wasidispatch.executor
        import wasidispatch.runc.spec
        import wasidispatch.wasmshim.linux
        import wasidispatch.wasmshim.wasm  # noqa: F401
    except Exception:
        pass


def _kind(request: CreateRequest) -> tuple[str, str]:
    """``("wasm" | "linux", why)`` for a Create, by the dispatch rule."""
    if request.annotations.get(SANDBOX_ANNOTATION) == "sandbox":
        return "linux", "the CRI sandbox container"
    from wasidispatch.executor import decide
    from wasidispatch.runc.spec import LeanBundle

    bundle = LeanBundle.load(request.bundle)
    decision = decide(bundle)
    if decision.kind != "wasm" and decision.detected is not None:
        from wasidispatch._binfmt import foreign_elf_refusal

        refusal = foreign_elf_refusal(decision.detected)
        if refusal is not None:  # runc would only say "exec format error"
            from wasidispatch.errors import CantHandle

            raise CantHandle(refusal)
    return ("wasm" if decision.kind == "wasm" else "linux"), decision.reason


def _default_root(namespace: str) -> str:
    return os.path.join(_DEFAULT_RUNC_ROOT, namespace or "default")


def _runc_options(request: CreateRequest, options: Options) -> dict[str, str]:
    """runc's root and binary: from ``containerd.runc.v1.Options`` when sent, else ours."""
    namespace = request.namespace or options.namespace
    root = _default_root(namespace)
    binary = "runc"
    any_options = request.options
    if any_options is not None and any_options.type_url.endswith(_RUNC_OPTIONS):
        from wasidispatch.shim._pb import runc_options_pb2

        parsed = runc_options_pb2.Options()
        parsed.ParseFromString(any_options.value)
        if parsed.root:
            root = os.path.join(parsed.root, namespace or "default")
        if parsed.binary_name:
            binary = parsed.binary_name
    return {"root": root, "binary": binary}


def _kill_if_ours(pid: int, bundle: str) -> None:
    """SIGKILL ``pid`` when it still is the container's process: the pid may have been
    reused since the shim died, so it must sit in the container's own cgroup (a Wasm
    container without a cgroup path is left alone: nothing proves the pid is still it)."""
    import signal

    from wasidispatch.runc import cgroups
    from wasidispatch.runc.spec import LeanBundle

    try:
        spec = LeanBundle.load(bundle).spec
        path = cgroups.resolve(spec.linux.cgroups_path if spec.linux else None)
        with open(f"/proc/{pid}/cgroup") as fh:
            lines = fh.read().splitlines()
    except Exception:
        return
    if path is None:
        return
    wanted = "/" + path.strip("/")
    if any(line.split(":", 2)[-1] == wanted for line in lines):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _remove_cgroups(bundle: str) -> None:
    from wasidispatch.runc import cgroups
    from wasidispatch.runc.spec import LeanBundle

    try:
        spec = LeanBundle.load(bundle).spec
        path = cgroups.resolve(spec.linux.cgroups_path if spec.linux else None)
        if path is not None:
            dirs = [
                os.path.normpath(os.path.join(h.mountpoint, path.lstrip("/")))
                for h in cgroups.hierarchies()
            ]
            cgroups.remove(d for d in dirs if os.path.isdir(d))
    except Exception:
        pass


def main() -> None:
    """The console script."""
    from wasidispatch.shim.daemon import run_shim

    sys.exit(run_shim(WasiDispatchShim()))
