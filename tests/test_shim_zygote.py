"""The zygote and Wasm containers forked from it (`wasidispatch.wasmshim`), without containerd.

Each test runs a small driver in its own process: it becomes a child subreaper (so the
container processes, grandchildren of the zygote, are re-parented to it as to the shim), forks
the zygote while single-threaded, and only then starts threads, as the shim daemon does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.guests import guest_bytes
from wasidispatch._bundles import wasm_bundle

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroups and the subreaper need root"),
]

_PRELUDE = textwrap.dedent(
    """
    import ctypes, json, os, sys, threading, time
    assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0   # PR_SET_CHILD_SUBREAPER
    from wasidispatch.wasmshim.zygote import Zygote
    zygote = Zygote.start()                                # single-threaded still
    from wasidispatch.shim.reaper import Reaper
    from wasidispatch.shim.instance import CreateRequest, Stdio
    from wasidispatch.wasmshim.wasm import create_wasm
    Reaper.default().start()

    def request(cid, bundle, out):
        spec = json.load(open(os.path.join(bundle, "config.json")))
        return CreateRequest(id=cid, bundle=bundle, namespace="t", stdio=Stdio("", out, out),
                             spec=spec)
    """
)


def _drive(body: str, env: dict[str, str], timeout: float = 240) -> dict[str, object]:
    script = _PRELUDE + textwrap.dedent(body)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def _cache_env(tmp_path: Path) -> dict[str, str]:
    return {
        "WASIDISPATCH_CACHE_DIR": str(tmp_path / "cache"),
        "WASIDISPATCH_ENGINE": "wasmtime-fast",
    }


def test_two_hundred_containers_from_eight_threads(tmp_path: Path) -> None:
    """The fork-safety stress test: 200 containers created, started and waited for from 8
    threads at once (while other threads keep the daemon-like process busy), each with its
    own output and exit code, and the zygote single-threaded at every moment we look."""
    bundle = wasm_bundle(tmp_path / "b", guest_bytes("c", "say"), ["/app.wasm"])
    result = _drive(
        f"""
        bundle = {str(bundle)!r}
        base = json.load(open(os.path.join(bundle, "config.json")))
        outs, codes, zthreads, errors = {{}}, {{}}, [], []
        stop = threading.Event()
        def busy():                                        # threads that hold locks, allocate
            while not stop.is_set():
                json.dumps([list(range(100))] * 10); time.sleep(0)
        noise = [threading.Thread(target=busy, daemon=True) for _ in range(3)]
        for t in noise: t.start()
        def worker(w):
            for i in range(w, 200, 8):
                try:
                    b = os.path.join({str(tmp_path)!r}, f"c{{i}}")
                    os.makedirs(b, exist_ok=True)
                    spec = dict(base); spec["process"] = dict(base["process"])
                    spec["process"]["args"] = ["/app.wasm", f"container-{{i}}", str(i % 100)]
                    spec["root"] = {{"path": os.path.join(bundle, "rootfs"), "readonly": True}}
                    json.dump(spec, open(os.path.join(b, "config.json"), "w"))
                    out = os.path.join(b, "out")
                    open(out, "w").close()
                    inst = create_wasm(request(f"c{{i}}", b, out), zygote)
                    zthreads.append(zygote.threads())
                    inst.start()
                    codes[i] = inst.wait().status
                    inst.delete()
                    outs[i] = open(out).read()
                except Exception as exc:
                    errors.append(f"{{i}}: {{exc!r}}")
        workers = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        t0 = time.monotonic()
        for t in workers: t.start()
        for t in workers: t.join(200)
        elapsed = time.monotonic() - t0
        stop.set()
        print(json.dumps({{"outs": outs, "codes": codes, "zthreads": sorted(set(zthreads)),
                          "errors": errors, "alive": [t.is_alive() for t in workers],
                          "elapsed": elapsed}}))
        """,
        _cache_env(tmp_path),
    )
    assert result["errors"] == []
    assert result["alive"] == [False] * 8  # no deadlock
    outs, codes = result["outs"], result["codes"]
    assert isinstance(outs, dict)
    assert isinstance(codes, dict)
    assert sorted(int(i) for i in outs) == list(range(200))
    for i in range(200):
        assert outs[str(i)] == f"container-{i}\n"
        assert codes[str(i)] == i % 100
    assert result["zthreads"] == [1]


def test_wait_for_start_kill_pause_stats_and_cleanup(tmp_path: Path) -> None:
    cgroup = f"/wasidispatch-test-{os.getpid()}/loop"
    bundle = wasm_bundle(tmp_path / "loop", guest_bytes("c", "loop"), ["/app.wasm"])
    spec = json.loads((bundle / "config.json").read_text())
    spec.setdefault("linux", {})["cgroupsPath"] = cgroup
    (bundle / "config.json").write_text(json.dumps(spec))
    result = _drive(
        f"""
        b = {str(bundle)!r}
        out = os.path.join(b, "out"); open(out, "w").close()
        inst = create_wasm(request("loop", b, out), zygote)
        pid = inst.pid
        cg = open(f"/proc/{{pid}}/cgroup").read()
        def cpu():
            fields = open(f"/proc/{{pid}}/stat").read().split(")")[1].split()
            return int(fields[11]) + int(fields[12])
        before_start = cpu(); time.sleep(0.3); waited = cpu() - before_start
        inst.start(); time.sleep(0.5)
        inst.pause(); time.sleep(0.1); frozen_at = cpu()
        time.sleep(0.5); frozen = cpu() - frozen_at
        inst.resume(); time.sleep(0.3); thawed = cpu() - frozen_at
        from wasidispatch.shim._pb import cgroups_v1_pb2, cgroups_v2_pb2
        stats = inst.stats()
        v1 = stats.type_url.endswith("v1.Metrics")
        m = (cgroups_v1_pb2.Metrics if v1 else cgroups_v2_pb2.Metrics).FromString(stats.value)
        memory = m.memory.usage.usage if hasattr(m.memory, "rss") else m.memory.usage
        pids = inst.pids()
        leaves = list(inst.leaves)
        inst.kill(15, True)
        code = inst.wait().status
        try:
            inst.kill(9); again = "no error"
        except Exception as exc:
            again = type(exc).__name__
        inst.delete()
        print(json.dumps({{"cgroup": cg, "waited": waited, "frozen": frozen, "thawed": thawed,
                          "memory": memory, "pids": pids, "pid": pid, "code": code,
                          "again": again, "left": [l for l in leaves if os.path.exists(l)]}}))
        """,
        _cache_env(tmp_path),
    )
    assert cgroup in str(result["cgroup"])  # it joined the spec's cgroup
    assert result["waited"] == 0  # blocked until Start, not spinning
    assert result["frozen"] == 0  # the freezer stopped the looping guest
    assert isinstance(result["thawed"], int)
    assert result["thawed"] > 0
    assert isinstance(result["memory"], int)
    assert result["memory"] > 0
    assert result["pids"] == [result["pid"]]
    assert result["code"] == 143  # SIGTERM: 128 + 15
    assert result["again"] == "NotFoundError"
    assert result["left"] == []  # delete removed the cgroup it made
    for h in Path("/sys/fs/cgroup").iterdir():
        parent = h / cgroup.strip("/").split("/")[0]
        if parent.is_dir():
            parent.rmdir()


def test_a_module_that_does_not_compile_leaves_nothing(tmp_path: Path) -> None:
    bundle = wasm_bundle(tmp_path / "bad", b"\0asm\x01\0\0\0\x99garbage", ["/app.wasm"])
    result = _drive(
        f"""
        b = {str(bundle)!r}
        try:
            create_wasm(request("bad", b, "/dev/null"), zygote); error = ""
        except Exception as exc:
            error = f"{{type(exc).__name__}}: {{exc}}"
        time.sleep(0.2)
        def parent(p):
            return open(f"/proc/{{p}}/stat").read().split(")")[1].split()[1]
        children = [p for p in os.listdir("/proc") if p.isdigit() and p != str(os.getpid())
                    and parent(p) == str(os.getpid()) and int(p) != zygote.pid]
        print(json.dumps({{"error": error, "children": children}}))
        """,
        _cache_env(tmp_path),
    )
    assert str(result["error"]).startswith("ShimError: create bad: /app.wasm:")
    assert result["children"] == []


def test_exec_is_refused_clearly(tmp_path: Path) -> None:
    bundle = wasm_bundle(tmp_path / "h", guest_bytes("c", "hello"), ["/app.wasm"])
    result = _drive(
        f"""
        from wasidispatch.shim.instance import Stdio
        b = {str(bundle)!r}
        inst = create_wasm(request("h", b, "/dev/null"), zygote)
        try:
            inst.exec("e1", {{"args": ["sh"]}}, Stdio()); error = None
        except Exception as exc:
            error = [type(exc).__name__, getattr(exc, "code", None), str(exc)]
        inst.delete()
        print(json.dumps({{"error": error}}))
        """,
        _cache_env(tmp_path),
    )
    error = result["error"]
    assert isinstance(error, list)
    assert error[:2] == ["UnimplementedError", 12]
    assert "not supported" in str(error[2])
