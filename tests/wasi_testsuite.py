"""Run the public WASI conformance suite through ``wasidispatch run`` on OCI bundles.

The suite is WebAssembly/wasi-testsuite (its ``prod/testsuite-base`` branch carries the built
``.wasm`` tests). Each test is a ``NAME.wasm`` with an optional ``NAME.json`` spec, read the way
the suite's own runner (``test-runner/wasi_test_runner``) and ``doc/specification.md`` read it:

- legacy keys ``args``, ``env``, ``root``, ``exit_code``, ``stdout``, ``stderr`` (older suites
  also have ``dirs``), or ``operations`` (``run``, ``write``, ``read``, ``wait``) with
  ``proposals``/``world``/``servers``;
- ``env`` is the whole guest environment; ``root`` (relative to the test's directory) is
  preopened as the guest's ``/``; ``args`` follow the module path;
- a ``read`` checks that the stream *starts with* its payload (the reference reads exactly that
  many characters); ``wait`` checks the exit code.

Each test becomes a real bundle in a temporary directory: ``rootfs/`` is a copy of ``root`` (or
empty), the module at ``/NAME.wasm`` inside it, ``process.args`` ``["/NAME.wasm", *args]``,
``process.env`` exactly ``env``, ``process.cwd`` ``/``, ``root.readonly`` false when the test
has a ``root``; legacy ``dirs`` become bind mounts at ``/DIR`` of copies. So the suite is never
written to. Each bundle runs as ``wasidispatch run --engine NAME --cache DIR BUNDLE`` in a
subprocess of its own session, stdin a pipe holding the ``write`` payloads (empty otherwise),
killed with its whole process group at the per-test timeout.

Two deviations are inherent to bundles and stated here once: the guest always has the rootfs
preopened as ``/`` (a test without ``root`` sees a read-only ``/`` holding only its module,
where the reference preopens nothing), and the module itself is a file in that ``/``.

Tests that need sockets, HTTP, another WASI world or several runs are skipped with the reason.

Usage::

    python -m tests.wasi_testsuite SUITE_DIR [--engine NAME ...] [--json] [-k SUBSTRING]

``SUITE_DIR`` is a checkout of the suite (every ``manifest.json`` below it whose ``version`` is
``--wasi-version``, default ``wasm32-wasip1``) or one test directory. Exit status 0 when every
test that ran passed on every engine, 1 otherwise, 2 for a bad invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wasidispatch import _bundles

#: The engines measured by default (``wasidispatch engines`` lists them).
DEFAULT_ENGINES = ("wasmtime", "wasmtime-fast", "wasmer")
DEFAULT_TIMEOUT = 60.0
DEFAULT_VERSION = "wasm32-wasip1"

_LEGACY_KEYS = frozenset({"args", "root", "env", "exit_code", "stderr", "stdout", "dirs"})
_OPERATION_KEYS = frozenset({"operations", "proposals", "world", "servers", "debug"})
_CLI_WORLD = "wasi:cli/command"
_TAIL = 600  # characters of guest stderr kept in a failure's reason


class SpecError(Exception):
    """A test's ``.json`` spec is not one the suite's runner would accept."""


@dataclass(frozen=True, slots=True)
class TestSpec:
    """One test: its module, what it is run with and what it must produce."""

    __test__ = False  # not a pytest class

    test_id: str  # the module's path below SUITE_DIR, without ``.wasm``
    suite: str  # the manifest's name
    wasm: Path
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    root: Path | None = None
    dirs: tuple[Path, ...] = ()
    stdin: str = ""
    stdout: str = ""  # the output must start with this
    stderr: str = ""
    exit_code: int = 0
    skip: str | None = None  # why the test cannot run through a bundle


@dataclass(frozen=True, slots=True)
class TestResult:
    """What one test did on one engine."""

    __test__ = False

    engine: str
    test_id: str
    status: str  # "pass", "fail" or "skip"
    reason: str = ""
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0


@dataclass(slots=True)
class EngineScore:
    """Per-engine totals and the results that were not a pass."""

    engine: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[TestResult] = field(default_factory=list)
    skips: list[TestResult] = field(default_factory=list)

    @property
    def ran(self) -> int:
        """Tests that were run (passed or failed)."""
        return self.passed + self.failed


# --- reading the suite ------------------------------------------------------------------------


def _str_list(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def _str_map(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SpecError(f"{where}: expected an object of strings, got {value!r}")
    return tuple(value.items())


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{where}: expected a string, got {value!r}")
    return value


def _code(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    return value


def _dir(base: Path, value: object, where: str) -> Path:
    path = base / _text(value, where)
    if not path.is_dir():
        raise SpecError(f"{where}: {path} is not a directory")
    return path


def _legacy(spec: dict[str, Any], base: Path, where: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if "args" in spec:
        fields["args"] = _str_list(spec["args"], f"{where}: args")
    if "env" in spec:
        fields["env"] = _str_map(spec["env"], f"{where}: env")
    if spec.get("root") is not None:
        fields["root"] = _dir(base, spec["root"], f"{where}: root")
    if "dirs" in spec:
        names = _str_list(spec["dirs"], f"{where}: dirs")
        fields["dirs"] = tuple(_dir(base, n, f"{where}: dirs") for n in names)
    if spec.get("stdout") is not None:
        fields["stdout"] = _text(spec["stdout"], f"{where}: stdout")
    if spec.get("stderr") is not None:
        fields["stderr"] = _text(spec["stderr"], f"{where}: stderr")
    if "exit_code" in spec:
        fields["exit_code"] = _code(spec["exit_code"], f"{where}: exit_code")
    return fields


def _operations(spec: dict[str, Any], base: Path, where: str) -> dict[str, Any]:
    if spec.get("proposals"):
        return {"skip": f"needs WASI proposals {spec['proposals']!r}"}
    if spec.get("world", _CLI_WORLD) != _CLI_WORLD:
        return {"skip": f"targets the WASI world {spec['world']!r}, not {_CLI_WORLD}"}
    if spec.get("servers"):
        return {"skip": "needs HTTP servers stood up by the runner"}
    ops = spec.get("operations") or [{"type": "run"}, {"type": "wait"}]
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise SpecError(f"{where}: operations: expected a list of objects")
    kinds = [op.get("type") for op in ops]
    if kinds.count("run") != 1 or kinds.count("wait") != 1:
        return {"skip": f"runs the module {kinds.count('run')} times"}
    fields: dict[str, Any] = {"stdin": "", "stdout": "", "stderr": ""}
    for i, op in enumerate(ops):
        at = f"{where}: operations[{i}]"
        kind = op.get("type")
        if kind == "run":
            fields.update(_legacy({k: op[k] for k in ("args", "env", "root") if k in op}, base, at))
        elif kind == "wait":
            fields["exit_code"] = _code(op.get("exit_code", 0), f"{at}: exit_code")
        elif kind == "write":
            fields["stdin"] += _text(op.get("payload", ""), f"{at}: payload")
        elif kind == "read":
            stream = op.get("id", "stdout")
            if stream not in ("stdout", "stderr"):
                raise SpecError(f"{at}: id: no stream {stream!r}")
            fields[stream] += _text(op.get("payload", ""), f"{at}: payload")
        else:
            return {"skip": f"needs the {kind!r} operation (sockets, HTTP or signals)"}
    return fields


def read_spec(wasm: Path, suite_dir: Path, suite_name: str) -> TestSpec:
    """The `TestSpec` of ``wasm`` from the ``.json`` beside it (defaults when there is none).

    Raises `SpecError` naming the file and field when the spec is malformed.
    """
    test_id = str(wasm.relative_to(suite_dir).with_suffix(""))
    spec_file = wasm.with_suffix(".json")
    fields: dict[str, Any] = {}
    if spec_file.is_file():
        where = str(spec_file)
        try:
            doc = json.loads(spec_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpecError(f"{where}: {exc}") from exc
        if not isinstance(doc, dict):
            raise SpecError(f"{where}: expected a JSON object")
        keys = set(doc)
        if keys & _OPERATION_KEYS and keys & _LEGACY_KEYS:
            raise SpecError(f"{where}: mixes legacy keys and operations")
        if keys & _OPERATION_KEYS:
            fields = _operations(doc, wasm.parent, where)
        else:
            fields = _legacy(doc, wasm.parent, where)
    return TestSpec(test_id=test_id, suite=suite_name, wasm=wasm, **fields)


def _suite_dirs(root: Path, version: str) -> Iterator[tuple[Path, str]]:
    manifests = [root / "manifest.json"] if (root / "manifest.json").is_file() else []
    manifests = manifests or sorted(root.rglob("manifest.json"))
    if not manifests and any(root.glob("*.wasm")):
        yield root, root.name  # a bare directory of tests: the runner assumes wasm32-wasip1
        return
    for manifest in manifests:
        try:
            doc = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpecError(f"{manifest}: {exc}") from exc
        if not isinstance(doc, dict):
            raise SpecError(f"{manifest}: expected a JSON object")
        suite_version = doc.get("version", manifest.parent.name)
        if suite_version == version and any(manifest.parent.glob("*.wasm")):
            yield manifest.parent, str(doc.get("name", manifest.parent))


def discover(suite_dir: Path, version: str = DEFAULT_VERSION) -> list[TestSpec]:
    """Every test below ``suite_dir`` whose suite targets ``version``, sorted by id."""
    specs = [
        read_spec(wasm, suite_dir, name)
        for directory, name in _suite_dirs(suite_dir, version)
        for wasm in sorted(directory.glob("*.wasm"))
    ]
    return sorted(specs, key=lambda s: s.test_id)


# --- one test as one bundle -------------------------------------------------------------------


def write_test_bundle(spec: TestSpec, directory: Path) -> Path:
    """The OCI bundle for ``spec`` in ``directory`` (which must not exist yet)."""
    rootfs = directory / "rootfs"
    skip_artifacts = shutil.ignore_patterns("*.cleanup")
    if spec.root is not None:
        shutil.copytree(spec.root, rootfs, symlinks=True, ignore=skip_artifacts)
    mounts: list[dict[str, Any]] = []
    for i, source in enumerate(spec.dirs):
        copy = directory / "mounts" / str(i)
        shutil.copytree(source, copy, symlinks=True, ignore=skip_artifacts)
        destination = f"/{source.name}"
        (rootfs / source.name).mkdir(parents=True, exist_ok=True)
        mounts.append(
            {"destination": destination, "type": "bind", "source": str(copy), "options": ["rbind"]}
        )
    module = f"/{spec.wasm.stem}.wasm"
    return _bundles.wasm_bundle(
        directory,
        spec.wasm,
        (module, *spec.args),
        env=[f"{k}={v}" for k, v in spec.env],
        cwd="/",
        readonly=spec.root is None and not spec.dirs,
        mounts=mounts,
    )


def _text_of(data: bytes) -> str:
    # The reference reads the pipes in text mode: universal newlines, replaced undecodable bytes.
    return data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


_RUNTIME_FRAMES = ("std::", "core::", "__rustc::", "<core::", "<std::", "abort", "__assert")


def _gist(stderr: str) -> str:
    """The lines of guest stderr that say what failed: a Rust panic and its message, a C
    assertion, or else the first line and the innermost frame of the test's own code."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "panicked at" in line:
            return " ".join(lines[i : i + 2])
        if "Assertion failed" in line:
            return line
    frames = [ln.strip()[3:] for ln in lines if ln.strip().startswith("at ")]
    own = next((f for f in frames if not f.startswith(_RUNTIME_FRAMES)), None)
    gist = " ".join(lines[:1] + ([f"in {own}"] if own else []))
    return gist if len(gist) <= _TAIL else gist[:_TAIL] + "…"


