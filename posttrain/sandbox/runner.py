"""Start a sandboxed program, feed it its job, collect its outcome, decide its verdicts, clean up.

The parent side of every run: the backend's command line (``bwrap`` or the weaker in-process one), the
wall-clock timeout, output caps, SIGKILL to the whole process group at the end, the results pipe and
its nonce, and the verdicts (:mod:`posttrain.sandbox.verdicts`).
"""

from __future__ import annotations

import dataclasses
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
from dataclasses import dataclass

from posttrain.sandbox import _bpf, bwrap, verdicts
from posttrain.sandbox.cgroup import RunCgroup

TMP_PREFIX = "posttrain-sandbox-"
"""Prefix of the process backend's temporary directories (the OS backend writes nothing on the host)."""

_BOOT = str(bwrap.HERE / "_boot.py")
_NPROC_HEADROOM = 32  # process backend, not root: tasks a program may add to the user's count
_RESULTS_CAP = 8 << 20
_NO_PREIMPORT = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "webbrowser",
}  # side effects on import
MAP_AS_ROOT = True
"""A root parent writes the user namespace's maps (the program runs as the host's nobody); False takes the
unprivileged path (bubblewrap's own map, a nested user namespace), which tests use to cover it as root."""


@dataclass(frozen=True)
class Result:
    """What happened to one program.

    Attributes:
        ok: every test ran and passed (or, with no tests, the program ran to its end without error), no
            violation, not killed.
        returncode: exit status; negative is the signal that ended it (``-9`` SIGKILL, ``-31`` SIGSYS).
        stdout, stderr: decoded output, at most ``max_output_bytes`` of each; ``stderr`` ends with the
            program's error, if it raised (``ValueError: boom (<program>, line 2)``).
        timed_out: killed at the wall-clock timeout.
        killed_reason: None, ``"timeout"``, ``"output"`` (a stream passed ``max_output_bytes``), ``"cpu"``
            (RLIMIT_CPU), ``"forbidden system call"`` (the seccomp filter), ``"file size"`` (RLIMIT_FSIZE),
            or ``"signal NAME"``.
        tests_passed: one bool per test snippet / stdin-stdout case, decided here (see ``verdicts``); a
            test that never reported is False; all are False after a violation.
        test_errors: per test, why it failed (None when it passed).
        violation: None, or the first thing the sandbox refused (a refusal by the audit hook, a forbidden
            system call, a full workdir): the run scores 0 whatever its tests said.
        layers: the isolation layers that were active.
        backend: ``"bwrap"`` or ``"process"``.
        seconds: wall-clock duration.
        pid: process id of the sandbox's outermost process (its group is gone).
        workdir: where it ran (the OS backend: a tmpfs inside the sandbox; the process backend: a removed
            temporary directory).
        tag: a random word on the sandbox's command line (tests look for leftover processes by it).
        cpu_s: CPU seconds the sandboxed interpreter reported at its end (None if it never got there).
    """

    ok: bool
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    tests_passed: tuple[bool, ...]
    test_errors: tuple[str | None, ...]
    violation: str | None
    layers: tuple[str, ...]
    backend: str
    seconds: float
    pid: int
    workdir: str
    tag: str = ""
    cpu_s: float | None = None


class SandboxUnavailable(RuntimeError):
    """No OS-level sandbox can run here, and the process backend was not chosen."""


def _user_tasks(uid: int) -> int:
    """Processes plus threads owned by ``uid``: what RLIMIT_NPROC counts outside a user namespace."""
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = dict(line.split(":", 1) for line in open(f"{entry.path}/status") if ":" in line)
            except OSError:
                continue
            if int(fields.get("Uid", "-1").split()[0]) == uid:
                total += int(fields.get("Threads", "1"))
    return total


def _layers(backend: str, guard: bool = True) -> tuple[str, ...]:
    if sys.platform != "linux":
        return ("rlimits", "audit") if guard else ("rlimits",)
    base = (
        ("rlimits", "no-capabilities", "seccomp", "audit")
        if guard
        else ("rlimits", "no-capabilities", "seccomp")
    )
    if backend == "bwrap":
        return ("namespaces", "readonly-root", "noexec-workdir", "os-seccomp", *base)
    return base


