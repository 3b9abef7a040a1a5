"""cgroup v2 limits for the OS backend, where a delegated cgroup is available.

rlimits always apply (inside the sandbox, per process, plus RLIMIT_NPROC per user namespace); a cgroup
adds limits on the whole tree that rlimits cannot express: resident memory including the tmpfs workdir
(``memory.max``, no swap), the number of tasks (``pids.max``), and ``cgroup.kill`` to end every process
in it at once. It needs a cgroup v2 directory this process may create children in, with the memory and
pids controllers enabled for them (a systemd unit with ``Delegate=yes``, a container's own cgroup,
or one root made). Name it with ``sandbox.cgroup`` / ``POSTTRAIN_SANDBOX_CGROUP``; nothing is guessed,
since writing into the wrong cgroup could move the trainer itself.

Each run gets ``<parent>/posttrain-<tag>``; bubblewrap is started inside it by a one-line shell that
writes its own pid into ``cgroup.procs`` before it execs bwrap, so no process of the sandbox ever runs
outside. After the run: ``cgroup.kill``, the OOM count from ``memory.events``, and the directory removed.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

ENV = "POSTTRAIN_SANDBOX_CGROUP"


def check_parent(path: str | os.PathLike) -> Path:
    """``path`` as a usable parent, or ValueError saying why not."""
    parent = Path(path)
    controllers = parent / "cgroup.subtree_control"
    if not (parent / "cgroup.controllers").is_file() or not controllers.is_file():
        raise ValueError(f"sandbox.cgroup: {parent} is not a cgroup v2 directory")
    enabled = set(controllers.read_text().split())
    missing = {"memory", "pids"} - enabled
    if missing:
        try:
            controllers.write_text(" ".join(f"+{c}" for c in sorted(missing)))
        except OSError as e:
            raise ValueError(
                f"sandbox.cgroup: {parent} does not delegate {', '.join(sorted(missing))} to its children "
                f"and they cannot be enabled ({e.strerror})"
            ) from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"sandbox.cgroup: {parent} is not writable by this process")
    return parent


class RunCgroup:
    """The cgroup of one run: :meth:`wrap` its command, :meth:`close` after it ended."""

    def __init__(self, parent: Path, tag: str, *, memory_bytes: int, max_tasks: int):
        self.path = parent / f"posttrain-{tag}"
        self.path.mkdir()
        for name, value in (("memory.max", memory_bytes), ("memory.swap.max", 0), ("pids.max", max_tasks)):
            target = self.path / name
            if name != "memory.swap.max" or target.exists():  # no swap accounting on some kernels
                target.write_text(str(value))

    def wrap(self, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *argv]

    def close(self) -> int:
        """Kill what is left, remove the directory; returns how many OOM kills it saw."""
        kill = self.path / "cgroup.kill"
        if kill.exists():
            try:
                kill.write_text("1")
            except OSError:
                pass
        ooms = 0
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    ooms = int(value)
        except (OSError, ValueError):
            pass
        deadline = time.monotonic() + 2.0
        while True:
            try:
                self.path.rmdir()
                break
            except OSError as e:
                # EBUSY: tasks still leaving after cgroup.kill (ms). Anything else: not a cgroup we can remove.
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        return ooms
