"""``wasidispatch node install|runtime-class``: set a node's containerd up for the shim.

``install`` adds the runtime (``runtime_type = "io.containerd.wasidispatch.v1"``) to
containerd's config (see `wasidispatch.node.install`), then prints what changed, the backup,
notes, and the next steps: restart containerd, label the node, apply the RuntimeClass (printed).
``--dry-run`` prints the diff and writes nothing. ``runtime-class`` prints only the
RuntimeClass. Exit status 0 when the runtime is (or, dry, would be) installed; a refusal
(`SpecError`) or a failed write is one line on stderr and status 1, the file untouched.
"""

from __future__ import annotations

import argparse
import socket
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``node`` subcommand and its ``install`` and ``runtime-class`` actions."""
    from wasidispatch.node import DEFAULT_CONFIG, DEFAULT_NAME, NODE_LABEL

    name = argparse.ArgumentParser(add_help=False)
    name.add_argument(
        "--name",
        default=DEFAULT_NAME,
        help=f"the runtime's name in containerd: the RuntimeClass handler (default {DEFAULT_NAME})",
    )
    parser = sub.add_parser(
        "node",
        help="set a node's containerd up for the wasidispatch shim",
        description="Set a Kubernetes node's containerd up for containerd-shim-wasidispatch-v1.",
    )
    actions = parser.add_subparsers(dest="node_action", metavar="ACTION", required=True)
    install = actions.add_parser(
        "install",
        parents=[name],
        help="add the wasidispatch runtime to containerd's config",
        description=(
            "Add the runtime (runtime_type io.containerd.wasidispatch.v1) to containerd's "
            "config: appended as text (comments and formatting kept), checked by parsing the "
            "result, the old file kept as CONFIG.bak-<UTC time>. Does nothing when already "
            "installed; creates a minimal version 2 config when there is none."
        ),
    )
    install.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"containerd's config (default {DEFAULT_CONFIG})",
    )
    install.add_argument(
        "--dry-run", action="store_true", help="print the change as a diff, write nothing"
    )
    install.add_argument(
        "--shim-path",
        metavar="PATH",
        help="absolute path of containerd-shim-wasidispatch-v1, written as runtime_path "
        "(default: containerd finds it on its PATH)",
    )
    actions.add_parser(
        "runtime-class",
        parents=[name],
        help="print the RuntimeClass",
        description=f"Print the RuntimeClass for the runtime, selecting nodes {NODE_LABEL}=true.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action."""
    from wasidispatch.node import runtime_class

    if args.node_action == "runtime-class":
        sys.stdout.write(runtime_class(args.name))
        return 0
    return _install(args)


def _install(args: argparse.Namespace) -> int:
    from wasidispatch.node import NODE_LABEL, RUNTIME_TYPE, install, runtime_class

    try:
        result = install(
            args.config, name=args.name, dry_run=args.dry_run, shim_path=args.shim_path
        )
    except OSError as exc:  # not root, a read-only /etc: one line, the file untouched
        print(f"wasidispatch node install: {args.config}: {exc}", file=sys.stderr)
        return 1
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    out = sys.stdout
    where = f"{result.table} (runtime_type = {RUNTIME_TYPE!r})"
    if result.action == "already-installed":
        out.write(f"already installed: {result.path} defines {where}; nothing changed\n")
    elif result.dry_run:
        verb = "create" if result.action == "created" else "change"
        out.write(f"dry run: would {verb} {result.path} (nothing written):\n{result.diff}")
    elif result.action == "created":
        out.write(
            f"created {result.path} (there was none): a minimal version 2 config with {where}\n"
        )
    else:
        out.write(f"added {where} to {result.path}\n")
        out.write(f"backup: {result.backup}\n")
    for line in result.notes:
        out.write(f"note: {line}\n")
    if result.dry_run:
        return 0
    step = 1
    out.write("\nnext steps:\n")
    if result.changed:
        out.write(f"  {step}. restart containerd: systemctl restart containerd\n")
        step += 1
    host = socket.gethostname().lower()  # the kubelet's default node name
    out.write(
        f"  {step}. label this node: kubectl label node <node> {NODE_LABEL}=true"
        f"   (<node>: usually {host})\n"
    )
    out.write(f"  {step + 1}. apply the RuntimeClass (kubectl apply -f -):\n\n")
    out.write(runtime_class(result.name))
    return 0