def _question(check: verdicts.Check) -> dict:
    """What the sandbox gets of a test: the snippet, or its statements and the leaves of its asserts."""
    if check.kind == "snippet":
        return {"kind": "snippet", "source": check.source}
    return {
        "kind": "steps",
        "steps": [[s[0], s[1]] if s[0] == "run" else ["assert", s[2]] for s in check.steps],
    }


def run_one(code: str, tests: Sequence[str], cases: Sequence, *, backend: str, timeout_s: float = 10.0,
            cpu_s: int | None = None, memory_mb: int = 1024, disk_mb: int = 64, max_output_bytes: int = 1 << 20,
            max_file_bytes: int = 16 << 20, max_threads: int = 32, max_open_files: int = 256,
            python_guard: bool = True, cgroup_parent=None) -> Result:  # fmt: skip
    """One program in ``backend`` (already checked to be usable). See ``posttrain.sandbox.run_python``."""
    cpu_s = int(cpu_s if cpu_s is not None else -(-timeout_s // 1) + 1)
    checks, modules = verdicts.plan(list(tests))
    case_inputs = [c[0] for c in cases]
    nonce = secrets.token_hex(16)  # tags every result line; never on the command line
    tag = secrets.token_hex(6)  # on the command line, to find the run's processes
    job = {
        "code": code,
        "tests": [_question(c) for c in checks],
        "cases": case_inputs,
        "nonce": nonce,
    }  # fmt: skip
    use_os = backend == "bwrap"
    if use_os:
        bwrap.root_args()  # the one-off probe of the interpreter's files: not on the program's clock
    start = time.monotonic()
    workdir = bwrap.WORKDIR if use_os else os.path.realpath(tempfile.mkdtemp(prefix=TMP_PREFIX))
    if use_os:
        nproc = max_threads + 8  # counted per user namespace: this sandbox's tasks only
    elif os.getuid() == 0 or sys.platform != "linux":
        nproc = None  # the kernel exempts root; seccomp (no fork) and the thread cap hold there
    else:
        nproc = _user_tasks(os.getuid()) + _NPROC_HEADROOM
    cfg = {
        "workdir": workdir, "cpu_s": cpu_s, "memory_bytes": memory_mb << 20, "max_file_bytes": max_file_bytes,
        "max_open_files": max_open_files, "nproc": nproc, "max_threads": max_threads, "os": use_os,
        "max_output_bytes": max_output_bytes, "tag": tag, "guard": python_guard,
        "preimport": sorted(m for m in modules if m in sys.stdlib_module_names and m not in _NO_PREIMPORT),
    }  # fmt: skip
    results_r, results_w = os.pipe()
    violations_r, violations_w = os.pipe()  # the guard's refusals: no nonce, only ever a cost to the program
    fds, group, map_fds = [results_w, violations_w], None, None
    cfg["violations_fd"] = violations_w
    try:
        if use_os:
            seccomp_r, seccomp_w = os.pipe()
            fds.append(seccomp_r)
            os.write(seccomp_w, _bpf.to_bytes(_bpf.os_filter(os.uname().machine)))
            os.close(seccomp_w)
            cfg["results_fd"] = results_w
            cfg["mapped"] = MAP_AS_ROOT and os.geteuid() == 0  # root maps the sandbox to nobody itself
            map_fds = None
            if cfg["mapped"]:
                block_r, block_w = os.pipe()
                info_r, info_w = os.pipe()
                fds += [block_r, info_w]
                map_fds = (block_r, info_w)
            args = ["-I", "-S", "-B", "-X", "utf8", f"{bwrap.SANDBOX_DIR}/_boot.py", json.dumps(cfg)]
            command = bwrap.argv(args, seccomp_fd=seccomp_r, disk_mb=disk_mb, map_fds=map_fds)
            cwd = None
            env = {}
            if cgroup_parent is not None:
                group = RunCgroup(
                    cgroup_parent, tag, memory_bytes=(memory_mb + disk_mb) << 20, max_tasks=nproc + 4
                )
                command = group.wrap(command)
        else:
            cfg["results_fd"] = results_w
            command = [bwrap.interpreter(), "-I", "-S", "-B", "-X", "utf8", _BOOT, json.dumps(cfg)]
            cwd = workdir
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
            pass_fds=tuple(fds), start_new_session=True,
        )  # fmt: skip
    except BaseException:
        os.close(results_r)
        os.close(violations_r)
        if group is not None:
            group.close()
        if not use_os:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    try:
        if map_fds is not None:
            try:
                bwrap.write_maps(info_r, block_w, start + timeout_s)
            except OSError:
                pass  # bwrap is gone or stuck: its stderr and exit status (collected below) say why
            finally:
                os.close(info_r)
                os.close(block_w)
        data = json.dumps(job).encode()
        by_fd, killed = _communicate(
            proc, data, (results_r, violations_r), start + timeout_s, max_output_bytes
        )
        streams = {"stdout": by_fd[proc.stdout.fileno()], "stderr": by_fd[proc.stderr.fileno()]}
        streams["results"], streams["violations"] = by_fd[results_r], by_fd[violations_r]
        exited = _wait_exit(proc.pid, start + timeout_s if killed is None else 0.0)
        if not exited and killed is None:
            killed = "timeout"
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a leader not yet reaped: no pid reuse
        except (ProcessLookupError, PermissionError):
            pass
        returncode = proc.wait()
        for f in (proc.stdout, proc.stderr):
            f.close()
    finally:
        os.close(results_r)
        os.close(violations_r)
        if not use_os:
            shutil.rmtree(workdir, ignore_errors=True)
        ooms = group.close() if group is not None else 0
    if ooms and killed is None:
        killed = "memory (cgroup)"
    if use_os and returncode > 128:  # bwrap reports a child killed by signal N as 128 + N
        returncode = -(returncode - 128)
    if killed is None and returncode < 0:
        sig = -returncode
        names = {signal.SIGXCPU: "cpu", signal.SIGSYS: "forbidden system call", signal.SIGXFSZ: "file size"}
        killed = (
            names.get(sig) or f"signal {signal.Signals(sig).name if sig in signal.valid_signals() else sig}"
        )
    records = _parse(streams["results"], nonce)
    refused = streams["violations"].decode("utf-8", "replace").strip()
    if refused and "violation" not in records:
        records["violation"] = refused.splitlines()[0][:200]
    result = _result(
        records, checks, cases, proc, returncode, killed, streams, max_output_bytes, backend, workdir, start
    )
    layers = _layers(backend, python_guard) + (("cgroup",) if group is not None else ())
    return dataclasses.replace(result, tag=tag, layers=layers if result.layers else ())


def _result(
    records, checks, cases, proc, returncode, killed, streams, cap, backend, workdir, start
) -> Result:
    if "setup-failed" in records:
        raise SandboxUnavailable(f"the {backend} sandbox could not set itself up: {records['setup-failed']}")
    violation = records.get("violation")
    if violation is None and killed in ("forbidden system call", "file size"):
        violation = killed
    n = len(cases) if cases else len(checks)
    passed, errors = [False] * n, [None] * n
    program_error = records.get("program")
    for i in range(n):
        outcome = records.get(("case" if cases else "test", i))
        if outcome is None:
            errors[i] = program_error or ("killed: " + killed if killed else "did not report (exited early)")
            continue
        status, payload = outcome
        try:
            if cases:
                ok = status == "ok" and verdicts.same_output(json.loads(payload), cases[i][1])
                why = None if ok else (json.loads(payload) if status == "err" else "wrong output")
            elif checks[i].kind == "snippet":
                ok, why = status == "pass", None if status == "pass" else json.loads(payload)
            elif status == "ok":
                per_assert, asserts = json.loads(payload), checks[i].asserts
                if not isinstance(per_assert, list) or len(per_assert) != len(asserts):
                    raise ValueError("not one list of values per assert")
                ok, why = True, None
                for k, ((expr, _), values) in enumerate(zip(asserts, per_assert)):
                    if not bool(verdicts.evaluate(expr, [verdicts.decode(v) for v in values])):
                        ok, why = False, "assertion failed" if len(asserts) == 1 else f"assert {k + 1} failed"
                        break
            else:
                ok, why = False, json.loads(payload)
        except Exception as e:  # noqa: BLE001 — whatever came back malformed fails that test
            ok, why = False, f"{type(e).__name__}: {e}"
        passed[i], errors[i] = bool(ok), why
    if violation:
        passed = [False] * n
        errors = [f"violation: {violation}"] * n
    stdout = streams["stdout"][:cap].decode("utf-8", "replace")
    stderr = streams["stderr"][:cap].decode("utf-8", "replace")
    if program_error:
        stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + program_error + "\n"
    finished = "end" in records and returncode == 0 and killed is None
    try:
        cpu_s = float(records.get("end") or "nan") if "end" in records else None
    except ValueError:
        cpu_s = None
    ok = finished and not violation and all(passed) and (bool(n) or not program_error)
    return Result(
        ok=ok, returncode=returncode, stdout=stdout, stderr=stderr, timed_out=killed == "timeout",
        killed_reason=killed, tests_passed=tuple(passed), test_errors=tuple(errors), violation=violation,
        layers=_layers(backend) if "ready" in records else (), backend=backend,
        seconds=time.monotonic() - start, pid=proc.pid, workdir=workdir, cpu_s=cpu_s,
    )  # fmt: skip


def _parse(data: bytes, nonce: str) -> dict:
    """The nonce-tagged lines; the first of each kind counts, the rest (and anything untagged) is ignored."""
    records: dict = {}
    for line in data.decode("utf-8", "replace").splitlines():
        head, _, rest = line.partition(" ")
        if head != nonce:
            continue
        kind, _, rest = rest.partition(" ")
        if kind in ("test", "case"):
            index, _, rest = rest.partition(" ")
            status, _, payload = rest.partition(" ")
            if index.isdigit():
                records.setdefault((kind, int(index)), (status, payload))
        elif kind == "program":
            status, _, payload = rest.partition(" ")
            if status == "err":
                records.setdefault("program", json.loads(payload) if payload else "error")
        elif kind in ("violation", "setup-failed", "ready", "end"):
            records.setdefault(kind, rest)
    return records


def _communicate(proc, job: bytes, pipes: tuple[int, ...], deadline: float, cap: int):
    """Feed ``job`` to stdin; read stdout, stderr and ``pipes`` until all close, the deadline passes or a
    stream passes its cap. Returns ({fd: bytes}, killed_reason)."""
    out_fds = [proc.stdout.fileno(), proc.stderr.fileno(), *pipes]
    caps = {proc.stdout.fileno(): cap, proc.stderr.fileno(): cap, **dict.fromkeys(pipes, _RESULTS_CAP)}
    streams = {fd: bytearray() for fd in out_fds}
    sel = selectors.DefaultSelector()
    for fd in out_fds:
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd, sent = proc.stdin.fileno(), 0
    os.set_blocking(stdin_fd, False)
    sel.register(stdin_fd, selectors.EVENT_WRITE)
    killed = None
    try:
        while killed is None and any(fd in sel.get_map() for fd in out_fds):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed = "timeout"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                if key.fd == stdin_fd:
                    try:
                        sent += os.write(stdin_fd, job[sent : sent + 65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        sent = len(job)
                    if sent >= len(job):
                        sel.unregister(stdin_fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                streams[key.fd] += chunk
                if len(streams[key.fd]) > caps[key.fd]:
                    killed = "output"
    finally:
        sel.close()
        if not proc.stdin.closed:
            proc.stdin.close()
    if killed:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return {fd: bytes(data) for fd, data in streams.items()}, killed


def _wait_exit(pid: int, deadline: float) -> bool:
    """Wait (until ``deadline``) for ``pid`` to exit without reaping it, so its process group id stays
    reserved for the final killpg. True if it exited."""
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
