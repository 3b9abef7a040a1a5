"""The OS backend's kernel layers alone (``python_guard=False``: no audit hook, no Python-level refusal):
each attack of test_sandbox_attacks.py must still leave the host untouched. Here the score is not the
point (without the hook, an attack that fails quietly and then defines a correct function can pass);
what the kernel refuses, and that nothing outside the sandbox changed or leaked, is.
"""

import os
import subprocess
import sys
import threading
import time

import pytest

from posttrain import sandbox
from posttrain.sandbox import run_python

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only"),
    pytest.mark.skipif(bool(sandbox.unavailable()), reason=f"no OS backend: {sandbox.unavailable()}"),
]


def bare(code: str, **limits):
    r = run_python(code, backend="bwrap", python_guard=False, **limits)
    assert "audit" not in r.layers
    return r


def steps(*bodies: str) -> str:
    """Each step prints 'ok <i>' or 'err <i> <exception type>'."""
    out = "import os\n"
    for i, body in enumerate(bodies):
        out += "try:\n" + "".join(f"    {line}\n" for line in body.splitlines())
        out += f"    print('ok {i}')\nexcept BaseException as e:\n    print('err {i}', type(e).__name__)\n"
    return out


def test_the_root_is_minimal_and_the_host_is_out_of_sight(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    secret = tmp_path / "shadow"
    secret.write_text("hunter2")
    r = bare(
        steps(
            f"print(open({str(secret)!r}).read())",
            "print(open('/etc/passwd').read())",
            "print(sorted(os.listdir('/')))",
            "print(os.listdir('/proc'))",
            "d = os.open('/', os.O_RDONLY)\nprint(os.read(os.open('etc/shadow', os.O_RDONLY, dir_fd=d), 100))",
            "print(dict(os.environ))",
            "print(os.getuid(), os.getgid())",
            "os.setuid(0)",
        )
    )
    out = r.stdout
    assert "hunter2" not in out and "root:" not in out
    lines = out.splitlines()
    assert lines[0].startswith("err 0 FileNotFoundError") and lines[1].startswith("err 1 FileNotFoundError")
    root = eval(lines[2])  # noqa: S307 — our own program's printed list
    assert "etc" not in root and "home" not in root and "work" in root and "proc" in root
    assert "[]\nok 3" in out  # /proc is an empty read-only tmpfs
    assert "err 4 FileNotFoundError" in out  # through a descriptor of / : still the sandbox's root
    assert "1000 1000\nok 6" in out and "err 7 PermissionError" in out  # uid 1000, no way back to 0


def test_writes_stay_inside_and_the_workdir_is_noexec_and_limited(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    r = bare(
        steps(
            f"open({str(keep)!r}, 'w').write('pwned')",
            "open('/usr/lib/pwned', 'w')",
            "open('/dev/pwned', 'w')",
            "open('ok.txt', 'w').write('x')",
            "import mmap\nf = open('code.bin', 'wb+')\nf.write(b'\\xc3' * 4096)\nf.flush()\n"
            "mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)",
            "i = 0\nwhile True:\n    open(f'fill{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1",
        ),
        disk_mb=8,
    )
    out = r.stdout.splitlines()
    assert keep.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert out[0].startswith("err 0") and out[1].startswith("err 1") and out[2].startswith("err 2")
    assert out[3] == "ok 3"
    assert out[4] == "err 4 PermissionError"  # noexec: no executable mapping of a file it wrote
    assert out[5] == "err 5 OSError"  # ENOSPC at 8 MB


def test_signals_pidfds_and_processes_never_reach_the_host():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        # Signals to anything but itself are killed by the seccomp filter before the pid namespace (where
        # the host's pids do not exist) is even asked.
        for attack in (
            f"os.kill({sleeper.pid}, 9)",
            "os.kill(-1, 9)",
            f"import signal\nsignal.pidfd_send_signal(os.pidfd_open({sleeper.pid}), 9)",
            "os.fork()",
            "os.execv('/bin/sh', ['sh'])",
            "os.mkfifo('fifo')",
            "import fcntl, struct\nfcntl.ioctl(open('f', 'w').fileno(), 0x40086602, struct.pack('l', 0x10))",
        ):
            killed = bare("import os\n" + attack)
            assert killed.killed_reason == "forbidden system call" and killed.violation, attack
        time.sleep(0.2)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_network_and_a_thread_bomb_hits_the_kernel_limit():
    net = bare("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)")
    assert net.killed_reason == "forbidden system call"  # an AF_INET socket: killed; no interface anyway
    bomb = bare(
        "import threading, time\nn = 0\n"
        "try:\n    while True:\n        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        "        n += 1\nexcept RuntimeError:\n    print('threads', n)",
        max_threads=16,
        memory_mb=16_000,  # so that the address space is not what stops it
    )
    # RLIMIT_NPROC (16 + 8, the main thread included), counted in the sandbox's user namespace; it holds for
    # a root trainer too, since the program runs as the host's nobody, not as an exempt root.
    assert bomb.stdout.startswith("threads") and int(bomb.stdout.split()[1]) <= 23


@pytest.mark.skipif(os.geteuid() != 0, reason="the nobody mapping is what a root trainer gets")
def test_a_root_trainers_sandbox_runs_as_the_hosts_nobody():
    seen, done = {}, threading.Event()

    def watch():  # the last look at the sandboxed interpreter (it is root only while it sets itself up)
        while not done.is_set():
            for entry in os.scandir("/proc"):
                try:
                    cmdline = open(f"{entry.path}/cmdline", "rb").read() if entry.name.isdigit() else b""
                    if b"/sandbox/_boot.py" in cmdline:
                        status = open(f"{entry.path}/status").read()
                        if "python" in status.split("\n")[0]:
                            seen[cmdline] = status.split("Uid:")[1].split()[:4]
                except OSError:
                    pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = run_python("import time\ntime.sleep(1.5)", backend="bwrap")
    finally:
        done.set()
        watcher.join()
    mine = [uids for cmdline, uids in seen.items() if r.tag.encode() in cmdline]  # not other sessions' runs
    assert r.ok and mine == [["65534"] * 4], seen


def test_the_unprivileged_path_holds_too(monkeypatch):
    """What a non-root trainer gets (bubblewrap maps its uid; the bootstrap nests a user namespace of its
    own to remount), taken here on purpose."""
    from posttrain.sandbox import runner

    monkeypatch.setattr(runner, "MAP_AS_ROOT", False)
    r = bare(
        steps(
            "print(os.getuid(), os.listdir('/proc'))",
            "import mmap\nf = open('code.bin', 'wb+')\nf.write(b'\\xc3' * 4096)\nf.flush()\n"
            "mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)",
            "open('/usr/lib/pwned', 'w')",
        )
    )
    assert r.stdout.splitlines() == ["1000 []", "ok 0", "err 1 PermissionError", "err 2 OSError"], r.stdout
    honest = run_python("def add(a, b):\n    return a + b", tests=["assert add(2, 3) == 5"], backend="bwrap")
    assert honest.ok
