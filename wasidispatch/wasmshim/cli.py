"""``containerd-shim-wasidispatch-v1``: runtime type ``io.containerd.wasidispatch.v1``.

One long-lived shim per pod (or per container outside Kubernetes) built on
`wasidispatch.shim`: the containers of a group are served by one process. For each Create it
applies the `wasidispatch.executor.decide` rule to the bundle:

- Wasm (artifact annotations, or the entrypoint's first bytes are Wasm): a container process
  forked from the shim's warm zygote (`wasidispatch.wasmshim.zygote`), where the engine is
  loaded once and modules come precompiled from the cache;
- the CRI sandbox (``io.kubernetes.cri.container-type: sandbox``, the pause container) and
  every ELF or ``#!`` entrypoint: the real runc (`wasidispatch.wasmshim.linux`).

Runtime options: ``ctr --runc-root``/``--runc-binary``/``--runc-systemd-cgroup`` (and the
CRI's runc options) arrive as ``containerd.runc.v1.Options`` and are honoured for the Linux
containers. Environment: ``WASIDISPATCH_ENGINE`` (engine order, e.g. ``wasmtime-fast``),
``WASIDISPATCH_CACHE_DIR`` / ``WASIDISPATCH_CACHE=off`` as for ``wasidispatch-runc``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from wasidispatch import _fs
from wasidispatch.shim.daemon import Options, run_shim

if TYPE_CHECKING:
    from wasidispatch.shim.instance import CreateRequest, Factory, Instance
    from wasidispatch.wasmshim.zygote import Zygote

__all__ = ["RECORD", "WasiDispatchShim", "main"]

RECORD = "wasidispatch-shim.json"
"""The file in a bundle saying how its container runs, for ``delete`` after a dead shim."""

SANDBOX_ANNOTATION = "io.kubernetes.cri.container-type"
_DEFAULT_RUNC_ROOT = "/run/containerd/wasidispatch"
_RUNC_OPTIONS = "containerd.runc.v1.Options"

log = logging.getLogger("wasidispatch.shim")


class WasiDispatchShim:
    """The `wasidispatch.shim.daemon.Shim` of ``containerd-shim-wasidispatch-v1``."""

    name = "wasidispatch"

    def __init__(self) -> None:
        self._zygote: Zygote | None = None

    def prepare(self, options: Options) -> None:
        """Fork the zygote while the daemon is single-threaded."""
        from wasidispatch.wasmshim.zygote import Zygote

        self._zygote = Zygote.start()

    def factory(self, options: Options) -> Factory:
        """Create's dispatch: sandbox and Linux to runc, Wasm to the zygote."""
        # the dispatch rule's modules load while containerd connects, not in the first Create
        threading.Thread(target=_warm_imports, name="warm-imports", daemon=True).start()
        return lambda request: self._create(request, options)

    def _create(self, request: CreateRequest, options: Options) -> Instance:
        kind, why = _kind(request)
        log.info("create %s: %s (%s)", request.id, kind, why)
        runc = _runc_options(request, options)
        if kind == "wasm":
            from wasidispatch.wasmshim.wasm import create_wasm

            if self._zygote is None:
                raise RuntimeError("the zygote is not running")
            instance: Instance = create_wasm(request, self._zygote)
        else:
            from wasidispatch.wasmshim.linux import create_linux

            instance = create_linux(request, runc_root=runc["root"], runc_binary=runc["binary"])
        record = {
            "kind": kind,
            "pid": instance.pid,
            "runc_root": runc["root"],
            "runc_binary": runc["binary"],
            "id": request.id,
        }
        with contextlib.suppress(OSError):
            _fs.write_atomic(
                os.path.join(request.bundle, RECORD), json.dumps(record).encode(), mode=0o600
            )
        return instance

    def cleanup(self, options: Options, bundle: str) -> None:
        """``delete`` after a dead shim: runc's state, or the Wasm process and its cgroup."""
        try:
            record = json.loads(
                _fs.read_regular(os.path.join(bundle, RECORD), limit=65536, follow=False)
            )
        except Exception:
            record = {}
        if not isinstance(record, dict):
            record = {}
        root = str(record.get("runc_root") or _default_root(options.namespace))
        binary = str(record.get("runc_binary") or "runc")
        if record.get("kind") == "wasm":
            pid = record.get("pid")
            if isinstance(pid, int) and pid > 1:
                _kill_if_ours(pid, bundle)
            _remove_cgroups(bundle)
        else:
            from wasidispatch.shim.reaper import Reaper

            reaper = Reaper()
            reaper.start()
            try:
                reaper.run([binary, "--root", root, "delete", "--force", options.id], timeout=30)
            finally:
                reaper.close()

    def close(self) -> None:
        """Stop the zygote."""
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None


def _warm_imports() -> None:
    with contextlib.suppress(Exception):
        import wasidispatch.executor
        import wasidispatch.runc.spec
        import wasidispatch.wasmshim.linux
        import wasidispatch.wasmshim.wasm  # noqa: F401


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
    root = _default_root(request.namespace or options.namespace)
    binary = "runc"
    any_options = request.options
    if any_options is not None and any_options.type_url.endswith(_RUNC_OPTIONS):
        from wasidispatch.shim._pb import runc_options_pb2

        parsed = runc_options_pb2.Options()
        parsed.ParseFromString(any_options.value)
        if parsed.root:
            root = os.path.join(parsed.root, request.namespace or options.namespace)
        if parsed.binary_name:
            binary = parsed.binary_name
    return {"root": root, "binary": binary}


def _kill_if_ours(pid: int, bundle: str) -> None:
    """SIGKILL ``pid`` when it still is the container's process: the pid may have been
    reused since the shim died, so it must sit in the container's own cgroup (a Wasm
    container without a cgroup path is left alone: nothing proves the pid is still it)."""
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
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _remove_cgroups(bundle: str) -> None:
    from wasidispatch.runc import cgroups
    from wasidispatch.runc.spec import LeanBundle

    with contextlib.suppress(Exception):
        spec = LeanBundle.load(bundle).spec
        path = cgroups.resolve(spec.linux.cgroups_path if spec.linux else None)
        if path is not None:
            dirs = [
                os.path.normpath(os.path.join(h.mountpoint, path.lstrip("/")))
                for h in cgroups.hierarchies()
            ]
            cgroups.remove(d for d in dirs if os.path.isdir(d))


def main() -> None:
    """The console script."""
    sys.exit(run_shim(WasiDispatchShim()))
