"""The sandbox's cost: 164 small HumanEval-sized programs with their tests, OS backend (bubblewrap) against
the process backend, in one run on the same machine.

    python benchmarks/sandbox.py [--programs 164] [--workers 2] [--rounds 2]

Each program is a short function (string, list and number tasks as in HumanEval) with 5-8 asserts,
generated here (no data set is downloaded); 1 in 8 is wrong on purpose so that failing paths are timed
too. Both backends run the same programs through ``posttrain.sandbox.run_many`` with a worker pool, the
rounds alternate backends, and the best round of each counts. Reported: seconds per program, programs
per second, the OS/process ratio (target <= 2x), and how busy the cores were (CPU
seconds of this process, bwrap and the sandboxed interpreters over wall seconds x workers; the load
average is printed, since other programs on a shared machine slow every figure), and how many
sandboxes were in flight on average (the pool's occupancy: ``workers`` when it never starves), and that both backends gave the same verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posttrain.sandbox import WeakSandboxWarning, bwrap, run_many  # noqa: E402

TASKS = [
    ("def f(xs):\n    return sorted(set(xs))\n", "def f(xs):\n    return sorted(xs)\n",
     lambda r: [r.randint(0, 5) for _ in range(r.randint(0, 8))], lambda xs: sorted(set(xs))),
    ("def f(s):\n    return s[::-1].upper()\n", "def f(s):\n    return s.upper()\n",
     lambda r: "".join(r.choice("abcxyz") for _ in range(r.randint(2, 9))), lambda s: s[::-1].upper()),
    ("def f(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     "def f(n):\n    return n * (n - 1)\n", lambda r: r.randint(0, 30),
     lambda n: [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181, 6765, 10946,
                17711, 28657, 46368, 75025, 121393, 196418, 317811, 514229, 832040][n]),
    ("def f(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n"
     "            return False\n        i += 1\n    return True\n", "def f(n):\n    return n % 2 == 1\n",
     lambda r: r.randint(0, 200), lambda n: n > 1 and all(n % i for i in range(2, int(n**0.5) + 1))),
    ("def f(xs):\n    return sum(x for x in xs if x % 2 == 0) / max(1, len(xs))\n",
     "def f(xs):\n    return sum(xs) / max(1, len(xs))\n", lambda r: [r.randint(-9, 9) for _ in range(r.randint(0, 7))],
     lambda xs: sum(x for x in xs if x % 2 == 0) / max(1, len(xs))),
    ("def f(s):\n    words = s.split()\n    return {w: words.count(w) for w in words}\n",
     "def f(s):\n    return {w: 1 for w in s.split()}\n",
     lambda r: " ".join(r.choice(["a", "b", "cc"]) for _ in range(r.randint(0, 6))),
     lambda s: {w: s.split().count(w) for w in s.split()}),
]  # fmt: skip


def programs(n: int, seed: int = 0) -> tuple[list[str], list[list[str]], list[bool]]:
    """``n`` programs, their asserts, and whether each is the correct version."""
    rng = random.Random(seed)
    codes, tests, honest = [], [], []
    for i in range(n):
        good, bad, make, expected = TASKS[i % len(TASKS)]
        correct = i % 8 != 7
        codes.append(
            ("import math\nfrom typing import List\n\n" + (good if correct else bad)).replace("f(", f"f{i}(")
        )
        args = [make(rng) for _ in range(rng.randint(5, 8))]
        tests.append([f"assert f{i}({a!r}) == {expected(a)!r}" for a in args])
        honest.append(correct)
    return codes, tests, honest


def measure(backend: str, codes, tests, workers: int) -> dict:
    before, wall0 = os.times(), time.perf_counter()
    results = run_many(codes, tests=tests, backend=backend, workers=workers)
    wall, after = time.perf_counter() - wall0, os.times()
    # This process, its children (bwrap, or the interpreter itself on the process backend) and, on the OS
    # backend, the interpreters inside (reaped in their own pid namespace, so they report their own time).
    cpu = sum(
        getattr(after, k) - getattr(before, k) for k in ("user", "system", "children_user", "children_system")
    )
    if backend == "bwrap":
        cpu += sum(r.cpu_s or 0.0 for r in results)
    busy = cpu / (wall * min(workers, os.cpu_count() or 1))
    return {
        "seconds": wall,
        "per_program_ms": 1000 * wall / len(codes),
        "programs_per_s": len(codes) / wall,
        "cores_busy": busy,
        "cpu_ms_per_program": 1000 * cpu / len(codes),
        "in_flight": sum(r.seconds for r in results) / wall,  # sandboxes running at once, on average
        "verdicts": [r.tests_passed for r in results],
        "all_ok": [r.ok for r in results],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=164, help="how many programs (HumanEval has 164)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="concurrent sandboxes")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per backend; the best counts")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    why = bwrap.unavailable()
    if why:
        print(f"no OS backend here ({why}): {bwrap.HOW_TO_GET_ONE}")
        return 2
    warnings.simplefilter("ignore", WeakSandboxWarning)
    codes, tests, honest = programs(args.programs)
    run_many(codes[:4], tests=tests[:4], backend="bwrap")  # the root probe, once, outside the timing
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for backend in ("bwrap", "process"):
            m = measure(backend, codes, tests, args.workers)
            if backend not in best or m["seconds"] < best[backend]["seconds"]:
                best[backend] = m
    os_, proc = best["bwrap"], best["process"]
    same = os_["verdicts"] == proc["verdicts"]
    right = os_["all_ok"] == honest
    ratio = os_["per_program_ms"] / proc["per_program_ms"]
    print(
        f"{args.programs} programs, {args.workers} workers, best of {args.rounds} rounds, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'backend':<10} {'ms/program':>11} {'programs/s':>11} {'CPU ms/program':>15} {'cores busy':>11} "
        f"{'in flight':>10}"
    )
    for name, m in (("bwrap", os_), ("process", proc)):
        print(
            f"{name:<10} {m['per_program_ms']:>11.1f} {m['programs_per_s']:>11.1f} "
            f"{m['cpu_ms_per_program']:>15.1f} {m['cores_busy']:>10.0%} {m['in_flight']:>10.2f}"
        )
    print(f"ratio bwrap/process: {ratio:.2f}x (target <= 2x) {'ok' if ratio <= 2 else 'OVER'}")
    print(f"same verdicts on both backends: {same}; verdicts as intended (1 in 8 wrong): {right}")
    if args.out:
        figures = {
            k: {f: v for f, v in m.items() if f not in ("verdicts", "all_ok")} for k, m in best.items()
        }
        Path(args.out).write_text(json.dumps({"ratio": ratio, "same_verdicts": same, **figures}, indent=2))
    return 0 if same and right else 1


if __name__ == "__main__":
    sys.exit(main())
