"""Bootstrap of one sandboxed Python program; `posttrain.rewards.sandbox` starts it.

Run as ``python -I -S _sandbox_boot.py CONFIG_JSON`` with the job (code, test snippets, nonce) as
JSON on stdin, in a fresh temporary directory. Standard library only: with ``-S`` this process
cannot import posttrain (nor anything else outside the standard library).

The order of the steps is the design:

1. Read the whole job from stdin, then point stdin at /dev/null. The test snippets and the nonce
   live only in this function's locals from then on: the program cannot re-read them.
2. Resource limits (CPU, address space, file size, open files, core dumps, and processes when
   not root: the kernel never applies RLIMIT_NPROC to uid 0).
3. A private network namespace, when the kernel lets us create one (root, or an unprivileged
   user namespace): no interface but a downed loopback, so every connect fails.
4. A seccomp filter (x86_64 and aarch64): no fork/exec, no non-Unix sockets, no signals to other
   processes, no raising limits, no namespace or module syscalls. It is the kernel-level fork-bomb
   guard where RLIMIT_NPROC does nothing (root), and it cannot be removed once installed.
5. A Python audit hook (``sys.addaudithook``; it cannot be removed either): it refuses network
   sockets, processes, ctypes, writes outside the directory, reads outside the Python
   installation, and the heap and tracing introspection (gc.get_objects, sys.settrace, ...) that
   has no use in a solution. Plain frame access (sys._getframe) stays allowed: enum, typing and
   namedtuple need it at import time.
6. Run the program in a fresh ``__main__`` module, then each test snippet in its namespace, and
   report each outcome as ``<nonce> test <i> <0|1>`` on the results pipe. The program can write
   to that pipe too, but not a line with the nonce unless it digs it out of this function's
   frame: that stops printed or written fake results, not a program built to attack this file.

Layers that could not be set up are skipped; the first line on the results pipe says which ones
are active, so callers (and tests) know what protected a run.
"""

import json
import os
import resource
import sys


