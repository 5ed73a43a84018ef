"""The shim's `Reaper`: exit codes, signals, fds, timeouts, re-parented orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from wasidispatch.errors import ShimError
from wasidispatch.shim.reaper import Reaper, exit_code


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    r.start()
    yield r
    r.close()


def test_exit_codes_and_output(reaper: Reaper) -> None:
    done = reaper.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (done.code, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    big = os.urandom(300_000)
    assert reaper.run(["cat"], input=big).stdout == big  # no pipe deadlock either way


def test_death_by_signal_is_128_plus_n(reaper: Reaper) -> None:
    pid = reaper.spawn(["sleep", "30"])
    assert reaper.poll(pid) is None
    os.kill(pid, signal.SIGTERM)
    assert reaper.wait(pid, 10).status == 143
    assert exit_code(signal.SIGKILL) == 137


def test_many_waiters_see_one_exit(reaper: Reaper) -> None:
    pid = reaper.spawn(["sh", "-c", "sleep 0.2; exit 4"])
    seen: list[int] = []
    threads = [
        threading.Thread(target=lambda: seen.append(reaper.wait(pid, 10).status)) for _ in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert seen == [4] * 5
    reaper.forget(pid)
    with pytest.raises(ShimError, match="not watched"):
        reaper.wait(pid, 1)


def test_fds_reach_their_numbers_and_nothing_else_leaks(reaper: Reaper) -> None:
    r, w = os.pipe()
    leak_r, leak_w = os.pipe()  # close-on-exec: must not reach the child
    try:
        assert reaper.run(["sh", "-c", "echo via3 >&3"], fds={3: w}).code == 0
        os.close(w)
        assert os.read(r, 100) == b"via3\n"
        listing = reaper.run(["ls", "/proc/self/fd"], fds={3: leak_r})
        fds = {int(x) for x in listing.stdout.split()}
        assert {0, 1, 2, 3} <= fds
        assert leak_w not in fds
        assert leak_r not in fds or leak_r == 3
    finally:
        for fd in (r, leak_r, leak_w):
            os.close(fd)


def test_a_source_already_at_its_target_is_inherited(reaper: Reaper) -> None:
    r, w = os.pipe()
    try:
        code = f"import os; os.write({w}, b'x\\n')"
        done = reaper.run([sys.executable, "-c", code], fds={w: w})
        assert done.code == 0
        os.close(w)
        assert os.read(r, 10) == b"x\n"
    finally:
        os.close(r)


def test_timeout_kills_and_raises(reaper: Reaper) -> None:
    with pytest.raises(ShimError, match="timed out") as info:
        reaper.run(["sleep", "30"], timeout=0.2)
    assert info.value.code == 4


def test_missing_binary_is_a_clear_error(reaper: Reaper) -> None:
    with pytest.raises(ShimError, match="cannot run /nonexistent/x"):
        reaper.spawn(["/nonexistent/x"])
    with pytest.raises(ShimError):
        reaper.spawn([])


def test_spawned_children_get_default_signals(reaper: Reaper) -> None:
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        pid = reaper.spawn(["sleep", "30"])
    finally:
        signal.signal(signal.SIGTERM, old)
    os.kill(pid, signal.SIGTERM)  # ignored here, default (death) there
    assert reaper.wait(pid, 10).status == 143


_SUBREAPER = textwrap.dedent(
    """
    import ctypes, os, sys
    from wasidispatch.shim.reaper import Reaper
    assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0   # PR_SET_CHILD_SUBREAPER
    reaper = Reaper.default()
    reaper.start(reap_all=True)
    # a child that forks a grandchild and exits: the grandchild is re-parented to us
    r, w = os.pipe()
    done = reaper.run(["sh", "-c", "(sleep 0.3; exit 6) & echo $! >&3"], fds={3: w})
    os.close(w)
    grandchild = int(os.read(r, 100))
    reaper.watch(grandchild)
    print(done.code, reaper.wait(grandchild, 10).status)
    # an orphan nobody watches is reaped too: no zombie stays
    reaper.run(["sh", "-c", "(exit 0) & true"])
    import time; time.sleep(0.3)
    zombies = [p for p in os.listdir("/proc") if p.isdigit()
               and open(f"/proc/{p}/stat").read().split(")")[1].split()[0] == "Z"
               and int(open(f"/proc/{p}/stat").read().split(")")[1].split()[1]) == os.getpid()]
    print(len(zombies))
    """
)


def test_a_subreaper_reaps_reparented_orphans() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SUBREAPER], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "6", "0"]
