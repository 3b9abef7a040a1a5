"""Code reward: the share of a row's tests that the completion's code passes, run in the sandbox.

``tests[i]`` is a list of Python snippets (usually one ``assert`` each). The code of completion i
is its last fenced Python block (```` ```python ```` / ```` ```py ```` / an untagged ```` ``` ````),
or the whole text when it has none; the snippets run after it, one by one, in its namespace,
and the score is the share that ran without raising. Scoring per test rather than all-or-nothing
gives a partial solution partial credit, so a group of GRPO samples is rarely all zeros.

Programs run in parallel in separate sandboxed processes (see :mod:`posttrain.rewards.sandbox`).
What the sandbox does not stop: a solution that special-cases the visible tests, or returns an
object whose ``__eq__`` is always True. Hold out tests for evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from posttrain.rewards.basic import completion_text
from posttrain.rewards.sandbox import run_many

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
    tests: Sequence[Sequence[str]],
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    **_row_fields,
) -> list[float]:
    """Share of each row's test snippets passed by its completion's code (0.0 to 1.0).

    Args:
        prompts: ignored.
        completions: model outputs (strings or assistant message lists).
        tests: one list of snippets per completion; a plain string is one snippet. A row with no
            tests scores 0.0.
        timeout_s, memory_mb: per-program limits, code and tests together (see
            :func:`posttrain.rewards.sandbox.run_python`).
        workers: concurrent sandboxes; default ``os.cpu_count()``.
    """
    if len(tests) != len(completions):
        raise ValueError(f"tests has {len(tests)} rows for {len(completions)} completions")
    snippets = [[tests_i] if isinstance(tests_i, str) else list(tests_i) for tests_i in tests]
    programs = [extract_code(completion_text(c)) for c in completions]
    results = run_many(programs, tests=snippets, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    return [sum(r.tests_passed) / len(r.tests_passed) if r.tests_passed else 0.0 for r in results]
