"""GRPO side by side: posttrain against TRL's GRPOTrainer on the same model, prompts, reward and settings.

    python benchmarks/grpo.py                          # tiny and small, 120 s budget (~25 min on 2 cores)
    python benchmarks/grpo.py --sizes tiny --budget 60 --repeats 1 --work /tmp/grpo-bench     # a quick look

What runs, per model size (``tiny`` ~1.07M parameters, where per-step overhead dominates; ``small`` ~25M,
where the maths dominates):

1. **START**: ``posttrain.tasks.tiny.build_tiny`` (random init), then a short posttrain SFT on
   ``arithmetic.sft_rows(levels=("add2",))`` (constant lr 2e-3 after a 20-step warm-up, no decay: RL from
   an annealed model is fragile), so that the model knows the answer format and, for tiny (400 steps),
   held-out pass@1 starts well above 0 and well below 1 (0.42). small gets 100 steps (it is 25x slower
   per step): it learns the format, which is what its speed runs need, but little arithmetic (~0.02).
   Built in a child process and cached in the work directory (``--work``); both trainers load this same
   directory.
2. **Speed**: each trainer, in its own child process, trains W warm-up + N measured steps; repeated
   (``--repeats``, interleaved: every trainer once, then again) and the fastest repeat shown.
3. **Budget** (``--budget-sizes``, default tiny): each trainer, in its own child process, trains for
   ``--budget`` seconds of training time from START; held-out greedy pass@1 every ``--eval-every``
   seconds and at the end, with the clock paused while it evaluates. Once per seed (``--seeds``, default
   2: the seed of the sampling and of the prompt order, the same seed for both trainers), because one RL
   run on a 1M-parameter model varies a lot from seed to seed; the table shows the mean and every seed.

Same work for both, every step: 16 prompts x 8 samples (TRL: per_device_train_batch_size=128,
num_generations=8), at most 8 new tokens, temperature 1, top-p 1, no top-k; prompts from one file of
``arithmetic.prompt_rows(20000, levels=("add2",))`` (2-digit additions, none held out; the order of
drawing differs: each framework shuffles with its own seeded sampler); reward
``posttrain.tasks.arithmetic.exact_match`` of the completion (TRL's reward fn decodes the completion ids
exactly as posttrain's engine does: cut before the first eos, special tokens kept, so both score the
same text); advantages (r - group mean) / (group std + 1e-4) (posttrain ``rl.scale: std``, TRL
``scale_rewards="group"``); clipped token-level surrogate, epsilon 0.2, normalised by the completion
tokens of the whole batch (posttrain ``rl.aggregation: token_mean``, TRL ``loss_type="dapo"``, its
default); one optimiser step per rollout (TRL num_iterations=1, posttrain rl.epochs=1, minibatches=1);
no KL term and no reference model (beta 0); AdamW lr 5e-4 constant, betas (0.9, 0.99), eps 1e-8, no
weight decay, clip 1.0; fp32 on CPU, ``torch.set_num_threads(2)`` (``--threads``), HF generation (no
vLLM). beta2 0.99 for both: with TRL's default 0.999 at lr 5e-4 the policy collapsed to 0% held-out
(``shared/reference/README.md``, trl_grpo.py); posttrain's online default is 0.99 for that reason.

TRL gets its best CPU settings (shared/reference): ``use_cpu=True, bf16=False, fp16=False,
gradient_checkpointing=False``, no dataloader workers, no reports, no saving, logging every 10^6 steps,
no completion logging. posttrain runs its defaults for the rest (samples.jsonl written every step) with
``monitor.enabled: false``, no TensorBoard and no progress bar.

Metrics, defined identically for both:
    s/step        wall time from the end of warm-up step W to the end of step W+N, over N: prompt
                  sampling, generation, reward, advantages, forward, backward, clipping, optimiser step
                  and per-step bookkeeping. posttrain: ``time`` of metrics.jsonl; TRL: a callback's clock
                  at on_step_end. One column per repeat; the rest of the row is the fastest repeat's.
    samples/s     16 x 8 completions per step / s/step.
    tokens/s      completion tokens (up to and including the eos) of the N measured steps / that time.
                  posttrain: completion_length/mean x buffer/samples; TRL: completion_mask.sum().
    gen %         share of the measured time spent generating (posttrain: generation/seconds; TRL: its
                  ``_generate``, which also renders and tokenises the prompts and decodes the completions).
    roll %        share spent making the whole scored rollout: generation, rewards, advantages and
                  bookkeeping (posttrain: rollout/seconds, which includes writing samples.jsonl; TRL: its
                  ``_generate_and_score_completions``). The rest is the update: forward, backward, optimiser.
    reward, len   mean reward and completion length over the measured steps: both sample from the same
                  START, so they must agree up to sampling noise (a check that the work is the same).
    peak MiB      the child's own peak resident set at the end of training (``_common.peak_rss_mib``:
                  VmHWM; ``ru_maxrss`` would include the peak of the process that spawned it), the
                  largest over repeats. ``rss_at_start_mib`` in the JSON is the same before the child
                  imported anything.
    pass@1        held-out greedy exact match on ``arithmetic.eval_rows(("add2",), n_per_level=200)``, by
                  one evaluator for both (``posttrain.eval.generation.accuracy``: plain
                  ``model.generate``, 8 new tokens), on the live model at the end of the step where the
                  training clock passed each mark. before = START.
    budget        training time: from the beginning of step 1 to the end of the step that passes
                  ``--budget`` seconds, evaluations excluded. The evaluations run inside posttrain's
                  after-step hook, which its ``train.max_seconds`` would count as training time, so the
                  benchmark stops it from outside, at the same point as TRL's callback: after
                  the optimiser step, from ``RolloutSource.after_step`` (the loop's hook after every
                  update), by raising an exception once the budget is used; the last step is therefore
                  not in its metrics.jsonl.

Identical prompts, checked: the parent compares the token ids of the first 64 prompts as posttrain
renders them (``encode_prompts``) with TRL's ``_tokenize_prompts``. Step-1 losses are not compared: the
two frameworks draw different samples, so their losses differ by sampling noise; the clipped token-level
loss on identical samples is covered by posttrain's unit tests against TRL's formula.

On a shared machine another program's load wrecks CPU timings (torch's threads wait for each other), so
the parent waits for a quiet machine before each run and records the cores other programs kept busy
during it; a speed row whose shown repeat was disturbed is marked ``!``; a disturbed budget run is rerun
(``--retries``) and marked ``!`` if it stayed disturbed (fewer steps in the budget, lower pass@1).
TRL not installed: its runs are skipped and posttrain's figures are still reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import (
    TRL_CPU_ARGS,
    bench_main,
    emit_result,
    fmt,
    ids_digest,
    measured_window,
    peak_rss_mib,
    ratio,
    read_jsonl,
    run_child,
    run_quietly,
    setup_child,
    trl_step_clock,
    versions,
)

REPO = Path(__file__).resolve().parents[1]

PROMPTS_PER_STEP = 16
GROUP_SIZE = 8
SAMPLES_PER_STEP = PROMPTS_PER_STEP * GROUP_SIZE
MAX_NEW_TOKENS = 8
TEMPERATURE = 1.0
LR = 5e-4
BETAS = (0.9, 0.99)
EPSILON = 0.2  # PPO clip, both sides
MAX_LENGTH = 64  # posttrain's prompt + completion limit (prompts here are 8 tokens)
LEVELS = ("add2",)
N_PROMPTS = 20_000
EVAL_PER_LEVEL = 200
THREADS = 2
SEED = 0
# START: SFT of the random-init model (constant lr after a short warm-up; see the module docstring).
SFT = {"lr": 2e-3, "betas": (0.9, 0.98), "batch_size": 64, "warmup_steps": 20, "max_length": 64}
SFT_STEPS = {"tiny": 400, "small": 100}
# Measured steps N of the speed runs: tiny's 60 take ~5 s (20 took 1.6 s and swung by 10% between repeats).
DEFAULT_STEPS = {"tiny": 60, "small": 5}
PROMPT_CHECK = 64  # prompts whose token ids are compared between the frameworks

VARIANTS: dict[str, dict] = {
    "posttrain": {"framework": "posttrain"},
    "trl": {"framework": "trl"},
}
BASELINE = "trl"


# ----------------------------------------------------------------------------------- children


class BudgetReached(Exception):
    """Raised from posttrain's after-step hook to end a budget run (posttrain has no time limit)."""


