"""Fuzzing runc's command line parser (`wasidispatch.runc.args.parse`).

Whatever argv containerd, a user or an attacker passes, `parse` returns an `Invocation` or
raises the documented `UsageError` (``main`` then hands the line to the real runc): never
another exception. Words are drawn from runc's own flag and command names, spelled every way
runc reads them, mixed with arbitrary text.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from wasidispatch.runc.args import COMMAND_FLAGS, GLOBAL_FLAGS, Invocation, UsageError, parse

_NAMES = sorted({*GLOBAL_FLAGS, *(f for table in COMMAND_FLAGS.values() for f in table)})
_SHORT = ["h", "v", "b", "d", "a", "f", "q", "e", "t", "u", "g", "p", "r"]

_flag = st.builds(
    lambda dashes, name, value: dashes + name + value,
    st.sampled_from(["-", "--", "---"]),
    st.sampled_from(_NAMES + _SHORT + ["", "=", "x"]),
    st.sampled_from(["", "=", "=true", "=false", "=maybe", "=0", "=1", "=/run/x", "=-"]),
)
_word = st.one_of(
    _flag,
    st.sampled_from([*sorted(COMMAND_FLAGS), "--", "-", "", "help", "c1", "KILL", "9"]),
    st.text(max_size=12),
)
_argv = st.lists(_word, max_size=12)

_FUZZ = settings(max_examples=400, deadline=None)


def _consistent(inv: Invocation) -> None:
    """What the runtime reads from an Invocation is always of the documented type."""
    assert inv.command is None or inv.command in COMMAND_FLAGS
    assert isinstance(inv.root, str)
    assert inv.log_path is None or isinstance(inv.log_path, str)
    assert isinstance(inv.log_format, str)
    assert all(isinstance(a, str) for a in inv.args)
    for table in (inv.options, inv.global_options):
        assert all(isinstance(v, (str, bool)) for v in table.values())
    for name in _NAMES:
        assert isinstance(inv.flag(name), bool)
        value = inv.value(name)
        assert value is None or isinstance(value, str)


@_FUZZ
@given(st.one_of(_argv, st.lists(st.text(), max_size=8)))  # runc-shaped, or any text
def test_fuzz_parse_raises_only_usage_error(argv: list[str]) -> None:
    try:
        inv = parse(argv)
    except UsageError:
        return
    _consistent(inv)


@_FUZZ
@given(
    command=st.sampled_from(sorted(COMMAND_FLAGS)),
    before=st.lists(
        st.sampled_from(
            ["--debug", "--root=/r", "--log=/l", "--log-format=json", "-v", "--systemd-cgroup"]
        ),
        max_size=4,
    ),
    after=st.lists(_word, max_size=6),
)
def test_fuzz_each_subcommand(command: str, before: list[str], after: list[str]) -> None:
    """Past the global flags, every subcommand's own table is exercised."""
    argv = [*before, command, *after]
    try:
        inv = parse(argv)
    except UsageError:
        return
    assert inv.command == command
    _consistent(inv)
