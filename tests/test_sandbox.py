"""The sandbox: what it runs, how verdicts are decided, limits, cleanup, backends and the run log.

The attacks (each a hostile program that ends with a correct function) are in test_sandbox_attacks.py.
Every test runs on each backend: ``bwrap`` (skipped, with the reason, where it cannot run) and the
explicit ``process`` one.
"""

import json
import sys
import time

import pytest
from sandbox_checks import leftover_processes, sandbox_dirs

from posttrain import sandbox
from posttrain.sandbox import SandboxUnavailable, WeakSandboxWarning, run_many, run_python
from posttrain.sandbox import bwrap as bwrap_backend
from posttrain.sandbox.verdicts import decode, evaluate, plan, strict_equal

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only"),
    pytest.mark.filterwarnings("ignore::posttrain.sandbox.WeakSandboxWarning"),
]


# --- verdicts, decided in the parent ------------------------------------------------------------


def test_plan_sends_only_the_questions():
    checks, modules = plan(
        ["assert f(3) == 7", "assert abs(f(x) - 0.5) < 1e-6", "assert math.isclose(g(2), 1.0)",
         "y = f(1)\nassert y == 2", "assert all(f(i) for i in range(3))", "assert not f(2), 'msg'"]
    )  # fmt: skip
    assert [c.kind for c in checks] == ["parent", "parent", "parent", "parent", "snippet", "parent"]
    assert [c.leaves for c in checks] == [["f(3)"], ["f(x)"], ["g(2)"], ["y"], [], ["f(2)"]]
    assert checks[3].steps[0] == ("run", "y = f(1)")  # runs inside; y itself comes back as a leaf
    assert "math" in modules
    # The expected values stay here: 7, 0.5 and 1e-6 are in the parent's expression, not in a leaf.
    (expr, _), (close, _) = checks[0].asserts[0], checks[1].asserts[0]
    assert evaluate(expr, [7]) is True and evaluate(expr, [8]) is False
    assert evaluate(close, [0.5 + 1e-7]) is True and evaluate(close, [0.6]) is False
    loop = plan(["for i in range(3):\n    assert f(i) == i"])[0][0]
    assert loop.kind == "snippet"
    humaneval = "METADATA = {}\n\ndef check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 3\n\ncheck(inc)"
    (inlined,), _ = plan([humaneval])
    assert inlined.kind == "parent" and inlined.leaves == ["inc(1)", "inc(2)"]


def test_strict_equality_and_plain_values_only():
    assert strict_equal(7, 7.0) and strict_equal([1, (2, "a")], [1, (2, "a")])
    assert (
        not strict_equal(True, 1) and not strict_equal((1, 2), [1, 2]) and not strict_equal({1: True}, {1: 1})
    )
    assert decode(["tuple", [["int", "1"], ["float", (0.5).hex()], ["none"]]]) == (1, 0.5, None)
    for bad in (["int", 5], ["object"], "x", ["list", [["bool", 1]]]):
        with pytest.raises(ValueError):
            decode(bad)


def test_runs_code_and_reports_each_test(backend):
    code = "def add(a, b):\n    return a + b\nprint('defined')"
    tests = [
        "assert add(2, 3) == 5",
        "assert add(2, 2) == 5",
        "assert add(-1, 1) == 0",
        "x = add(1, 1)\nassert x == 2",
    ]
    r = run_python(code, tests=tests, backend=backend)
    assert r.tests_passed == (True, False, True, True) and r.test_errors[1] == "assertion failed"
    assert not r.ok and r.violation is None and r.killed_reason is None
    assert r.stdout == "defined\n" and r.backend == backend
    assert run_python(code, tests=[tests[0], tests[2]], backend=backend).ok


