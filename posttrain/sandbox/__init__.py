"""The one sandbox for everything that runs untrusted code: code rewards, agent tools.

    from posttrain.sandbox import run_python, run_many
    r = run_python("def f(x):\\n    return x + 1", tests=["assert f(1) == 2"])
    r.ok, r.tests_passed, r.violation, r.backend          # True, (True,), None, 'bwrap'

Backends (``sandbox.backend`` in a run's config, or :func:`configure`):

- ``bwrap`` (the default, ``auto``): an OS-level sandbox on bubblewrap (see :mod:`.bwrap`): own user,
  mount, pid, network, ipc and uts namespaces, a minimal read-only root, a private size-limited
  ``noexec`` tmpfs workdir, uid 1000 with no capabilities (the host's ``nobody`` when the trainer is
  root), ``no_new_privs``, two seccomp filters,
  rlimits, and cgroup v2 limits where a delegated cgroup is named (:mod:`.cgroup`); the whole process
  tree dies with it and nothing is written on the host.
- ``process``: the weaker one, opted into explicitly: the same bootstrap (rlimits, no capabilities,
  seccomp, audit hook) in a plain child process with a temporary directory on the host. It sees the
  host's files (the audit hook refuses what it can see) and shares its pid namespace. It warns at every
  call, and a run using it says so in its manifest and model card.

With ``auto`` and no bubblewrap, running code raises :class:`SandboxUnavailable`, saying how to get one.
``POSTTRAIN_SANDBOX_BACKEND`` / ``POSTTRAIN_SANDBOX_CGROUP`` set the defaults for a process.

Verdicts are decided in the parent (:mod:`.verdicts`); the layers inside (:mod:`._guard`) stay as
defence in depth. Each call appends one line (backend, limits, layers, violations) to the run
directory's ``sandbox.jsonl`` once :func:`configure` was given one.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from posttrain.sandbox import bwrap, cgroup
from posttrain.sandbox.runner import TMP_PREFIX, Result, SandboxUnavailable, run_one

BACKENDS = ("auto", "bwrap", "process")
LOG_NAME = "sandbox.jsonl"
DEFAULT_LIMITS = {
    "timeout_s": 10.0, "memory_mb": 1024, "disk_mb": 64, "max_output_bytes": 1 << 20,
    "max_file_bytes": 16 << 20, "max_threads": 32, "max_open_files": 256, "python_guard": True,
}  # fmt: skip


class WeakSandboxWarning(UserWarning):
    """Untrusted code ran on the process backend (no OS-level isolation)."""


warnings.simplefilter("always", WeakSandboxWarning)
_state = {
    "backend": os.environ.get("POSTTRAIN_SANDBOX_BACKEND", "auto"),
    "log_dir": None,
    "cgroup": os.environ.get(cgroup.ENV) or None,
}
_log_lock = threading.Lock()


def configure(
    backend: str | None = None,
    *,
    log_dir: str | os.PathLike | None = None,
    cgroup_parent: str | os.PathLike | None = None,
) -> dict:
    """Choose the backend for this process, where each call is logged, and (optionally) the delegated
    cgroup v2 directory whose children hold each OS-backend run (:mod:`.cgroup`); returns :func:`describe`.

    Raises:
        ValueError: an unknown backend, or a cgroup directory that cannot hold the runs.
        SandboxUnavailable: ``bwrap`` asked for (or ``auto``) where it cannot run.
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"sandbox.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
        _state["backend"] = backend
    _state["log_dir"] = Path(log_dir) if log_dir is not None else None
    if cgroup_parent is not None:
        _state["cgroup"] = str(cgroup.check_parent(cgroup_parent))
    return describe()


