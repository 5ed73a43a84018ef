"""``wasidispatch engines``: every known engine, whether it loads, its version and
capabilities, and what to install when it is missing.

Exit status 0 when at least one engine is installed, 1 when none is (nothing could run Wasm).
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``engines`` subcommand."""
    parser = sub.add_parser(
        "engines",
        help="list Wasm engines: installed?, version, capabilities, install hint",
        description=__doc__,
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the engine table (or JSON)."""
    from wasidispatch.engines import available

    infos = available()
    if args.json:
        doc = [
            {
                "name": i.name,
                "installed": i.installed,
                "version": i.version,
                "capabilities": i.capabilities.names() if i.capabilities else [],
                "install_hint": i.install_hint,
                "error": i.error,
                "source": i.source,
                "target": i.target,
            }
            for i in infos
        ]
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        width = max([len(i.name) for i in infos] + [6])
        print(f"{'ENGINE':<{width}}  {'STATUS':<9}  {'VERSION':<9}  CAPABILITIES")
        for i in infos:
            status = "installed" if i.installed else "missing"
            caps = ", ".join(i.capabilities.names()) if i.capabilities else "-"
            print(f"{i.name:<{width}}  {status:<9}  {i.version or '-':<9}  {caps}")
            if not i.installed:
                print(f"{'':<{width}}  install: {i.install_hint}")
                print(f"{'':<{width}}  reason:  {i.error}")
    return 0 if any(i.installed for i in infos) else 1