def test_the_usual_stdlib_works(backend):
    code = (
        "import asyncio, collections, enum, json, math, re, tempfile, threading, typing\n"
        "out = []\n"
        "t = threading.Thread(target=out.append, args=(7,))\n"
        "t.start(); t.join()\n"
        "Point = collections.namedtuple('Point', 'x y')\n"
        "Colour = enum.Enum('Colour', 'red green')\n"
        "T = typing.TypeVar('T')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n"
        "    f.write('scratch')\n"
        "print(out, Point(1, 2).y, Colour.red.name, asyncio.run(asyncio.sleep(0, result='async')))\n"
    )
    r = run_python(code, backend=backend)
    assert r.ok and r.stdout == "[7] 2 red async\n", (r.stderr, r.violation)
    assert {"rlimits", "seccomp", "audit", "no-capabilities"} <= set(r.layers)
    if backend == "bwrap":
        assert {"namespaces", "readonly-root", "noexec-workdir", "os-seccomp"} <= set(r.layers)


def test_failing_code_fails_every_test(backend):
    r = run_python("x = 1\nraise ValueError('boom')", tests=["assert True", "print('ran')"], backend=backend)
    assert r.tests_passed == (False, False) and not r.ok
    assert "ValueError: boom (<program>, line 2)" in r.stderr and "ran" not in r.stdout
    syntax = run_python("def f(:\n  pass", tests=["assert True"], backend=backend)
    assert syntax.tests_passed == (False,) and "SyntaxError" in syntax.stderr


def test_sys_exit_zero_ends_the_program_part_only(backend):
    code = "import sys\ndef f():\n    return 1\nsys.exit(0)"
    assert run_python(code, tests=["assert f() == 1", "assert f() == 2"], backend=backend).tests_passed == (
        True,
        False,
    )


def test_stdin_stdout_cases_are_compared_outside(backend):
    code = "n = int(input())\nprint(n * 2)"
    r = run_python(code, cases=[("3\n", "6\n"), ("4", "8  \n\n"), ("5", "11")], backend=backend)
    assert r.tests_passed == (True, True, False) and r.test_errors[2] == "wrong output"


def test_run_many_keeps_order_and_runs_in_parallel(backend):
    programs = [f"import time\ntime.sleep(0.4)\nprint({i})" for i in range(4)]
    start = time.monotonic()
    results = run_many(programs, tests=[["assert True"]] * 4, workers=4, backend=backend)
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert all(r.ok for r in results)
    assert time.monotonic() - start < 1.5  # serially it would take >= 1.6 s
    with pytest.raises(ValueError, match="tests has 1 entries for 4 programs"):
        run_many(programs, tests=[[]], backend=backend)


# --- limits and cleanup -----------------------------------------------------------------------------


def test_infinite_loop_is_killed_at_the_timeout_and_nothing_is_left(backend):
    before = sandbox_dirs()
    r = run_python("while True:\n    pass", tests=["assert True"], timeout_s=1.0, backend=backend)
    assert r.timed_out and r.killed_reason == "timeout" and not r.ok and r.tests_passed == (False,)
    assert r.seconds < 3
    assert leftover_processes(r.tag) == []
    assert sandbox_dirs() <= before


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock(backend):
    r = run_python("while True:\n    pass", timeout_s=20.0, cpu_s=1, backend=backend)
    assert r.killed_reason == "cpu" and not r.timed_out and r.seconds < 6


def test_memory_bomb_is_a_memory_error(backend):
    code = "try:\n    bomb = bytearray(10 * 2**30)\nexcept MemoryError:\n    print('MemoryError')\n"
    r = run_python(code, memory_mb=256, backend=backend)
    assert r.stdout == "MemoryError\n" and r.ok


def test_output_is_capped(backend):
    r = run_python("while True:\n    print('spam')", max_output_bytes=10_000, timeout_s=10.0, backend=backend)
    assert r.killed_reason == "output" and r.seconds < 5 and len(r.stdout) <= 10_000


# --- backends, the run log ---------------------------------------------------------------------------


def test_process_backend_warns_every_call():
    for _ in range(2):
        with pytest.warns(WeakSandboxWarning, match="weak `process` sandbox backend"):
            run_python("pass", backend="process")


def test_no_os_backend_is_an_error_that_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(bwrap_backend, "unavailable", lambda: "bubblewrap (bwrap) is not installed")
    with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap.*sandbox.backend: process"):
        run_python("pass", backend="auto")
    with pytest.raises(ValueError, match="not one of auto, bwrap, process"):
        sandbox.configure("docker")


