"""Helpers shared by the side-by-side benchmarks (SFT, DPO, GRPO).

Every benchmark runs each framework in its own child process, so that the peak resident
memory of one framework is not polluted by the other's imports, models or caches. A child
prints one line ``RESULT {json}``; the parent collects them with :func:`run_child`.

Timing follows one definition for every framework: the wall time between the end of
warm-up step W and the end of step W + N (:func:`measured_window`), so data collation,
forward, backward, clipping, the optimiser step and per-step bookkeeping all count.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

# Benchmark the posttrain next to these scripts, not whichever copy happens to be installed
# (an editable install can point at another checkout).
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULT_PREFIX = "RESULT "

# Benchmarks never reach the network: models and data are built locally.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}


# TRL's fastest settings on a CPU (shared/reference/README.md): no mixed precision, no activation
# checkpointing (slower at these sizes), no workers, no reports, no saving, no logging, no progress bar.
TRL_CPU_ARGS = dict(
    use_cpu=True,
    bf16=False,
    fp16=False,
    gradient_checkpointing=False,
    dataloader_num_workers=0,
    report_to="none",
    save_strategy="no",
    logging_steps=10**6,
    disable_tqdm=True,
)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux, VmHWM of /proc/self/status: the high-water mark of this process's own address space.
    `ru_maxrss` is not: a child started with fork + exec keeps its parent's peak there (a child of a
    300 MiB parent reports >= 300 MiB before it allocates anything), so a parent that built models
    before spawning the measured runs would floor every child's figure at its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20  # macOS reports bytes


def cpu_busy_seconds() -> float | None:
    """CPU seconds spent busy by all processes since boot, over every core (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by all processes over the next `seconds` (None off Linux).

    The parent calls it while idle, before starting a child: anything above ~0.15 is another
    program competing for the cores. With torch's threads pinned to the core count, a competitor
    does not slow a run proportionally: threads wait for each other at every parallel region,
    and steps of a small model can come out several times slower.
    """
    start = cpu_busy_seconds()
    time.sleep(seconds)
    end = cpu_busy_seconds()
    return None if start is None or end is None else (end - start) / seconds


def wait_until_quiet(limit: float, max_wait: float) -> float | None:
    """Poll :func:`busy_cores` until at most `limit` cores are busy or `max_wait` seconds have
    passed; returns the last reading (None off Linux)."""
    deadline = time.monotonic() + max_wait
    busy = busy_cores()
    while busy is not None and busy > limit and time.monotonic() < deadline:
        busy = busy_cores(5.0)
    return busy


def setup_child(threads: int) -> None:
    """Pin the intra-op thread count (before any model work) and make sure nothing goes online."""
    os.environ.update(OFFLINE_ENV)
    import torch

    torch.set_num_threads(threads)


def emit_result(result: dict) -> None:
    """Print the child's one result line (the parent reads the last such line)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str, spec: dict, *, timeout: float | None = None) -> dict:
    """Run ``python script --child <spec json>`` and return its result dict.

    Adds ``other_cores``: the cores that other programs kept busy while the child ran (all busy
    CPU time on the machine minus the child's own, over the child's wall time; None off Linux).
    A child that crashes or prints no result line gives ``{"error": ...}`` with the tail of its
    output, so one failing framework does not hide the others' numbers.
    """
    cmd = [sys.executable, script, "--child", json.dumps(spec)]
    env = {**os.environ, **OFFLINE_ENV}
    busy0, own0 = cpu_busy_seconds(), _children_cpu_seconds()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_busy_seconds(), _children_cpu_seconds()
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        return {"error": f"exit code {proc.returncode}", "output_tail": tail, "other_cores": other}
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result.update(child_wall_s=round(wall, 1), other_cores=other)
    return result


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_window(end_times: list[float], tokens: list[int], warmup: int, steps: int) -> dict:
    """Throughput over steps warmup+1 .. warmup+steps.

    Args:
        end_times: wall-clock time (s) at the end of each step, step 1 first.
        tokens: non-padding tokens processed in each step, step 1 first.
        warmup, steps: W warm-up steps excluded, N measured steps.

    Returns:
        ``{"s_per_step", "tokens_per_s", "measured_tokens", "measured_s"}``; the window runs from
        the end of step W to the end of step W + N, so it holds exactly the N measured steps.
    """
    if len(end_times) < warmup + steps or len(tokens) < warmup + steps:
        raise ValueError(f"need {warmup + steps} steps, got {len(end_times)} times and {len(tokens)} counts")
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the window starts at the end of step W")
    seconds = end_times[warmup + steps - 1] - end_times[warmup - 1]
    n_tokens = sum(tokens[warmup : warmup + steps])
    return {
        "s_per_step": seconds / steps,
        "tokens_per_s": n_tokens / seconds,
        "measured_tokens": n_tokens,
        "measured_s": seconds,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    return None if a is None or b is None or b == 0 else a / b


def trl_step_clock():
    """A transformers ``TrainerCallback`` that stamps ``time.perf_counter()`` at the beginning and
    end of every optimiser step (``begin_times``, ``end_times``). Built lazily, so that importing
    this module does not import transformers."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin_times: list[float] = []
            self.end_times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin_times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end_times.append(time.perf_counter())

    return StepClock()


def bench_main(args, variants_table: dict, run_all, name: str) -> None:
    """The parent side of a benchmark: check the variants, skip TRL when absent, run every
    (size, variant) in a work directory, write the JSON report to args.out."""
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in variants_table]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {list(variants_table)}")
    if find_spec("trl") is None:
        print("trl is not installed: TRL runs skipped, posttrain figures only (pip install trl)")
        variants = [v for v in variants if variants_table[v]["framework"] != "trl"]
    sizes = [s for s in args.sizes.split(",") if s]
    work = Path(args.work or tempfile.mkdtemp(prefix=f"posttrain-bench-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_all(args, sizes, variants, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {out}")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ids_digest(sequences: list[list[int]]) -> str:
    """sha256 of every sequence's token ids, in order: equal digests mean identical tokenisation."""
    return hashlib.sha256(json.dumps(sequences).encode()).hexdigest()


def fmt(value, spec: str, unit: str = "") -> str:
    """A table cell: `value` formatted, or "-" when there is none."""
    return "-" if value is None else format(value, spec) + unit


def versions() -> dict:
    """Package versions, and where the measured posttrain lives (this checkout: see REPO above)."""
    from importlib.metadata import PackageNotFoundError, version

    import posttrain

    found = {"posttrain_path": str(Path(posttrain.__file__).parent)}
    for name in ("posttrain", "torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


BUSY_LIMIT = 0.15  # cores kept busy by other programs (before or during a run) that flag it unreliable


def run_quietly(script: str, spec: dict, label: str, args, retries: int = 0) -> dict:
    """Run `script`'s child on `spec` once the machine is quiet (waiting up to args.wait_quiet s); run it
    again, up to `retries` times, when other programs kept the cores busy meanwhile. A run that stays
    disturbed is kept, flagged `noisy`. Each attempt gets its own run directory."""
    for attempt in range(retries + 1):
        before = wait_until_quiet(BUSY_LIMIT, args.wait_quiet)
        print(f"{label} ..." + (f" (retry {attempt})" if attempt else ""), flush=True)
        run_spec = {**spec, "run_dir": f"{spec['run_dir']}-{attempt}"} if "run_dir" in spec else spec
        result = run_child(script, run_spec, timeout=args.timeout)
        result["busy_cores_before"] = before
        if "error" in result:
            print(f"{label} failed: {result['error']}\n  " + "\n  ".join(result.get("output_tail", [])))
        busy = max((x for x in (before, result.get("other_cores")) if x is not None), default=0.0)
        result["noisy"] = busy > BUSY_LIMIT
        if not result["noisy"]:
            break
        print(f"{label}: WARNING other programs kept {busy:.2f} cores busy around this run")
    if result["noisy"]:
        print(f"{label}: figures NOT reliable (machine busy); rerun on a quiet machine")
    return result
