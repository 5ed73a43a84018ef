"""``wasidispatch pull REF DIR``: copy an image or artifact from a registry into a layout."""

from __future__ import annotations

import argparse
import sys


def add_plain_http_option(parser: argparse.ArgumentParser) -> None:
    """``--plain-http`` (``None`` when not given: HTTP for loopback registries), shared by
    ``pull`` and ``push``."""
    parser.add_argument(
        "--plain-http",
        action="store_true",
        default=None,
        help="use HTTP, not HTTPS (the default for localhost/127.0.0.1)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``pull`` subcommand."""
    parser = sub.add_parser(
        "pull",
        help="pull REF from a registry into the image layout DIR",
        description=(
            "Pull REF (host[:port]/repository:tag or @sha256:...) into the OCI image layout DIR "
            "(created if missing), verifying every digest. Needs the 'registry' extra."
        ),
    )
    parser.add_argument("ref", metavar="REF")
    parser.add_argument("dir", metavar="DIR")
    parser.add_argument("--tag", help="reference name in the layout (default: REF's tag)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="deadline of the whole pull (default: 600); a failed pull leaves nothing behind",
    )
    add_plain_http_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Pull; prints ``DIR:TAG sha256:...``."""
    from wasidispatch.oci.registry import pull

    desc = pull(args.ref, args.dir, tag=args.tag, plain_http=args.plain_http, timeout=args.timeout)
    sys.stdout.write(f"{args.dir}:{desc.ref_name} {desc.digest}\n")
    return 0
