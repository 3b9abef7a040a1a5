"""The seccomp filters, run through a small classic-BPF interpreter: the decisions for both arches, without
needing either machine (the attack tests check the real kernel on this one)."""

import struct

import pytest

from posttrain.sandbox import _bpf


def run_filter(program, arch: int, nr: int, args=(0,) * 6) -> int:
    """The action the filter returns for one syscall (struct seccomp_data, little-endian)."""
    args = (list(args) + [0] * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & (2**64 - 1) for a in args])
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:  # LD W ABS
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:  # RET K
            return k
        elif code == 0x05:  # JA
            pc += k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


@pytest.mark.parametrize("machine", sorted(_bpf.ARCHES))
def test_filters_decide_as_documented(machine):
    arch, nr = _bpf.ARCHES[machine]
    pid = 2
    boot, os_layer = _bpf.boot_filter(machine, pid), _bpf.os_filter(machine)
    ALLOW, KILL, ENOSYS = _bpf.ALLOW, _bpf.KILL, _bpf.ENOSYS
    for program in (boot, os_layer):
        assert run_filter(program, 0x40000003, nr["socket"]) == KILL  # another arch (i386)
        assert run_filter(program, arch, 0x40000000 + 1) == KILL  # x32
        for name in ("ptrace", "pidfd_send_signal", "rt_sigqueueinfo", "mknodat", "bpf", "userfaultfd"):
            assert run_filter(program, arch, nr[name]) == KILL, name
        assert run_filter(program, arch, nr["ioctl"], (3, 0x40086602)) == KILL  # chattr +i
        assert run_filter(program, arch, nr["ioctl"], (3, 0x5401)) == ALLOW  # TCGETS
        assert run_filter(program, arch, nr["clone3"]) == ENOSYS
        assert run_filter(program, arch, 0) in (ALLOW, KILL)  # io_setup (aarch64) / read (x86_64)
    # The OS layer lets the bootstrap set itself up; the bootstrap's own filter then closes that.
    for name in ("unshare", "mount", "execve"):
        assert run_filter(os_layer, arch, nr[name]) == ALLOW
        assert run_filter(boot, arch, nr[name]) == KILL
    clone_thread = 0x00010000 | 0x00000100 | 0x00000200  # CLONE_THREAD | CLONE_VM | CLONE_FS
    assert run_filter(boot, arch, nr["clone"], (clone_thread,)) == ALLOW
    assert run_filter(boot, arch, nr["clone"], (0x11,)) == KILL  # fork: SIGCHLD only
    assert run_filter(boot, arch, nr["kill"], (pid, 9)) == ALLOW
    assert run_filter(boot, arch, nr["kill"], (0, 9)) == ALLOW
    assert run_filter(boot, arch, nr["kill"], (1, 9)) == KILL
    assert run_filter(boot, arch, nr["kill"], (-1, 9)) == KILL
    assert run_filter(boot, arch, nr["tgkill"], (pid, 5, 9)) == ALLOW
    assert run_filter(boot, arch, nr["socket"], (1,)) == ALLOW  # AF_UNIX
    assert run_filter(boot, arch, nr["socket"], (2,)) == KILL  # AF_INET
    assert run_filter(boot, arch, nr["prlimit64"], (0, 7, 0, 0x1000)) == ALLOW  # getrlimit
    assert run_filter(boot, arch, nr["prlimit64"], (0, 7, 0x1000, 0)) == KILL  # setting one
    assert len(_bpf.to_bytes(boot)) == 8 * len(boot)
