"""``wasidispatch explain BUNDLE``: which executor a bundle goes to, and the evidence."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``explain`` subcommand."""
    parser = sub.add_parser(
        "explain",
        help="print where a bundle would run and why",
        description="Print the dispatch decision for an OCI bundle and the evidence behind it.",
    )
    parser.add_argument("bundle", help="bundle directory (config.json + rootfs)")
    parser.add_argument("--engine", action="append", help="Wasm engine (repeat for fallbacks)")
    parser.add_argument("--runtime", default="runc", help="OCI runtime for Linux containers")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run, no_cache=True, cache=None)


def run(args: argparse.Namespace) -> int:
    """Print the decision; exit 0, or 1 (with the reason) when nothing takes the bundle."""
    from wasidispatch._cli.run import build_executor

    decision = build_executor(args).explain(args.bundle)
    if args.json:
        doc = {
            "executor": decision.executor,
            "kind": decision.kind,
            "entrypoint": str(decision.entrypoint) if decision.entrypoint else None,
            "format": decision.detected.format if decision.detected else None,
            "evidence": [{"source": e.source, "detail": e.detail} for e in decision.evidence],
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"executor: {decision.executor} ({decision.kind})")
    if decision.entrypoint is not None:
        print(f"entrypoint: {decision.entrypoint}")
    for item in decision.evidence:
        print(f"  {item}")
    return 0
