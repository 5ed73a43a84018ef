"""``wasidispatch classify REF``: would this image run as Wasm or as Linux, and why.

REF is a registry reference or a local image layout ``DIR[:TAG]``. Prints the kind, the
manifest digest and the evidence (``--json``: the :class:`~wasidispatch.classify.ImageDecision`
as one JSON object). Exit status 0 whatever the kind; 1 (with one line on stderr) when the
image could not be read or is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``classify`` subcommand."""
    parser = sub.add_parser(
        "classify",
        help="tell whether an image (registry or layout) is Wasm or Linux",
        description=(
            "Decide whether REF runs as Wasm or Linux: from its artifact media types, its "
            "platform, crun's Wasm annotations, else the first bytes of its entrypoint, read "
            "from the layers as the container would see them (only as far as needed). REF is "
            "host[:port]/repository:tag, ...@sha256:..., or a local layout DIR[:TAG]."
        ),
    )
    parser.add_argument("ref", metavar="REF")
    parser.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="the platform to pick from a multi-platform index (default: this node's)",
    )
    parser.add_argument("--json", action="store_true", help="print the decision as JSON")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP to the registry (the default for localhost/127.0.0.1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="deadline of the whole decision (default: 60)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Classify and print; errors propagate (the command line prints them)."""
    from wasidispatch.classify import classify

    decision = classify(
        args.ref, platform=args.platform, timeout=args.timeout, insecure=args.insecure
    )
    if args.json:
        sys.stdout.write(json.dumps(decision.to_json(), indent=2) + "\n")
        return 0
    details = [decision.architecture or "", decision.platform or ""]
    head = " ".join([decision.kind, decision.reference, decision.digest, *filter(None, details)])
    lines = [head]
    if decision.entrypoint:
        lines.append(f"  entrypoint: {decision.entrypoint}")
    lines += [f"  - {fact}" for fact in decision.evidence]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``classify`` alone, as ``wasidispatch classify ARGS`` would run it (for tests and for
    embedding before the subcommand is registered)."""
    from wasidispatch.cli import _say
    from wasidispatch.errors import WasiDispatchError

    parser = argparse.ArgumentParser(prog="wasidispatch")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["classify", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except WasiDispatchError as exc:
        _say(f"wasidispatch: error: {exc}")
        return 1
