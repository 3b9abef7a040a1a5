"""GRPO vs CISPO vs GSPO (and, optionally, online DPO) from the quickstart's SFT model: held-out pass@1 curves
and entropy at the same budget, over seeds.

    python benchmarks/objectives.py                                   # 3 objectives x 3 seeds
    python benchmarks/objectives.py --seeds 0 --steps 40 --work /tmp/obj   # a quick look
    python benchmarks/objectives.py --algorithms grpo cispo gspo online_dpo online_dpo_rpo online_dpo_ds

What runs:

1. **START**: the quickstart pipeline's data, base and SFT stages (posttrain/pipelines/quickstart.yaml, the
   quickstart's Budget), into ``--quickstart`` (default runs/quickstart); a finished stage there is reused,
   so a quickstart already run is the start as it is.
2. **Each objective, each seed**: the quickstart's GRPO stage (the pipeline's ``grpo``: 16 prompts x 8
   samples of <= 6 tokens on add2 / sub2, exact-match reward, KL 0.05 to the start, lr 3e-5, Adam betas
   0.9 / 0.99, constant lr) with the objective's preset (config/online.py RL_PRESETS) and ``--epochs`` x
   ``--minibatches`` optimiser steps per rollout (default 2 x 2). With one step per rollout the ratio is 1
   at every update and GSPO's gradient is GRPO's (the last session's finding): the objectives differ only
   in how they treat a policy that moved since it sampled, so each rollout is reused here. Online DPO: 64
   prompts x 2 samples (the same 128 samples a rollout), sigmoid, beta 0.1, the same lr; its variants
   ``online_dpo_rpo`` (+ the chosen completion's NLL, dpo.sft_weight 1) and ``online_dpo_ds`` (tied pairs
   replaced by fresh prompts, rl.dynamic_sampling).
   The same number of optimiser steps (``--steps``) for all; the seed is the seed of the sampling and the
   prompt order (train.seed).
3. **Held out**: greedy exact match on ``arithmetic.eval_rows(("add2", "sub2"))`` (800 problems, none in
   training) every ``--eval-every`` steps (the online evaluator) and at step 0 (the SFT model, by the same
   greedy rule with ``eval.generation.accuracy``).

Prints a table per seed (pass@1 at start, end and best, mean entropy of the last rollouts, training seconds)
and the mean over seeds; writes ``objectives.json`` and ``objectives.png`` (pass@1 vs step, one thin line a
seed, the mean bold) into ``--work``. Run one at a time on a shared machine (``OMP_NUM_THREADS=1``): the
numbers are held-out accuracies, but the seconds are only comparable within one quiet run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posttrain import quickstart  # noqa: E402
from posttrain.engine.run import read_metrics  # noqa: E402
from posttrain.tasks import arithmetic  # noqa: E402
from posttrain.train import train  # noqa: E402

EVAL_LEVELS = quickstart.RL_LEVELS
# Arms besides the algorithms by name: (algorithm, what they set on top of its config).
VARIANTS = {
    "online_dpo_rpo": ("online_dpo", {"dpo": {"sft_weight": 1.0}}),  # RPO: + the chosen's NLL per token
    "online_dpo_ds": ("online_dpo", {"rl": {"dynamic_sampling": True}}),  # tied pairs replaced by new prompts
}


def build_start(qs: Path, until: str = "sft") -> dict:
    """The quickstart pipeline's stages up to `until` (data, base, sft; posttrain/pipelines/quickstart.yaml,
    its Budget), run into `qs` or reused there; returns {"base", "sft", "tiny", "prompts_train", "sft_train":
    paths, "grpo": the GRPO stage's resolved config}."""
    from posttrain.pipeline import run_pipeline

    pipe = quickstart.quickstart_pipeline(qs)
    t0 = time.time()
    done = run_pipeline(pipe, until=until, cards=False)
    if any(v != "reused" for v in done.values()):
        print(f"[quickstart] {done} in {time.time() - t0:.0f}s", flush=True)
    data = pipe.stage("data").attributes()
    return {
        "base": pipe.stage("base").run_dir / "final",
        "sft": pipe.stage("sft").run_dir / "final",
        **{k: data[k] for k in ("tiny", "prompts_train", "sft_train")},
        "grpo": pipe.stage("grpo").spec,
    }


def run_config(arm: str, seed: int, args, start: dict, eval_file: Path) -> dict:
    """The quickstart's GRPO stage as a raw config, with the arm's algorithm preset (the stage's own
    aggregation left out: the preset's is the objective's), a variant's settings (`VARIANTS`), `seed` and the
    budget."""
    algorithm, extra = VARIANTS.get(arm, (arm, {}))
    base = start["grpo"]
    rollout = {
        k: base["rollout"][k]
        for k in ("prompts_per_step", "group_size", "max_new_tokens")
        if k in base["rollout"]
    }
    rl = {"rewards": base["rl"]["rewards"], "kl_coef": base["rl"]["kl_coef"]}
    rl |= {"epochs": args.epochs, "minibatches": args.minibatches}
    train_opts = {k: base["train"][k] for k in ("lr", "betas", "schedule") if k in base["train"]}
    train_opts |= {
        "seed": seed, "max_steps": args.steps, "eval_every": args.eval_every, "log_every": 1,
        "save_every": None, "progress": False, "tensorboard": False,
    }  # fmt: skip
    raw = {
        "algorithm": algorithm,
        "out": str(args.work / f"{arm}-seed{seed}"),
        "model": {"path": str(start["sft"])},
        "data": {**base["data"], "eval": str(eval_file)},
        "rollout": rollout,
        "rl": rl,
        "train": train_opts,
        "monitor": {"enabled": False},
    }
    if algorithm == "online_dpo":  # the same 128 samples a rollout, as 64 pairs; no KL term (beta is it)
        raw["rollout"] = {**rollout, "prompts_per_step": 128 // 2, "group_size": 2}
        raw["rl"] = {k: v for k, v in rl.items() if k != "kl_coef"}
        raw["dpo"] = {"kind": "sigmoid", "beta": 0.1}
    for section, values in extra.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def summarise(run_dir: Path, start: float, steps_per_rollout: int) -> dict:
    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if "reward/mean" in m]  # the optimiser steps' lines (evaluations are others)
    curve = [(0, start)] + [(m["step"], m["eval/pass@1"]) for m in metrics if "eval/pass@1" in m]
    entropy = [m["entropy"] for m in steps if "entropy" in m]
    tail = max(1, len(entropy) // 5)
    return {
        "curve": curve,
        "start": start,
        "end": curve[-1][1],
        "best": max(p for _, p in curve[1:]),
        "mean": statistics.mean(p for _, p in curve[1:]),
        "entropy_first": entropy[0] if entropy else None,
        "entropy_last": statistics.mean(entropy[-tail:]) if entropy else None,
        "reward_last": statistics.mean(m["reward/mean"] for m in steps[-steps_per_rollout * 3 :]),
        "train_seconds": sum(m["step_s"] for m in steps),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, (algorithm, seeds) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results.items()):
        curves = [r["curve"] for r in seeds.values()]
        for c in curves:
            ax.plot(*zip(*c), color=color, alpha=0.3, lw=1)
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, color=color, lw=2.2, label=f"{algorithm} (mean of {len(curves)})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("held-out pass@1 (greedy, add2 + sub2)")
    ax.set_title("From the quickstart's SFT model, the same budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--work", type=Path, default=Path("runs/bench-objectives"), help="Run directories, results."
    )
    p.add_argument(
        "--quickstart", type=Path, default=Path("runs/quickstart"), help="The quickstart's out (START)."
    )
    p.add_argument(
        "--algorithms", nargs="+", default=["grpo", "cispo", "gspo"],
        help=f"Online algorithms by name, or the variants {', '.join(VARIANTS)}.",
    )  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=120, help="Optimiser steps per run (the budget).")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2, help="Passes over each rollout.")
    p.add_argument("--minibatches", type=int, default=2, help="Optimiser steps per pass.")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    paths = build_start(args.quickstart)
    start_model = paths["sft"]
    eval_rows = arithmetic.eval_rows(EVAL_LEVELS)
    eval_file = args.work / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.eval.generation import accuracy

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(start_model),
        AutoTokenizer.from_pretrained(start_model),
    )
    start = accuracy(model, tokenizer, eval_rows, max_new_tokens=paths["grpo"]["rollout"]["max_new_tokens"])
    print(f"START {start_model}: held-out pass@1 {start:.3f} on {len(eval_rows)} problems", flush=True)

    out_json = args.work / "objectives.json"
    results: dict = json.loads(out_json.read_text())["results"] if out_json.exists() else {}
    for seed in args.seeds:  # seed-major: a cut-short benchmark still has every objective on the first seeds
        for algorithm in args.algorithms:
            if str(seed) in results.get(algorithm, {}):
                continue
            raw = run_config(algorithm, seed, args, paths, eval_file)
            t0 = time.time()
            res = train(raw, overwrite=True)
            summary = summarise(res.run_dir, start, args.epochs * args.minibatches)
            results.setdefault(algorithm, {})[str(seed)] = summary
            entropy = f"{fmt(summary['entropy_first'])} -> {fmt(summary['entropy_last'])}"
            print(
                f"[{algorithm} seed {seed}] pass@1 {start:.3f} -> {summary['end']:.3f} (best {summary['best']:.3f}), "
                f"entropy {entropy}, {time.time() - t0:.0f}s",
                flush=True,
            )
            out_json.write_text(json.dumps({"args": {**vars(args), "work": str(args.work),
                                                     "quickstart": str(args.quickstart)},
                                            "start": start, "results": results}, indent=1))  # fmt: skip
    print_tables(results, start)
    plot(results, args.work / "objectives.png")
    print(f"\n{out_json}\n{args.work / 'objectives.png'}")


def print_tables(results: dict, start: float) -> None:
    cols = ("start", "end", "best", "mean", "entropy_first", "entropy_last", "reward_last", "train_seconds")
    head = f"{'objective':<15}{'seed':>5}" + "".join(f"{c:>14}" for c in cols)
    print(
        "\nheld-out pass@1 (greedy; 'mean' over the evaluations), entropy (nats/token), train reward\n" + head
    )
    for algorithm, seeds in results.items():
        for seed, r in sorted(seeds.items()):
            print(f"{algorithm:<15}{seed:>5}" + "".join(f"{fmt(r[c]):>14}" for c in cols))
        mean = {
            c: None if None in (v := [r[c] for r in seeds.values()]) else statistics.mean(v) for c in cols
        }
        print(f"{algorithm:<15}{'mean':>5}" + "".join(f"{fmt(mean[c]):>14}" for c in cols))


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
