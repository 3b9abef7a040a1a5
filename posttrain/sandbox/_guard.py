"""The bootstrap's layers inside the sandbox (standard library only; bound in next to ``_boot.py``).

In the order ``_boot.main`` applies them, all before the program's first line:

1. :func:`enter_user_namespace` (OS backend only): remount the tmpfs workdir ``noexec`` (no native code
   written by the program can be mapped), ``/dev`` read-only, remove ``/proc``, and become uid 1000
   (the host's ``nobody`` when the trainer is root). bubblewrap cannot mount ``noexec`` itself; its own
   filter lets these calls through.
2. :func:`set_limits`: CPU, address space, file size, open files, threads, no core dumps.
3. :func:`drop_privileges`: every capability out of the effective, permitted, inheritable, ambient and
   bounding sets, and ``no_new_privs``.
4. :func:`install_seccomp`: the bootstrap's filter (``_bpf.boot_filter``).
5. :func:`install_guard`: the Python audit hook and the refusals it cannot express (signal handlers, more
   threads than the limit). Defence in depth, not the boundary: it turns what the kernel would refuse
   anyway into a recorded violation with a readable reason, and it refuses what the kernel cannot see
   (frame inspection, tracing, heap walks, code objects built by hand), which is what forging a free-form
   test's verdict would need.
"""

import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
INNER_UID = 1000
_CAPSET = {"x86_64": 126, "aarch64": 91}


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise OSError(errno, f"sandbox setup: {what}: {os.strerror(errno)}")