def _run_cli(
    command: Sequence[str], stdin: bytes, timeout: float
) -> tuple[int | None, bytes, bytes]:
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # the timeout kills the CLI and anything it started
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def run_test(
    spec: TestSpec, engine: str, *, cli: Path, cache: Path, timeout: float = DEFAULT_TIMEOUT
) -> TestResult:
    """Run ``spec`` on ``engine`` through ``cli run`` and compare with its expectations."""
    if spec.skip is not None:
        return TestResult(engine, spec.test_id, "skip", spec.skip)
    with tempfile.TemporaryDirectory(prefix="wasi-testsuite-") as tmp:
        start = time.monotonic()
        try:
            bundle = write_test_bundle(spec, Path(tmp) / "bundle")
            command = [str(cli), "run", "--engine", engine, "--cache", str(cache), str(bundle)]
            code, out_bytes, err_bytes = _run_cli(command, spec.stdin.encode(), timeout)
        except OSError as exc:  # the runner's own failure: reported, the other tests go on
            return TestResult(engine, spec.test_id, "fail", f"runner: {exc}")
        seconds = time.monotonic() - start
    out, err = _text_of(out_bytes), _text_of(err_bytes)
    problems: list[str] = []
    if code is None:
        problems.append(f"no exit within {timeout:g} s (killed)")
    elif code != spec.exit_code:
        problems.append(f"exit code {code}, expected {spec.exit_code}")
    if not out.startswith(spec.stdout):
        problems.append(f"stdout {out[: len(spec.stdout) + 40]!r}, expected {spec.stdout!r}…")
    if not err.startswith(spec.stderr):
        problems.append(f"stderr does not start with {spec.stderr!r}")
    if problems and err.strip():
        problems.append(f"stderr: {_gist(err)}")
    status = "fail" if problems else "pass"
    return TestResult(engine, spec.test_id, status, "; ".join(problems), code, out, err, seconds)


