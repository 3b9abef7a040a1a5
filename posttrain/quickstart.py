"""`posttrain quickstart`: watch a tiny model learn, on a CPU, in a few minutes.

Stages, each its own run directory under OUT (a finished stage is reused unless --fresh):

    data/    the bundled arithmetic task written as jsonl (pretraining corpus, SFT rows, held-out set)
    tiny/    a char-level tokenizer and a random 1M-parameter Llama, built locally
    base/    the base model: the tiny model pretrained (briefly, on purpose) on the corpus
    sft/     supervised fine-tuning of the base model on chat rows, loss on the answers only

and a table of held-out exact-match accuracy, per difficulty level, before and after SFT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from posttrain.eval.generation import accuracy_by_level
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train

# The demo task: three levels a 1M-parameter model can learn in minutes on 2 CPU cores.
LEVELS = ("add1", "add2", "sub2")


@dataclass(frozen=True)
class Budget:
    """Steps per stage. The defaults leave the base model mediocre in the chat format (it met
    the format in a slice of its corpus only), so SFT has something to show, and keep the whole
    demo to a few minutes on 2 CPU cores."""

    base_steps: int = 400
    sft_steps: int = 500
    eval_per_level: int = 200


def base_config(out: Path, data: dict[str, Path], budget: Budget) -> RunConfig:
    return RunConfig(
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
    return RunConfig(
        algorithm="sft",
        out=str(out / "sft"),
        model=ModelConfig(path=str(out / "base" / "final")),
        data=DataConfig(train=str(data["sft_train"]), max_length=128),
        train=TrainConfig(
            lr=2e-3, betas=(0.9, 0.98), batch_size=128, max_steps=budget.sft_steps, warmup_steps=20,
            schedule="cosine", min_lr_ratio=0.1, save_every=200, log_every=10,
        ),
    )  # fmt: skip


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
    result = train(cfg, resume=resume)
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
    data = arithmetic.write_task_files(out / "data", levels=LEVELS)
    if fresh or not (out / "tiny" / "config.json").exists():
        build_tiny(out / "tiny", size="tiny")
    _stage(base_config(out, data, budget), fresh)
    _stage(sft_config(out, data, budget), fresh)

    rows = arithmetic.eval_rows(LEVELS, n_per_level=budget.eval_per_level)
    before = level_accuracy(out / "base" / "final", rows)
    after = level_accuracy(out / "sft" / "final", rows)
    summary = {"held_out_exact_match": {"base": before, "sft": after}, "seconds": round(time.time() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\nheld-out exact match (up to {budget.eval_per_level} problems per level, greedy)")
    print(f"  {'level':<8}{'base':>8}{'sft':>8}{'change':>9}")
    for lv in before:
        print(f"  {lv:<8}{before[lv]:>8.1%}{after[lv]:>8.1%}{after[lv] - before[lv]:>+9.1%}")
    print(f"\nruns in {out}/ (base, sft); {summary['seconds']:.0f}s in all")
    return summary
