"""`posttrain quickstart`: watch a tiny model learn, on a CPU, in a few minutes.

Stages, each its own run directory under OUT (a finished stage is reused unless --fresh):

    data/    the bundled arithmetic task written as jsonl (pretraining corpus, SFT rows, held-out set)
    tiny/    a char-level tokenizer and a random 1M-parameter Llama, built locally
    base/    the base model: the tiny model pretrained (briefly, on purpose) on the corpus
    sft/     supervised fine-tuning of the base model on chat rows, loss on the answers only
    reward/  a Bradley-Terry reward model on the bundled gold-scored preference pairs
    dpo/     DPO from the SFT model on the same pairs
    grpo/    GRPO from the SFT model on 2-digit problems against the exact-match reward, held-out
             pass@1 every 100 steps

and a table: held-out exact match per level before and after SFT, the reward model's held-out
pair accuracy, and DPO against SFT by the gold score of their greedy answers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import (
    DataConfig,
    GroupRLOptions,
    ModelConfig,
    OnlineRun,
    PreferenceRun,
    RewardRun,
    RolloutConfig,
    RunConfig,
    SFTRun,
    TrainConfig,
)
from posttrain.eval.generation import accuracy_by_level, generate_greedy
from posttrain.rewards.model import RewardModel
from posttrain.tasks import arithmetic, preference
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train

# The demo task: three levels a 1M-parameter model can learn in minutes on 2 CPU cores.
LEVELS = ("add1", "add2", "sub2")
# GRPO's prompts: the levels SFT leaves unsolved (add1, 100 problems, it already knows: those groups
# would all score 1 and teach nothing).
RL_LEVELS = ("add2", "sub2")


@dataclass(frozen=True)
class Budget:
    """Steps per stage. The defaults leave the base model mediocre in the chat format (it met
    the format in a slice of its corpus only), so SFT has something to show, and keep the whole
    demo to a few minutes on 2 CPU cores."""

    base_steps: int = 400
    sft_steps: int = 500
    reward_steps: int = 150
    dpo_steps: int = 200
    grpo_steps: int = 400
    eval_per_level: int = 200
    rows: int = 20_000  # rows per generated training file


def base_config(out: Path, data: dict[str, Path], budget: Budget) -> RunConfig:
    return SFTRun(
        algorithm="sft",
        out=str(out / "base"),
        model=ModelConfig(path=str(out / "tiny")),
        data=DataConfig(train=str(data["pretrain"]), max_length=256),
        train=TrainConfig(
            lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01, batch_size=64, max_steps=budget.base_steps,
            warmup_steps=30, schedule="cosine", min_lr_ratio=0.1, save_every=200, log_every=10,
        ),
    )  # fmt: skip


def sft_config(out: Path, data: dict[str, Path], budget: Budget) -> RunConfig:
    return SFTRun(
        algorithm="sft",
        out=str(out / "sft"),
        model=ModelConfig(path=str(out / "base" / "final")),
        data=DataConfig(train=str(data["sft_train"]), max_length=128),
        train=TrainConfig(
            lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01, batch_size=128, max_steps=budget.sft_steps, warmup_steps=20,
            schedule="cosine", min_lr_ratio=0.1, save_every=200, log_every=10,
        ),
    )  # fmt: skip


def reward_config(out: Path, pref: dict[str, Path], budget: Budget) -> RunConfig:
    return RewardRun(
        algorithm="reward",
        out=str(out / "reward"),
        model=ModelConfig(path=str(out / "sft" / "final")),
        data=DataConfig(train=str(pref["pref_train"]), max_length=128),
        train=TrainConfig(
            lr=2e-3, batch_size=32, max_steps=budget.reward_steps, warmup_steps=10, log_every=10
        ),
    )


def dpo_config(out: Path, pref: dict[str, Path], budget: Budget) -> RunConfig:
    return PreferenceRun(
        algorithm="dpo",
        out=str(out / "dpo"),
        model=ModelConfig(path=str(out / "sft" / "final")),
        data=DataConfig(train=str(pref["pref_train"]), max_length=128),
        train=TrainConfig(lr=3e-5, batch_size=64, max_steps=budget.dpo_steps, warmup_steps=10, log_every=10),
    )


def grpo_config(out: Path, data: dict[str, Path], budget: Budget) -> RunConfig:
    # A low lr and a KL anchor: after SFT these tiny models sit in a sharp minimum, and Adam's first,
    # sign-like steps at the lr of the reference GRPO script (5e-4; 1e-4 and 2e-4 too) knock held-out
    # accuracy down to ~10% within 100 steps, from where it does not recover (see the issue notes). From
    # a start that is not annealed (benchmarks/grpo.py's START) 5e-4 works.
    return OnlineRun(
        algorithm="grpo",
        out=str(out / "grpo"),
        model=ModelConfig(path=str(out / "sft" / "final")),
        data=DataConfig(train=str(data["prompts_train"]), eval=str(data["eval"]), max_length=64),
        rollout=RolloutConfig(prompts_per_step=16, group_size=8, max_new_tokens=6),
        rl=GroupRLOptions(rewards=["exact_match"], kl_coef=0.05),
        train=TrainConfig(
            lr=3e-5, betas=(0.9, 0.99), schedule="constant", max_steps=budget.grpo_steps, log_every=10,
            eval_every=100, save_every=100,
        ),
    )  # fmt: skip


def reward_accuracy(rm_dir: Path, pairs: list[dict]) -> float:
    """Held-out pairwise accuracy of a reward model: chosen scored above rejected."""
    rm = RewardModel.from_pretrained(str(rm_dir))
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = (
        rm.score(prompts, [p["chosen"] for p in pairs]),
        rm.score(prompts, [p["rejected"] for p in pairs]),
    )
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def gold_scores(model_dir: Path, rows: list[dict]) -> list[float]:
    """Gold score (correct and concise = 1) of each greedy answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    completions = generate_greedy(
        model, AutoTokenizer.from_pretrained(model_dir), [r["prompt"] for r in rows], max_new_tokens=48
    )
    return [preference.gold_score(c, r["answer"]) for c, r in zip(completions, rows)]


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a beats b, ties counting half."""
    return sum((x > y) + 0.5 * (x == y) for x, y in zip(a, b)) / len(a)


def level_accuracy(model_dir: Path, rows: list[dict]) -> dict[str, float]:
    """Held-out greedy exact match per level, and over all problems ("all")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    by_level = accuracy_by_level(model, AutoTokenizer.from_pretrained(model_dir), rows)
    out = {lv: by_level[lv] for lv in arithmetic.LEVELS if lv in by_level}
    counts = {lv: sum(r["level"] == lv for r in rows) for lv in out}
    # Over problems, not levels: add1 has only 16 held-out problems and must not weigh a third.
    out["all"] = sum(out[lv] * counts[lv] for lv in out) / sum(counts.values())
    return out