def enter_user_namespace(workdir: str, *, mapped: bool) -> None:
    """The OS backend's last setup steps: ``noexec`` workdir, read-only ``/dev``, no ``/proc``, uid 1000.

    ``mapped``: the parent is root and wrote this namespace's maps itself (uid 0 here is the host's root,
    for these setup steps only; uid 1000 is the host's ``nobody``): remount, unmount /proc, then become
    uid 1000, which also clears every capability. Otherwise (an unprivileged parent: bubblewrap mapped
    this namespace to the parent's uid) a nested user namespace with its own mount namespace, uid 1000 in
    it, and /proc hidden under an empty tmpfs (a copied mount cannot be unmounted).
    """
    ctypes, libc = _libc()

    def mount(source, target, fstype, flags, data=None):
        _check(libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), f"mount {target.decode()}")

    if not mapped:
        uid, gid = os.getuid(), os.getgid()
        _check(libc.unshare(ctypes.c_int(CLONE_NEWUSER | CLONE_NEWNS)), "unshare")
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{INNER_UID} {uid} 1"),
            ("gid_map", f"{INNER_UID} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    # Copied mounts keep the flags bubblewrap set (nosuid, nodev are locked); noexec / ro can only be added.
    mount(b"none", workdir.encode(), None, MS_REMOUNT | MS_BIND | MS_NOEXEC | MS_NOSUID | MS_NODEV)
    mount(b"none", b"/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOEXEC | MS_NOSUID | MS_NODEV)
    if not mapped:
        mount(b"none", b"/proc", b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k")
        return
    _check(libc.umount2(b"/proc", ctypes.c_int(2)), "umount /proc")  # MNT_DETACH
    os.chown(workdir, INNER_UID, INNER_UID)  # bubblewrap made it for uid 0
    _drop_bounding_set(ctypes, libc)  # needs CAP_SETPCAP: before the uid change takes it away
    os.setgroups([])
    os.setresgid(INNER_UID, INNER_UID, INNER_UID)
    os.setresuid(INNER_UID, INNER_UID, INNER_UID)


def _drop_bounding_set(ctypes, libc) -> None:
    pr_capbset_drop, pr_cap_ambient, pr_cap_ambient_clear_all = 24, 47, 4
    zero = ctypes.c_ulong(0)
    libc.prctl(pr_cap_ambient, ctypes.c_ulong(pr_cap_ambient_clear_all), zero, zero, zero)
    for cap in range(64):
        libc.prctl(pr_capbset_drop, ctypes.c_ulong(cap), zero, zero, zero)  # EINVAL past the last cap


def set_limits(cfg: dict) -> list:
    """The rlimits; returns the names of those the kernel refused (none expected)."""
    failed = []

    def limit(name, soft, hard=None):
        try:
            resource.setrlimit(getattr(resource, name), (soft, soft if hard is None else hard))
        except (ValueError, OSError, AttributeError):
            failed.append(name)

    # SIGXCPU at the soft limit; the hard limit one second later is SIGKILL.
    limit("RLIMIT_CPU", cfg["cpu_s"], cfg["cpu_s"] + 1)
    limit("RLIMIT_AS", cfg["memory_bytes"])
    limit("RLIMIT_FSIZE", cfg["max_file_bytes"])
    limit("RLIMIT_CORE", 0)
    limit("RLIMIT_NOFILE", cfg["max_open_files"])
    if cfg["nproc"] is not None:  # counts threads too; per user namespace, so per sandbox on the OS backend
        limit("RLIMIT_NPROC", cfg["nproc"])
    return failed


def drop_privileges() -> None:
    ctypes, libc = _libc()
    pr_set_no_new_privs, zero = 38, ctypes.c_ulong(0)
    _drop_bounding_set(ctypes, libc)  # EPERM once already dropped: fine
    machine = os.uname().machine
    if machine in _CAPSET:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable, twice (64 bits): all zero
        _check(libc.syscall(_CAPSET[machine], header, data), "capset")
    _check(libc.prctl(pr_set_no_new_privs, ctypes.c_ulong(1), zero, zero, zero), "no_new_privs")


def install_seccomp(program: bytes) -> None:
    ctypes, libc = _libc()

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    fprog = SockFprog(len(program) // 8, program)
    pr_set_seccomp, seccomp_mode_filter = 22, 2
    zero = ctypes.c_ulong(0)
    _check(
        libc.prctl(pr_set_seccomp, ctypes.c_ulong(seccomp_mode_filter), ctypes.byref(fprog), zero, zero),
        "seccomp",
    )


def install_guard(workdir: str, violations_fd: int, *, max_threads: int, allowed_frame_code: set) -> None:
    """The audit hook and the Python-level refusals. Every refusal is written to ``violations_fd`` before it
    raises, so catching the PermissionError gains nothing. That pipe is not the results pipe: the functions
    this installs (``signal.signal``'s stand-in, ...) are reachable from the program, and so are their
    closures; nothing in them leads to the results' nonce, and a line on the violations pipe can only cost
    the program its score.
    ``allowed_frame_code``: code objects (the bootstrap's own, and the stdlib functions that look one frame
    up at import time: namedtuple, enum, typing) that may call ``sys._getframe`` / read ``tb_frame``."""
    import _signal
    import _thread
    import signal

    get_ident, getframe, realpath, join, getcwd, fspath, fsdecode, write = (
        _thread.get_ident, sys._getframe, os.path.realpath, os.path.join, os.getcwd, os.fspath, os.fsdecode,
        os.write,
    )  # fmt: skip
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    writable = (workdir, "/dev/null")
    readable = {realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    readable |= {workdir, "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share", "/sandbox"}
    readable |= {"/dev/null", "/dev/zero", "/dev/urandom"}
    in_hook = set()  # threads inside the hook right now (what the hook itself calls raises events too)
    refused = {
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
        "pty.spawn", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
        "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook",
        "function.__new__", "sys.monitoring.register_callback", "cpython.PyInterpreterState_New",
        "_xxsubinterpreters.create", "os.mkfifo", "os.mknod", "os.chflags", "os.lchflags",
    }  # fmt: skip
    refused_imports = {
        "_posixsubprocess", "ctypes", "_ctypes", "_xxsubinterpreters", "_testcapi", "_testinternalcapi",
        "_signal", "_thread", "faulthandler", "_tracemalloc",
    }  # fmt: skip
    frame_attrs = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "gi_code", "cr_code", "ag_code"}
    path_events = {  # event: (indices of path arguments, indices of dir_fd arguments)
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((0, 1), (2,)),
        "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
    }  # fmt: skip
    pid = os.getpid()

    def resolve(path):
        if isinstance(path, int):
            return None  # an open descriptor: checked when it was opened
        return realpath(join(getcwd(), fsdecode(fspath(path))))

    def inside(path, roots):
        return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)

    def refuse(what):
        try:
            write(violations_fd, (what.replace("\n", " ")[:200] + "\n").encode())
        except OSError:
            pass
        raise PermissionError(f"sandbox: {what} is not allowed")

    def trusted_caller() -> bool:
        frame = getframe(3)  # 0 this, 1 check, 2 hook, 3 whoever raised the event
        return frame.f_code in allowed_frame_code

    def check(event, args):
        if event == "socket.__new__" and args[1] == 1:
            return  # a Unix socketpair (asyncio's self-pipe); connect and bind stay refused
        if event in refused or event.startswith(("socket.", "ctypes.")):
            refuse(event)
        elif event == "import" and args[0] in refused_imports:
            refuse(f"importing {args[0]}")
        elif event == "code.__new__" and not trusted_caller():
            refuse("building a code object")
        elif event == "sys._getframe" and not trusted_caller():
            refuse("frame inspection (sys._getframe)")
        elif event == "object.__getattr__" and args[1] in frame_attrs and not trusted_caller():
            refuse(f"frame inspection (.{args[1]})")
        elif (
            event == "object.__setattr__" and args[1] in ("__code__", "__globals__") and not trusted_caller()
        ):
            refuse(f"replacing a function's {args[1]}")
        elif event == "os.kill" and args[0] not in (0, pid):
            refuse("signalling another process")
        elif event == "open":
            path, mode, flags = args
            target = resolve(path)
            writes = bool((flags or 0) & write_flags) or (
                isinstance(mode, str) and any(c in mode for c in "wax+")
            )
            if target is not None and not inside(target, writable if writes else readable):
                refuse(f"{'writing' if writes else 'reading'} {target}")
        elif event in path_events:
            paths, dir_fds = path_events[event]
            if any(i < len(args) and args[i] not in (None, -1) for i in dir_fds):
                refuse(f"{event} relative to a directory descriptor")
            for i in paths:
                target = resolve(args[i])
                if target is not None and not inside(target, (workdir,)):
                    refuse(f"{event} on {target}")
        elif event in ("os.listdir", "os.scandir") and args and args[0] is not None:
            target = resolve(args[0])
            if target is not None and not inside(target, readable):
                refuse(f"listing {target}")

    # No audit event covers fork_exec, signal handlers or thread starts: replace the functions before the
    # program runs and refuse the re-imports that would bring the originals back.
    import _posixsubprocess

    def fork_exec(*args, **kwargs):
        refuse("_posixsubprocess.fork_exec")

    _posixsubprocess.fork_exec = fork_exec

    # Nobody presses ^C in here; with SIGINT ignored, asyncio.run does not try to install its handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def no_handlers(*args, **kwargs):
        refuse("installing a signal handler")

    for module in (signal, _signal):
        for name in ("signal", "setitimer", "set_wakeup_fd", "siginterrupt"):
            if hasattr(module, name):
                setattr(module, name, no_handlers)

    import threading

    start_new, started = _thread.start_new_thread, [0]

    def start_thread(*args, **kwargs):
        started[0] += 1
        if started[0] > max_threads:
            refuse(f"starting more than {max_threads} threads")
        try:
            return start_new(*args, **kwargs)
        except RuntimeError:  # the kernel's limit (RLIMIT_NPROC, or address space for the stacks) came first
            refuse(f"starting threads past the process limits ({started[0]} started)")

    for module, name in (
        (_thread, "start_new_thread"),
        (_thread, "start_new"),
        (_thread, "start_joinable_thread"),  # 3.13
        (threading, "_start_new_thread"),
        (threading, "_start_joinable_thread"),
    ):
        if hasattr(module, name):
            setattr(module, name, start_thread)

    # Native code: an extension module from anywhere but the standard library is refused (on the OS
    # backend the workdir is noexec as well, so the kernel would not map it either).
    import _frozen_importlib_external as external

    create_module = external.ExtensionFileLoader.create_module
    stdlib_dirs = tuple(readable - {workdir})

    def create_extension(loader, spec):
        origin = realpath(spec.origin or "")
        if not inside(origin, stdlib_dirs) or inside(origin, (workdir,)):
            refuse(f"loading native code from {origin}")
        return create_module(loader, spec)

    external.ExtensionFileLoader.create_module = create_extension

    def hook(event, args):
        me = get_ident()
        if me in in_hook:
            return
        in_hook.add(me)
        try:
            check(event, args)
        finally:
            in_hook.discard(me)

    sys.addaudithook(hook)
