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
from pathlib import Path

import torch

from posttrain.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from posttrain.eval.generation import accuracy
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train

# Budgets chosen on 2 CPU cores: the base model ends mediocre on the task (it has seen the
# chat format only in a slice of its corpus), so that SFT has something to show, and the
# whole demo stays within a few minutes.
BASE_STEPS = 500
SFT_STEPS = 250
EVAL_PER_LEVEL = 200


def base_config(out: Path, data: dict[str, Path]) -> RunConfig:
    return RunConfig(
        algorithm="sft",
        out=str(out / "base"),
        model=ModelConfig(path=str(out / "tiny")),
        data=DataConfig(train=str(data["pretrain"]), max_length=256, truncation="drop"),
        train=TrainConfig(
            lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01, batch_size=32, max_steps=BASE_STEPS,
            warmup_steps=50, schedule="cosine", min_lr_ratio=0.1, save_every=250, log_every=10,
        ),
    )  # fmt: skip


def sft_config(out: Path, data: dict[str, Path]) -> RunConfig:
    return RunConfig(
        algorithm="sft",
        out=str(out / "sft"),
        model=ModelConfig(path=str(out / "base" / "final")),
        data=DataConfig(train=str(data["sft_train"]), max_length=64),
        train=TrainConfig(
            lr=1e-3, betas=(0.9, 0.98), batch_size=64, max_steps=SFT_STEPS, warmup_steps=20,
            schedule="cosine", min_lr_ratio=0.1, save_every=250, log_every=10,
        ),
    )  # fmt: skip


def level_accuracy(model_dir: Path, rows: list[dict]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    levels = sorted({r["level"] for r in rows}, key=arithmetic.LEVELS.index)
    out = {lv: accuracy(model, tok, [r for r in rows if r["level"] == lv]) for lv in levels}
    out["all"] = sum(out[lv] for lv in levels) / len(levels)
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


def quickstart(out: str | Path = "runs/quickstart", *, fresh: bool = False) -> dict:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    out = Path(out)
    t0 = time.time()
    data = arithmetic.write_task_files(out / "data")
    if fresh or not (out / "tiny" / "config.json").exists():
        build_tiny(out / "tiny", size="tiny")
    _stage(base_config(out, data), fresh)
    _stage(sft_config(out, data), fresh)

    rows = arithmetic.eval_rows(n_per_level=EVAL_PER_LEVEL)
    before = level_accuracy(out / "base" / "final", rows)
    after = level_accuracy(out / "sft" / "final", rows)
    summary = {"held_out_exact_match": {"base": before, "sft": after}, "seconds": round(time.time() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\nheld-out exact match ({EVAL_PER_LEVEL} problems per level, greedy)")
    print(f"  {'level':<8}{'base':>8}{'sft':>8}{'change':>9}")
    for lv in before:
        print(f"  {lv:<8}{before[lv]:>8.1%}{after[lv]:>8.1%}{after[lv] - before[lv]:>+9.1%}")
    print(f"\nruns in {out}/ (base, sft); {summary['seconds']:.0f}s in all")
    return summary