def test_each_call_is_logged_to_the_run_directory(tmp_path, backend):
    previous = dict(sandbox._state)
    try:
        sandbox.configure(backend, log_dir=tmp_path)
        run_many(["x = 1", "open('/etc/passwd').read()"], tests=[["assert x == 1"], []])
    finally:
        sandbox._state.update(previous)
    (line,) = (tmp_path / "sandbox.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["backend"] == backend and record["programs"] == 2 and record["passed"] == 1
    assert record["limits"]["timeout_s"] == 10.0 and "seccomp" in record["layers"]
    assert [v["index"] for v in record["violations"]] == [1]


@pytest.mark.skipif(bool(sandbox.unavailable()), reason="cgroups apply to the OS backend only")
def test_a_delegated_cgroup_holds_each_run(tmp_path):
    """The cgroup plumbing, on a stand-in directory (a real delegated cgroup v2 is rarely there in CI):
    the per-run group gets its limits and bwrap's first process, and the run's layers say so."""
    from posttrain.sandbox.cgroup import check_parent

    with pytest.raises(ValueError, match="not a cgroup v2 directory"):
        check_parent(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory pids\n")
    previous = dict(sandbox._state)
    try:
        sandbox.configure("bwrap", cgroup_parent=tmp_path)
        r = run_python("print('hi')", memory_mb=256, disk_mb=16, max_threads=8)
    finally:
        sandbox._state.update(previous)
    assert r.ok and r.stdout == "hi\n" and "cgroup" in r.layers
    (group,) = tmp_path.glob("posttrain-*")  # a real cgroup is removed after the run; a stand-in stays
    assert (group / "memory.max").read_text() == str((256 + 16) << 20)
    assert (group / "pids.max").read_text() == str(8 + 8 + 4)
    assert int((group / "cgroup.procs").read_text()) == r.pid  # bwrap started inside it


def test_the_weak_backend_is_in_the_manifest_and_the_model_card(tmp_path):
    from posttrain.audit import model_card

    run = tmp_path / "run"
    run.mkdir()
    manifest = {"algorithm": "grpo", "inputs": {}, "parents": [], "sandbox": sandbox.describe("process")}
    (run / "manifest.json").write_text(json.dumps(manifest))
    card = model_card(run).read_text()
    assert "- **sandbox**: process" in card and "weak `process` sandbox backend" in card
    manifest["sandbox"] = {"backend": "bwrap", "weak": False}
    (run / "manifest.json").write_text(json.dumps(manifest))
    card = model_card(run).read_text()
    assert "- **sandbox**: bwrap" in card and "weak `process`" not in card


def test_a_runs_sandbox_comes_from_its_config(tmp_path, capsys):
    from posttrain.config import load_config
    from posttrain.engine.run import Run
    from posttrain.errors import ConfigError
    from posttrain.train import sandbox_for

    base = {"algorithm": "grpo", "out": str(tmp_path / "run"), "model": {"path": "m"}, "data": {"train": "t"}}
    previous = dict(sandbox._state)
    try:
        cfg = load_config(base | {"sandbox": {"backend": "process"}, "rl": {"rewards": ["code_tests"]}})
        info = sandbox_for(cfg, Run(tmp_path / "run"))
        assert info["backend"] == "process" and info["weak"] and "seccomp" in info["layers"]
        assert "sandbox.backend is `process`" in capsys.readouterr().out
        with pytest.warns(WeakSandboxWarning):
            run_python("pass")  # the configured backend, logged into the run directory
        assert json.loads((tmp_path / "run" / "sandbox.jsonl").read_text())["backend"] == "process"
        with pytest.raises(ConfigError, match="sandbox.cgroup: .* is not a cgroup v2 directory"):
            sandbox_for(load_config(base | {"sandbox": {"cgroup": str(tmp_path)}}), Run(tmp_path / "run"))
    finally:
        sandbox._state.update(previous)
