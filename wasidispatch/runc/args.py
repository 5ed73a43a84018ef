"""runc's command line, parsed the way runc (urfave/cli over Go's ``flag``) reads it.

``runc [global options] command [command options] [arguments...]``: flags may be written
``-name`` or ``--name``, with the value as ``=value`` or as the next word; boolean flags take
no value (``--all``, or ``--all=false``). Flags of a subcommand may also follow its
positional arguments (urfave/cli reorders them), except after ``exec``'s container id, where
the process's own argv begins; ``--`` ends the flags. Only the flags runc
knows are accepted: anything else is a `UsageError`, and the caller then hands the whole
command line to the real runc so the user sees runc's own message.
"""

from __future__ import annotations

__all__ = ["COMMAND_FLAGS", "GLOBAL_FLAGS", "Invocation", "UsageError", "parse"]

# flag name -> takes a value. Aliases map to their long name in _ALIASES.
GLOBAL_FLAGS: dict[str, bool] = {
    "debug": False,
    "log": True,
    "log-format": True,
    "root": True,
    "criu": True,
    "systemd-cgroup": False,
    "rootless": True,
    "help": False,
    "version": False,
}
_GLOBAL_ALIASES = {"h": "help", "v": "version"}

_CREATE = {
    "bundle": True,
    "console-socket": True,
    "pid-file": True,
    "no-pivot": False,
    "no-new-keyring": False,
    "preserve-fds": True,
}
COMMAND_FLAGS: dict[str, dict[str, bool]] = {
    "create": _CREATE,
    "run": {**_CREATE, "detach": False, "no-subreaper": False, "keep": False},
    "start": {},
    "state": {},
    "kill": {"all": False},
    "delete": {"force": False},
    "ps": {"format": True},
    "pause": {},
    "resume": {},
    "features": {},
    "list": {"format": True, "quiet": False},
    "events": {"stats": False, "interval": True},
    "exec": {
        "console-socket": True,
        "pidfd-socket": True,
        "cwd": True,
        "env": True,
        "tty": False,
        "user": True,
        "additional-gids": True,
        "process": True,
        "detach": False,
        "pid-file": True,
        "process-label": True,
        "apparmor": True,
        "no-new-privs": False,
        "cap": True,
        "preserve-fds": True,
        "cgroup": True,
        "ignore-paused": False,
    },
    "update": {
        "resources": True,
        "blkio-weight": True,
        "cpu-period": True,
        "cpu-quota": True,
        "cpu-share": True,
        "cpu-rt-period": True,
        "cpu-rt-runtime": True,
        "cpuset-cpus": True,
        "cpuset-mems": True,
        "kernel-memory": True,
        "kernel-memory-tcp": True,
        "memory": True,
        "cpu-idle": True,
        "memory-reservation": True,
        "memory-swap": True,
        "pids-limit": True,
        "l3-cache-schema": True,
        "mem-bw-schema": True,
    },
}
_COMMAND_ALIASES: dict[str, dict[str, str]] = {
    "create": {"b": "bundle"},
    "run": {"b": "bundle", "d": "detach"},
    "kill": {"a": "all"},
    "delete": {"f": "force"},
    "ps": {"f": "format"},
    "list": {"f": "format", "q": "quiet"},
    "exec": {"e": "env", "t": "tty", "u": "user", "g": "additional-gids", "p": "process"},
    "update": {"r": "resources"},
}

# After the container id, ``exec`` takes the process's own argv (``sh -c ...``): no flags.
_NO_REORDER = frozenset({"exec"})

_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


class UsageError(Exception):
    """The command line is not one runc would accept the way we read it."""