# --- the whole suite --------------------------------------------------------------------------


def default_cli() -> Path:
    """``wasidispatch`` next to this interpreter (the venv's), else the one on ``PATH``."""
    beside = Path(sys.executable).parent / "wasidispatch"
    if beside.is_file():
        return beside
    found = shutil.which("wasidispatch")
    if found is None:
        raise SpecError("no wasidispatch executable beside the interpreter or on PATH")
    return Path(found)


def run_suite(
    specs: Sequence[TestSpec],
    engines: Sequence[str] = DEFAULT_ENGINES,
    *,
    cli: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    jobs: int = 1,
    cache: Path | None = None,
) -> dict[str, EngineScore]:
    """Run every spec on every engine; the score of each engine, in ``engines`` order.

    The precompile cache is a fresh temporary directory unless ``cache`` is given, so the
    user's cache is neither read nor filled.
    """
    cli = cli or default_cli()
    with tempfile.TemporaryDirectory(prefix="wasi-testsuite-cache-") as tmp:
        cache_dir = cache or Path(tmp)
        work = [(spec, engine) for engine in engines for spec in specs]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(
                pool.map(
                    lambda item: run_test(
                        item[0], item[1], cli=cli, cache=cache_dir, timeout=timeout
                    ),
                    work,
                )
            )
    scores = {engine: EngineScore(engine) for engine in engines}
    for result in results:
        score = scores[result.engine]
        if result.status == "pass":
            score.passed += 1
        elif result.status == "fail":
            score.failed += 1
            score.failures.append(result)
        else:
            score.skipped += 1
            score.skips.append(result)
    return scores


