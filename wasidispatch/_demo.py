"""The README's main job (``make demo``): grows with the library; see the docstring of main()."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.cri_harness import CriClient, CriContainerd

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "docs" / "examples"
DEMO_DIR = REPO / ".demo"


def detect_demo(workdir: Path = DEMO_DIR) -> int:
    """Run ``wasidispatch detect`` over real files of every kind and print the table.

    Builds the Wasm module and component from the WAT sources in ``docs/examples/`` with
    ``wasmtime.wat2wasm`` into ``workdir`` (when wasmtime is installed), and adds real ELF
    binaries of this machine (``/bin/true``, this Python, a ``.so``), a ``#!`` script, the WAT
    text itself, a Markdown file (unknown), and the tests' arm64 busybox if ``make fixtures``
    fetched it.
    Returns the command's exit status.
    """
    from wasidispatch.cli import main as cli_main

    workdir.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    try:
        import wasmtime
    except ImportError:
        print("(wasmtime not installed: no Wasm binaries built)", file=sys.stderr)
    else:
        for wat in sorted(EXAMPLES.glob("detect-*.wat")):
            out = workdir / (wat.stem.removeprefix("detect-") + ".wasm")
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(bytes(wasmtime.wat2wasm(wat.read_text())))
            os.replace(tmp, out)
            paths.append(str(out))
    paths += [str(p) for p in sorted(EXAMPLES.glob("detect-*.wat"))]
    paths += ["/bin/true", sys.executable]
    spec = importlib.util.find_spec("_ctypes")
    if spec is not None and spec.origin and spec.origin.endswith(".so"):
        link = workdir / "_ctypes.so"  # a short name for the table; detect follows the link
        link.unlink(missing_ok=True)
        link.symlink_to(spec.origin)
        paths.append(str(link))
    for candidate in (Path(sys.executable).parent / "pip", Path("/bin/busybox")):
        if candidate.is_file():
            paths.append(str(candidate))
    arm64 = REPO / "tests" / ".fixtures" / "arm64" / "busybox"
    if arm64.is_file():
        paths.append(str(arm64))
    paths.append(str(REPO / "docs" / "architecture.md"))  # neither Wasm nor Linux: unknown
    rel = [os.path.relpath(p) if p.startswith(str(REPO)) else p for p in paths]
    print("$ wasidispatch detect", " ".join(rel))
    return cli_main(["detect", *rel])


def _build_wasm_app(workdir: Path) -> Path:
    """Compile ``docs/examples/app.c`` with Debian's clang for wasm32-wasi (once)."""
    import shutil
    import subprocess

    source = EXAMPLES / "app.c"
    out = workdir / "app.wasm"
    if out.is_file() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    clang = shutil.which("clang")
    if clang is None:
        raise SystemExit("make demo needs clang (Debian: clang lld wasi-libc); run as root")
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        [clang, "--target=wasm32-wasi", "-O2", "-s", str(source), "-o", str(tmp)], check=True
    )
    os.replace(tmp, out)
    return out


def build_pod(workdir: Path = DEMO_DIR) -> dict[str, Path]:
    """Write the demo's bundles under ``workdir/pod``: a Wasm app (C), a Linux sidecar
    (Debian's busybox-static) and a Wasm component (WAT). Returns name -> bundle dir."""
    import wasmtime

    from wasidispatch._bundles import busybox_bundle, wasm_bundle

    workdir.mkdir(parents=True, exist_ok=True)
    pod = workdir / "pod"
    env = ["PATH=/bin", "POD_NAME=demo-pod"]
    app = wasm_bundle(
        pod / "app",
        _build_wasm_app(workdir),
        ("/app.wasm", "--greet"),
        env=env,
        extra_files={"/etc/greeting.txt": b"app: hello from C compiled to wasm32-wasi\n"},
    )
    sidecar = busybox_bundle(
        pod / "sidecar", ["sh", "-c", "echo sidecar: hello from busybox in runc, pid $$"], env=env
    )
    component_wasm = bytes(wasmtime.wat2wasm((EXAMPLES / "greeter-component.wat").read_text()))
    component = wasm_bundle(pod / "component", component_wasm, ("/greeter.wasm",), env=env)
    return {"app": app, "sidecar": sidecar, "component": component}


