"""The OS-level backend: bubblewrap (the Flatpak sandbox; also under Anthropic's sandbox runtime on Linux).

Each program runs as ``bwrap <namespaces and mounts> python -I -S -B /sandbox/_boot.py``:

- new user, mount, pid, network, ipc, uts and cgroup namespaces (``--unshare-all --unshare-user``);
  no network interface but a downed loopback; the pid namespace holds only the sandbox's processes, so
  no signal, pidfd or /proc path can name a process outside;
- a root that is an empty tmpfs, read-only, holding only the interpreter, its standard library (without
  site-packages), the shared libraries they map (found once by a probe that imports every extension
  module of the standard library and reads its own memory map), a minimal ``/dev``, and the bootstrap
  (three files of this package, bound one by one: no view of the project, home, ``/etc`` or the
  host's ``/proc``);
- a private tmpfs workdir of ``disk_mb`` (the bootstrap remounts it ``noexec``, removes ``/proc`` and
  becomes uid 1000: see ``_guard``);
- uid 1000 inside is the host's ``nobody`` when the trainer runs as root (the parent writes the user
  namespace's maps itself: :func:`write_maps`), else the trainer's own uid; never a privileged one;
- every capability dropped, ``no_new_privs``, the OS seccomp filter (``_bpf.os_filter``) loaded before
  the interpreter runs, ``--die-with-parent`` (the sandbox gets SIGKILL if its parent goes) and a new
  session; when the sandbox's pid 1 ends, the kernel kills everything left in its namespace.

Nothing is written on the host: the workdir and the root are memory that goes with the mount namespace.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

from posttrain.sandbox._bpf import ARCHES

HERE = Path(__file__).resolve().parent
BOOT_FILES = ("_boot.py", "_guard.py", "_bpf.py")
SANDBOX_DIR = "/sandbox"
WORKDIR = "/work"
HOW_TO_GET_ONE = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`; "
    "Arch: `pacman -S bubblewrap`). If it is installed and still fails, unprivileged user namespaces are "
    "off: `sysctl kernel.unprivileged_userns_clone=1` (Debian), or allow bwrap in AppArmor (Ubuntu 24.04: "
    "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`); in a container, run it with "
    "--security-opt seccomp=unconfined or use a VM. Or opt into the weaker in-process backend with "
    "`sandbox.backend: process` (it warns at every run and is written into the manifest and model card)"
)


def interpreter() -> str:
    """The base interpreter (a virtualenv's python is a link to it; its site-packages are not wanted)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=1)
def _probe_files() -> tuple[str, ...]:
    """Every file the interpreter maps once all standard extension modules are imported."""
    code = (
        "import os, sys, importlib.machinery as m\n"
        "d = os.path.dirname(m.PathFinder.find_spec('_json').origin) if m.PathFinder.find_spec('_json') else None\n"
        "for f in sorted(os.listdir(d)) if d else []:\n"
        "    name = f.split('.')[0]\n"
        "    if f.endswith('.so') and name not in ('_tkinter',):\n"
        "        try: __import__(name)\n"
        "        except BaseException: pass\n"
        "paths = {l.split()[-1] for l in open('/proc/self/maps') if len(l.split()) >= 6 and l.split()[-1].startswith('/')}\n"
        "print('\\n'.join(sorted(paths)))\n"
    )
    out = subprocess.run(
        [interpreter(), "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60, env={}
    )
    if out.returncode != 0:
        raise RuntimeError(f"probing the interpreter failed: {out.stderr[-500:]}")
    return tuple(p for p in out.stdout.split() if os.path.isfile(p))


def _links(path: str, binds: list, seen: set) -> None:
    """Recreate the symlinks on the way to ``path`` (e.g. /lib64 -> usr/lib64 on merged-/usr systems), each
    at its resolved place."""
    current = "/"
    for part in Path(path).parts[1:]:
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            if candidate not in seen:
                seen.add(candidate)
                binds += ["--dir", os.path.dirname(candidate), "--symlink", os.readlink(candidate), candidate]
            _links(os.path.join(current, os.readlink(candidate)), binds, seen)  # the target's own links
            current = os.path.realpath(candidate)
        else:
            current = candidate


_probe_lock = threading.Lock()


def root_args() -> tuple[str, ...]:
    """The mounts of the minimal read-only root (computed once; the workers of a pool wait for the first)."""
    with _probe_lock:
        return _root_args()


@functools.lru_cache(maxsize=1)
def _root_args() -> tuple[str, ...]:
    stdlib = os.path.dirname(os.__file__)
    dynload = sysconfig.get_config_var("DESTSHARED") or ""
    binds, seen = [], set()
    dirs = [stdlib] + ([dynload] if dynload and not dynload.startswith(stdlib + os.sep) else [])
    files = [interpreter(), *_probe_files()]
    for path in files:
        _links(path, binds, seen)
    for d in dirs:
        real = os.path.realpath(d)
        binds += ["--ro-bind", real, real]
        if real != d:
            _links(d, binds, seen)
        site = os.path.join(real, "site-packages")
        if os.path.isdir(site):
            binds += ["--tmpfs", site, "--remount-ro", site]
    real_files = sorted({os.path.realpath(p) for p in files})
    for path in real_files:
        if not any(path.startswith(os.path.realpath(d) + os.sep) for d in dirs):
            binds += ["--ro-bind", path, path]
    # The loader asks for sonames (libz.so.1) and its own path (PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2);
    # the memory map names the files they point to.
    wanted = set(real_files)
    for directory in sorted({os.path.dirname(p) for p in real_files}):
        for entry in os.scandir(directory):
            if entry.is_symlink() and os.path.realpath(entry.path) in wanted:
                _links(entry.path, binds, seen)
    for loader in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"):
        if os.path.exists(loader):
            _links(loader, binds, seen)
    for name in BOOT_FILES:
        binds += ["--ro-bind", str(HERE / name), f"{SANDBOX_DIR}/{name}"]
    # Every directory on the way to a mount, made 0755 first: bubblewrap would copy the host's modes, and
    # a 0700 /root (a pyenv interpreter) would shut out the program's uid.
    dests = [binds[i + 2] for i, a in enumerate(binds) if a in ("--ro-bind", "--symlink")]
    ancestors = sorted(
        {str(p) for d in dests for p in Path(d).parents if str(p) != "/"}, key=lambda p: p.count("/")
    )
    return tuple(a for d in ancestors for a in ("--perms", "0755", "--dir", d)) + tuple(binds)


NOBODY = 65534  # the host uid / gid of the sandbox when the trainer is root (the kernel's overflow id)


def argv(
    python_args: list[str], *, seccomp_fd: int, disk_mb: int, map_fds: tuple[int, int] | None = None
) -> list[str]:
    """The bwrap command line; the bootstrap reads its job from stdin. ``map_fds`` (block, info): the parent
    writes the user namespace's maps itself (see :func:`write_maps`)."""
    mapping = []
    if map_fds is not None:
        mapping = [
            "--uid",
            "0",
            "--gid",
            "0",
            "--userns-block-fd",
            str(map_fds[0]),
            "--info-fd",
            str(map_fds[1]),
        ]
    return [
        shutil.which("bwrap") or "bwrap",
        "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--hostname", "sandbox",
        *mapping,
        "--clearenv", "--setenv", "PATH", "/usr/bin", "--setenv", "HOME", WORKDIR, "--setenv", "TMPDIR", WORKDIR,
        "--setenv", "LANG", "C.UTF-8",
        *root_args(),
        "--dev", "/dev", "--proc", "/proc",
        "--size", str(disk_mb << 20), "--tmpfs", WORKDIR,
        "--remount-ro", "/",
        "--chdir", WORKDIR,
        "--seccomp", str(seccomp_fd),
        "--", interpreter(), *python_args,
    ]  # fmt: skip


def write_maps(info_fd: int, block_fd: int, deadline: float) -> None:
    """Root only: read bwrap's child pid from ``info_fd``, map uid/gid 0 in its new user namespace to root
    (bubblewrap's own setup, and the bootstrap's remounts, run as it) and 1000 to the host's ``nobody`` (what
    the program runs as), then let it go on by writing to ``block_fd``. bubblewrap alone maps only the
    caller's uid, which for a root trainer would make the program the host's root without capabilities:
    still the owner of every root-owned file and exempt from RLIMIT_NPROC. OSError if bwrap died first."""
    import json
    import select
    import time

    info = b""
    while b"}" not in info:
        if not select.select([info_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise OSError("bwrap did not report its namespace in time")
        chunk = os.read(info_fd, 4096)
        if not chunk:
            raise OSError("bwrap exited before its user namespace was ready")
        info += chunk
    pid = int(json.loads(info[: info.index(b"}") + 1])["child-pid"])
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 1\n1000 {NOBODY} 1\n")
    os.write(block_fd, b"1")


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why the backend cannot run here (None: it can). Checked once per process, by running it."""
    if sys.platform != "linux":
        return f"bubblewrap needs Linux (this is {sys.platform})"
    if os.uname().machine not in ARCHES:
        return f"the seccomp filter has no system call table for {os.uname().machine}"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        out = subprocess.run(
            ["bwrap", "--unshare-all", "--unshare-user", "--die-with-parent", "--ro-bind", "/", "/", "--", "/bin/true"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap did not run: {e}"
    if out.returncode != 0:
        return f"bwrap cannot create its namespaces here: {out.stderr.strip()[-300:]}"
    return None
