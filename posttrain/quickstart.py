"""`posttrain quickstart`: watch a tiny model learn, on a CPU, in a few minutes.

The stages are a pipeline shipped with the package, ``posttrain/pipelines/quickstart.yaml``, run by
the pipeline runner (:mod:`posttrain.pipeline`): each stage its own run directory under OUT, a
finished stage reused unless --fresh (or its config changed):

    data/    the bundled arithmetic task and preference pairs as jsonl, and data/tiny/: a char-level
             tokenizer and a random 1M-parameter Llama, built locally
    base/    the base model: the tiny model pretrained (briefly, on purpose) on the corpus
    sft/     supervised fine-tuning of the base model on chat rows, loss on the answers only
    reward/  a Bradley-Terry reward model on the bundled gold-scored preference pairs
    dpo/     DPO from the SFT model on the same pairs
    grpo/    GRPO from the SFT model on 2-digit problems against the exact-match reward, held-out
             pass@1 every 100 steps

Then the summary (:func:`summarize`, printed by :func:`format_summary`): held-out exact match per
level before and after SFT and after GRPO, the reward model's held-out pair accuracy, and DPO
against SFT by the gold score of their greedy answers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.eval.generation import accuracy_by_level, generate_greedy
from posttrain.eval.metrics import win_rate as paired_win_rate
from posttrain.pipeline import STATE, Pipeline, load_pipeline, run_pipeline
from posttrain.rewards.model import RewardModel
from posttrain.tasks import arithmetic, preference

# The demo task's levels (the pipeline file's data.levels), and GRPO's (its data.prompt_levels).
LEVELS = ("add1", "add2", "sub2")
RL_LEVELS = ("add2", "sub2")


@dataclass(frozen=True)
class Budget:
    """Steps per stage; the defaults are the bundled pipeline file's values (a test holds them equal).
    They leave the base model mediocre in the chat format (it met the format in a slice of its corpus
    only), so SFT has something to show, and keep the whole demo to a few minutes on 2 CPU cores."""

    base_steps: int = 400
    sft_steps: int = 500
    reward_steps: int = 150
    dpo_steps: int = 200
    grpo_steps: int = 400
    eval_per_level: int = 200  # held-out problems (and pairs) per level in the summary
    rows: int = 20_000  # rows per generated training file

    def overrides(self) -> list[str]:
        """The budget as the pipeline's ``--set STAGE.key=value`` items."""
        steps = {"base": self.base_steps, "sft": self.sft_steps, "reward": self.reward_steps}
        steps |= {"dpo": self.dpo_steps, "grpo": self.grpo_steps}
        return [f"data.rows={self.rows}"] + [f"{s}.train.max_steps={n}" for s, n in steps.items()]


def pipeline_file():
    """The bundled pipeline file (a Traversable: a path inside an installed package)."""
    return resources.files("posttrain").joinpath("pipelines", "quickstart.yaml")


def quickstart_pipeline(out: str | Path, budget: Budget = Budget()) -> Pipeline:
    """The quickstart's stages, resolved and validated, writing into `out`."""
    with resources.as_file(pipeline_file()) as path:
        return load_pipeline(path, out=out, overrides=budget.overrides())


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
    """Share of prompts where a beats b, ties counting half (:func:`posttrain.eval.metrics.win_rate`)."""
    return paired_win_rate(a, b, ties=0.5).rate


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


def summarize(out: str | Path, eval_per_level: int = Budget.eval_per_level) -> dict:
    """The quickstart's numbers, from the final models of its stages in `out`."""
    out = Path(out)
    rows = arithmetic.eval_rows(LEVELS, n_per_level=eval_per_level)
    before = level_accuracy(out / "base" / "final", rows)
    after = level_accuracy(out / "sft" / "final", rows)
    after_grpo = level_accuracy(out / "grpo" / "final", rows)
    pairs = preference.preference_eval_rows(LEVELS, n_per_level=eval_per_level)
    rm_acc = reward_accuracy(out / "reward" / "final", pairs)
    gold_sft, gold_dpo = gold_scores(out / "sft" / "final", rows), gold_scores(out / "dpo" / "final", rows)
    summary = {
        "held_out_exact_match": {"base": before, "sft": after, "grpo": after_grpo},
        "reward_model_pair_accuracy": rm_acc,
        "gold_score": {"sft": sum(gold_sft) / len(rows), "dpo": sum(gold_dpo) / len(rows)},
        "dpo_win_rate_vs_sft": win_rate(gold_dpo, gold_sft),
    }
    return summary


def format_summary(summary: dict, eval_per_level: int = Budget.eval_per_level) -> str:
    """The table `posttrain quickstart` prints, of :func:`summarize`'s numbers."""
    em = summary["held_out_exact_match"]
    before, after, after_grpo = em["base"], em["sft"], em["grpo"]
    gold = summary["gold_score"]
    lines = [
        f"held-out exact match (up to {eval_per_level} problems per level, greedy)",
        f"  {'level':<8}{'base':>8}{'sft':>8}{'grpo':>8}",
        *(f"  {lv:<8}{before[lv]:>8.1%}{after[lv]:>8.1%}{after_grpo[lv]:>8.1%}" for lv in before),
        "",
        "stage     metric (held out)                        value",
        f"  sft     exact match, all levels                {after['all']:>7.1%}   (base {before['all']:.1%})",
        f"  grpo    exact match, all levels                {after_grpo['all']:>7.1%}   (sft {after['all']:.1%})",
        f"  reward  pair accuracy (chance 50%)             {summary['reward_model_pair_accuracy']:>7.1%}",
        f"  dpo     gold score (1 = correct and concise)   {gold['dpo']:>7.3f}   (sft {gold['sft']:.3f})",
        f"  dpo     win rate vs sft by gold score          {summary['dpo_win_rate_vs_sft']:>7.1%}   (ties count half)",
    ]  # fmt: skip
    return "\n".join(lines)


def quickstart(
    out: str | Path = "runs/quickstart", *, fresh: bool = False, budget: Budget = Budget()
) -> dict:
    """Run the demo into `out`; returns (and writes to out/summary.json) the accuracy table."""
    out = Path(out)
    if (out / "tiny").is_dir() and not (out / STATE).exists():
        raise ConfigError(
            f"{out} holds an older quickstart's runs (before the quickstart was a pipeline; they cannot be "
            "reused): delete it or give another --out"
        )
    t0 = time.time()
    run_pipeline(quickstart_pipeline(out, budget), fresh=fresh)  # and a MODEL_CARD.md per stage
    summary = summarize(out, budget.eval_per_level)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from posttrain.report import write_report

    report = write_report(out)
    print("\n" + format_summary(summary, budget.eval_per_level))
    print(f"\nruns in {out}/ (data, base, sft, reward, dpo, grpo); {summary['seconds']:.0f}s in all")
    print(f"report: {report}\nmodel card: {out / 'grpo' / 'MODEL_CARD.md'}")
    return summary
