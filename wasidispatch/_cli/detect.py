"""``wasidispatch detect PATH...``: print the detected format of each path, one line each.

Exit status 0 when every path was read, 1 when any could not be (its error goes to stderr,
the other paths are still printed). ``--json`` prints one JSON object per line instead.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``detect`` subcommand."""
    parser = sub.add_parser(
        "detect",
        help="detect the format of entrypoints from their first bytes",
        description=(
            "Detect whether each PATH is Wasm (module, component), ELF, a #! script, "
            "WebAssembly text or unknown, by reading at most its first 4 KiB."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files to inspect")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per line (path, format, details)"
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="resolve each PATH inside this root filesystem, as a container would see it",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Detect every path; returns 0 if all were read, else 1."""
    from wasidispatch.detect import sniff_path
    from wasidispatch.errors import DetectionError

    paths: list[str] = args.paths
    width = max(len(p) for p in paths)
    status = 0
    out = sys.stdout
    for path in paths:
        try:
            detected = sniff_path(path, root=args.root)
        except DetectionError as exc:
            out.flush()  # keep stdout and stderr lines in order on a terminal
            print(f"wasidispatch detect: {exc}", file=sys.stderr)
            status = 1
            continue
        if args.json:
            out.write(json.dumps({"path": path, **detected.to_dict()}) + "\n")
        else:
            out.write(f"{path:<{width}}  {detected}\n")
    out.flush()
    return status
