"""runc's log: ``--log FILE`` and ``--log-format text|json``.

containerd's runc shim reads the last ``"level":"error"`` line of ``<bundle>/log.json`` and
shows its ``msg`` (``OCI runtime create failed: <msg>``), so errors are appended there as one
JSON object per line. Without ``--log`` runc writes to stderr; so do we. Nothing is ever
written to the container's own stdio when a log file is given. The log is opened by
`wasidispatch._fs.append_fd`: a symlink planted at its name, or anything but a regular file
or a FIFO, is refused and the record dropped (runc would follow it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

__all__ = ["RuntimeLog"]


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


class RuntimeLog:
    """Append runc-style records to ``path`` (stderr when ``None``) in ``fmt`` (text|json).

    Example::

        >>> import tempfile, json, os
        >>> path = os.path.join(tempfile.mkdtemp(), "log.json")
        >>> RuntimeLog(path, "json").error("container not running")
        >>> json.loads(open(path).read())["msg"]
        'container not running'
    """

    def __init__(self, path: str | None, fmt: str = "text", *, debug: bool = False) -> None:
        self.path = path
        self.fmt = fmt
        self.debug_enabled = debug

    def error(self, msg: str) -> None:
        """Record an error (what containerd shows the user)."""
        self._write("error", msg)

    def warning(self, msg: str) -> None:
        """Record a warning."""
        self._write("warning", msg)

    def debug(self, msg: str) -> None:
        """Record a debug line when ``--debug`` was given."""
        if self.debug_enabled:
            self._write("debug", msg)

    def _format(self, level: str, msg: str) -> str:
        import json

        stamp = _now()
        if self.fmt == "json":
            return json.dumps({"level": level, "msg": msg, "time": stamp}) + "\n"
        return f"time={json.dumps(stamp)} level={level} msg={json.dumps(msg)}\n"

    def hold(self) -> int | None:
        """Open the log now and write through that descriptor from here on (a container
        process about to leave the host's file system); the fd, or ``None``."""
        if self.path is None:
            return None
        from wasidispatch._fs import append_fd

        try:
            self._held = append_fd(self.path)
        except OSError:
            return None
        return self._held

    def _write(self, level: str, msg: str) -> None:
        line = self._format(level, msg)
        held = getattr(self, "_held", None)
        if held is not None:
            with contextlib.suppress(OSError):
                os.write(held, line.encode())
            return
        if self.path is None:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except OSError:
                pass
            return
        from wasidispatch._fs import append_fd  # only when there is something to log

        try:
            # never through a symlink planted at the log's name, nor into a device
            fd = append_fd(self.path)
        except OSError:
            return
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
