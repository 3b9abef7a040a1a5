"""The sandbox: what it runs, what it stops, and that it leaves nothing behind.

Each hostile program is checked by its outcome (killed, refused, nothing written, no process
left), whichever layer stopped it. Where the Python guard is switched off on purpose, the test
checks the kernel layers below it, and skips when this machine has none of them.
"""

import os
import socket
import sys
import tempfile
import time

import pytest

from posttrain.rewards.sandbox import TMP_PREFIX, run_many, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's limits are Linux-specific")


def group_alive(pgid: int, grace_s: float = 2.0) -> bool:
    """Whether any process of the group still exists, after ``grace_s`` for killed members (and
    zombies reparented to init) to be reaped."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


def sandbox_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith(TMP_PREFIX)}


@pytest.fixture(scope="module")
def layers():
    """The isolation layers this machine supports (a probe run)."""
    return set(run_python("pass").layers)


# ---------------------------------------------------------------------------------------
# Running code and tests.


def test_runs_code_and_reports_each_test():
    code = "def add(a, b):\n    return a + b\nprint('defined')"
    r = run_python(code, tests=["assert add(2, 3) == 5", "assert add(2, 2) == 5", "assert add(-1, 1) == 0"])
    assert r.tests_passed == (True, False, True)
    assert not r.ok and r.returncode == 1  # a failed test fails the run
    assert r.stdout == "defined\n"
    assert "<test 1>" in r.stderr and "AssertionError" in r.stderr
    assert r.killed_reason is None and not r.timed_out


def test_plain_program_ok_and_the_usual_stdlib_works():
    # What solutions use must survive the guards: threads (seccomp allows CLONE_THREAD), asyncio
    # (a socketpair, and it imports subprocess), enum/namedtuple/typing (sys._getframe), tempfiles.
    code = (
        "import asyncio, collections, tempfile, threading, typing\n"
        "out = []\n"
        "t = threading.Thread(target=out.append, args=(7,))\n"
        "t.start(); t.join()\n"
        "Point = collections.namedtuple('Point', 'x y')\n"
        "T = typing.TypeVar('T')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n"
        "    f.write('scratch')\n"
        "print(out, Point(1, 2).y, asyncio.run(asyncio.sleep(0, result='async')))\n"
    )
    r = run_python(code)
    assert r.ok and r.returncode == 0 and r.stdout == "[7] 2 async\n", r.stderr
    assert r.tests_passed == ()
    assert {"rlimits", "audit"} <= set(r.layers)


def test_failing_code_fails_every_test_without_running_them():
    r = run_python("x = 1\nraise ValueError('boom')", tests=["assert True", "print('ran')"])
    assert r.tests_passed == (False, False)
    assert "ValueError: boom" in r.stderr and '"<program>", line 2' in r.stderr
    assert "ran" not in r.stdout


def test_syntax_error_is_a_failed_program():
    r = run_python("def f(:\n  pass", tests=["assert True"])
    assert r.tests_passed == (False,) and "SyntaxError" in r.stderr


def test_sys_exit_zero_ends_the_program_part_only():
    # The tests still run, so exiting early cannot skip a failing assert.
    r = run_python(
        "import sys\ndef f():\n    return 1\nsys.exit(0)", tests=["assert f() == 1", "assert f() == 2"]
    )
    assert r.tests_passed == (True, False)


def test_exiting_or_printing_cannot_fake_passed_tests():
    forge = (
        "import os\n"
        "for line in ['test 0 1', 'layers a', 'code 1']:\n"
        "    print(line)\n"
        "    for fd in range(3, 64):\n"
        "        try:\n"
        "            os.write(fd, (line + '\\n').encode())\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)\n"
    )
    r = run_python(forge, tests=["assert False"])
    assert r.returncode == 0  # the process exited "successfully"...
    assert r.tests_passed == (False,)  # ...but no genuine test report came back


def test_patching_builtins_cannot_skip_the_tests():
    patch = "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None"
    r = run_python(patch, tests=["assert 1 == 2"])
    assert r.tests_passed == (False,)


def test_run_many_keeps_order_and_runs_in_parallel():
    programs = [f"import time\ntime.sleep(0.4)\nprint({i})" for i in range(4)]
    start = time.monotonic()
    results = run_many(programs, tests=[["assert True"]] * 4, workers=4)
    elapsed = time.monotonic() - start
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert all(r.tests_passed == (True,) for r in results)
    assert elapsed < 1.5  # serially it would take >= 1.6 s
    with pytest.raises(ValueError, match="tests has 1 entries for 4 programs"):
        run_many(programs, tests=[[]])


# ---------------------------------------------------------------------------------------
# Hostile programs.


def test_infinite_loop_is_killed_at_the_timeout():
    r = run_python("while True:\n    pass", tests=["assert True"], timeout_s=1.0)
    assert r.timed_out and r.killed_reason == "timeout" and not r.ok
    assert r.returncode == -9 and r.tests_passed == (False,)
    assert r.seconds < 3
    assert not group_alive(r.pid)


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    r = run_python("while True:\n    pass", timeout_s=20.0, cpu_s=1)
    assert r.killed_reason == "cpu" and not r.timed_out
    assert r.seconds < 6


def test_memory_bomb_is_a_memory_error_and_never_materialises():
    code = (
        "try:\n"
        "    bomb = bytearray(10 * 2**30)\n"
        "except MemoryError:\n"
        "    print('MemoryError')\n"
        "chunks = []\n"
        "try:\n"
        "    while True:\n"
        "        chunks.append(bytearray(b'x' * (50 * 2**20)))  # touched, so really resident\n"
        "except MemoryError:\n"
        "    print(len(chunks))\n"
        "raise MemoryError\n"
    )
    r = run_python(code, memory_mb=256, timeout_s=10.0)
    first, chunks = r.stdout.split()
    assert first == "MemoryError"  # the 10 GB were refused outright
    assert 1 <= int(chunks) <= 5  # at most 250 MB of the 256 MB address space got filled
    assert "MemoryError" in r.stderr and not r.ok and not r.timed_out and r.seconds < 8


def test_fork_bomb_is_refused_quickly():
    r = run_python("import os\nwhile True:\n    os.fork()", timeout_s=5.0)
    assert not r.ok and not r.timed_out and r.seconds < 3
    assert "PermissionError" in r.stderr
    assert not group_alive(r.pid)


def test_fork_bomb_is_contained_by_the_kernel_layers_alone(layers):
    if not layers & {"seccomp", "nproc"}:
        pytest.skip(f"no kernel-level process limit here (layers {sorted(layers)}); not running a real bomb")
    bomb = (
        "import os\n"
        "forks = 0\n"
        "for _ in range(2000):\n"
        "    try:\n"
        "        os.fork()  # parent and child both go on forking\n"
        "        forks += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print('forks', forks)\n"
    )
    r = run_python(bomb, timeout_s=5.0, python_guard=False)
    assert "audit" not in r.layers
    assert r.seconds < 6.5
    assert not group_alive(r.pid)  # nothing of it is left running
    if "seccomp" in r.layers:
        assert r.stdout == "forks 0\n"


def test_subprocess_and_exec_are_refused(layers):
    code = "import subprocess\nsubprocess.run(['echo', 'escaped'])"
    guarded = run_python(code)
    assert "escaped" not in guarded.stdout and "PermissionError" in guarded.stderr
    if "seccomp" in layers:
        bare = run_python("import os\nos.execv('/bin/echo', ['echo', 'escaped'])", python_guard=False)
        assert "escaped" not in bare.stdout and "PermissionError" in bare.stderr


def _connect_program(port: int) -> str:
    return (
        "import socket\n"
        f"for host, port in [('127.0.0.1', {port}), ('8.8.8.8', 53)]:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=1).close()\n"
        "        print('connected', host)\n"
        "    except Exception as e:\n"
        "        print('blocked', host, type(e).__name__)\n"
    )


def test_network_is_blocked(layers):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # reachable from outside the sandbox
        server.accept()[0].close()
        runs = [run_python(_connect_program(port))]
        if layers & {"seccomp", "netns"}:
            runs.append(run_python(_connect_program(port), python_guard=False))
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # no connection from the sandbox ever arrived
    for r in runs:
        assert "connected" not in r.stdout
        assert r.stdout.count("blocked") == 2, r.stderr


def test_writes_outside_its_directory_are_refused(tmp_path):
    target = tmp_path / "outside" / "pwned.txt"
    target.parent.mkdir()
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    code = (
        "import os\n"
        "with open('inside.txt', 'w') as f:\n"
        "    f.write('fine')\n"
        "print(open('inside.txt').read())\n"
        f"for attempt in [lambda: open({str(target)!r}, 'w'), lambda: os.remove({str(keep)!r}),\n"
        f"                lambda: os.rename({str(keep)!r}, 'stolen.txt'), lambda: os.symlink('/', 'root'),\n"
        f"                lambda: open('../escape.txt', 'a')]:\n"
        "    try:\n"
        "        attempt()\n"
        "        print('done')\n"
        "    except PermissionError:\n"
        "        print('refused')\n"
    )
    r = run_python(code, tmp_root=tmp_path)
    assert r.stdout.split() == ["fine"] + ["refused"] * 5, r.stderr
    assert not target.exists() and keep.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "outside"]  # no escape.txt either


def test_no_inherited_secrets_and_no_reads_outside(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    secret = tmp_path / "token"
    secret.write_text("hunter2")
    code = (
        "import os\n"
        "print(sorted(os.environ))\n"
        f"for path in [{str(secret)!r}, f'/proc/{{os.getppid()}}/environ']:\n"
        "    try:\n"
        "        print(open(path).read())\n"
        "    except PermissionError:\n"
        "        print('refused')\n"
    )
    r = run_python(code)
    assert "hunter2" not in r.stdout
    assert r.stdout.splitlines()[1:] == ["refused", "refused"]
    assert "POSTTRAIN_TEST_SECRET" not in r.stdout.splitlines()[0]


def test_output_is_capped_and_a_print_loop_is_stopped():
    r = run_python("print('x' * 10_000_000)", max_output_bytes=1000)
    assert r.killed_reason == "output" and not r.ok
    assert len(r.stdout) <= 1000
    looping = run_python("while True:\n    print('spam')", max_output_bytes=10_000, timeout_s=10.0)
    assert looping.killed_reason == "output" and looping.seconds < 5


def test_leaves_nothing_behind(tmp_path):
    before = sandbox_dirs()
    results = [
        run_python("open('data.txt', 'w').write('x' * 1000)"),
        run_python("open('data.txt', 'w').write('x')\nwhile True:\n    pass", timeout_s=0.5),
    ]
    for r in results:
        assert not os.path.exists(r.workdir)
        assert os.path.basename(r.workdir).startswith(TMP_PREFIX)
        assert not group_alive(r.pid)
    assert results[1].timed_out
    assert sandbox_dirs() <= before  # (other runs on this machine may remove theirs meanwhile)
    run_python("open('data.txt', 'w').write('x')", tmp_root=tmp_path)
    assert list(tmp_path.iterdir()) == []
