"""Code reward: the share of a row's tests that the completion's code passes, run in the sandbox.

``tests[i]`` is a list of Python snippets (usually one ``assert`` each), or of stdin/stdout cases
(``{"stdin": ..., "stdout": ...}``). The code of completion i is its last fenced Python block
(```` ```python ```` / ```` ```py ```` / an untagged ```` ``` ````), or the whole text when it has none.
The score is the share of tests passed; a partial solution earns partial credit, so a group of GRPO
samples is rarely all zeros.

Programs run in parallel in :mod:`posttrain.sandbox` (the OS-level bubblewrap backend unless the run
opted into ``sandbox.backend: process``), and the verdicts are decided outside the program:

- ``assert f(3) == 7``, ``assert abs(f(x) - 0.5) < 1e-6``, ``assert not g("")``: only the values the
  program must compute (``f(3)``) are asked of the sandbox; they come back as plain data (exact built-in
  types) and the parent evaluates the assert with the real builtins and strict equality (``True`` is
  not ``1``). A lying ``__eq__``, patched builtins or stdlib, a frame walk or an early ``os._exit(0)``
  cannot turn a wrong value into a pass: the expected value never enters the sandbox.
- stdin/stdout cases: the sandbox gets the input only; the parent compares the output (trailing
  whitespace ignored).
- a straight line of assignments and asserts (``r = f(1)`` / ``assert r == 2``): the assignments run
  inside, the asserts are decided outside on ``r`` brought back as plain data.
- anything else (loops, definitions, comprehensions, lambdas) runs inside, in a fresh namespace with
  fresh builtins and the stdlib modules it names put back as they were; frame inspection, tracing,
  heap walks, hand-made code objects and signal handlers are refused.
- any refused action (reading or writing outside, a forbidden system call, a full workdir, a signal to
  another process, a native extension: the workdir is ``noexec``) is a violation: the program scores 0.

Hacks that remain possible, and why:

- special-casing the tests it can see (a prompt that shows the asserts, a lookup table of answers):
  the sandbox cannot tell a memorised answer from a computed one. Hold out tests for evaluation.
- forging a *free-form* snippet's verdict by escaping the Python-level guard from inside the one
  interpreter (a CPython memory-safety bug, a stdlib object that leaks a frame and that the guard does
  not know): the snippet's pass/fail is reported by the sandboxed process. Write tests as single
  asserts or stdin/stdout cases where the parent decides; no kernel-level escape is involved.
- a lying object (``__eq__`` always True) inside a *free-form* snippet (a loop of asserts): that
  comparison runs inside the sandbox, on the program's object. Single asserts and straight lines of
  assignments and asserts are decided outside, where the object is refused as not plain data.
- mutating stdlib *classes* (``collections.Counter.__eq__ = ...``) affects free-form snippets that use
  them: only module namespaces are put back, not every class inside them.
- resource games inside the limits (sleeping to the timeout, printing up to the cap): they cost the
  program its score, not the host.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from posttrain.rewards.basic import completion_text
from posttrain.sandbox import run_many

# An opening fence with an optional language tag, the body, and the closing fence at a line start.
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = {"", "python", "python3", "py", "py3"}


def extract_code(completion: str) -> str:
    """The last closed fenced code block tagged python/py (or untagged); else the whole text.

    Blocks tagged with another language (```` ```text ````, ```` ```bash ````) are skipped, so an
    output sample after the solution does not replace it. An unclosed block (a completion cut at
    the length limit) does not count as a block.
    """
    blocks = [m.group(2) for m in _FENCE.finditer(completion) if m.group(1).lower() in _PYTHON_TAGS]
    return blocks[-1] if blocks else completion


def code_tests(
    prompts: Sequence,
    completions: Sequence,
    tests: Sequence[Sequence],
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    **_row_fields,
) -> list[float]:
    """Share of each row's tests passed by its completion's code (0.0 to 1.0; 0.0 after a violation).

    Args:
        prompts: ignored.
        completions: model outputs (strings or assistant message lists).
        tests: one list per completion of assert snippets, or of ``{"stdin", "stdout"}`` cases; a plain
            string is one snippet. A row with no tests scores 0.0.
        timeout_s, memory_mb: per-program limits, code and tests together (see
            :func:`posttrain.sandbox.run_python`).
        workers: concurrent sandboxes; default ``os.cpu_count()``.
    """
    if len(tests) != len(completions):
        raise ValueError(f"tests has {len(tests)} rows for {len(completions)} completions")
    rows = [[t] if isinstance(t, (str, Mapping)) else list(t) for t in tests]
    for i, row in enumerate(rows):
        if any(isinstance(t, Mapping) for t in row) and not all(isinstance(t, Mapping) for t in row):
            raise ValueError(f"tests[{i}] mixes assert snippets and stdin/stdout cases")
    snippets = [[] if row and isinstance(row[0], Mapping) else row for row in rows]
    cases = [row if row and isinstance(row[0], Mapping) else [] for row in rows]
    programs = [extract_code(completion_text(c)) for c in completions]
    results = run_many(
        programs, tests=snippets, cases=cases, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb
    )
    return [sum(r.tests_passed) / len(r.tests_passed) if r.tests_passed else 0.0 for r in results]
