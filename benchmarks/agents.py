"""Agentic RL throughput: GRPO on `calculator` episodes, where the time goes.

    python benchmarks/agents.py                            # tiny and small, 20 measured steps each
    python benchmarks/agents.py --sizes tiny --steps 10 --work /tmp/agent-bench        # a quick look

What runs, per model size (``tiny`` ~1.07M parameters, ``small`` ~25M):

1. **START**: ``posttrain.tasks.tiny.build_tiny`` (random init), then a short posttrain SFT on the
   environment's golden trajectories (``posttrain.agents.demos.demo_rows``: calc, then answer, chat rows
   with the tools), so that episodes have the shape of real ones (2 turns, a tool call each) instead of a
   random model's one garbled turn. Cached in the work directory.
2. **GRPO**: W warm-up + N measured steps on ``examples/agent_calculator.yaml``'s settings (8 tasks x 8
   episodes per step, at most 3 turns of 32 new tokens, tool results cut at 16 tokens, temperature 1),
   fp32 on CPU, ``torch.set_num_threads(--threads)``, the HF engine, one optimiser step per rollout.

Metrics, from metrics.jsonl over the N measured steps:
    s/step         wall time per optimiser step (generation, tools, grading, rewards, the update).
    episodes/s     episodes per step / s/step.
    policy tok/s   tokens the policy sampled (agent/policy_tokens x episodes) / s/step: the training
                   tokens; environment tokens (tool results, bridges) are not counted.
    gen %          share of the time in the turn waves' ``engine.generate`` (generation/seconds).
    tools %        share in environment steps and resets (agent/tool_seconds), run concurrently.
    grade %        share in grading, the per-episode render check and labelling (agent/grade_seconds).
    update %       the rest of the step outside the rollout (step_s - rollout/seconds): forward, backward,
                   optimiser; the rollout's own remainder (rewards, advantages, files) is "other".
    turns, env %   mean assistant turns per episode, share of environment tokens in the sequences.
    success        share of episodes done (graded passed, no failure label), a check that the work is real.
    cpu s/step     this process's CPU seconds per step, start-up included: with --threads 1 on a machine
                   other programs load, a better estimate of the idle s/step than the wall time.

On a shared machine another program's load wrecks CPU timings; the benchmark records the cores other
programs kept busy during the run (``_common.busy_cores`` before and after) and marks a disturbed row ``!``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import busy_cores, fmt  # noqa: E402

BUDGETS = {"max_turns": 3, "max_new_tokens": 32, "max_tool_tokens": 16}
SFT_STEPS = {"tiny": 300, "small": 100}


def start_model(work: Path, size: str, threads: int) -> Path:
    """The SFT'd START of a size (cached)."""
    import torch

    from posttrain.agents.demos import demo_rows
    from posttrain.tasks.tiny import build_tiny, build_tokenizer
    from posttrain.train import train

    final = work / size / "sft" / "final"
    if final.is_dir():
        return final
    torch.set_num_threads(threads)
    base = build_tiny(work / size / "base", size=size, seed=0)
    rows = demo_rows("calculator", build_tokenizer(), n=8192, seed=1)  # too few rows are memorised
    demos = work / size / "demos.jsonl"
    demos.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(
        {
            "algorithm": "sft",
            "out": str(work / size / "sft"),
            "model": {"path": str(base)},
            "data": {"train": str(demos), "max_length": 512},
            "train": {"max_steps": SFT_STEPS[size], "batch_size": 32, "lr": 3e-3, "warmup_steps": 20,
                      "progress": False, "tensorboard": False},
        }
    )  # fmt: skip
    return final


def measure(work: Path, size: str, start: Path, warmup: int, steps: int, threads: int) -> dict:
    import torch

    from posttrain.config import load_config
    from posttrain.engine.run import read_metrics
    from posttrain.train import train

    torch.set_num_threads(threads)
    examples = Path(__file__).resolve().parents[1] / "examples" / "agent_calculator.yaml"
    out = work / size / f"grpo-{int(time.time())}"
    overrides = [
        f"model.path={start}", f"out={out}", f"train.max_steps={warmup + steps}", "train.eval_every=null",
        "train.save_every=null", "train.progress=false", "train.tensorboard=false", "monitor.enabled=false",
        "env.eval_tasks=0", f"env.budgets={json.dumps(BUDGETS)}",
    ]  # fmt: skip
    before = busy_cores()
    t0, cpu0 = time.perf_counter(), time.process_time()
    train(load_config(examples, overrides))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = busy_cores()
    rows = [m for m in read_metrics(out) if "step_s" in m][warmup:]
    total = sum(m["step_s"] for m in rows)
    episodes = sum(m["buffer/samples"] for m in rows)

    def share(key: str) -> float:
        return sum(m.get(key, 0.0) for m in rows) / total

    rollout = share("rollout/seconds")
    gen, tools, grade = share("generation/seconds"), share("agent/tool_seconds"), share("agent/grade_seconds")
    return {
        "size": size,
        "steps": len(rows),
        "s_per_step": total / len(rows),
        "episodes_per_s": episodes / total,
        "policy_tokens_per_s": sum(m["agent/policy_tokens"] * m["buffer/samples"] for m in rows) / total,
        "gen_share": gen,
        "tools_share": tools,
        "grade_share": grade,
        "other_rollout_share": rollout - gen - tools - grade,
        "update_share": 1 - rollout,
        "turns": statistics.mean(m["agent/turns"] for m in rows),
        "env_token_frac": statistics.mean(m["agent/env_token_frac"] for m in rows),
        "success": statistics.mean(m["agent/success"] for m in rows),
        "wall_s": wall,
        # CPU seconds of this process per step (start-up included): on a machine other programs load, the
        # better estimate of an idle machine's s/step with --threads 1
        "cpu_s_per_step": cpu / (warmup + steps),
        "busy_cores_other": max(x for x in (before, after) if x is not None) if (before or after) else None,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,small", help="comma-separated model sizes (tiny, small)")
    p.add_argument("--steps", type=int, default=20, help="measured steps N")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps W, excluded from the figures")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--work", default=None, help="keep models and runs here (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--start", default=None, help="use this model directory as START (one size only)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="agent-bench-"))
    results = []
    for size in args.sizes.split(","):
        start = Path(args.start) if args.start else start_model(work, size, args.threads)
        results.append(measure(work, size, start, args.warmup, args.steps, args.threads))
    head = f"{'size':<6} {'s/step':>7} {'episodes/s':>10} {'policy tok/s':>12} {'gen %':>6} {'tools %':>7} "
    head += f"{'grade %':>7} {'update %':>8} {'turns':>5} {'env %':>5} {'success':>7} {'cpu s/step':>10}"
    print(head)
    for r in results:
        mark = " !" if (r["busy_cores_other"] or 0) > 0.5 else ""
        print(
            f"{r['size']:<6} {fmt(r['s_per_step'], '.2f'):>7} {fmt(r['episodes_per_s'], '.1f'):>10} "
            f"{fmt(r['policy_tokens_per_s'], '.0f'):>12} {100 * r['gen_share']:>6.0f} {100 * r['tools_share']:>7.1f} "
            f"{100 * r['grade_share']:>7.1f} {100 * r['update_share']:>8.0f} {r['turns']:>5.2f} "
            f"{100 * r['env_token_frac']:>5.0f} {r['success']:>7.2f} {r['cpu_s_per_step']:>10.2f}{mark}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
