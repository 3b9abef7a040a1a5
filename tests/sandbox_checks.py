"""What the sandbox tests look for after a run: the run's processes gone, its directories removed."""

import os
import tempfile
import time

from posttrain.sandbox import TMP_PREFIX


def leftover_processes(tag: str) -> list[int]:
    """Host processes whose command line carries a run's tag (after a short grace for reaping)."""
    deadline = time.monotonic() + 2.0
    while True:
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if tag.encode() in open(f"{entry.path}/cmdline", "rb").read():
                        found.append(int(entry.name))
                except OSError:
                    pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def sandbox_dirs() -> set[str]:
    """The sandbox's working directories now in the temporary directory."""
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith(TMP_PREFIX)}