def _set_limits(cfg: dict, layers: list) -> None:
    failed = []

    def limit(kind, soft, hard=None):
        try:
            resource.setrlimit(kind, (soft, soft if hard is None else hard))
        except (ValueError, OSError):  # e.g. a limit this OS does not enforce, or above the hard one
            failed.append(kind)

    # SIGXCPU at the soft limit (Python's default action for it kills the process); the hard
    # limit one second later sends SIGKILL if the signal was somehow survived.
    limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
    limit(resource.RLIMIT_AS, cfg["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NOFILE, 256)
    if not failed:
        layers.append("rlimits")  # all of them: a partial set is not reported as the layer
    if cfg["nproc"] is not None:
        limit(resource.RLIMIT_NPROC, cfg["nproc"])
        if resource.RLIMIT_NPROC not in failed:
            layers.append("nproc")


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _unshare_network(layers: list) -> None:
    ctypes, libc = _libc()
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    # CLONE_NEWNET alone needs CAP_SYS_ADMIN; an unprivileged process gets it inside a new user
    # namespace (where the kernel allows those).
    for flags in (clone_newnet, clone_newnet | clone_newuser):
        if libc.unshare(ctypes.c_int(flags)) == 0:
            layers.append("netns")
            return


# seccomp-bpf. Syscall numbers: x86_64 from asm/unistd_64.h, aarch64 from asm-generic/unistd.h.
_ARCHES = {
    # machine: (AUDIT_ARCH_*, syscall numbers)
    "x86_64": (
        0xC000003E,
        dict(
            fork=57, vfork=58, execve=59, execveat=322, ptrace=101, setrlimit=160, unshare=272,
            setns=308, mount=165, umount2=166, reboot=169, kexec_load=246, init_module=175,
            finit_module=313, delete_module=176, bpf=321, io_uring_setup=425, process_vm_readv=310,
            process_vm_writev=311, tkill=200, clone=56, clone3=435, socket=41, kill=62, tgkill=234,
            prlimit64=302,
        ),
    ),
    "aarch64": (
        0xC00000B7,
        dict(
            execve=221, execveat=281, ptrace=117, setrlimit=164, unshare=97, setns=268, mount=40,
            umount2=39, reboot=142, kexec_load=104, init_module=105, finit_module=273,
            delete_module=106, bpf=280, io_uring_setup=425, process_vm_readv=270,
            process_vm_writev=271, tkill=130, clone=220, clone3=435, socket=198, kill=129,
            tgkill=131, prlimit64=261,
        ),
    ),
}  # fmt: skip
_ALWAYS_DENIED = (
    "fork vfork execve execveat ptrace setrlimit unshare setns mount umount2 reboot kexec_load "
    "init_module finit_module delete_module bpf io_uring_setup process_vm_readv process_vm_writev tkill"
).split()


def _seccomp_program(arch: int, nr: dict, pid: int) -> list:
    """The filter as (code, jt, jf, k) tuples; a denied syscall fails with EPERM."""
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ..., BPF_RET|K
    allow, deny, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # RET_ALLOW, RET_ERRNO|EPERM, |ENOSYS
    arg0, arg2_lo, arg2_hi = 16, 32, 36  # offsets in struct seccomp_data (little-endian)
    clone_thread, af_unix = 0x00010000, 1
    # Each rule: syscall -> instructions run when it matches (they end in a return).
    rules = {
        # Threads yes (pthread_create passes CLONE_THREAD), new processes no.
        "clone": [(ld, 0, 0, arg0), (jset, 0, 1, clone_thread), (ret, 0, 0, allow), (ret, 0, 0, deny)],
        # clone3 keeps its flags in memory the filter cannot read: ENOSYS makes glibc fall back to clone.
        "clone3": [(ret, 0, 0, enosys)],
        "socket": [(ld, 0, 0, arg0), (jeq, 0, 1, af_unix), (ret, 0, 0, allow), (ret, 0, 0, deny)],
        # Signals only to itself (pid 0 is its own process group, which holds only itself).
        "kill": [(ld, 0, 0, arg0), (jeq, 1, 0, pid), (jeq, 0, 1, 0), (ret, 0, 0, allow), (ret, 0, 0, deny)],
        "tgkill": [(ld, 0, 0, arg0), (jeq, 0, 1, pid), (ret, 0, 0, allow), (ret, 0, 0, deny)],
        # prlimit64 reads limits too (getrlimit); only a NULL new-limit pointer is allowed.
        "prlimit64": [
            (ld, 0, 0, arg2_lo), (jeq, 0, 3, 0), (ld, 0, 0, arg2_hi), (jeq, 0, 1, 0),
            (ret, 0, 0, allow), (ret, 0, 0, deny),
        ],
    }  # fmt: skip
    denied = [nr[name] for name in _ALWAYS_DENIED if name in nr]
    head = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny), (ld, 0, 0, 0)]
    # x32 syscalls (bit 30) share the x86_64 arch value; none is needed.
    head += [(jge, 0, 1, 0x40000000), (ret, 0, 0, deny)]
    for number in denied:
        head += [(jeq, 0, 1, number), (ret, 0, 0, deny)]
    body = []
    for name, block in rules.items():
        # A match falls through to the jump into its block; anything else skips that jump.
        head += [(jeq, 0, 1, nr[name]), (0x05, 0, 0, 0)]  # BPF_JMP|JA with k patched below
        body.append((len(head) - 1, block))
    head.append((ret, 0, 0, allow))
    program = list(head)
    for jump_at, block in body:
        program[jump_at] = (0x05, 0, 0, len(program) - jump_at - 1)
        program += block
    return program


def _install_seccomp(layers: list) -> None:
    machine = os.uname().machine
    if machine not in _ARCHES:
        return
    ctypes, libc = _libc()
    arch, numbers = _ARCHES[machine]
    program = _seccomp_program(arch, numbers, os.getpid())

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*[SockFilter(*ins) for ins in program])
    fprog = SockFprog(len(program), filters)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    args = [ctypes.c_ulong(0)] * 3
    if libc.prctl(pr_set_no_new_privs, ctypes.c_ulong(1), *args) != 0:
        return
    if libc.prctl(pr_set_seccomp, ctypes.c_ulong(seccomp_mode_filter), ctypes.byref(fprog), *args[:2]) == 0:
        layers.append("seccomp")


