"""Per-turn credit on `guess`: trajectory-level vs discounted vs anchor-state (GiGPO) at the same budget.

    python benchmarks/agent_credit.py                                  # 3 seeds, 3 modes, 60 steps each
    python benchmarks/agent_credit.py --seeds 0 --steps 4 --demos 64 --sft-steps 20 --work /tmp/cr   # smoke

An experiment, not a promise. Per seed:

1. **START**: a random tiny model (``posttrain.tasks.tiny.build_tiny``) SFT'd on a mix of demos: half the
   environment's golden binary search, half a skewed search that uses the feedback but guesses a quarter
   of the way into the interval (consistent, slower, often out of guesses). The start plays a mixture, so
   there is room to fall toward ceil(log2(N+1)) guesses.
2. **GRPO** from that start with ``env.credit.mode`` in {trajectory, discounted, anchor}, the same tasks,
   seed and budget (8 tasks x 8 episodes per step), a per-wrong-guess penalty of ``--step-penalty`` (the
   per-turn reward discounted and anchor credit can see), gamma ``--gamma``.

Curves (from metrics.jsonl, per step): ``agent/success`` and ``agent/turns``; and at the end, greedy
held-out episodes: success and mean guesses of the solved ones against the optimum ceil(log2(N+1)).
Prints a table and writes ``credit.json`` (every curve) in the work directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QUIET = {"progress": False, "tensorboard": False}
BUDGETS = {"max_turns": 6, "max_new_tokens": 28}  # <call>guess(31)</call> is 22 tiny tokens


def skewed(task):
    """Uses the feedback, but guesses a quarter of the way into the interval (slower than bisection)."""
    from posttrain.agents.policies import Call

    lo, hi = 1, int(task["n"])
    while True:
        reply = (yield [Call("guess", {"n": lo + (hi - lo) // 4})])[0]
        g = lo + (hi - lo) // 4
        if reply.startswith("higher"):
            lo = g + 1
        elif reply.startswith("lower"):
            hi = g - 1
        else:
            return


def start_model(root: Path, seed: int, demos: int, steps: int) -> Path:
    from posttrain.agents.demos import demo_rows
    from posttrain.tasks.tiny import build_tiny, build_tokenizer
    from posttrain.train import train

    final = root / "sft" / "final"
    if final.is_dir():
        return final
    tok = build_tokenizer()
    rows = demo_rows("guess", tok, n=demos // 2, seed=100 + seed)
    rows += demo_rows("guess", tok, n=demos // 2, seed=200 + seed, script=skewed, passed_only=False)
    path = root / "demos.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "algorithm": "sft",
        "out": str(root / "sft"),
        "model": {"path": str(build_tiny(root / "base", seed=seed))},
        "data": {"train": str(path), "max_length": 512},
        "train": {
            "max_steps": steps,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 10,
            "seed": seed,
            **QUIET,
        },
    }
    return train(cfg).final


def held_out(model_dir: Path, n: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.agents.envs.guess import GuessEnv
    from posttrain.agents.runner import Budgets, EpisodeRunner
    from posttrain.rollout.engine import HFEngine, Sampling

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    runner = EpisodeRunner(tok, "tiny", budgets=Budgets(**BUDGETS), sampling=Sampling(temperature=0))
    eps = runner.run(HFEngine(model, tok), GuessEnv, GuessEnv.tasks(n, split="held_out", seed=0))
    solved = [e for e in eps if e.failure is None and e.reward > 0]
    guesses = [e.grade.components["guesses"] for e in solved]
    optimum = [e.grade.components["limit"] for e in solved]
    return {
        "success": len(solved) / max(1, n),
        "guesses": statistics.mean(guesses) if guesses else None,
        "limit": statistics.mean(optimum) if optimum else None,
    }


def grpo(root: Path, start: Path, mode: str, seed: int, args) -> dict:
    from posttrain.engine.run import read_metrics
    from posttrain.train import train

    credit = {} if mode == "trajectory" else {"mode": mode, "gamma": args.gamma}
    cfg = {
        "algorithm": "grpo",
        "out": str(root / f"grpo_{mode}"),
        "model": {"path": str(start)},
        "env": {
            "name": "guess",
            "options": {"step_penalty": args.step_penalty},
            "budgets": BUDGETS,
            "tasks": 512,
            "eval_tasks": 0,
            "task_seed": 100 + seed,
            "credit": credit,
        },
        "rollout": {"prompts_per_step": 8, "group_size": 8},
        "train": {"max_steps": args.steps, "lr": args.lr, "seed": seed, **QUIET},
    }
    res = train(cfg)
    curve = [
        {"step": m["step"], "success": m.get("agent/success"), "turns": m.get("agent/turns")}
        for m in read_metrics(res.run_dir)
        if "agent/success" in m
    ]
    return {"curve": curve, "held_out": held_out(res.final, args.eval_tasks)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["trajectory", "discounted", "anchor"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--demos", type=int, default=512)
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--step-penalty", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--eval-tasks", type=int, default=64)
    p.add_argument("--work", default="runs/bench_agent_credit")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    work, out = Path(args.work), {}
    for seed in args.seeds:
        root = work / f"seed{seed}"
        start = start_model(root, seed, args.demos, args.sft_steps)
        out[f"seed{seed}/start"] = {"held_out": held_out(start, args.eval_tasks)}
        for mode in args.modes:
            out[f"seed{seed}/{mode}"] = grpo(root, start, mode, seed, args)
            (work / "credit.json").write_text(json.dumps(out, indent=1))
    print(f"{'run':<22} {'first success':>13} {'last success':>12} {'first turns':>11} {'last turns':>10} "
          f"{'held-out success':>16} {'guesses/limit':>13}")  # fmt: skip
    for name, r in out.items():
        c, h = r.get("curve") or [{}], r["held_out"]
        ratio = f"{h['guesses']:.2f}/{h['limit']:.2f}" if h["guesses"] is not None else "-"
        cells = [c[0].get("success"), c[-1].get("success"), c[0].get("turns"), c[-1].get("turns")]
        cells = [f"{x:.3f}" if isinstance(x, float) else "-" for x in cells]
        print(
            f"{name:<22} {cells[0]:>13} {cells[1]:>12} {cells[2]:>11} {cells[3]:>10} {h['success']:>16.3f} {ratio:>13}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
