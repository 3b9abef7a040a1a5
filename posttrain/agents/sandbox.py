"""The one place agent tools run untrusted code: the narrow interface the bundled environments need.

Environments that execute the policy's code (``fix_bug``'s ``run_tests`` and its grader) call a
:class:`CodeRunner`; nothing else in ``posttrain.agents`` starts a process. :class:`SandboxRunner` runs
on :mod:`posttrain.sandbox`, the same sandbox (backend, limits, cleanup, run-directory log) as the code
rewards: verdicts decided outside the program, any violation fails every test.

    runner.run(source, tests=[...], files={...}, timeout_s=...) -> Execution
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from posttrain.agents.env import InfraError


@dataclass(frozen=True)
class Execution:
    """What one run did: ``ok`` (exited 0, not killed; every test passed), ``exit_code``, ``stdout`` and
    ``stderr`` (capped), ``timed_out``, one bool per test snippet (decided outside the program), and
    the wall-clock ``seconds``."""

    ok: bool
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    tests_passed: tuple[bool, ...]
    seconds: float


class CodeRunner(Protocol):
    def run(
        self,
        source: str,
        *,
        tests: Sequence[str] = (),
        files: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> Execution: ...


class SandboxRunner:
    """:class:`CodeRunner` on :func:`posttrain.sandbox.run_python`.

    ``source`` runs as ``__main__`` in the sandbox's private workdir, which first holds ``files``
    (relative paths; written by a short prelude inside the sandbox, so the files never touch the host's
    disk outside that directory); each test snippet then runs in the program's namespace.

    Args:
        memory_mb: address-space limit of each run.
        backend: the sandbox backend; default the configured one (``sandbox.backend``).
    """

    def __init__(self, *, memory_mb: int = 512, backend: str | None = None):
        self.memory_mb, self.backend = memory_mb, backend

    def run(self, source, *, tests=(), files=None, timeout_s=10.0) -> Execution:
        from posttrain.sandbox import run_python

        code = source
        if files:
            if any(p.startswith("/") or ".." in p.split("/") for p in files):
                raise ValueError(f"sandbox files must be relative paths inside the workdir: {sorted(files)}")
            # Write the files, then run the source under its own name so tracebacks point at its lines.
            code = (
                "import os as _o\n"
                f"for _p, _t in {json.dumps(dict(files))}.items():\n"
                "    _o.makedirs(_o.path.dirname(_p) or '.', exist_ok=True)\n"
                "    open(_p, 'w').write(_t)\n"
                "del _o, _p, _t\n"
                f"exec(compile({source!r}, '<main.py>', 'exec'))\n"
            )
        try:
            r = run_python(
                code, tests=list(tests), timeout_s=timeout_s, memory_mb=self.memory_mb, backend=self.backend
            )
        except OSError as e:  # the sandbox process could not start: not the policy's doing
            raise InfraError(f"sandbox did not start: {e}", "infra.sandbox") from e
        if not r.layers and not r.timed_out:  # the bootstrap reports its layers before the program runs
            raise InfraError(
                f"sandbox bootstrap failed (exit {r.returncode}): {r.stderr[-300:]}", "infra.sandbox"
            )
        return Execution(
            ok=r.ok,
            exit_code=r.returncode,
            stdout=r.stdout,
            stderr=r.stderr,
            timed_out=r.timed_out,
            tests_passed=r.tests_passed,
            seconds=r.seconds,
        )


ProcessRunner = SandboxRunner  # the name the agents issue used; it is no longer a plain process


def default_runner() -> CodeRunner:
    return SandboxRunner()