def pod_demo(workdir: Path = DEMO_DIR) -> int:
    """Run the demo pod through one `DispatchExecutor` and print, per bundle, the executor
    chosen, why, the output, the exit code and the wall time. Returns 0 when all exited 0."""
    from wasidispatch.cache import PrecompileCache
    from wasidispatch.executor import DispatchExecutor, LinuxExecutor, WasmExecutor
    from wasidispatch.oci.bundle import Bundle

    bundles = build_pod(workdir)
    cache = PrecompileCache(workdir / "cache")
    executor = DispatchExecutor([WasmExecutor(cache=cache), LinuxExecutor("runc")])
    rows: list[tuple[str, str, str, str]] = []
    failed = 0
    for name, path in bundles.items():
        bundle = Bundle.load(path)
        decision = executor.explain(bundle)
        print(f"== {name}: {decision.executor} executor ({os.path.relpath(path)})")
        for item in decision.evidence:
            print(f"   {item}")
        print("-- output:", flush=True)
        ran = executor.run(bundle)
        code, wall = ran.exit_code, ran.seconds * 1000
        sys.stdout.flush()
        why = f" ({ran.why})" if ran.why else ""
        print(f"-- exit code {code}{why}, {wall:.1f} ms\n")
        failed += code != 0
        rows.append((name, decision.executor, str(code), f"{wall:.1f}"))
    print(f"{'bundle':<10} {'executor':<9} {'exit':>4} {'wall ms':>8}")
    for name, chosen, code_text, wall_text in rows:
        print(f"{name:<10} {chosen:<9} {code_text:>4} {wall_text:>8}")
    print(f"\nprecompile cache: {cache.stats()}")
    return 1 if failed else 0


def containerd_demo(workdir: Path = DEMO_DIR) -> int:
    """The pod through a private containerd and ``containerd-shim-wasidispatch-v1`` (root
    only; in a repository checkout, whose ``tests/containerd_harness.py`` runs containerd
    under a temporary directory): a Linux sidecar keeping the pod's shim up, the Wasm app and
    a busybox container in the same group, all served by one shim process."""
    import time

    if os.geteuid() != 0:
        print("== containerd: skipped (needs root: containerd, runc and cgroups)")
        return 0
    try:
        from tests import containerd_harness as h
    except ImportError:
        print("== containerd: skipped (run make demo in the repository: tests/ is needed)")
        return 0
    missing = h.missing_requirements() or h.missing_shim()
    if missing is not None:
        print(f"== containerd: skipped ({missing})")
        return 0
    daemon = h.PrivateContainerd(bytecode=True)
    failed = 0
    try:
        daemon.start()
        images = daemon.base / "images"
        images.mkdir()
        files = {
            "app.wasm": _build_wasm_app(workdir).read_bytes(),
            "etc/greeting.txt": b"app: hello from C compiled to wasm32-wasi, via containerd\n",
        }
        wasm = daemon.import_layout(h.wasm_layout(images / "app", files, "/app.wasm"), "app")
        busybox = daemon.import_layout(h.busybox_layout(images / "busybox"), "busybox")
        pod = {h.GROUP_ANNOTATION: "demo-pod"}
        run = h.SHIM_RUNTIME
        print(f"== a private containerd, runtime {run}, pod annotation {pod}")
        keeper = daemon.run_argv(
            busybox, "sidecar", "sleep", "60", runtime_type=run, annotations=pod, detach=True
        )
        import subprocess

        subprocess.run(keeper, check=True, capture_output=True, timeout=60)
        shim = daemon.shim_pid("sidecar")
        print(f"   sidecar (Linux, runc): busybox sleep, task pid {daemon.task_pid('sidecar')}")
        rows = []
        for cid, image, args, kind in (
            ("app", wasm, ("/app.wasm", "--greet"), "wasm (zygote fork)"),
            (
                "logger",
                busybox,
                ("sh", "-c", "echo logger: hello from busybox in runc"),
                "linux (runc)",
            ),
        ):
            argv = daemon.run_argv(image, cid, *args, runtime_type=run, annotations=pod)
            t0 = time.perf_counter()
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            wall = (time.perf_counter() - t0) * 1000
            print(f"== {cid}: {kind}")
            print(f"-- output:\n{out.stdout}{out.stderr}", end="")
            print(f"-- exit code {out.returncode}, ctr run --rm {wall:.0f} ms\n")
            failed += out.returncode != 0
            rows.append((cid, kind, out.returncode, wall))
        same = daemon.shim_pid("sidecar") == shim
        print(f"one shim process for the pod: pid {shim} ({'yes' if same else 'NO'})")
        failed += not same
        daemon.ctr("tasks", "kill", "--signal", "SIGKILL", "sidecar")
        daemon.wait_status("sidecar", "STOPPED")
        daemon.remove("sidecar")
        print(f"left behind: {daemon.settle()}")
    except Exception as exc:
        print(f"== containerd demo failed: {exc}\n{daemon.log()}")
        failed += 1
    finally:
        daemon.stop()
    return 1 if failed else 0


