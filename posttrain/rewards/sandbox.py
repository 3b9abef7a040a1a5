"""Run untrusted Python (model-written code) in a separate, limited process.

Code rewards execute whatever the policy wrote, thousands of times per training run, and RL is
an optimiser that finds every hole: an infinite loop, a memory or fork bomb, a program that
deletes files, opens sockets, reads the tests or prints "all tests passed". Each program
therefore runs in its own process (``python -I -S -B``: no site-packages, no environment
variables, no bytecode writes), in a fresh temporary directory that is removed afterwards (also
after a timeout), with a minimal environment (nothing inherited, so no tokens or keys), and
layered guards, set up by the bootstrap ``_sandbox_boot.py`` before the program starts:

- resource limits: CPU seconds, address space (a 10 GB allocation is a MemoryError), file size,
  open files, no core dumps, and the number of processes when not root (RLIMIT_NPROC counts every
  process of the user, so the limit is the user's current count plus a small headroom; the kernel
  ignores it for root, hence the next layers);
- a private network namespace where the kernel allows one (no usable interface);
- a seccomp filter on Linux x86_64/aarch64: no fork or exec, no network sockets, no signals to
  other processes, no raising of limits;
- a Python audit hook: refuses network sockets, subprocesses, ctypes, writes outside the
  directory, reads outside the Python installation (so no ``/proc/<parent>/environ`` or
  ``~/.cache`` tokens), and heap or trace introspection (gc.get_objects, sys.settrace);
- here, in the parent: a wall-clock timeout, output capped at ``max_output_bytes`` per stream,
  and SIGKILL to the whole process group (the child leads its own session) when the run ends.

:class:`Result` says which layers were active (``layers``). Test outcomes come back on a
separate pipe, each line tagged with a random nonce the program is never given, so printing fake
results earns nothing; a program that exits early (``os._exit(0)``) has its tests counted as
failed, never as passed (``sys.exit(0)`` ends the program part only: its tests still run). The
tests reach the bootstrap through stdin, never the disk, so the program cannot read them from
a file.

This is a guard against accidents and reward hacking by a policy model, not a security boundary
for adversarial code: for that, run the trainer (or these processes) in a container or VM with
gVisor, nsjail or firecracker. Known gaps: the program can read the Python installation, can
write many files of up to ``max_file_bytes`` each until the timeout, and, since it shares the
interpreter with the test runner, a program written to attack the bootstrap (walking frames up
to its locals) could forge results.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TMP_PREFIX = "posttrain-sandbox-"
"""Prefix of every sandbox's temporary directory."""

_BOOT = str(Path(__file__).with_name("_sandbox_boot.py"))
_NPROC_HEADROOM = 32  # processes (and threads) a program may add to the user's count, when not root


@dataclass(frozen=True)
class Result:
    """What happened to one program.

    Attributes:
        ok: the process exited with status 0 (the program and every test ran without error)
            and was not killed.
        returncode: exit status; negative is the signal that ended it (``-9`` for SIGKILL).
        stdout, stderr: decoded output, at most ``max_output_bytes`` of each.
        timed_out: killed at the wall-clock timeout.
        killed_reason: None, or why it was stopped: ``"timeout"``, ``"output"`` (a stream passed
            ``max_output_bytes``), ``"cpu"`` (SIGXCPU from RLIMIT_CPU), or another signal, as
            ``"signal SIGKILL"`` (e.g. the hard CPU limit or the kernel's OOM killer).
        tests_passed: one bool per test snippet, in order; a test that never reported (the run
            died first) is False.
        layers: the isolation layers that were active: "rlimits", "nproc", "netns", "seccomp",
            "audit". Empty if the bootstrap never got that far.
        seconds: wall-clock duration.
        pid: the process id, which was also its process group id (the whole group is gone).
        workdir: the temporary directory it ran in (already removed).
    """

    ok: bool
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    tests_passed: tuple[bool, ...]
    layers: tuple[str, ...]
    seconds: float
    pid: int
    workdir: str


