"""The ``wasidispatch`` command line.

Each subcommand lives in its own module under ``wasidispatch/_cli/`` exposing
``register(subparsers)``; registering only touches argparse, and a subcommand imports what it
needs (pydantic, an engine) when it runs, so ``wasidispatch detect`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from wasidispatch import __version__
from wasidispatch.errors import WasiDispatchError

# Order here is the order in ``--help``. Add a subcommand by adding its module name.
_SUBCOMMANDS: tuple[str, ...] = (
    "run",
    "explain",
    "detect",
    "inspect",
    "pack",
    "pull",
    "push",
    "cache",
    "engines",
    "classify",
    "node",
    "webhook",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="wasidispatch",
        description="Run WebAssembly next to Linux containers, dispatched by entrypoint bytes.",
    )
    parser.add_argument("--version", action="version", version=f"wasidispatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        importlib.import_module(f"wasidispatch._cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status (1 with one line on stderr for
    a `WasiDispatchError`, 130 on Ctrl-C, 141 quietly when stdout is a pipe closed early)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        status: int = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        return _broken_pipe()
    except WasiDispatchError as exc:
        _say(f"wasidispatch: error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    return status


def _say(line: str) -> None:
    """One line on stderr, whatever it holds: a lone surrogate from a file name or an argument
    is escaped, never a second error (a strict stderr raises ``UnicodeEncodeError``)."""
    data = (line + "\n").encode(sys.stderr.encoding or "utf-8", "backslashreplace")
    sys.stderr.flush()
    try:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
    except AttributeError:  # a text-only stderr (tests, embedders)
        sys.stderr.write(data.decode(sys.stderr.encoding or "utf-8", "replace"))


#: Exit status when stdout's reader went away: 128 + SIGPIPE, what a shell reports for a Unix
#: tool killed by SIGPIPE (``yes | head -1``), silently.
EXIT_BROKEN_PIPE = 141


def _broken_pipe() -> int:
    """stdout's reader closed the pipe (``wasidispatch detect ... | head -1``): no traceback,
    no message; devnull goes over fd 1 so the interpreter's final flush cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE
