"""The hostile review's attacks, each written as model-written code would be: the attack, then a correct
function, so that a lax sandbox scores it 1.0. Each must score 0 (code_tests' share), leave the host as
it was (the file, the process, the environment) and leave nothing behind (no process, no directory).

Every attack runs on both backends. The process backend (the weak, opted-into one) passes what it can;
what it cannot stop is skipped with the reason, so its limits are listed, not hidden.
"""

import base64
import os
import shutil
import subprocess
import sys
import time

import pytest
from sandbox_checks import leftover_processes, sandbox_dirs

from posttrain import sandbox
from posttrain.rewards import code_tests
from posttrain.sandbox import run_python

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only"),
    pytest.mark.filterwarnings("ignore::posttrain.sandbox.WeakSandboxWarning"),
]

CORRECT = "\ndef add(a, b):\n    return a + b\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
PROCESS_CANNOT = {
    "dir_fd": "the audit hook sees no dir_fd on open(); only the OS backend's mount namespace hides the host",
    "native": "the process backend's workdir is on the host disk, mounted exec; only the audit hook's loader "
    "check stands (the OS backend's workdir is noexec)",
    "disk": "the process backend has no size-limited workdir: only RLIMIT_FSIZE per file bounds a fill",
}


def attack(program: str, backend: str, tests=TESTS, **limits):
    """Run an attack; assert it scored 0 and left nothing behind; return its Result."""
    before = sandbox_dirs()
    r = run_python(program, tests=tests, backend=backend, **limits)
    assert sum(r.tests_passed) == 0 and not r.ok, (r.test_errors, r.violation, r.stderr[-500:])
    assert leftover_processes(r.tag) == []
    assert sandbox_dirs() <= before
    return r


def guarded(body: str) -> str:
    """An attack step that swallows its own failure, so only the sandbox can make the score 0."""
    return (
        "try:\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "except BaseException as e:\n    pass\n"
    )


def test_honest_code_scores_one(backend):
    r = run_python(CORRECT, tests=TESTS, backend=backend)
    assert r.ok and r.tests_passed == (True, True)


def test_code_tests_scores_attacks_zero_and_honest_code_one(backend, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SANDBOX_BACKEND", backend)

    monkeypatch.setitem(sandbox._state, "backend", backend)
    completions = [f"```python{CORRECT}```", "```python\nimport sys\nsys._getframe(1)\n" + CORRECT + "```"]
    assert code_tests(["p", "p"], completions, tests=[TESTS, TESTS]) == [1.0, 0.0]


# --- reading and writing outside ----------------------------------------------------------------------


def test_read_outside_absolute(backend, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("hunter2")
    r = attack(
        guarded(f"print(open({str(secret)!r}).read())")
        + guarded("print(open('/etc/shadow').read())")
        + CORRECT,
        backend,
    )
    assert "hunter2" not in r.stdout and "root:" not in r.stdout


def test_read_outside_through_dir_fd(backend, tmp_path):
    if backend == "process":
        pytest.skip(PROCESS_CANNOT["dir_fd"])
    secret = tmp_path / "shadow"
    secret.write_text("hunter2")
    rel = os.path.relpath(secret, "/")
    body = (
        "import os\n"
        f"for base in ['/', '.', '..', '/proc/1/root']:\n"
        "    try:\n"
        "        d = os.open(base, os.O_RDONLY | os.O_DIRECTORY)\n"
        f"        print(os.read(os.open({rel!r}, os.O_RDONLY, dir_fd=d), 100))\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    r = attack(body + CORRECT, backend)
    assert "hunter2" not in r.stdout


def test_read_outside_through_proc_and_the_parents_secret(backend, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    body = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for path in [f'/proc/{os.getppid()}/environ', '/proc/1/environ', '/proc/self/../1/mem',\n"
        f"             '/proc/{os.getpid()}/environ']:\n"
        "    try:\n"
        "        print(open(path, 'rb').read(4096))\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    r = attack(body + CORRECT, backend)
    assert "hunter2" not in r.stdout and "POSTTRAIN_TEST_SECRET" not in r.stdout


def test_write_outside(backend, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    target = tmp_path / "pwned.txt"
    body = "\n".join(
        guarded(step)
        for step in [f"open({str(target)!r}, 'w').write('x')", f"import os\nos.remove({str(keep)!r})",
                     f"import os\nos.rename({str(keep)!r}, 'stolen')", "open('../escape.txt', 'w').write('x')"]
    )  # fmt: skip
    attack(body + CORRECT, backend)
    assert keep.read_text() == "precious" and not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_device_node_and_fifo(backend):
    body = guarded("import os\nos.mkfifo('fifo')") + guarded(
        "import os, stat\nos.mknod('kmsg', stat.S_IFCHR | 0o600, os.makedev(1, 11))\nprint(open('kmsg').read(100))"
    )
    r = attack(body + CORRECT, backend)
    assert r.violation is not None


# --- other processes ----------------------------------------------------------------------------------


def test_signal_a_process_outside(backend):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pid = sleeper.pid
        body = "".join(
            guarded(step)
            for step in [f"import os\nos.kill({pid}, 9)", f"import os\nos.killpg({pid}, 9)",
                         f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), 9)",
                         "import os\nos.kill(-1, 9)"]
        )  # fmt: skip
        attack(body + CORRECT, backend)
        time.sleep(0.2)
        assert sleeper.poll() is None  # still sleeping
        # Unguarded, straight to the pidfd syscall after the refused kill: still nothing reaches it.
        kernel_only = run_python(
            f"import os, signal\nos.kill({pid}, 9)\nsignal.pidfd_send_signal(os.pidfd_open({pid}), 9)",
            backend=backend,
        )
        assert not kernel_only.ok and sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_native_extension(backend, tmp_path):
    if backend == "process":
        pytest.skip(PROCESS_CANNOT["native"])
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the extension")
    import sysconfig

    src = tmp_path / "evil.c"
    src.write_text(
        "#include <Python.h>\n"
        'static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "evil", NULL, -1, NULL};\n'
        "PyMODINIT_FUNC PyInit_evil(void) { return PyModule_Create(&m); }\n"
    )
    so = tmp_path / "evil.so"
    built = subprocess.run([cc, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(so)],
                           capture_output=True, text=True)  # fmt: skip
    if built.returncode != 0:
        pytest.skip(f"could not build the extension: {built.stderr[-200:]}")
    payload = base64.b64encode(so.read_bytes()).decode()
    body = (
        "import base64, importlib.util, sys\n"
        f"open('evil.so', 'wb').write(base64.b64decode({payload!r}))\n"
        + guarded("spec = importlib.util.spec_from_file_location('evil', 'evil.so')\nspec.loader.create_module(spec)")
        + guarded("import _imp\nspec = importlib.util.spec_from_file_location('evil', 'evil.so')\n_imp.create_dynamic(spec)\nprint('loaded')")
    )  # fmt: skip
    r = attack(body + CORRECT, backend)
    assert "loaded" not in r.stdout and "native code" in (r.violation or "")


# --- leftovers and resources --------------------------------------------------------------------------


def test_immutable_flag_leftover(backend):
    body = guarded(
        "import fcntl, struct\n"
        "f = open('stuck', 'w')\n"
        "fcntl.ioctl(f.fileno(), 0x40086602, struct.pack('l', 0x10))  # FS_IOC_SETFLAGS, FS_IMMUTABLE_FL"
    )
    r = attack(body + CORRECT, backend)
    assert r.killed_reason == "forbidden system call"


def test_disk_fill_past_the_limit(backend):
    if backend == "process":
        pytest.skip(PROCESS_CANNOT["disk"])
    body = guarded("i = 0\nwhile True:\n    open(f'fill{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1")
    r = attack(body + CORRECT, backend, disk_mb=16, max_file_bytes=4 << 20)
    assert "workdir full" in (r.violation or "")


def test_thread_bomb(backend):
    body = guarded(
        "import threading, time\n"
        "while True:\n"
        "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()"
    )
    r = attack(body + CORRECT, backend, timeout_s=10.0)
    assert "threads" in (r.violation or "") and r.seconds < 8


# --- forging the verdict ------------------------------------------------------------------------------

WRONG = "\ndef add(a, b):\n    return a - b\n"


def test_forging_by_frame_walk(backend):
    walk = (
        "import sys\n"
        "def add(a, b):\n"
        "    f = sys._getframe(1)\n"
        "    while f is not None:\n"
        "        f.f_locals.update(passed=True, failed=False)\n"
        "        f = f.f_back\n"
        "    return a - b\n"
    )
    attack(walk, backend)
    via_traceback = (
        "def add(a, b):\n"
        "    try:\n"
        "        1 / 0\n"
        "    except ZeroDivisionError as e:\n"
        "        e.__traceback__.tb_frame.f_back.f_globals['report'] = print\n"
        "    return a - b\n"
    )
    attack(via_traceback, backend)


def test_forging_by_signal_handler(backend):
    body = "import signal\ndef handler(sig, frame):\n    frame.f_globals.clear()\n" + guarded(
        "signal.signal(signal.SIGALRM, handler)\nsignal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)"
    )
    attack(body + WRONG, backend)


def test_forging_by_shadowed_builtins(backend):
    body = "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.exec = lambda *a, **k: None\nbuiltins.len = lambda x: 3\n"
    tests = [
        "assert abs(add(1, 1) - 2) < 1e-9",
        "x = add(1, 2)\nassert abs(x - 3) < 1e-9",
        "for _ in range(1):\n    assert abs(add(1, 2) - 3) < 1e-9",  # free-form: runs inside, fresh builtins
        "assert len([add(1, 1)]) == 3",
    ]
    attack(body + WRONG, backend, tests=tests)


def test_forging_by_patched_stdlib(backend):
    body = "import math, operator\nmath.isclose = lambda *a, **k: True\noperator.eq = lambda *a: True\n"
    tests = [
        "assert math.isclose(add(1, 1), 2)",
        "import math\nx = add(1, 1)\nassert math.isclose(x, 2)",
        "import math\nfor _ in range(1):\n    assert math.isclose(add(1, 1), 2)",  # free-form: math put back
    ]
    attack(body + WRONG, backend, tests=tests)


def test_forging_by_exiting_before_the_tests(backend):
    r = attack("import os\n" + WRONG + "os._exit(0)\n", backend)
    assert r.returncode == 0  # the process "succeeded"; no test ever reported
    printed = "import os\nprint('2/2 passed')\nfor fd in range(3, 64):\n" + guarded("os.write(fd, b'test 0 pass\\n')").replace("\n", "\n    ") + "\nos._exit(0)\n"  # fmt: skip
    attack(printed + WRONG, backend)


def test_forging_by_a_lying_eq(backend):
    body = (
        "class Yes(int):\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    __hash__ = int.__hash__\n"
        "class Anything:\n"
        "    __eq__ = lambda self, other: True\n"
        "    __lt__ = lambda self, other: True\n"
        "    __sub__ = lambda self, other: self\n"
        "    __abs__ = lambda self: self\n"
        "def add(a, b):\n"
        "    return Yes(0) if a > 0 else Anything()\n"
    )
    attack(body, backend, tests=["assert add(2, 3) == 5", "assert abs(add(-1, 1) - 0) < 1e-9"])
    # A straight line of assignments and asserts is decided outside too: r must come back as plain data.
    attack(body, backend, tests=["r = add(2, 3)\nassert r == 5", "r = add(-1, 1)\nassert abs(r - 0) < 1e-9"])


def test_forging_through_the_guards_own_closures(backend):
    """The functions the guard installs (signal.signal's stand-in, the thread and loader wrappers) are
    reachable, and so are their closures: none of them may lead to the results' nonce."""
    walk = (
        "import os, signal, threading, _posixsubprocess, importlib.machinery as m\n"
        "seen, found = set(), set()\n"
        "def walk(obj, depth=0):\n"
        "    if id(obj) in seen or depth > 10:\n"
        "        return\n"
        "    seen.add(id(obj))\n"
        "    if isinstance(obj, str) and len(obj) == 32:\n"
        "        found.add(obj)\n"
        "    for cell in getattr(obj, '__closure__', None) or ():\n"
        "        try:\n"
        "            walk(cell.cell_contents, depth + 1)\n"
        "        except ValueError:\n"
        "            pass\n"
        "    for x in obj if isinstance(obj, (list, tuple, set, frozenset)) else obj.values() if isinstance(obj, dict) else ():\n"
        "        walk(x, depth + 1)\n"
        "for f in (signal.signal, threading._start_new_thread, m.ExtensionFileLoader.create_module,\n"
        "          _posixsubprocess.fork_exec):\n"
        "    walk(f)\n"
        "for nonce in found:\n"
        "    for fd in range(3, 30):\n"
        "        for i in range(2):\n"
        "            try:\n"
        "                os.write(fd, f'{nonce} test {i} pass\\n'.encode())\n"
        "            except OSError:\n"
        "                pass\n"
    )
    free_form = [
        "for _ in range(1):\n    assert add(2, 3) == 5",
        "for _ in range(1):\n    assert add(-1, 1) == 0",
    ]
    attack(walk + WRONG, backend, tests=free_form)  # verdicts reported from inside, tagged with the nonce


def test_a_path_swapped_between_check_and_open(backend):
    """The review's race: a thread flips a name between a file inside and /etc/passwd while the main
    thread opens it. The OS backend has no /etc at all; both refuse the link to the outside."""
    race = (
        "import os, threading\n"
        "open('inside.txt', 'w').write('harmless')\n"
        "stop, leaked = [False], []\n"
        "def flip():\n"
        "    while not stop[0]:\n"
        "        for target in ('inside.txt', '/etc/passwd'):\n"
        + "".join(f"        {line}\n" for line in guarded("os.symlink(target, 'tmp-link')\nos.replace('tmp-link', 'link')").splitlines())
        + "t = threading.Thread(target=flip, daemon=True)\n"
        "t.start()\n"
        "for _ in range(300):\n"
        + "".join(f"    {line}\n" for line in guarded("data = open('link').read()\nif 'root:' in data:\n    leaked.append(data)").splitlines())
        + "stop[0] = True\n"
        "print('leaked', len(leaked))\n"
    )  # fmt: skip
    r = attack(race + CORRECT, backend)
    assert "root:" not in r.stdout
