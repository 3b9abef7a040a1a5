"""Golden loss curves: SFT, DPO and GRPO on the tiny model, 20 optimiser steps each at a fixed seed.

`tests/test_golden.py` reruns them and compares every step's loss and gradient norm with the stored curves in
`tests/golden/*.json` to 1e-4. A change of the maths, of the loop, of the data order or of the optimiser (the
fused-AdamW change of commit 111ea94 moved three slow end-to-end tests) then shows up as a failing test and
a reviewed diff, not as a surprise. When a change is meant to move the curves, regenerate them with

    python tests/golden_runs.py          # rewrites tests/golden/*.json: review the diff, commit it

and say in the commit why they moved. Nothing else writes those files.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden"
STAGES = ("sft", "dpo", "grpo")
STEPS = 20
KEYS = {  # what each curve records per step, besides the step
    "sft": ("loss", "grad_norm", "token_accuracy"),
    "dpo": ("loss", "grad_norm", "rewards/margin"),
    "grpo": ("loss", "grad_norm", "reward/mean", "kl_to_ref"),
}


def configs(root: Path) -> dict[str, dict]:
    """The three stages' configs, on data and a tiny model built under `root` (deterministic)."""
    from posttrain.tasks import arithmetic, preference
    from posttrain.tasks.tiny import build_tiny

    tiny = build_tiny(root / "tiny", size="tiny")
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in arithmetic.sft_rows(400, seed=0)))
    pref = preference.write_preference_files(root / "pref", n_train=400)["pref_train"]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in arithmetic.prompt_rows(400, seed=0)))
    train = {"max_steps": STEPS, "seed": 0, "progress": False, "tensorboard": False, "warmup_steps": 2}
    common = {"model": {"path": str(tiny)}, "monitor": {"enabled": False}}
    return {
        "sft": common | {
            "algorithm": "sft", "out": str(root / "runs/sft"),
            "data": {"train": str(sft), "max_length": 128},
            "train": train | {"lr": 3e-3, "batch_size": 16},
        },
        "dpo": common | {
            "algorithm": "dpo", "out": str(root / "runs/dpo"),
            "data": {"train": str(pref), "max_length": 160},
            "dpo": {"beta": 0.1},
            "train": train | {"lr": 1e-3, "batch_size": 8},
        },
        "grpo": common | {
            "algorithm": "grpo", "out": str(root / "runs/grpo"),
            "data": {"train": str(prompts), "max_length": 128},
            "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 6},
            "rl": {
                "rewards": [{"name": "length_penalty", "target_length": 3},
                            {"name": "format_regex", "pattern": "\\d", "mode": "search"}],
                "kl_coef": 0.05,
            },
            "train": train | {"lr": 3e-3, "batch_size": 16},
        },
    }  # fmt: skip


def run(stage: str, root: Path) -> list[dict]:
    """Train `stage` and return its curve: one {step, <KEYS>} per optimiser step."""
    from posttrain.engine.run import read_metrics
    from posttrain.train import train

    torch.set_num_threads(2)  # the reduction order of CPU kernels depends on the thread count
    result = train(configs(root)[stage])
    curve = [{"step": m["step"], **{k: m[k] for k in KEYS[stage]}} for m in read_metrics(result.run_dir)]
    if len(curve) != STEPS:
        raise RuntimeError(f"{stage}: {len(curve)} logged steps, expected {STEPS}")
    return curve


def load(stage: str) -> list[dict]:
    return json.loads((GOLDEN / f"{stage}.json").read_text())["curve"]


def main() -> None:
    stages = sys.argv[1:] or STAGES
    GOLDEN.mkdir(exist_ok=True)
    for stage in stages:
        with tempfile.TemporaryDirectory() as tmp:
            curve = run(stage, Path(tmp))
        record = {"stage": stage, "steps": STEPS, "torch": torch.__version__, "curve": curve}
        (GOLDEN / f"{stage}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{stage}: loss {curve[0]['loss']:.6f} -> {curve[-1]['loss']:.6f} ({GOLDEN / stage}.json)")


if __name__ == "__main__":
    main()