def report_text(scores: dict[str, EngineScore]) -> str:
    """Per-engine scores, then each failing test with its reason."""
    lines = []
    for score in scores.values():
        skipped = f", {score.skipped} skipped" if score.skipped else ""
        lines.append(f"{score.engine}: {score.passed}/{score.ran} passed{skipped}")
        lines += [f"  FAIL {r.test_id}: {r.reason}" for r in score.failures]
        lines += [f"  SKIP {r.test_id}: {r.reason}" for r in score.skips]
    return "\n".join(lines)


def report_json(scores: dict[str, EngineScore], suite_dir: Path) -> str:
    """One JSON document: per engine its counts and every non-passing result."""
    doc = {
        "suite_dir": str(suite_dir),
        "engines": {
            name: {
                "passed": s.passed,
                "failed": s.failed,
                "skipped": s.skipped,
                "failures": [asdict(r) for r in s.failures],
                "skips": [asdict(r) for r in s.skips],
            }
            for name, s in scores.items()
        },
    }
    return json.dumps(doc, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run the suite, print the scores; 0 when nothing failed."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.wasi_testsuite",
        description="Run WebAssembly/wasi-testsuite through `wasidispatch run` on OCI bundles.",
    )
    parser.add_argument("suite_dir", type=Path, help="a wasi-testsuite checkout or test dir")
    parser.add_argument(
        "--engine",
        action="append",
        help=f"engine to measure (repeatable; default: all of {', '.join(DEFAULT_ENGINES)})",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("-k", dest="select", help="only tests whose id contains this")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per test, s")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="tests run at once")
    parser.add_argument("--wasi-version", default=DEFAULT_VERSION, help="suites to run")
    parser.add_argument("--cli", type=Path, help="the wasidispatch executable")
    parser.add_argument("--cache", type=Path, help="precompile cache (default: a fresh one)")
    args = parser.parse_args(argv)
    try:
        specs = discover(args.suite_dir, args.wasi_version)
        cli = args.cli or default_cli()
    except SpecError as exc:
        print(f"wasi_testsuite: {exc}", file=sys.stderr)
        return 2
    if args.select:
        specs = [s for s in specs if args.select in s.test_id]
    if not specs:
        print(f"wasi_testsuite: no {args.wasi_version} tests in {args.suite_dir}", file=sys.stderr)
        return 2
    engines = tuple(args.engine or DEFAULT_ENGINES)
    scores = run_suite(
        specs, engines, cli=cli, timeout=args.timeout, jobs=args.jobs, cache=args.cache
    )
    print(report_json(scores, args.suite_dir) if args.json else report_text(scores))
    return 1 if any(s.failed for s in scores.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