class BudgetClock:
    """Training time against a budget, with held-out evaluations that the clock does not count.

    ``begin()`` at the beginning of every step (only the first one starts the clock); ``end_of_step(model)``
    after every optimiser update: evaluates when the training time has passed the next mark and returns
    True once the budget is used (after a last evaluation)."""

    def __init__(self, budget_s: float, eval_every_s: float | None, evaluate):
        self.budget, self.every, self.evaluate = budget_s, eval_every_s, evaluate
        self.start: float | None = None
        self.paused = 0.0
        self.steps = 0
        self.next_eval = eval_every_s or float("inf")
        self.curve: list[dict] = []

    def begin(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def train_s(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def end_of_step(self, model) -> bool:
        self.steps += 1
        t = self.train_s()
        done = t >= self.budget
        if done or t >= self.next_eval:
            while self.next_eval <= t:
                self.next_eval += self.every
            t0 = time.perf_counter()
            value = self.evaluate(model)
            self.paused += time.perf_counter() - t0
            self.curve.append({"train_s": round(t, 2), "step": self.steps, "pass@1": value})
        return done

    def summary(self) -> dict:
        train_s = self.curve[-1]["train_s"] if self.curve else None
        return {
            "budget_s": self.budget,
            "train_s": train_s,
            "steps": self.steps,
            "s_per_step_in_budget": train_s / self.steps if train_s and self.steps else None,
            "eval_s": self.paused,
            "pass@1": self.curve[-1]["pass@1"] if self.curve else None,
            "curve": self.curve,
        }


def make_evaluator(tokenizer, eval_file: str):
    """Held-out greedy pass@1, the same function for both frameworks' live models."""
    from posttrain.eval.generation import accuracy

    rows = read_jsonl(eval_file)
    return lambda model: accuracy(model, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS)


def posttrain_config(spec: dict) -> dict:
    return {
        "algorithm": "grpo",
        "out": spec["run_dir"],
        "model": {"path": spec["model"]},
        "data": {"train": spec["prompts"], "max_length": MAX_LENGTH},
        "rollout": {
            "engine": "hf",
            "prompts_per_step": PROMPTS_PER_STEP,
            "group_size": GROUP_SIZE,
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": TEMPERATURE,
        },
        "rl": {
            "rewards": ["exact_match"],
            "advantage": "group",
            "scale": "std",
            "aggregation": "token_mean",  # TRL's default loss_type "dapo"
            "clip_low": EPSILON,
            "clip_high": EPSILON,
            "kl_coef": 0.0,
            "epochs": 1,
            "minibatches": 1,
        },
        "train": {
            "lr": LR,
            "betas": list(BETAS),
            "weight_decay": 0.0,
            "schedule": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "max_steps": spec["max_steps"],
            "precision": "fp32",
            "seed": spec.get("seed", SEED),
            "log_every": 1,
            "progress": False,
            "tensorboard": False,
        },
        "monitor": {"enabled": False},
    }


def child_posttrain(spec: dict, started: float) -> dict:
    """Train through the public API; per-step figures from metrics.jsonl. `started`: time.time()."""
    t_import = time.perf_counter()
    import posttrain.train as stage
    from posttrain.engine.run import read_metrics

    import_s = time.perf_counter() - t_import
    out = {"posttrain_path": str(Path(stage.__file__).parent), "import_s": import_s}
    clock = None
    if spec["mode"] == "budget":
        from transformers import AutoTokenizer

        from posttrain.rollout.source import RolloutSource

        clock = BudgetClock(
            spec["budget_s"],
            spec["eval_every_s"],
            make_evaluator(AutoTokenizer.from_pretrained(spec["model"]), spec["eval"]),
        )
        next_step, after_step = RolloutSource.next_step, RolloutSource.after_step

        def timed_next_step(self, state, model):
            clock.begin()
            return next_step(self, state, model)

        def budgeted_after_step(self, state, model):
            after_step(self, state, model)
            if clock.end_of_step(self.policy(self.accelerator.unwrap_model(model))):
                raise BudgetReached

        RolloutSource.next_step, RolloutSource.after_step = timed_next_step, budgeted_after_step
    try:
        stage.train(posttrain_config(spec))
    except BudgetReached:
        pass
    peak = peak_rss_mib()
    records = [r for r in read_metrics(spec["run_dir"]) if "step_s" in r]
    if clock is not None:
        return {
            **out,
            **clock.summary(),
            "peak_rss_mib": peak,
            "rewards": [r["reward/mean"] for r in records],
        }
    times = [r["time"] for r in records]
    completion_tokens = [round(r["completion_length/mean"] * r["buffer/samples"]) for r in records]
    return {
        **out,
        **window_figures(
            times,
            completion_tokens,
            [r["generation/seconds"] for r in records],
            [r["rollout/seconds"] for r in records],
            spec,
        ),
        "peak_rss_mib": peak,
        "steps_run": len(records),
        "setup_s": times[0] - records[0]["step_s"] - started,
        "total_s": times[-1] - started,
        "rewards": [r["reward/mean"] for r in records],
        "completion_lengths": [r["completion_length/mean"] for r in records],
    }


def window_figures(
    end_times: list[float], tokens: list[int], gen_s: list[float], rollout_s: list[float], spec: dict
) -> dict:
    """The measured window's s/step, samples/s, completion tokens/s, generation and rollout shares."""
    w, n = spec["warmup"], spec["steps"]
    window = measured_window(end_times, tokens, w, n)
    return {
        "s_per_step": window["s_per_step"],
        "samples_per_s": SAMPLES_PER_STEP / window["s_per_step"],
        "tokens_per_s": window["tokens_per_s"],
        "measured_tokens": window["measured_tokens"],
        "measured_s": window["measured_s"],
        "generation_share": sum(gen_s[w : w + n]) / window["measured_s"],
        "rollout_share": sum(rollout_s[w : w + n]) / window["measured_s"],
    }


def recording_trainer(base):
    """GRPOTrainer that records, per rollout, the time in `_generate`, the completion tokens and the
    mean reward, and the time of each whole rollout (values TRL computes anyway)."""

    class RecordingGRPOTrainer(base):
        def __init__(self, *args, **kwargs):
            self.gen_seconds: list[float] = []
            self.rollout_seconds: list[float] = []
            self.completion_tokens: list[int] = []
            self.rewards: list[float] = []
            self.completion_lengths: list[float] = []
            super().__init__(*args, **kwargs)

        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            self.gen_seconds.append(time.perf_counter() - t)
            return out

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.rollout_seconds.append(time.perf_counter() - t)
            tokens = int(out["completion_mask"].sum())
            self.completion_tokens.append(tokens)
            self.completion_lengths.append(tokens / out["completion_mask"].shape[0])
            self.rewards.append(self._metrics["train"]["reward"][-1])
            return out

    return RecordingGRPOTrainer


def trl_reward(tokenizer):
    """posttrain's exact match of the text posttrain's engine decodes from the same ids: the completion
    without its final eos, special tokens kept. TRL's completion ids end at the first eos (inclusive);
    `eos` is filled with the trainer's eos ids once it exists."""
    from posttrain.tasks.arithmetic import exact_match

    eos: set[int] = set()

    def exact_match_reward(prompts, completions, completion_ids, answer, **_):
        texts = [
            tokenizer.decode(ids[:-1] if ids and ids[-1] in eos else ids, skip_special_tokens=False)
            for ids in completion_ids
        ]
        return [exact_match(t, a) for t, a in zip(texts, answer)]

    exact_match_reward.eos = eos
    return exact_match_reward


def child_trl(spec: dict, started: float) -> dict:
    """GRPOTrainer in its best CPU settings, timed by a callback (time.perf_counter(), like `started`)."""
    t_import = time.perf_counter()
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import_s = time.perf_counter() - t_import
    budget = spec["mode"] == "budget"
    args = GRPOConfig(
        output_dir=spec["run_dir"],
        max_steps=spec["max_steps"],
        per_device_train_batch_size=SAMPLES_PER_STEP,  # completions, not prompts
        num_generations=GROUP_SIZE,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=1e-8,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=EPSILON,
        num_iterations=1,
        use_vllm=False,
        **TRL_CPU_ARGS,
        log_completions=False,
        seed=spec.get("seed", SEED),
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in read_jsonl(spec["prompts"])]
    clock = trl_step_clock()
    callbacks = [clock]
    budget_clock = None
    if budget:
        budget_clock = BudgetClock(
            spec["budget_s"], spec["eval_every_s"], make_evaluator(tokenizer, spec["eval"])
        )

        class Budget(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                budget_clock.begin()

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if budget_clock.end_of_step(model):
                    control.should_training_stop = True

        callbacks.append(Budget())
    reward = trl_reward(tokenizer)
    trainer = recording_trainer(GRPOTrainer)(
        model=spec["model"],
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    reward.eos.update(trainer.eos_token_ids)
    trainer.train()
    peak = peak_rss_mib()
    prompt_ids = trainer._tokenize_prompts([r["prompt"] for r in rows[:PROMPT_CHECK]])[0]
    common = {
        "import_s": import_s,
        "peak_rss_mib": peak,
        "prompt_ids_sha256": ids_digest([list(p) for p in prompt_ids]),
        "eos_token_ids": list(trainer.eos_token_ids),
        "optim": getattr(args.optim, "value", str(args.optim)),
        "model_dtype": str(trainer.model.dtype),
        "rewards": trainer.rewards,
    }
    if budget_clock is not None:
        return {**common, **budget_clock.summary()}
    return {
        **common,
        **window_figures(
            clock.end_times, trainer.completion_tokens, trainer.gen_seconds, trainer.rollout_seconds, spec
        ),
        "steps_run": len(clock.end_times),
        "setup_s": clock.begin_times[0] - started,
        "total_s": clock.end_times[-1] - started,
        "completion_lengths": trainer.completion_lengths,
    }


def child_prepare(spec: dict) -> dict:
    """START for one size (built once per work directory), the prompt and eval files, pass@1 before."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.io import write_jsonl
    from posttrain.data.templates import encode_prompts
    from posttrain.tasks import arithmetic
    from posttrain.tasks.tiny import build_tiny
    from posttrain.train import train

    work, size = Path(spec["work"]), spec["size"]
    files = {
        "prompts": work / "prompts.jsonl",
        "eval": work / "eval.jsonl",
        "sft": work / f"sft-{size}.jsonl",
    }
    sft_steps = spec["sft_steps"]
    if not files["prompts"].exists():
        write_jsonl(files["prompts"], arithmetic.prompt_rows(N_PROMPTS, seed=SEED, levels=LEVELS))
        write_jsonl(files["eval"], arithmetic.eval_rows(LEVELS, n_per_level=EVAL_PER_LEVEL))
    settings = {"size": size, "levels": LEVELS, "steps": sft_steps, **SFT, "seed": SEED}
    start_dir = work / f"start-{size}"
    marker = start_dir / "benchmark-settings.json"
    sft_s = None
    cached = json.loads(marker.read_text()) if marker.exists() else {}
    if {k: cached.get(k) for k in settings} != json.loads(json.dumps(settings)):
        t0 = time.perf_counter()
        init = build_tiny(work / f"init-{size}", size=size, seed=SEED)
        write_jsonl(
            files["sft"], arithmetic.sft_rows(sft_steps * SFT["batch_size"], seed=SEED, levels=LEVELS)
        )
        result = train(
            {
                "algorithm": "sft",
                "out": str(start_dir / "sft"),
                "model": {"path": str(init)},
                "data": {"train": str(files["sft"]), "max_length": SFT["max_length"]},
                "train": {
                    "lr": SFT["lr"],
                    "betas": list(SFT["betas"]),
                    "batch_size": SFT["batch_size"],
                    "max_steps": sft_steps,
                    "schedule": "constant",
                    "warmup_steps": SFT["warmup_steps"],
                    "precision": "fp32",
                    "seed": SEED,
                    "log_every": 50,
                    "progress": False,
                    "tensorboard": False,
                },
                "monitor": {"enabled": False},
            }
        )
        sft_s = time.perf_counter() - t0
        marker.write_text(json.dumps({**settings, "final": str(result.final), "sft_s": sft_s}))
    start = json.loads(marker.read_text())["final"]
    tokenizer = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start)
    before = make_evaluator(tokenizer, str(files["eval"]))(model)
    _, ids = encode_prompts(
        tokenizer, [r["prompt"] for r in read_jsonl(str(files["prompts"]))[:PROMPT_CHECK]]
    )
    return {
        "start": start,
        "prompts": str(files["prompts"]),
        "eval": str(files["eval"]),
        "sft_steps": sft_steps,
        "sft_s": sft_s,  # None: reused from the work directory
        "pass@1_before": before,
        "prompt_ids_sha256": ids_digest(ids),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def child_main(spec: dict) -> None:
    rss_at_start = peak_rss_mib()  # before any import: what this process inherited (see the docstring)
    started_wall, started = time.time(), time.perf_counter()
    setup_child(spec["threads"])
    os.environ["TQDM_DISABLE"] = "1"
    if spec["mode"] == "prepare":
        result = child_prepare(spec)
    elif spec["framework"] == "posttrain":
        result = child_posttrain(spec, started_wall)
    else:
        result = child_trl(spec, started)
    emit_result({**result, "rss_at_start_mib": rss_at_start})


# ------------------------------------------------------------------------------------- parent


def summarise(reps: list[dict]) -> dict:
    """One trainer's speed repeats -> its row: the fastest repeat's figures, every repeat's s/step, the
    largest peak RSS."""
    ok = [r for r in reps if "error" not in r]
    if not ok:
        return {"error": reps[-1].get("error"), "repeats": reps}
    best = min(ok, key=lambda r: r["s_per_step"])
    row = {k: v for k, v in best.items() if k not in ("noisy", "other_cores", "busy_cores_before")}
    w, n = best["warmup"], best["steps"]
    row.update(
        s_per_step_repeats=[r["s_per_step"] for r in ok],
        peak_rss_mib=max(r["peak_rss_mib"] for r in ok),
        peak_rss_mib_repeats=[r["peak_rss_mib"] for r in ok],
        rss_at_start_mib=max(r["rss_at_start_mib"] for r in ok),
        noisy=[r["noisy"] for r in ok],
        noisy_used=best["noisy"],
        other_cores_repeats=[r.get("other_cores") for r in ok],
        busy_cores_before_repeats=[r.get("busy_cores_before") for r in ok],
        reward_measured=mean(best["rewards"][w : w + n]),
        completion_length_measured=mean(best["completion_lengths"][w : w + n]),
    )
    return row


def summarise_budget(runs: list[dict]) -> dict:
    """One trainer's budget runs (one per seed) -> mean pass@1 and steps, every run kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1].get("error"), "runs": runs}
    return {
        "budget_s": ok[0]["budget_s"],
        "pass@1": mean([r["pass@1"] for r in ok]),
        "pass@1_runs": [r["pass@1"] for r in ok],
        "steps": mean([r["steps"] for r in ok]),
        "steps_runs": [r["steps"] for r in ok],
        "s_per_step_in_budget": mean([r["s_per_step_in_budget"] for r in ok]),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
        "noisy": any(r["noisy"] for r in ok),
        "seeds": [r["seed"] for r in ok],
        "failed_seeds": [r["seed"] for r in runs if "error" in r],
        "runs": ok,
    }


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def print_tables(speed: dict, budget: dict, prep: dict) -> None:
    head = (
        f"{'size':6} {'trainer':10} {'s/step (repeats)':>18} {'samples/s':>10} {'tokens/s':>9} "
        f"{'gen %':>6} {'roll %':>6} {'reward':>7} {'len':>5} {'peak MiB':>9} {'setup s':>8}"
        "  | posttrain/TRL: samples/s tokens/s memory"
    )
    print("\nspeed (16 prompts x 8 samples per step, <= 8 new tokens)\n" + head + "\n" + "-" * len(head))
    for size, rows in speed.items():
        for name, r in rows.items():
            if "error" in r:
                print(f"{size:6} {name:10} error: {r['error']}")
                continue
            label = name + ("!" if r["noisy_used"] else "")
            reps = " ".join(f"{x:.3f}" for x in r["s_per_step_repeats"])
            shares = f"{100 * r['generation_share']:5.0f}% {100 * r['rollout_share']:5.0f}%"
            print(
                f"{size:6} {label:10} {reps:>18} {r['samples_per_s']:10.0f} {r['tokens_per_s']:9.0f} "
                f"{shares} "
                f"{fmt(r['reward_measured'], '7.3f')} {fmt(r['completion_length_measured'], '5.2f')} "
                f"{r['peak_rss_mib']:9.0f} {r['setup_s']:8.1f}  |  {fmt(r.get('samples_ratio'), '6.2f')}x "
                f"{fmt(r.get('tokens_ratio'), '7.2f')}x {fmt(r.get('memory_ratio'), '6.2f')}x"
            )
    if budget:
        head = (
            f"{'size':6} {'trainer':10} {'budget s':>8} {'steps':>6} {'s/step':>7} {'pass@1 before':>14} "
            f"{'after':>7} {'vs TRL':>7}  after, per seed"
        )
        print("\nheld-out greedy pass@1 after a fixed training-time budget\n" + head + "\n" + "-" * len(head))
        for size, rows in budget.items():
            for name, r in rows.items():
                if "error" in r:
                    print(f"{size:6} {name:10} error: {r['error']}")
                    continue
                label = name + ("!" if r["noisy"] else "")
                per_seed = " ".join(f"{x:.3f}" for x in r["pass@1_runs"])
                print(
                    f"{size:6} {label:10} {r['budget_s']:8.0f} {r['steps']:6.0f} "
                    f"{fmt(r['s_per_step_in_budget'], '7.3f')} {prep[size]['pass@1_before']:14.3f} "
                    f"{fmt(r['pass@1'], '7.3f')} {fmt(r.get('pass@1_ratio'), '6.2f')}x  {per_seed}"
                )
                for run in r["runs"]:
                    curve = " ".join(f"{c['train_s']:.0f}s:{c['pass@1']:.3f}" for c in run["curve"])
                    flag = "!" if run["noisy"] else ""
                    print(f"{'':17} seed {run['seed']}{flag}: {run['steps']} steps, pass@1 at {curve}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,small", help="comma-separated model sizes (tiny, small)")
    p.add_argument("--variants", default="posttrain,trl", help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="measured steps N (default: 60 tiny, 5 small)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps W, excluded from s/step")
    p.add_argument("--repeats", type=int, default=2, help="speed runs of every (size, trainer), interleaved")
    p.add_argument("--budget", type=float, default=120, help="training seconds of the pass@1 runs (0: none)")
    p.add_argument("--budget-sizes", default="tiny", help="sizes that get a budget run")
    p.add_argument(
        "--seeds",
        type=int,
        default=2,
        help="budget runs per trainer, seeds 0..n-1 (RL varies from seed to seed)",
    )
    p.add_argument("--eval-every", type=float, default=30, help="training seconds between pass@1 evaluations")
    p.add_argument(
        "--sft-steps", default=None, help="START's SFT steps, e.g. tiny=400,small=100 (default: those)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="torch intra-op threads per child (1: robust to a busy machine)",
    )
    p.add_argument(
        "--retries", type=int, default=1, help="reruns of a budget run disturbed by another program"
    )
    p.add_argument("--out", default="benchmarks/results/grpo.json", help="JSON results file")
    p.add_argument("--work", default=None, help="keep START models, data and runs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child run")
    p.add_argument(
        "--wait-quiet", type=float, default=120, help="seconds to wait for a quiet machine before each run"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.child:
        return child_main(json.loads(args.child))
    bench_main(args, VARIANTS, run_all, "grpo")


def run_all(args, sizes: list[str], variants: list[str], work: Path) -> dict:
    sft_steps = dict(SFT_STEPS)
    for item in filter(None, (args.sft_steps or "").split(",")):
        size, _, steps = item.partition("=")
        sft_steps[size] = int(steps)
    steps = {size: args.steps or DEFAULT_STEPS.get(size, 5) for size in sizes}
    prep = {}
    for size in sizes:
        spec = {
            "mode": "prepare",
            "work": str(work),
            "size": size,
            "sft_steps": sft_steps[size],
            "threads": args.threads,
        }
        prep[size] = run_child(__file__, spec, timeout=args.timeout * 4)
        if "error" in prep[size]:
            sys.exit(
                f"[{size}] START failed: {prep[size]['error']}\n  "
                + "\n  ".join(prep[size].get("output_tail", []))
            )
        made = "reused" if prep[size]["sft_s"] is None else f"SFT {prep[size]['sft_s']:.0f} s"
        before = prep[size]["pass@1_before"]
        print(f"[{size}] START {prep[size]['start']} ({made}): held-out pass@1 {before:.3f}")

    def spec_for(size: str, name: str, mode: str, tag: str) -> dict:
        return {
            **VARIANTS[name],
            "mode": mode,
            "model": prep[size]["start"],
            "prompts": prep[size]["prompts"],
            "eval": prep[size]["eval"],
            "run_dir": str(work / f"run-{size}-{name}-{tag}"),
            "threads": args.threads,
            "warmup": args.warmup,
            "steps": steps[size],
            "max_steps": args.warmup + steps[size] if mode == "speed" else 10**6,
            "budget_s": args.budget,
            "eval_every_s": args.eval_every or None,
        }

    raw: dict[str, dict[str, list[dict]]] = {s: {v: [] for v in variants} for s in sizes}
    for rep in range(args.repeats):
        for size in sizes:
            for name in variants:
                label = f"[{size}] {name} speed (repeat {rep + 1}/{args.repeats})"
                spec = spec_for(size, name, "speed", f"speed{rep}")
                raw[size][name].append(
                    {**run_quietly(__file__, spec, label, args), "warmup": args.warmup, "steps": steps[size]}
                )
    budget_sizes = [s for s in args.budget_sizes.split(",") if s in sizes] if args.budget > 0 else []
    seeds = list(range(args.seeds))
    budget_raw: dict[str, dict[str, list[dict]]] = {s: {v: [] for v in variants} for s in budget_sizes}
    for seed in seeds:  # interleaved, like the speed repeats
        for size in budget_sizes:
            for name in variants:
                label = f"[{size}] {name} budget {args.budget:.0f} s (seed {seed})"
                spec = {**spec_for(size, name, "budget", f"budget-seed{seed}"), "seed": seed}
                budget_raw[size][name].append(
                    {**run_quietly(__file__, spec, label, args, args.retries), "seed": seed}
                )

    speed: dict[str, dict] = {}
    checks = {}
    for size in sizes:
        rows = {name: summarise(reps) for name, reps in raw[size].items()}
        base = rows.get(BASELINE, {})
        for r in rows.values():
            if "error" in r:
                continue
            r["samples_ratio"] = ratio(r["samples_per_s"], base.get("samples_per_s"))
            r["tokens_ratio"] = ratio(r["tokens_per_s"], base.get("tokens_per_s"))
            r["memory_ratio"] = ratio(r["peak_rss_mib"], base.get("peak_rss_mib"))
        speed[size] = rows
        trl_digest = base.get("prompt_ids_sha256")
        checks[size] = (
            "TRL not run"
            if trl_digest is None
            else "identical"
            if trl_digest == prep[size]["prompt_ids_sha256"]
            else "DIFFERENT: the frameworks do not see the same prompt tokens"
        )
        print(f"\n[{size}] prompt token ids of the first {PROMPT_CHECK} prompts: {checks[size]}")
    budget = {
        size: {name: summarise_budget(runs) for name, runs in rows.items()}
        for size, rows in budget_raw.items()
    }
    for rows in budget.values():
        base = rows.get(BASELINE, {})
        for r in rows.values():
            if "error" not in r:
                r["pass@1_ratio"] = ratio(r["pass@1"], base.get("pass@1"))
                r["steps_ratio"] = ratio(r["steps"], base.get("steps"))

    print_tables(speed, budget, prep)
    disturbed = any(r.get("noisy_used") for rows in speed.values() for r in rows.values())
    disturbed |= any(r.get("noisy") for rows in budget.values() for r in rows.values())
    if disturbed:
        print("! another program competed for the CPU during this run: its figures are not reliable")
    return {
        "settings": {
            "prompts_per_step": PROMPTS_PER_STEP,
            "group_size": GROUP_SIZE,
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": TEMPERATURE,
            "lr": LR,
            "betas": BETAS,
            "epsilon": EPSILON,
            "kl_beta": 0.0,
            "loss": "token_mean (TRL loss_type='dapo')",
            "levels": LEVELS,
            "prompts": N_PROMPTS,
            "eval_per_level": EVAL_PER_LEVEL,
            "threads": args.threads,
            "precision": "fp32",
            "warmup_steps_excluded": args.warmup,
            "measured_steps": steps,
            "repeats": args.repeats,
            "budget_s": args.budget,
            "budget_seeds": args.seeds,
            "eval_every_s": args.eval_every,
            "start_sft": {**SFT, "steps": sft_steps, "levels": LEVELS},
        },
        "method": __doc__,
        "versions": versions(),
        "start": prep,
        "prompt_check": checks,
        "speed": speed,
        "budget": budget,
    }


if __name__ == "__main__":
    main()