_WASM_REF = "localhost/wasidispatch-demo/app:demo"
_CREATE_LINE = re.compile(r"wasidispatch\.shim: create ([0-9a-f]+): (wasm|linux) \((.*)\)$")
_SERVING_LINE = re.compile(r"wasidispatch\.shim: shim \S+ serving on \S+ \(pid (\d+)\)$")


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rpartition(")")[2].split()[1])


def cri_demo(workdir: Path = DEMO_DIR) -> int:
    """A Kubernetes-style pod through containerd's CRI plugin and our shim (root only; in a
    repository checkout, with grpcio and grpcio-tools): a Wasm app, a Wasm writer and a
    busybox sidecar that ships what the writer puts in a shared host directory.

    Per container it prints the shim's own decision (its ``create ID: wasm|linux (why)``
    line, which reaches containerd's debug log), the CRI log, the exit code and reason from
    ``ContainerStatus`` and the timings; then that one shim process served the pod, and
    what was left after ``StopPodSandbox`` and ``RemovePodSandbox``.
    """
    import tempfile

    if os.geteuid() != 0:
        print("== CRI pod: skipped (needs root: containerd, runc and cgroups)")
        return 0
    try:
        from tests import containerd_harness as h
        from tests import cri_harness as c
        from tests.guests import build_c
    except ImportError:
        print("== CRI pod: skipped (run make demo in the repository: tests/ is needed)")
        return 0
    missing = h.missing_requirements() or h.missing_shim()
    if missing is not None:
        print(f"== CRI pod: skipped ({missing})")
        return 0
    if h.missing_grpc() is not None:
        print(f"== CRI pod: skipped ({h.missing_grpc()}; `make test` installs them)")
        return 0
    import shutil

    if shutil.which("gcc") is None:  # the pause image is a static C binary built here
        print("== CRI pod: skipped (needs gcc and libc6-dev for the pause image)")
        return 0

    failed = 0
    with tempfile.TemporaryDirectory(prefix="wasidispatch-demo-cri-") as scratch:
        tmp = Path(scratch)
        shared, logs = tmp / "shared", tmp / "logs"
        shared.mkdir()
        try:
            with c.cri_containerd(tmp, debug=True) as daemon:
                cri = daemon.client()
                version = cri.version()
                print(
                    f"== CRI: a private {version.runtime_name} {version.runtime_version}"
                    f" (CRI {version.runtime_api_version}), runtime handler {c.SHIM_HANDLER!r}"
                    f" = {h.SHIM_RUNTIME}"
                )
                wasm_files = {
                    "app.wasm": _build_wasm_app(workdir).read_bytes(),
                    "files.wasm": build_c("files").read_bytes(),
                    "etc/greeting.txt": b"app: hello from C compiled to wasm32-wasi, via CRI\n",
                }
                wasm = c.import_wasm(daemon, tmp / "wasm", wasm_files, "/app.wasm", _WASM_REF)
                busybox = c.import_busybox(daemon, tmp / "busybox")
                print(
                    f"   images (built here, not pulled): {wasm} (app.wasm, files.wasm), {busybox}"
                )
                try:
                    failed += _cri_pod(daemon, cri, wasm, busybox, shared, logs)
                except Exception as exc:  # containerd's log goes with its directory
                    print(f"== CRI demo failed: {type(exc).__name__}: {exc}\n{daemon.log()}")
                    failed += 1
            gone = not daemon.base.exists() and daemon.processes() == []
            print(f"containerd stopped, its directory removed: {'yes' if gone else 'NO'}")
            failed += not gone
        except Exception as exc:
            print(f"== CRI demo failed: {type(exc).__name__}: {exc}")
            failed += 1
    return 1 if failed else 0


