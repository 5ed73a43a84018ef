"""``wasidispatch push DIR[:TAG] REF``: push a layout's manifest (and its blobs) to a registry."""

from __future__ import annotations

import argparse
import sys

from wasidispatch._cli.pull import add_plain_http_option


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``push`` subcommand."""
    parser = sub.add_parser(
        "push",
        help="push the manifest tagged TAG in layout DIR to REF",
        description=(
            "Push the manifest tagged TAG in the OCI image layout DIR (TAG may be left out when "
            "the layout holds one reference) with all its blobs to REF. Needs the 'registry' "
            "extra."
        ),
    )
    parser.add_argument("source", metavar="DIR[:TAG]")
    parser.add_argument("ref", metavar="REF")
    add_plain_http_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Push; prints ``REF sha256:...``."""
    from wasidispatch._cli.pack import split_layout_ref
    from wasidispatch.oci.registry import push

    directory, tag = split_layout_ref(args.source)
    desc = push(directory, tag, args.ref, plain_http=args.plain_http)
    sys.stdout.write(f"{args.ref} {desc.digest}\n")
    return 0