class Invocation:
    """One parsed call: global options, the subcommand, its options and its arguments.

    Option values are ``str`` for value flags and ``bool`` for boolean flags; repeated value
    flags (``exec --env``) keep the last value, which is all this runtime reads. (A plain
    class, not a dataclass: importing ``dataclasses`` costs more than this whole module.)

    Example::

        >>> inv = parse(["--root", "/run/x", "kill", "--all", "c1", "9"])
        >>> inv.command, inv.root, inv.options, inv.args
        ('kill', '/run/x', {'all': True}, ['c1', '9'])
    """

    def __init__(self) -> None:
        self.global_options: dict[str, str | bool] = {}
        self.command: str | None = None
        self.options: dict[str, str | bool] = {}
        self.args: list[str] = []

    def __repr__(self) -> str:
        return (
            f"Invocation({self.global_options!r}, {self.command!r}, {self.options!r}, "
            f"{self.args!r})"
        )

    @property
    def root(self) -> str:
        """State directory (runc's default ``/run/runc``)."""
        value = self.global_options.get("root")
        return value if isinstance(value, str) and value else "/run/runc"

    @property
    def log_path(self) -> str | None:
        """``--log`` file, ``None`` for stderr."""
        value = self.global_options.get("log")
        return value if isinstance(value, str) and value and value != "/dev/stderr" else None

    @property
    def log_format(self) -> str:
        """``text`` or ``json``."""
        value = self.global_options.get("log-format")
        return value if isinstance(value, str) and value else "text"

    def flag(self, name: str) -> bool:
        """A boolean option of the subcommand (or a global one)."""
        value = self.options.get(name, self.global_options.get(name, False))
        return value is True

    def value(self, name: str) -> str | None:
        """A value option of the subcommand, ``None`` when absent."""
        value = self.options.get(name)
        return value if isinstance(value, str) else None


def _split_flag(word: str) -> tuple[str, str | None] | None:
    """``--name=value`` -> (name, value); not a flag -> None."""
    if word in ("-", "--") or not word.startswith("-"):
        return None
    body = word[2:] if word.startswith("--") else word[1:]
    if not body or body.startswith("-"):
        return None
    name, eq, value = body.partition("=")
    return name, (value if eq else None)


def _take(
    words: list[str],
    i: int,
    table: dict[str, bool],
    aliases: dict[str, str],
    out: dict[str, str | bool],
) -> int:
    """Consume the flag at ``words[i]`` into ``out``; return the next index."""
    split = _split_flag(words[i])
    assert split is not None
    name, value = split
    name = aliases.get(name, name)
    if name not in table:
        raise UsageError(f"flag provided but not defined: -{name}")
    if table[name]:
        if value is None:
            if i + 1 >= len(words):
                raise UsageError(f"flag needs an argument: -{name}")
            value = words[i + 1]
            i += 1
        out[name] = value
    elif value is None or value in _TRUE:
        out[name] = True
    elif value in _FALSE:
        out[name] = False
    else:
        raise UsageError(f"invalid boolean value {value!r} for -{name}")
    return i + 1


def parse(argv: list[str]) -> Invocation:
    """Parse runc's command line (without the program name); raises `UsageError`.

    Example::

        >>> inv = parse(["--log=/b/log.json", "create", "-b", "/b", "--pid-file", "/b/p", "c"])
        >>> inv.log_path, inv.value("bundle"), inv.args
        ('/b/log.json', '/b', ['c'])
    """
    inv = Invocation()
    i = 0
    while i < len(argv) and _split_flag(argv[i]) is not None:
        i = _take(argv, i, GLOBAL_FLAGS, _GLOBAL_ALIASES, inv.global_options)
    if i < len(argv) and argv[i] == "--":
        i += 1
    if i >= len(argv):
        return inv
    command = argv[i]
    if command not in COMMAND_FLAGS:
        raise UsageError(f"no such command: {command}")
    inv.command = command
    table = {**COMMAND_FLAGS[command], "help": False}
    aliases = {**_COMMAND_ALIASES.get(command, {}), "h": "help"}
    i += 1
    while i < len(argv):
        word = argv[i]
        if word == "--":
            inv.args.extend(argv[i + 1 :])
            break
        if _split_flag(word) is not None and not (inv.args and command in _NO_REORDER):
            i = _take(argv, i, table, aliases, inv.options)
        else:
            inv.args.append(word)
            i += 1
    return inv
