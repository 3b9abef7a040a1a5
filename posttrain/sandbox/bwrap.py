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
- a private tmpfs workdir of ``disk_mb`` (the bootstrap remounts it ``noexec``, enters a user namespace
  of its own as uid 1000, and hides ``/proc``: see ``_guard``);
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


@functools.lru_cache(maxsize=1)
def root_args() -> tuple[str, ...]:
    """The mounts of the minimal read-only root."""
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
    return tuple(binds)


def argv(python_args: list[str], *, seccomp_fd: int, disk_mb: int) -> list[str]:
    """The bwrap command line; the bootstrap reads its job from stdin."""
    return [
        shutil.which("bwrap") or "bwrap",
        "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--hostname", "sandbox",
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
