"""seccomp-bpf filters of the sandbox, as classic BPF bytes. Standard library only: the bootstrap inside
the sandbox imports this file too (it is bound in read-only next to it).

Two filters, stacked (the kernel applies every installed filter and the strictest answer wins):

- :func:`os_filter` — the OS layer, handed to bubblewrap (``--seccomp FD``) and loaded before the
  interpreter starts. It kills the process on syscalls no Python solution needs and that reach outside
  a namespace: tracing and other processes' memory, kernel modules and kexec, bpf, io_uring, keyrings,
  userfaultfd, perf, pidfds and queued signals (``pidfd_send_signal``, ``rt_sigqueueinfo``: they raise
  no audit event), device and fifo nodes (``mknod``), file handles, the immutable flag (the
  ``FS_IOC_SETFLAGS`` ioctl) and terminal injection (``TIOCSTI``). It still allows ``unshare`` and
  ``mount``: the bootstrap needs them once, to enter its own user namespace and remount its workdir
  ``noexec``, before it installs the second filter.
- :func:`boot_filter` — everything above plus no new processes (threads yes), no exec, no namespace or
  mount changes, no raising of limits, no sockets but Unix ones, and signals only to the process itself.
  The bootstrap installs it before the first line of the program runs; the process backend has only this.

A forbidden call kills the whole process (``SECCOMP_RET_KILL_PROCESS``): the parent sees SIGSYS and
records a violation, so a program cannot catch the refusal and go on to score. ``clone3`` answers
ENOSYS instead (its flags sit in memory the filter cannot read; glibc then falls back to ``clone``).
"""

from __future__ import annotations

import struct

# Syscall numbers: x86_64 from asm/unistd_64.h, aarch64 from asm-generic/unistd.h. Absent: not on that arch.
_X86_64 = dict(
    ptrace=101, process_vm_readv=310, process_vm_writev=311, kexec_load=246, kexec_file_load=320,
    init_module=175, finit_module=313, delete_module=176, bpf=321, io_uring_setup=425, io_uring_enter=426,
    io_uring_register=427, userfaultfd=323, perf_event_open=298, keyctl=250, add_key=248, request_key=249,
    pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297,
    mknod=133, mknodat=259, open_by_handle_at=304, name_to_handle_at=303, reboot=169, swapon=167,
    swapoff=168, acct=163, settimeofday=164, clock_settime=227, clock_adjtime=305, adjtimex=159, syslog=103,
    quotactl=179, fanotify_init=300, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
    open_tree=428, mount_setattr=442, pivot_root=155, chroot=161, setns=308, personality=135, vhangup=153,
    iopl=172, ioperm=173, ioctl=16, clone=56, clone3=435, fork=57, vfork=58, execve=59, execveat=322,
    mount=165, umount2=166, unshare=272, setrlimit=160, prlimit64=302, kill=62, tgkill=234, tkill=200,
    socket=41,
)  # fmt: skip
_AARCH64 = dict(
    ptrace=117, process_vm_readv=270, process_vm_writev=271, kexec_load=104, kexec_file_load=294,
    init_module=105, finit_module=273, delete_module=106, bpf=280, io_uring_setup=425, io_uring_enter=426,
    io_uring_register=427, userfaultfd=282, perf_event_open=241, keyctl=219, add_key=217, request_key=218,
    pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240,
    mknodat=33, open_by_handle_at=265, name_to_handle_at=264, reboot=142, swapon=224, swapoff=225, acct=89,
    settimeofday=170, clock_settime=112, clock_adjtime=266, adjtimex=171, syslog=116, quotactl=60,
    fanotify_init=262, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, open_tree=428,
    mount_setattr=442, pivot_root=41, chroot=51, setns=268, personality=92, vhangup=58, ioctl=29, clone=220,
    clone3=435, execve=221, execveat=281, mount=40, umount2=39, unshare=97, setrlimit=164, prlimit64=261,
    kill=129, tgkill=131, tkill=130, socket=198,
)  # fmt: skip
ARCHES = {
    "x86_64": (0xC000003E, _X86_64),
    "aarch64": (0xC00000B7, _AARCH64),
}  # machine: (AUDIT_ARCH_*, numbers)

OS_KILLED = (
    "ptrace process_vm_readv process_vm_writev kexec_load kexec_file_load init_module finit_module "
    "delete_module bpf io_uring_setup io_uring_enter io_uring_register userfaultfd perf_event_open keyctl "
    "add_key request_key pidfd_open pidfd_send_signal pidfd_getfd rt_sigqueueinfo rt_tgsigqueueinfo mknod "
    "mknodat open_by_handle_at name_to_handle_at reboot swapon swapoff acct settimeofday clock_settime "
    "clock_adjtime adjtimex syslog quotactl fanotify_init move_mount fsopen fsconfig fsmount fspick "
    "open_tree mount_setattr pivot_root chroot setns personality vhangup iopl ioperm"
).split()
BOOT_KILLED = "fork vfork execve execveat mount umount2 unshare setrlimit tkill".split()
# ioctl requests refused (the kernel truncates the request to 32 bits, so the low word is compared):
# FS_IOC_SETFLAGS (64- and 32-bit: chattr +i), FS_IOC_FSSETXATTR, TIOCSTI (typing into a terminal).
IOCTLS_KILLED = (0x40086602, 0x40046602, 0x401C5820, 0x5412)