def _cri_pod(
    daemon: CriContainerd, cri: CriClient, wasm: str, busybox: str, shared: Path, logs: Path
) -> int:
    """`cri_demo`'s pod, on a started `tests.cri_harness.CriContainerd`; the count of
    things that went wrong."""
    import time

    from tests import cri_harness as c

    t0 = time.perf_counter()
    pod = cri.run_pod(
        "demo-pod",
        runtime_handler=c.SHIM_HANDLER,
        log_directory=logs,
        cgroup_parent=daemon.pod_cgroup("demo-pod"),
    )
    run_ms = (time.perf_counter() - t0) * 1000
    pause = int(cri.pod_info(pod.id)["pid"])
    shim = _ppid(pause)
    print(f"   RunPodSandbox demo-pod: {run_ms:.0f} ms (pause pid {pause}, its parent {shim})")
    volume = [cri.mount(shared, "/shared")]
    # the logging-sidecar pattern: the Wasm writer fills a file of a shared host directory,
    # the Linux sidecar ships it to its own stdout (the CRI log); it waits for the last line
    sidecar_sh = (
        "i=0; until grep -qx 'writer: done' /shared/app.log 2>/dev/null; do"
        " i=$((i+1)); [ $i -lt 1500 ] || { echo 'sidecar: the writer never finished' >&2;"
        " exit 1; }; sleep 0.02; done;"
        " echo 'sidecar: shipping /shared/app.log (busybox in runc)';"
        " sed 's/^/sidecar: | /' /shared/app.log"
    )
    specs = (
        ("sidecar", busybox, ["sh", "-c", sidecar_sh]),
        ("app", wasm, ["/app.wasm", "--greet"]),
        (
            "writer",
            wasm,
            [
                "/files.wasm",
                "write",
                "/shared/app.log",
                "writer: line 1 from Wasm\nwriter: line 2 from Wasm\nwriter: done\n",
            ],
        ),
    )
    rows: dict[str, dict[str, Any]] = {}
    parents: dict[str, int] = {}
    for name, image, command in specs:
        t0 = time.perf_counter()
        cid = cri.create_container(
            pod.id,
            pod.config,
            name,
            image,
            command,
            mounts=volume,
            envs={"POD_NAME": "demo-pod"},
            log_path=f"{name}.log",
        )
        create_ms = (time.perf_counter() - t0) * 1000
        started_ns = time.time_ns()
        t0 = time.perf_counter()
        cri.start_container(cid)
        start_ms = (time.perf_counter() - t0) * 1000
        if name == "sidecar":  # it runs until the writer is done: its parent can be seen
            parents[name] = _ppid(int(cri.container_info(cid)["pid"]))
        rows[name] = {"id": cid, "create": create_ms, "start": start_ms, "t0": started_ns}
    for name in ("app", "writer", "sidecar"):  # the sidecar ends after the writer
        rows[name]["status"] = cri.wait_exited(rows[name]["id"], timeout=30)
    # the shim's own log lines (containerd at debug level passes them on): its decisions
    # and one "serving on" line per shim daemon started
    wanted = {pod.id, *(row["id"] for row in rows.values())}
    deadline = time.monotonic() + 5  # the shim's log reaches containerd through a FIFO
    while True:
        log = (daemon.base / "containerd.log").read_text(errors="replace").splitlines()
        decisions = {m[1]: (m[2], m[3]) for m in map(_CREATE_LINE.search, log) if m}
        if wanted <= decisions.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    serving = [int(m[1]) for m in map(_SERVING_LINE.search, log) if m]
    state = daemon.base / "state" / "io.containerd.runtime.v2.task" / c.CRI_NAMESPACE
    pause_kind, pause_why = decisions.get(pod.id, ("?", "no 'create' line of the shim"))
    print(f"   the pause container: {pause_kind} ({pause_why})\n")
    failed = 0
    for name, row in rows.items():
        cid, status = row["id"], row["status"]
        kind, why = decisions.get(cid, ("?", "no 'create' line of the shim in containerd's log"))
        why = why.replace(f"{state}/{cid}/rootfs", "<rootfs>")
        expected = "linux" if name == "sidecar" else "wasm"
        wrong = "" if kind == expected else f" (NOT {expected}, as expected)"
        print(f"== {name} ({cid[:12]}): {kind}{wrong} ({why})")
        failed += bool(wrong)
        print(f"-- output (CRI log {name}.log):")
        lines = c.read_log(logs / f"{name}.log")
        for line in lines:
            print(f"   {line.stream}: {line.text}")
        if not lines:
            print("   (none: it wrote to /shared/app.log)" if name == "writer" else "   (none)")
        # finished_at is the shim's exit timestamp; StartContainer may return after it
        to_exit = (status.finished_at - row["t0"]) / 1e6
        print(
            f"-- exit code {status.exit_code}, reason {status.reason}; CreateContainer"
            f" {row['create']:.0f} ms, StartContainer->exit {to_exit:.0f} ms"
            f" (the StartContainer call {row['start']:.0f} ms)"
            f"{'; it waits for the writer' if name == 'sidecar' else ''}\n"
        )
        failed += status.exit_code != 0
        row["kind"], row["exit"], row["to_exit"] = kind, status.exit_code, to_exit
    print(f"{'container':<10} {'runs as':<8} {'exit':>4} {'create ms':>9} {'start->exit ms':>14}")
    for name, row in rows.items():
        print(
            f"{name:<10} {row['kind']:<8} {row['exit']:>4} {row['create']:>9.0f}"
            f" {row['to_exit']:>14.0f}"
        )
    one = serving == [shim] and set(parents.values()) == {shim}
    print(
        f"\none shim process for the pod: {'yes' if one else 'NO'} (pid {shim}; shim"
        f" daemons started: {serving}; parent of the pause and of the sidecar:"
        f" {sorted({shim, *parents.values()})})"
    )
    failed += not one
    t0 = time.perf_counter()
    left_cgroups = cri.remove_pod(pod.id)
    remove_ms = (time.perf_counter() - t0) * 1000
    left = daemon.settle()
    nothing = not left_cgroups and not any(left.values()) and cri.list_pod_sandbox() == []
    print(
        f"StopPodSandbox + RemovePodSandbox: {remove_ms:.0f} ms; left behind:"
        f" {'nothing (no process, mount, cgroup, socket, FIFO or state)' if nothing else left}"
    )
    failed += not nothing
    return failed


def main() -> int:
    """``make demo``: the pod (Wasm app, Linux sidecar, Wasm component) dispatched and run,
    the same pod through containerd and the shim, then a pod through containerd's CRI (both
    as root), then the detection table."""
    status = pod_demo()
    print()
    status = status or containerd_demo()
    print()
    status = status or cri_demo()
    print()
    return status or detect_demo()


if __name__ == "__main__":
    sys.exit(main())