def _stage(cfg: RunConfig, fresh: bool):
    final = Path(cfg.out) / "final"
    if final.is_dir() and not fresh:
        print(f"[{Path(cfg.out).name}] reusing {final}")
        return
    t0 = time.time()
    resume = not fresh and (Path(cfg.out) / "checkpoints").is_dir()
    result = train(cfg, resume=resume, overwrite=not resume)  # no checkpoint: start the stage again
    if result.interrupted:
        raise SystemExit(130)
    print(
        f"[{Path(cfg.out).name}] {result.step} steps in {time.time() - t0:.0f}s, loss {result.metrics.get('loss', 0):.4f}"
    )


def quickstart(
    out: str | Path = "runs/quickstart", *, fresh: bool = False, budget: Budget = Budget()
) -> dict:
    """Run the demo into `out`; returns (and writes to out/summary.json) the accuracy table."""
    out = Path(out)
    t0 = time.time()
    n = budget.rows
    data = arithmetic.write_task_files(
        out / "data", levels=LEVELS, prompt_levels=RL_LEVELS, n_sft=n, n_prompts=n, n_pretrain_docs=n
    )
    if fresh or not (out / "tiny" / "config.json").exists():
        build_tiny(out / "tiny", size="tiny")
    pref = preference.write_preference_files(out / "data", levels=LEVELS, n_train=n)
    _stage(base_config(out, data, budget), fresh)
    _stage(sft_config(out, data, budget), fresh)
    _stage(reward_config(out, pref, budget), fresh)
    _stage(dpo_config(out, pref, budget), fresh)
    _stage(grpo_config(out, data, budget), fresh)

    rows = arithmetic.eval_rows(LEVELS, n_per_level=budget.eval_per_level)
    before = level_accuracy(out / "base" / "final", rows)
    after = level_accuracy(out / "sft" / "final", rows)
    after_grpo = level_accuracy(out / "grpo" / "final", rows)
    pairs = preference.preference_eval_rows(LEVELS, n_per_level=budget.eval_per_level)
    rm_acc = reward_accuracy(out / "reward" / "final", pairs)
    gold_sft, gold_dpo = gold_scores(out / "sft" / "final", rows), gold_scores(out / "dpo" / "final", rows)
    summary = {
        "held_out_exact_match": {"base": before, "sft": after, "grpo": after_grpo},
        "reward_model_pair_accuracy": rm_acc,
        "gold_score": {"sft": sum(gold_sft) / len(rows), "dpo": sum(gold_dpo) / len(rows)},
        "dpo_win_rate_vs_sft": win_rate(gold_dpo, gold_sft),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from posttrain.audit import model_card
    from posttrain.report import write_report

    card = model_card(out / "grpo")
    report = write_report(out)

    print(f"\nheld-out exact match (up to {budget.eval_per_level} problems per level, greedy)")
    print(f"  {'level':<8}{'base':>8}{'sft':>8}{'grpo':>8}")
    for lv in before:
        print(f"  {lv:<8}{before[lv]:>8.1%}{after[lv]:>8.1%}{after_grpo[lv]:>8.1%}")
    print("\nstage     metric (held out)                        value")
    print(
        f"  sft     exact match, all levels                {after['all']:>7.1%}   (base {before['all']:.1%})"
    )
    print(
        f"  grpo    exact match, all levels                {after_grpo['all']:>7.1%}   (sft {after['all']:.1%})"
    )
    print(f"  reward  pair accuracy (chance 50%)             {rm_acc:>7.1%}")
    print(
        f"  dpo     gold score (1 = correct and concise)   {summary['gold_score']['dpo']:>7.3f}   (sft {summary['gold_score']['sft']:.3f})"
    )
    print(
        f"  dpo     win rate vs sft by gold score          {summary['dpo_win_rate_vs_sft']:>7.1%}   (ties count half)"
    )
    print(f"\nruns in {out}/ (base, sft, reward, dpo, grpo); {summary['seconds']:.0f}s in all")
    print(f"report: {report}\nmodel card: {card}")
    return summary
