"""Run blocking calls concurrently, each under its own wall-clock limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


def call_all(fns: Sequence[Callable[[], Any]], timeouts: Sequence[float]) -> list[tuple[str, Any]]:
    """Run each fn in its own daemon thread; ("ok", value), ("raised", exception) or ("timeout", None).

    Daemon threads, not a ``ThreadPoolExecutor``: the pool's workers are joined at interpreter exit, so
    one tool that never returns would hang the whole process at the end of the run.
    """
    results: list[tuple[str, Any] | None] = [None] * len(fns)

    def work(i: int) -> None:
        try:
            results[i] = ("ok", fns[i]())
        except BaseException as e:  # noqa: BLE001 — every failure is reported to the caller
            results[i] = ("raised", e)

    threads = [
        threading.Thread(target=work, args=(i,), daemon=True, name="posttrain-env") for i in range(len(fns))
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    out = []
    for i, t in enumerate(threads):
        t.join(max(0.0, start + timeouts[i] - time.monotonic()))
        out.append(("timeout", None) if t.is_alive() else results[i])
    return out
