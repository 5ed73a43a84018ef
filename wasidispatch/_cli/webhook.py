"""``wasidispatch webhook``: the mutating admission webhook (see `wasidispatch.webhook`).

Serves ``AdmissionReview`` v1 on ``https://HOST:PORT/mutate`` (and ``GET /healthz``) until
SIGTERM or SIGINT: a Pod, or a workload's pod template, with a Wasm image gets
``runtimeClassName`` (``--runtime-class``). A renewed certificate is picked up within a
minute, or at once on SIGHUP. One log line per image (its kind and the
evidence) and one per decision on stderr. Exit status 0 after a clean stop; a bad option,
certificate or address is one line on stderr and status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every IPv4 address) -> (host, port).

    >>> parse_listen("0.0.0.0:8443"), parse_listen("[::]:443"), parse_listen(":9443")
    (('0.0.0.0', 8443), ('::', 443), ('0.0.0.0', 9443))
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address needs brackets
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r} (e.g. 0.0.0.0:8443)")
    return host or "0.0.0.0", int(port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``webhook`` subcommand."""
    from wasidispatch.webhook import DEFAULT_CACHE_TTL, DEFAULT_TIMEOUT, MUTATE_PATH

    parser = sub.add_parser(
        "webhook",
        help="serve the admission webhook that sets runtimeClassName for Wasm images",
        description=(
            "A Kubernetes mutating admission webhook (AdmissionReview v1 over HTTPS, "
            f"POST {MUTATE_PATH}): Pods and the pod templates of Deployments, ReplicaSets, "
            "StatefulSets, DaemonSets, Jobs and CronJobs whose containers or init containers "
            "include a Wasm image (wasidispatch classify) get runtimeClassName. Objects that "
            "name a RuntimeClass are left alone."
        ),
    )
    parser.add_argument("--tls-cert", required=True, metavar="FILE", help="PEM certificate chain")
    parser.add_argument("--tls-key", required=True, metavar="FILE", help="PEM private key")
    parser.add_argument(
        "--runtime-class",
        required=True,
        metavar="NAME",
        help="the RuntimeClass to set (see 'wasidispatch node runtime-class')",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("0.0.0.0", 8443),
        metavar="HOST:PORT",
        help="address to serve on (default 0.0.0.0:8443; [::]:8443 for IPv6)",
    )
    parser.add_argument(
        "--fail",
        choices=("open", "closed"),
        default="open",
        help="when an image cannot be classified: open allows without a patch (and warns), "
        "closed denies (default open)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="deadline of one review, registry reads included; keep it below the webhook "
        f"configuration's timeoutSeconds (default {DEFAULT_TIMEOUT:g}, at most 30)",
    )
    parser.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST",
        help="a registry (host[:port]) read over plain HTTP (repeatable; loopback always is)",
    )
    parser.add_argument(
        "--platform",
        metavar="OS/ARCH",
        help="platform picked from multi-platform images (default: this machine's)",
    )
    parser.add_argument(
        "--cache-ttl",
        type=_seconds,
        default=DEFAULT_CACHE_TTL,
        metavar="S",
        help="how long a decision for an image named by tag is reused (default "
        f"{DEFAULT_CACHE_TTL:g}; images pinned by digest are kept)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    from wasidispatch.webhook import Admission, TlsFiles, serve

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print(
            "wasidispatch webhook: needs aiohttp: pip install 'wasidispatch[webhook]'",
            file=sys.stderr,
        )
        return 1
    tls = TlsFiles(args.tls_cert, args.tls_key)
    admission = Admission(
        args.runtime_class,
        fail=args.fail,
        timeout=args.timeout,
        insecure_registries=args.insecure_registry,
        platform=args.platform,
        cache_ttl=args.cache_ttl,
    )
    host, port = args.listen
    serve(admission, tls, host, port)
    return 0