_LD, _JEQ, _JSET, _JGE, _JA, _RET = 0x20, 0x15, 0x45, 0x35, 0x05, 0x06  # BPF_LD|W|ABS, BPF_JMP|..., BPF_RET|K
ALLOW, KILL, ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 38  # RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO|ENOSYS
_NR, _ARCH, _ARG0, _ARG1 = 0, 4, 16, 24  # offsets in struct seccomp_data (little-endian low words)
_CLONE_THREAD, _AF_UNIX = 0x00010000, 1


def _assemble(arch: int, nr: dict, killed: list[str], blocks: dict[str, list]) -> list[tuple]:
    """A filter: wrong arch or x32 -> kill; a ``killed`` syscall -> kill; a syscall with a block -> that
    block (it ends in a return); anything else -> allow."""
    head = [(_LD, 0, 0, _ARCH), (_JEQ, 1, 0, arch), (_RET, 0, 0, KILL), (_LD, 0, 0, _NR)]
    head += [(_JGE, 0, 1, 0x40000000), (_RET, 0, 0, KILL)]  # x32 syscalls share the x86_64 arch value
    for name in killed:
        if name in nr:
            head += [(_JEQ, 0, 1, nr[name]), (_RET, 0, 0, KILL)]
    jumps = []
    for name, block in blocks.items():
        if name in nr:  # a match falls through to the jump into its block; anything else skips that jump
            head += [(_JEQ, 0, 1, nr[name]), (_JA, 0, 0, 0)]
            jumps.append((len(head) - 1, block))
    head.append((_RET, 0, 0, ALLOW))
    program = list(head)
    for at, block in jumps:
        program[at] = (_JA, 0, 0, len(program) - at - 1)
        program += block
    if len(program) > 4096:
        raise ValueError("seccomp filter too long")
    return program


def _ioctl_block() -> list[tuple]:
    block = [(_LD, 0, 0, _ARG1)]
    for request in IOCTLS_KILLED:
        block += [(_JEQ, 0, 1, request), (_RET, 0, 0, KILL)]
    return block + [(_RET, 0, 0, ALLOW)]


def os_filter(machine: str) -> list[tuple]:
    """The OS layer's filter (see the module docstring) for ``machine`` (``os.uname().machine``)."""
    arch, nr = ARCHES[machine]
    return _assemble(arch, nr, OS_KILLED, {"ioctl": _ioctl_block(), "clone3": [(_RET, 0, 0, ENOSYS)]})


def boot_filter(machine: str, pid: int) -> list[tuple]:
    """The bootstrap's filter: the OS layer's plus the process rules; ``pid`` is the process itself (as its
    own pid namespace numbers it)."""
    arch, nr = ARCHES[machine]
    allow, kill = (_RET, 0, 0, ALLOW), (_RET, 0, 0, KILL)
    blocks = {
        "ioctl": _ioctl_block(),
        "clone3": [(_RET, 0, 0, ENOSYS)],
        # Threads yes (pthread_create passes CLONE_THREAD), new processes no.
        "clone": [(_LD, 0, 0, _ARG0), (_JSET, 0, 1, _CLONE_THREAD), allow, kill],
        "socket": [(_LD, 0, 0, _ARG0), (_JEQ, 0, 1, _AF_UNIX), allow, kill],
        # Signals only to itself (0: its own process group, which holds only itself).
        "kill": [(_LD, 0, 0, _ARG0), (_JEQ, 1, 0, pid), (_JEQ, 0, 1, 0), allow, kill],
        "tgkill": [(_LD, 0, 0, _ARG0), (_JEQ, 0, 1, pid), allow, kill],
        # prlimit64 also reads limits (getrlimit): only a NULL new-limit pointer (arg 2) passes.
        "prlimit64": [(_LD, 0, 0, 32), (_JEQ, 0, 3, 0), (_LD, 0, 0, 36), (_JEQ, 0, 1, 0), allow, kill],
    }
    return _assemble(arch, nr, OS_KILLED + BOOT_KILLED, blocks)


def to_bytes(program: list[tuple]) -> bytes:
    """The ``struct sock_filter`` array, as bubblewrap's ``--seccomp`` and ``prctl`` take it."""
    return b"".join(struct.pack("=HBBI", *ins) for ins in program)