def _install_guard(workdir: str) -> None:
    """The audit hook (it also sees the bootstrap's own actions after this point)."""
    import _thread

    get_ident, realpath, join, getcwd, fspath, fsdecode = (
        _thread.get_ident, os.path.realpath, os.path.join, os.getcwd, os.fspath, os.fsdecode,
    )  # fmt: skip
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    writable = (workdir, "/dev/null")
    readable = {realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    readable |= {workdir, "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share"}
    readable |= {"/dev/null", "/dev/zero", "/dev/urandom"}
    pid, af_unix = os.getpid(), 1
    in_hook = set()  # threads inside the hook right now (what the hook itself calls raises events too)
    refused = {
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
        "pty.spawn", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
        "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook",
    }  # fmt: skip
    refused_imports = {"_posixsubprocess", "ctypes", "_ctypes", "_xxsubinterpreters", "_testcapi"}
    # event: (indices of path arguments, indices of dir_fd arguments)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((0, 1), (2,)),
        "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.utime": ((0,), (3,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
    }  # fmt: skip

    def resolve(path):
        if isinstance(path, int):
            return None  # an open file descriptor: checked when it was opened
        return realpath(join(getcwd(), fsdecode(fspath(path))))

    def inside(path, roots):
        return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def check(event, args):
        if event == "socket.__new__" and args[1] == af_unix:
            return  # a socketpair (asyncio's self-pipe); connect and bind stay refused for every family
        if event in refused or event.startswith(("socket.", "ctypes.")):
            refuse(event)
        elif event == "import" and args[0] in refused_imports:
            refuse(f"importing {args[0]}")
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
            if any(args[i] not in (None, -1) for i in dir_fds):
                refuse(f"{event} relative to a directory descriptor")
            for i in paths:
                target = resolve(args[i])
                if target is not None and not inside(target, (workdir,)):
                    refuse(f"{event} on {target}")

    # _posixsubprocess.fork_exec (what subprocess calls) raises no audit event of its own. Replace it
    # before anything imports it, and refuse any re-import that would bring the original back;
    # `import subprocess` (and asyncio, which imports it) keeps working, Popen is refused above.
    import _posixsubprocess

    def fork_exec(*args, **kwargs):
        refuse("_posixsubprocess.fork_exec")

    _posixsubprocess.fork_exec = fork_exec

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


def main() -> None:
    cfg = json.loads(sys.argv[1])
    job = json.loads(sys.stdin.buffer.read())
    code, tests, nonce = job["code"], job["tests"], job["nonce"]
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    del job

    import builtins
    import linecache
    import traceback
    import types

    # Everything used after the program starts is bound here: the program may patch builtins
    # (`builtins.exec = lambda *a: None` would otherwise make every test "pass") or module attributes.
    _exec, _compile, _enumerate, _len, _type = exec, compile, enumerate, len, type
    _BaseException, _SystemExit = BaseException, SystemExit
    write, exit_, print_exception, stderr = os.write, os._exit, traceback.print_exception, sys.stderr
    results_fd = cfg["results_fd"]

    def report(line: str) -> None:
        try:
            write(results_fd, f"{nonce} {line}\n".encode())
        except OSError:
            pass

    layers = []
    _set_limits(cfg, layers)
    if cfg["isolate"]:
        _unshare_network(layers)
        _install_seccomp(layers)
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # importing it again needs the refused dlopen; the cached copy must go
    if cfg["guard"]:
        _install_guard(cfg["workdir"])
        layers.append("audit")
    report("layers " + ",".join(layers))

    def show_error(error) -> None:
        try:
            # Skip this bootstrap's own frame: the traceback starts in the program.
            print_exception(_type(error), error, error.__traceback__.tb_next, file=stderr)
        except _BaseException:
            stderr.write(f"{_type(error).__name__}: {error}\n")

    def run(source: str, filename: str, namespace: dict, *, exit_ok: bool) -> bool:
        # Registering the source lets tracebacks show the failing line.
        linecache.cache[filename] = (_len(source), None, source.splitlines(True), filename)
        try:
            _exec(_compile(source, filename, "exec"), namespace)
            return True
        except _SystemExit as error:
            # A program that ends with sys.exit(0) still gets its tests run; a test never passes by
            # exiting (that would let `def f(x): sys.exit(0)` pass every assert).
            if exit_ok and error.code in (None, 0):
                return True
            show_error(error)
            return False
        except _BaseException as error:
            show_error(error)
            return False

    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    ok = run(code, "<program>", module.__dict__, exit_ok=True)
    failed = not ok
    for i, test in _enumerate(tests):
        passed = ok and run(test, f"<test {i}>", module.__dict__, exit_ok=False)
        report(f"test {i} {'1' if passed else '0'}")
        failed = failed or not passed
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    exit_(1 if failed else 0)  # without waiting for threads the program left running


if __name__ == "__main__":
    main()