def _user_tasks(uid: int) -> int:
    """Processes plus threads owned by ``uid``: what RLIMIT_NPROC counts."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue  # exited meanwhile, or not readable
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def run_python(
    code: str,
    *,
    tests: Sequence[str] = (),
    timeout_s: float = 10.0,
    cpu_s: int | None = None,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_file_bytes: int = 16 << 20,
    python_guard: bool = True,
    tmp_root: str | os.PathLike | None = None,
) -> Result:
    """Run ``code`` (then each of ``tests`` in its namespace) in a sandboxed process.

    Args:
        code: Python source, run as the ``__main__`` module; stdin is empty.
        tests: snippets run one after another after ``code``, in the same namespace (typically one
            ``assert`` each). Each either passes (runs without raising) or fails; if ``code``
            itself fails, none is run and all fail. ``timeout_s`` covers code and tests together.
        timeout_s: wall-clock limit, after which the process group is killed.
        cpu_s: CPU-time limit (RLIMIT_CPU, whole seconds); default ``ceil(timeout_s) + 1``.
        memory_mb: address-space limit (RLIMIT_AS). Python itself needs ~30 MB.
        max_output_bytes: cap on each of stdout and stderr; more kills the process.
        max_file_bytes: largest file the program may write (RLIMIT_FSIZE).
        python_guard: install the audit hook. Turn it off only to test the kernel layers.
        tmp_root: where the temporary directory is made; default the system temp dir.

    Returns:
        A :class:`Result`. Never raises for anything the program does.
    """
    # One second past the wall clock by default, so a busy loop is a clean timeout, not a race
    # between SIGKILL and SIGXCPU; the CPU limit then only matters for threads burning several cores.
    cpu_s = int(cpu_s if cpu_s is not None else -(-timeout_s // 1) + 1)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=tmp_root))
    start = time.monotonic()
    try:
        return _run(code, list(tests), workdir, start, timeout_s, cpu_s, memory_mb, max_output_bytes,
                    max_file_bytes, python_guard)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(code, tests, workdir, start, timeout_s, cpu_s, memory_mb, max_output_bytes, max_file_bytes, guard):
    nonce = secrets.token_hex(16)
    linux = sys.platform == "linux"
    results_r, results_w = os.pipe()
    cfg = {
        "workdir": workdir,
        "cpu_s": cpu_s,
        "memory_bytes": memory_mb << 20,
        "max_file_bytes": max_file_bytes,
        # The kernel never applies RLIMIT_NPROC to root; seccomp is the fork guard there.
        "nproc": None if os.getuid() == 0 or not linux else _user_tasks(os.getuid()) + _NPROC_HEADROOM,
        "results_fd": results_w,
        "isolate": linux,
        "guard": guard,
    }
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-X", "utf8", _BOOT, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            pass_fds=(results_w,),
            start_new_session=True,  # its own process group, killed as a whole below
        )
    except BaseException:
        os.close(results_r)
        raise
    finally:
        os.close(results_w)
    job = json.dumps({"code": code, "tests": tests, "nonce": nonce}).encode()
    streams, killed_reason = _communicate(proc, job, results_r, start + timeout_s, max_output_bytes)
    exited = _wait_exit(proc.pid, start + timeout_s if killed_reason is None else 0.0)
    if not exited and killed_reason is None:
        killed_reason = "timeout"
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a leader not yet reaped: no pid reuse
    except (ProcessLookupError, PermissionError):
        pass
    returncode = proc.wait()
    if killed_reason is None and returncode < 0:
        sig = -returncode
        killed_reason = "cpu" if sig == signal.SIGXCPU else f"signal {signal.Signals(sig).name}"
    layers, passed = _parse_results(streams[results_r], nonce, len(tests))
    stdout, stderr = (streams[proc.stdout.fileno()], streams[proc.stderr.fileno()])
    for f in (proc.stdout, proc.stderr):
        f.close()
    os.close(results_r)
    return Result(
        ok=returncode == 0 and killed_reason is None,
        returncode=returncode,
        stdout=stdout[:max_output_bytes].decode("utf-8", "replace"),
        stderr=stderr[:max_output_bytes].decode("utf-8", "replace"),
        timed_out=killed_reason == "timeout",
        killed_reason=killed_reason,
        tests_passed=passed,
        layers=layers,
        seconds=time.monotonic() - start,
        pid=proc.pid,
        workdir=workdir,
    )


def _communicate(proc, job: bytes, results_fd: int, deadline: float, cap: int):
    """Feed ``job`` to stdin and read stdout, stderr and the results pipe until all three close,
    the deadline passes or a stream passes ``cap`` bytes. Returns ({fd: bytes}, killed_reason)."""
    out_fds = [proc.stdout.fileno(), proc.stderr.fileno(), results_fd]
    streams = {fd: bytearray() for fd in out_fds}
    sel = selectors.DefaultSelector()
    for fd in out_fds:
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd, sent = proc.stdin.fileno(), 0
    os.set_blocking(stdin_fd, False)
    sel.register(stdin_fd, selectors.EVENT_WRITE)
    killed_reason = None
    try:
        while killed_reason is None and any(fd in sel.get_map() for fd in out_fds):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_reason = "timeout"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                if key.fd == stdin_fd:
                    try:
                        sent += os.write(stdin_fd, job[sent : sent + 65536])
                    except BlockingIOError:
                        continue  # the pipe is full: wait for the child to read
                    except BrokenPipeError:
                        sent = len(job)  # the child is gone; its exit status will say why
                    if sent >= len(job):
                        sel.unregister(stdin_fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                streams[key.fd] += chunk
                if len(streams[key.fd]) > cap:
                    killed_reason = "output"
    finally:
        sel.close()
        if not proc.stdin.closed:
            proc.stdin.close()
    if killed_reason:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return {fd: bytes(data) for fd, data in streams.items()}, killed_reason


def _wait_exit(pid: int, deadline: float) -> bool:
    """Wait (until ``deadline``) for ``pid`` to exit WITHOUT reaping it, so that its process group
    id stays reserved for the final killpg. True if it exited."""
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


def _parse_results(data: bytes, nonce: str, n_tests: int) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """Layers and test outcomes from the lines that carry the nonce; anything else is ignored."""
    layers: tuple[str, ...] = ()
    passed = [False] * n_tests
    seen: set[int] = set()
    for line in data.decode("utf-8", "replace").splitlines():
        parts = line.split(" ")
        if parts[0] != nonce or len(parts) < 2:
            continue
        if parts[1] == "layers" and len(parts) == 3:
            layers = tuple(p for p in parts[2].split(",") if p)
        elif parts[1] == "test" and len(parts) == 4 and parts[2].isdigit():
            i = int(parts[2])
            if i < n_tests and i not in seen:  # the first report of each test counts
                seen.add(i)
                passed[i] = parts[3] == "1"
    return layers, tuple(passed)


def run_many(
    programs: Sequence[str],
    *,
    tests: Sequence[Sequence[str]] | None = None,
    workers: int | None = None,
    **limits,
) -> list[Result]:
    """:func:`run_python` over many programs in parallel; results in input order.

    Args:
        programs: one source per run.
        tests: optional, one list of snippets per program.
        workers: concurrent processes; default ``os.cpu_count()``. Each waits mostly on its child,
            so threads suffice.
        **limits: keyword arguments of :func:`run_python`, shared by every run.
    """
    if tests is not None and len(tests) != len(programs):
        raise ValueError(f"tests has {len(tests)} entries for {len(programs)} programs")
    tests = tests if tests is not None else [()] * len(programs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(programs) or 1))
    if workers == 1:
        return [run_python(p, tests=t, **limits) for p, t in zip(programs, tests)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda pt: run_python(pt[0], tests=pt[1], **limits), zip(programs, tests)))
