"""A small client of the real runc, for the shim's Linux containers.

Every call goes through the shim's `wasidispatch.shim.reaper.Reaper` (a subreaper must never
let ``subprocess`` wait on its own children). runc's own errors are read from its JSON log
(``--log FILE --log-format json``) for the commands whose stdio is the container's
(``create``, ``exec``), from its stderr otherwise; the last error line becomes the
`wasidispatch.errors.ShimError` message containerd shows.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence

from wasidispatch.errors import NotFoundError, ShimError
from wasidispatch.shim.reaper import Reaper

__all__ = ["Runc", "runc_error"]


def runc_error(text: str) -> str:
    """The last error runc reported in ``text`` (its JSON or text log lines, or stderr).

    >>> runc_error('{"level":"error","msg":"exec: \\\\"nope\\\\": not found"}\\n')
    'exec: "nope": not found'
    """
    last = ""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                last = line
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                last = str(entry.get("msg", line))
            continue
        last = (
            line.removeprefix("time=").split(" msg=", 1)[-1].strip('"') if "msg=" in line else line
        )
    return last


class Runc:
    """runc with a private ``root`` (``binary`` on PATH, ``systemd``: its cgroup driver)."""

    def __init__(
        self,
        root: str,
        *,
        binary: str = "runc",
        systemd: bool = False,
        reaper: Reaper | None = None,
    ) -> None:
        self.root = root
        self.binary = binary
        self.systemd = systemd
        self.reaper = reaper or Reaper.default()

    def _argv(self, *args: str, log: str | None = None) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if log is not None:
            argv += ["--log", log, "--log-format", "json"]
        if self.systemd:
            argv.append("--systemd-cgroup")
        return [*argv, *args]

    def call(
        self, *args: str, input: bytes | None = None, timeout: float = 60.0, what: str = ""
    ) -> bytes:
        """Run ``runc ARGS``; its stdout, or `ShimError` with runc's message."""
        done = self.reaper.run(self._argv(*args), input=input, timeout=timeout)
        if done.code != 0:
            message = runc_error(done.stderr.decode(errors="replace")) or f"exit {done.code}"
            if "container does not exist" in message or "not exist" in message:
                raise NotFoundError(f"runc {what or args[0]}: {message}")
            raise ShimError(f"runc {what or args[0]}: {message}")
        return done.stdout

    def spawn_logged(
        self,
        args: Sequence[str],
        *,
        log: str,
        stdio: tuple[int | None, int | None, int | None],
    ) -> int:
        """Start ``runc ARGS`` whose stdio is the container's; errors go to ``log``."""
        stdin, stdout, stderr = stdio
        return self.reaper.spawn(
            self._argv(*args, log=log), stdin=stdin, stdout=stdout, stderr=stderr
        )

    def finish_logged(self, pid: int, *, log: str, what: str, timeout: float = 60.0) -> None:
        """Wait for a `spawn_logged` runc; `ShimError` with its logged message on failure."""
        try:
            done = self.reaper.wait(pid, timeout)
        except TimeoutError:
            import signal

            os.kill(pid, signal.SIGKILL)
            self.reaper.wait(pid, 10)
            self.reaper.forget(pid)
            raise ShimError(f"runc {what}: timed out after {timeout:g}s") from None
        self.reaper.forget(pid)
        if done.status != 0:
            try:
                with open(log, errors="replace") as fh:
                    text = fh.read()[-65536:]
            except OSError:
                text = ""
            raise ShimError(f"runc {what}: {runc_error(text) or f'exit {done.status}'}")

    def kill(self, cid: str, sig: int, *, all: bool = False) -> None:
        """``runc kill [--all] ID SIG``."""
        self.call("kill", *(["--all"] if all else []), cid, str(sig), what="kill")

    def delete(self, cid: str, *, force: bool = True) -> None:
        """``runc delete --force ID`` (a container that is gone is no error)."""
        with contextlib.suppress(NotFoundError):
            self.call("delete", *(["--force"] if force else []), cid, what="delete")

    def ps(self, cid: str) -> list[int]:
        """The pids of the container (``runc ps --format json``)."""
        out = self.call("ps", "--format", "json", cid, what="ps")
        pids = json.loads(out or b"[]")
        return [int(p) for p in pids] if isinstance(pids, list) else []

    def events_stats(self, cid: str) -> Mapping[str, object]:
        """``runc events --stats ID``'s ``data`` object."""
        out = self.call("events", "--stats", cid, what="events --stats")
        doc = json.loads(out or b"{}")
        data = doc.get("data") if isinstance(doc, dict) else None
        return data if isinstance(data, dict) else {}