def resolve(backend: str | None = None) -> str:
    """The backend a call runs on: ``bwrap`` or ``process``; raises :class:`SandboxUnavailable`."""
    backend = backend or _state["backend"]
    if backend not in BACKENDS:
        raise ValueError(f"sandbox backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "process":
        return "process"
    why = bwrap.unavailable() or _trial()
    if why:
        raise SandboxUnavailable(f"cannot run untrusted code: {why}. To fix: {bwrap.HOW_TO_GET_ONE}")
    return "bwrap"


def unavailable() -> str | None:
    """Why the OS backend cannot run here (None: it can): bubblewrap missing or refused, or a trial run
    of the bootstrap failing."""
    return bwrap.unavailable() or _trial()


@functools.lru_cache(maxsize=1)
def _trial() -> str | None:
    """One real run of the bootstrap (its own user namespace, remounts, filters), once per process: bwrap
    may start and still be refused a nested user namespace. None when it works, else why not."""
    try:
        r = run_one("print(6 * 7)", [], [], backend="bwrap", timeout_s=60.0)
    except SandboxUnavailable as e:
        return str(e)
    except OSError as e:
        return f"bwrap did not start: {e}"
    if not r.ok or r.stdout != "42\n":
        return f"a trial run failed (exit {r.returncode}): {(r.stderr or str(r.killed_reason))[-300:]}"
    return None


def describe(backend: str | None = None) -> dict:
    """What a run's manifest records: the backend, its layers and the default limits."""
    name = resolve(backend)
    from posttrain.sandbox.runner import _layers

    layers = list(_layers(name)) + (["cgroup"] if name == "bwrap" and _state["cgroup"] else [])
    return {"backend": name, "weak": name == "process", "layers": layers, "limits": DEFAULT_LIMITS}


def _normalise_cases(cases) -> list[tuple[str, str]]:
    out = []
    for case in cases:
        if isinstance(case, Mapping):
            out.append((str(case["stdin"]), str(case["stdout"])))
        else:
            stdin, stdout = case
            out.append((str(stdin), str(stdout)))
    return out


def run_many(
    programs: Sequence[str],
    *,
    tests: Sequence[Sequence[str]] | None = None,
    cases: Sequence[Sequence] | None = None,
    workers: int | None = None,
    backend: str | None = None,
    **limits,
) -> list[Result]:
    """:func:`run_python` over many programs in parallel (threads: each waits on its child); results in
    input order.

    Args:
        programs: one source per run.
        tests: optional, one list of assert snippets per program.
        cases: optional, one list of (stdin, expected stdout) pairs per program (instead of tests).
        workers: concurrent sandboxes; default ``os.cpu_count()``.
        backend: ``bwrap`` / ``process`` / ``auto``; default the configured one.
        **limits: keyword arguments of :func:`run_python`, shared by every run.
    """
    for name, rows in (("tests", tests), ("cases", cases)):
        if rows is not None and len(rows) != len(programs):
            raise ValueError(f"{name} has {len(rows)} entries for {len(programs)} programs")
    unknown = set(limits) - set(DEFAULT_LIMITS) - {"cpu_s"}
    if unknown:
        raise TypeError(f"unknown sandbox limit(s): {', '.join(sorted(unknown))}")
    name = resolve(backend)
    if name == "process":
        warnings.warn(
            "untrusted code is running on the weak `process` sandbox backend (no OS-level isolation); "
            "install bubblewrap (`apt-get install bubblewrap`) and drop `sandbox.backend: process`",
            WeakSandboxWarning,
            stacklevel=2,
        )
    merged = {**DEFAULT_LIMITS, **limits}
    tests_ = [list(t) for t in tests] if tests is not None else [[] for _ in programs]
    cases_ = [_normalise_cases(c) for c in cases] if cases is not None else [[] for _ in programs]
    jobs = list(zip(programs, tests_, cases_))
    start = time.monotonic()

    group = cgroup.check_parent(_state["cgroup"]) if name == "bwrap" and _state["cgroup"] else None

    def one(job):
        return run_one(job[0], job[1], job[2], backend=name, cgroup_parent=group, **merged)

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    if workers == 1:
        results = [one(j) for j in jobs]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            results = list(pool.map(one, jobs))
    _log(name, merged, results, time.monotonic() - start)
    return results


def run_python(
    code: str,
    *,
    tests: Sequence[str] = (),
    cases: Sequence = (),
    backend: str | None = None,
    **limits,
) -> Result:
    """Run ``code``, then its tests, in the sandbox.

    Args:
        code: Python source, run as ``__main__``; stdin is empty.
        tests: assert snippets, judged as :mod:`.verdicts` says (if ``code`` fails, every test fails).
        cases: (stdin, expected stdout) pairs or ``{"stdin", "stdout"}`` dicts: the program runs once per
            case (fresh namespace) and the parent compares its output. Use ``tests`` or ``cases``.
        backend: see :func:`configure`.
        **limits: ``timeout_s`` (wall clock, code and tests together), ``cpu_s`` (default timeout + 1),
            ``memory_mb`` (address space), ``disk_mb`` (the OS backend's workdir), ``max_output_bytes``
            (each of stdout / stderr; more kills it), ``max_file_bytes`` (one file), ``max_threads``,
            ``max_open_files``; ``python_guard=False`` leaves out the audit hook and the Python-level
            refusals (only to test the kernel layers alone: the run log records it).

    Returns:
        A :class:`Result`. Never raises for anything the program does; raises
        :class:`SandboxUnavailable` when no backend can run.
    """
    if tests and cases:
        raise ValueError("give tests or cases, not both")
    return run_many([code], tests=[list(tests)], cases=[list(cases)], workers=1, backend=backend, **limits)[0]


def _log(backend: str, limits: dict, results: list[Result], seconds: float) -> None:
    log_dir = _state["log_dir"]
    if log_dir is None:
        return
    record = {
        "time": time.time(), "backend": backend, "limits": limits, "programs": len(results),
        "layers": list(results[0].layers) if results else [], "seconds": round(seconds, 3),
        "passed": sum(r.ok for r in results),
        "violations": [{"index": i, "violation": r.violation} for i, r in enumerate(results) if r.violation],
        "killed": [{"index": i, "reason": r.killed_reason} for i, r in enumerate(results) if r.killed_reason],
    }  # fmt: skip
    with _log_lock:
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")


__all__ = [
    "BACKENDS",
    "LOG_NAME",
    "TMP_PREFIX",
    "Result",
    "SandboxUnavailable",
    "WeakSandboxWarning",
    "configure",
    "describe",
    "resolve",
    "run_many",
    "run_python",
    "unavailable",
]
