"""A terminal's copy loops, shared by the shim's Wasm and Linux containers.

A container with ``terminal: true`` has a pty; the shim holds its master and copies it to
containerd's stdout FIFO and the stdin FIFO to it, one thread each, until EOF or an error.
Each loop works on its own duplicates of both descriptors: the owner may close the
originals while a loop is blocked, and a number reused meanwhile must never be read or
written by it. The FIFOs `connect` opens belong to the caller, which closes them.
"""

from __future__ import annotations

import os
import threading

from wasidispatch.shim.instance import Stdio

__all__ = ["connect", "pump", "resize"]


def pump(src: int, dst: int, name: str) -> threading.Thread:
    """Copy ``src`` to ``dst`` on a daemon thread until EOF or an error."""
    src, dst = os.dup(src), os.dup(dst)

    def run() -> None:
        try:
            while True:
                data = os.read(src, 65536)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(dst, view) :]
        except OSError:
            return
        finally:
            os.close(src)
            os.close(dst)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def connect(master: int, stdio: Stdio, name: str) -> list[int]:
    """Open containerd's FIFOs of ``stdio`` and start copying between them and the pty's
    ``master``; returns the descriptors opened (the caller closes them)."""
    opened: list[int] = []
    if stdio.stdout:
        out = os.open(stdio.stdout, os.O_RDWR | os.O_CLOEXEC)
        opened.append(out)
        pump(master, out, name)
    if stdio.stdin:
        src = os.open(stdio.stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(src, True)
        opened.append(src)
        pump(src, master, name)
    return opened


def resize(master: int, width: int, height: int) -> None:
    """Set the pty's window size."""
    import fcntl
    import struct
    import termios

    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
