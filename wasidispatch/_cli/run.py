"""``wasidispatch run BUNDLE``: run a bundle where its bytes say; exit with its exit code."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wasidispatch.engines import Cancel
    from wasidispatch.executor import DispatchExecutor


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` subcommand."""
    parser = sub.add_parser(
        "run",
        help="run an OCI bundle: Wasm in-process, Linux through runc",
        description="Run an OCI runtime bundle. The entrypoint's bytes pick the executor: Wasm "
        "runs in-process on a Wasm engine, a Linux binary is handed to an OCI runtime. Exits "
        "with the container's exit code.",
    )
    parser.add_argument("bundle", help="bundle directory (config.json + rootfs)")
    parser.add_argument("--engine", action="append", help="Wasm engine (repeat for fallbacks)")
    parser.add_argument("--runtime", default="runc", help="OCI runtime for Linux containers")
    parser.add_argument("--id", dest="container_id", help="container id for the OCI runtime")
    parser.add_argument("--cache", metavar="DIR", help="precompile cache directory")
    parser.add_argument("--no-cache", action="store_true", help="do not use a precompile cache")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the decision and wall time on stderr"
    )
    parser.set_defaults(func=run)


def build_executor(args: argparse.Namespace) -> DispatchExecutor:
    """The `DispatchExecutor` the options describe (shared with ``explain``)."""
    from wasidispatch.executor import DispatchExecutor, LinuxExecutor, WasmExecutor

    cache = None
    if not getattr(args, "no_cache", True):
        from wasidispatch.cache import PrecompileCache

        if args.cache:
            cache = PrecompileCache(args.cache)  # asked for by name: its refusal is an error
        else:
            from wasidispatch.errors import CacheError

            try:
                cache = PrecompileCache()
            except CacheError as exc:  # the cache is an optimisation: run uncached
                print(f"wasidispatch: warning: running without a cache: {exc}", file=sys.stderr)
    engines = tuple(args.engine) if args.engine else None
    return DispatchExecutor([WasmExecutor(engines, cache=cache), LinuxExecutor(args.runtime)])


def run(args: argparse.Namespace) -> int:
    """Run the bundle; the process exits with the container's exit code.

    A Wasm guest that did not simply exit (trapped, timed out, out of memory or fuel) gets one
    line on stderr saying so (``wasidispatch: trapped: wasm trap: unreachable``), as
    ``wasidispatch-runc`` logs it; ``-v`` adds the decision and the exit line. SIGTERM and
    SIGHUP stop the run (a Linux container is killed and deleted first; a Wasm guest, also
    SIGINT, is cancelled at once, even in a loop) and the command exits with 128 + the signal
    number.
    """
    import signal
    import time

    from wasidispatch.oci.bundle import Bundle

    start = time.perf_counter()
    executor = build_executor(args)
    bundle = Bundle.load(args.bundle)
    decision = executor.explain(bundle)
    if args.verbose:
        print(f"wasidispatch: {decision.executor}: {decision.reason}", file=sys.stderr)
    # A Linux container: SIGTERM/SIGHUP end the command once `LinuxExecutor` has killed and
    # deleted the container (Ctrl-C stays a KeyboardInterrupt, which it handles too). A Wasm
    # guest on an engine that can be cancelled: the signal only fires a `Cancel` (also while
    # the guest runs in native code), the run ends as cancelled and the command exits 128+N;
    # nothing is raised in the middle of an engine's call (an SDK interrupted there can crash
    # the interpreter at exit). Signals are the main thread's: elsewhere, nothing is changed.
    import threading

    from wasidispatch.engines import Cancel
    from wasidispatch.executor import WasmExecutor

    cancel: Cancel | None = None
    if decision.executor == "wasm":
        wasm = next(e for e in executor.executors if isinstance(e, WasmExecutor))
        if wasm.plan(bundle).engine.capabilities.cancel:  # memoized: no second decision
            cancel = Cancel()
    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous: dict[int, Any] = {}
    unwatch = None
    if threading.current_thread() is threading.main_thread():
        watched = [signal.SIGHUP, signal.SIGTERM, *([signal.SIGINT] if cancel is not None else [])]
        if cancel is not None:
            from wasidispatch._signals import cancel_on_signals

            # before the handlers: no signal is missed
            unwatch = cancel_on_signals(cancel, (signal.SIGTERM, signal.SIGHUP, signal.SIGINT))
        for signum in watched:
            previous[signum] = old = signal.getsignal(signum)
            if old is not signal.SIG_IGN:  # nohup: SIGHUP stays ignored
                signal.signal(signum, record if cancel is not None else _exit_by_signal)
    try:
        ran = executor.run(bundle, container_id=args.container_id, cancel=cancel)
    finally:
        if unwatch is not None:
            unwatch()
        for watched_signal, handler in previous.items():
            signal.signal(watched_signal, handler if handler is not None else signal.SIG_DFL)
    why = ran.why
    if why is not None:
        print(f"wasidispatch: {why}", file=sys.stderr)
    if args.verbose:
        elapsed = (time.perf_counter() - start) * 1000
        reason = f" ({ran.result.reason.value})" if ran.result is not None else ""
        print(
            f"wasidispatch: exit code {ran.exit_code}{reason} in {elapsed:.1f} ms", file=sys.stderr
        )
    return 128 + received[0] if received else ran.exit_code


def _exit_by_signal(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP end ``wasidispatch run`` with 128 + their number (`LinuxExecutor` calls
    this once its container is gone)."""
    raise SystemExit(128 + signum)
