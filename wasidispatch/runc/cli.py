"""``wasidispatch-runc``: runc's command line, Wasm containers run here, the rest by runc.

``create`` applies the dispatch rule to the bundle. When it says Wasm, the container is ours
(`wasidispatch.runc.wasm_container`) and remembered under ``--root``; any other outcome
(Linux binary, a script, an entrypoint the rule cannot find) is runc's business, so the whole
command line is handed to the real runc by ``exec``: same arguments, same descriptors (stdio,
the console socket, ``--preserve-fds``), runc's own pid and exit status. Two refusals come
first, each one log line and exit status 1 as runc's own errors: a config.json that is not a
bounded regular file of JSON or has a field of the wrong type or value (`SpecError` naming the
field), and a Linux entrypoint built for an architecture this node cannot run. Every later
subcommand naming an id that is not a Wasm container of ours goes to runc the same way.

The real runc is ``$WASIDISPATCH_RUNC`` when set, else the first ``runc`` on ``PATH`` that is
not this program. Output into a closed pipe ends the process by SIGPIPE, silently, as runc's.
"""

from __future__ import annotations

import os
import sys

from wasidispatch.runc.args import Invocation, UsageError, parse
from wasidispatch.runc.log import RuntimeLog
from wasidispatch.runc.state import WasmState

__all__ = ["RuntimeFailure", "find_runc", "main"]

PROGRAM = "wasidispatch-runc"
OCI_SPEC_VERSION = "1.0.2"

# Subcommands whose first argument is a container id.
_ID_COMMANDS = frozenset(
    {"start", "state", "kill", "delete", "ps", "exec", "pause", "resume", "events", "update"}
)


class RuntimeFailure(Exception):
    """A subcommand failed; the message goes to ``--log`` and the exit status is 1."""


def find_runc() -> str:
    """Path of the real runc: ``$WASIDISPATCH_RUNC``, else ``runc`` on ``PATH`` (not us)."""
    explicit = os.environ.get("WASIDISPATCH_RUNC")
    if explicit:
        return explicit
    me = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    path = os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for directory in [*path.split(os.pathsep), "/usr/sbin", "/usr/bin", "/usr/local/sbin"]:
        candidate = os.path.join(directory or ".", "runc")
        if (
            os.path.isfile(candidate)
            and os.access(candidate, os.X_OK)
            and os.path.realpath(candidate) != me
        ):
            return candidate
    raise RuntimeFailure("runc not found: install it or set WASIDISPATCH_RUNC")


def passthrough(argv: list[str]) -> int:
    """Replace this process by the real runc with the same arguments (does not return)."""
    runc = find_runc()
    sys.stdout.flush()
    os.execv(runc, [runc, *argv])


def _version() -> int:
    from wasidispatch import __version__

    lines = [f"{PROGRAM} version {__version__}", f"spec: {OCI_SPEC_VERSION}"]
    try:
        import subprocess

        out = subprocess.run(
            [find_runc(), "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
        first = out.splitlines()[0] if out else ""
        lines.append(f"runc: {first.removeprefix('runc version ').strip() or 'unknown'}")
    except (RuntimeFailure, OSError, IndexError, ValueError):
        lines.append("runc: not found")
    print("\n".join(lines))
    return 0


def _features() -> int:
    """runc's ``features`` document, with our own annotations added."""
    import json
    import subprocess

    from wasidispatch import __version__

    doc: dict[str, object] = {}
    try:
        out = subprocess.run(
            [find_runc(), "features"], capture_output=True, text=True, check=False, timeout=10
        )
        if out.returncode == 0:
            loaded = json.loads(out.stdout)
            if isinstance(loaded, dict):
                doc = loaded
    except (RuntimeFailure, OSError, ValueError):
        pass
    doc.setdefault("ociVersionMin", "1.0.0")
    doc.setdefault("ociVersionMax", OCI_SPEC_VERSION)
    annotations = doc.get("annotations")
    if not isinstance(annotations, dict):
        annotations = {}
    annotations["io.github.wasidispatch.version"] = __version__
    annotations["io.github.wasidispatch.wasm"] = "true"
    doc["annotations"] = annotations
    print(json.dumps(doc, indent=4))
    return 0


def _create(inv: Invocation, argv: list[str], log: RuntimeLog) -> int:
    if len(inv.args) != 1:
        raise RuntimeFailure(f'"{inv.command}" requires exactly 1 argument')
    bundle_dir = os.path.abspath(inv.value("bundle") or os.getcwd())
    from wasidispatch.runc import wasm_container

    plan = wasm_container.plan(bundle_dir, log)
    if plan is None:
        return passthrough(argv)
    if inv.command == "run":
        return wasm_container.run(inv, plan, log)
    return wasm_container.create(inv, plan, log)


def _absent(root: str, container_id: str) -> bool:
    from wasidispatch.runc.state import container_dir, valid_id

    return valid_id(container_id) and not os.path.lexists(container_dir(root, container_id))


def _dispatch(inv: Invocation, argv: list[str], log: RuntimeLog) -> int:
    command = inv.command
    if command in ("create", "run"):
        return _create(inv, argv, log)
    if command in _ID_COMMANDS and inv.args:
        state = WasmState.load(inv.root, inv.args[0])
        if state is not None:
            from wasidispatch.runc import wasm_container

            return wasm_container.COMMANDS[command](inv, state, log)
        if command == "delete" and inv.flag("force") and _absent(inv.root, inv.args[0]):
            # runc answers `delete --force` of an id it has no directory for with success and
            # nothing else; containerd's cleanup makes this call after every delete.
            return 0
    if command == "features":
        return _features()
    return passthrough(argv)


def _stdout_closed() -> bool:
    """Whether nobody reads our stdout any more (a pipe whose reader is gone)."""
    import select

    poller = select.poll()
    poller.register(1, select.POLLOUT)
    return any(event & select.POLLERR for _, event in poller.poll(0))


def _end_as_runc_on_a_closed_pipe() -> int:
    """runc (Go) writing into a closed pipe dies of SIGPIPE, silently: so do we, instead of
    Python's BrokenPipeError traceback (stdout then points to /dev/null, so the interpreter's
    last flush cannot complain either)."""
    import signal

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return 128 + signal.SIGPIPE  # not reached: the signal ends the process


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``wasidispatch-runc``; returns the exit status (or execs runc)."""
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(words)
    except BrokenPipeError:
        if _stdout_closed():
            return _end_as_runc_on_a_closed_pipe()
        raise


def _main(words: list[str]) -> int:
    try:
        inv = parse(words)
    except UsageError:
        return passthrough(words)  # runc prints its own usage error
    if inv.global_options.get("version") is True:
        code = _version()
        sys.stdout.flush()
        return code
    if inv.command is None or inv.flag("help") or inv.global_options.get("help") is True:
        return passthrough(words)
    log = RuntimeLog(inv.log_path, inv.log_format, debug=inv.global_options.get("debug") is True)
    try:
        code = _dispatch(inv, words, log)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError as exc:
        if _stdout_closed():
            raise
        log.error(str(exc))  # another pipe or socket (the console socket's peer)
        return 1
    except RuntimeFailure as exc:
        log.error(str(exc))
        return 1
    except Exception as exc:  # every failure must reach containerd through the log
        from wasidispatch.errors import WasiDispatchError

        if isinstance(exc, (WasiDispatchError, OSError)):
            log.error(str(exc))
        else:  # a bug of ours: still no traceback on the container's stderr
            import traceback

            log.error(f"internal error: {type(exc).__name__}: {exc}")
            log.debug("".join(traceback.format_exception(exc)))
        return 1
