"""engines/_stdio: a reader of the caller's stdin stops when the run ends, without spinning."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator

import pytest

from wasidispatch.engines import Cancel
from wasidispatch.engines._stdio import RunControl, read_chunk


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def _reader(fd: int, control: RunControl) -> tuple[threading.Thread, list[bytes | None]]:
    got: list[bytes | None] = []
    reader = threading.Thread(target=lambda: got.append(read_chunk(fd, control)))
    reader.start()
    return reader, got


def test_a_stdin_reader_stops_at_end_and_reads_nothing_after_the_run(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    control = RunControl(None, Cancel())
    reader, got = _reader(r, control)
    time.sleep(0.1)  # the reader is waiting in poll
    control.end()
    reader.join(10)
    assert not reader.is_alive()
    assert got == [None]
    os.write(w, b"the caller's next bytes")
    assert os.read(r, 100) == b"the caller's next bytes"  # not consumed by the run
    control.close()


def test_a_woken_reader_waits_instead_of_spinning(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    """After a wake (the pump's finish leaves the wake pipe readable), a reader whose
    descriptor is not ready polls at most every `_RETRY` seconds: before, it re-polled
    at once, thousands of times, until the descriptor was ready."""
    polls = 0
    real_poll = select.poll

    class CountingPoll:
        def __init__(self) -> None:
            self._poll = real_poll()

        def register(self, fd: int, mask: int) -> None:
            self._poll.register(fd, mask)

        def poll(self, timeout: int | None = None) -> list[tuple[int, int]]:
            nonlocal polls
            polls += 1
            return self._poll.poll(timeout)

    monkeypatch.setattr(select, "poll", CountingPoll)  # _stdio calls select.poll()
    r, w = pipe
    control = RunControl(None, Cancel())
    reader, got = _reader(r, control)
    time.sleep(0.05)
    control.wake()
    time.sleep(0.3)
    os.write(w, b"x")
    reader.join(10)
    assert got == [b"x"]
    # 0.3 s / 0.01 s is 30 polls; a spinning reader makes tens of thousands
    assert polls < 1000, polls
    control.close()
