"""Run one stage: offline (rows -> examples -> the loop -> final/) or online (prompts -> rollouts -> the
loop -> final/); agent episodes are posttrain/train_env.py, what every stage shares posttrain/stage.py.

    result = posttrain.train("examples/sft.yaml", overrides=["train.max_steps=100"])

Works the same under `accelerate launch` (each process builds the same examples and plan;
the loop shards every global batch over processes); only the main process writes files.
"""

from __future__ import annotations

from pathlib import Path

from posttrain import algorithms
from posttrain.config import RunConfig, dump_config
from posttrain.data.batching import packing_supported, plan_batches
from posttrain.data.schemas import load_rows
from posttrain.engine.loop import LoopData, make_accelerator, train_loop, used_examples
from posttrain.engine.run import Run
from posttrain.errors import ConfigError, DataError, RewardError
from posttrain.models import load_model, load_tokenizer
from posttrain.stage import (
    StageResult,
    build_monitor,
    files,
    finish,
    load_stage,
    make_engine,
    online_models,
    record_start,
    run_source,
    sandbox_for,
)

__all__ = ["StageResult", "train"]


def encode_files(paths: list[str], algo, tokenizer, cfg: RunConfig, *, max_errors: int = 20) -> list:
    """Validate and encode every row of every file; all problems are reported together,
    before any model is loaded, so that a bad row costs seconds, not a run."""
    examples, errors, dropped = [], [], 0
    for path in paths:
        for loc, row in load_rows(path, algo.kind):
            try:
                ex = algo.encode(row, tokenizer, cfg, str(loc))
            except DataError as e:
                errors.append(str(e))
                continue
            if ex is None:
                dropped += 1
            else:
                examples.append(ex)
    if errors:
        more = f"\n  ... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        raise DataError(f"{len(errors)} row(s) cannot be used:\n  " + "\n  ".join(errors[:max_errors]) + more)
    if dropped:
        print(f"note: {dropped} row(s) longer than data.max_length={cfg.data.max_length} were dropped")
    if not examples:
        raise DataError(f"{', '.join(paths)}: no usable rows left")
    return examples


def loop_data(examples: list, algo, cfg: RunConfig, pad_id: int, packing: bool) -> LoopData:
    """Deterministic plans and collation over encoded examples (SFT examples, pairs, ...)."""
    lengths = [len(ex) for ex in examples]
    group = cfg.data.group_by_length and not packing
    batcher = algo.collate

    def plan(epoch: int) -> list[list[int]]:
        return plan_batches(
            lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch, group_by_length=group
        )

    def make(ix: list[int]) -> dict:
        return batcher(
            [examples[i] for i in ix], pad_id=pad_id, packing=packing, max_length=cfg.data.max_length
        )

    def tokens(batch: dict) -> int:
        return int((batch["example_index"] >= 0).sum())

    return LoopData(plan=plan, collate=make, tokens=tokens, num_examples=len(examples), examples=examples)


def reference_models(cfg: RunConfig) -> list[str]:
    ref = cfg.dpo.ref_model if cfg.algorithm == "dpo" else None
    return [ref] if ref else []


def prepare(
    objective, model, cfg: RunConfig, run: Run, accelerator, data: LoopData, eval_data: LoopData | None
) -> None:
    """Run the objective's one-off pass (reference log-probs) with the reference model (a
    separate one when configured, else the model as loaded, before any update), over the
    examples the run will use."""
    ref_path = reference_models(cfg)
    reference = model
    if ref_path:
        reference = load_model(
            cfg.model.model_copy(update={"path": ref_path[0], "lora": None}), trainable=False
        )
    reference.to(accelerator.device)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    used = used_examples(cfg.train, data, accelerator.num_processes)
    for name, d, indices in [("train", data, used), ("eval", eval_data, None)]:
        if d is not None:
            cache = run.path / f"ref_logps.{name}.pt" if accelerator.is_main_process else None
            indices = indices if indices is not None else list(range(d.num_examples))
            objective.prepare(
                reference, d.examples, indices, cache=cache, collate_fn=d.collate, micro_batch=micro
            )


def train(
    config: RunConfig | str | Path | dict,
    *,
    overrides=(),
    resume: bool = False,
    overwrite: bool = False,
    allow_changed=(),
) -> StageResult:
    """Run one stage into `cfg.out`. An existing run there is refused unless `resume` (continue from its
    last checkpoint; a change to a key that changes the result is refused unless named in
    `allow_changed`) or `overwrite` (delete it first); the directory is locked while the stage runs
    (engine/rundir.py)."""
    cfg = load_stage(config, overrides)
    accelerator = make_accelerator(cfg.train.precision)
    run = Run(cfg.out, write=accelerator.is_main_process)
    run.claim(
        config_text=dump_config(cfg),
        inputs=stage_inputs(cfg),
        resume=resume,
        overwrite=overwrite,
        allow_changed=allow_changed,
    )
    try:
        return (train_online if cfg.online else train_offline)(cfg, accelerator, run, resume=resume)
    finally:
        run.release()


def stage_inputs(cfg: RunConfig) -> dict[str, list]:
    """The files each result-changing config key reads (compared by content on --resume)."""
    from posttrain.audit.hashes import model_files

    models = {"model.path": cfg.model.path, "dpo.ref_model": next(iter(reference_models(cfg)), None)}
    if cfg.algorithm == "ppo":
        models["ppo.critic"] = cfg.ppo.critic
    return {
        "data.train": files(cfg.data.train),
        **{key: model_files(path) for key, path in models.items() if path},
    }


def train_offline(cfg: RunConfig, accelerator, run: Run, *, resume: bool = False) -> StageResult:
    """An offline stage (SFT, reward model, DPO family, KTO) into a claimed run directory."""
    from accelerate.utils import set_seed

    algo = algorithms.get(cfg.algorithm)
    set_seed(cfg.train.seed)
    say = accelerator.print

    tokenizer = load_tokenizer(cfg.model)
    train_files, eval_files = files(cfg.data.train), files(cfg.data.eval)
    examples = encode_files(train_files, algo, tokenizer, cfg)
    eval_examples = encode_files(eval_files, algo, tokenizer, cfg) if eval_files else None

    model = algo.load_model(cfg)
    packing = cfg.data.packing
    # A reward model's head pools one token per sequence: probe the backbone underneath.
    if packing and not packing_supported(getattr(model, "backbone", model)):
        say(f"note: {type(model).__name__} does not honour per-sequence position ids; using padded batches")
        packing = False
    record_start(
        run, cfg, accelerator, model,
        what=f"{cfg.algorithm}: {len(examples)} examples",
        inputs=train_files + eval_files,
        data={"train_examples": len(examples), "eval_examples": len(eval_examples or []), "packing": packing},
    )  # fmt: skip
    pad_id = tokenizer.pad_token_id
    objective = algo.Objective(cfg)
    data = loop_data(examples, algo, cfg, pad_id, packing)
    eval_data = loop_data(eval_examples, algo, cfg, pad_id, packing) if eval_examples else None
    if hasattr(objective, "prepare"):  # e.g. reference log-probs, once, before the first step
        prepare(objective, model, cfg, run, accelerator, data, eval_data)
    result = train_loop(
        cfg.train,
        accelerator=accelerator,
        model=model,
        objective=objective,
        data=data,
        eval_data=eval_data,
        run=run,
        monitor=build_monitor(cfg, run, accelerator),
        resume=resume,
    )
    return finish(result, algo, model, tokenizer, run, accelerator)


# --------------------------------------------------------------------------------------------- online


def prompt_rows(paths: list[str], tokenizer, cfg: RunConfig) -> tuple[list[dict], tuple[list, list]]:
    """Validated prompt rows and their `encode_prompts` (texts, token ids); a prompt that leaves no room
    for max_new_tokens within max_length is an error naming its file and line."""
    from posttrain.data.templates import encode_prompts

    rows, texts, token_ids, errors = [], [], [], []
    room = cfg.data.max_length - cfg.rollout.max_new_tokens
    for path in paths:
        located = load_rows(path, "prompt")
        rendered, ids = encode_prompts(tokenizer, [row["prompt"] for _, row in located])
        for (loc, row), text, prompt in zip(located, rendered, ids):
            if len(prompt) > room:
                errors.append(
                    f"{loc}: field 'prompt': {len(prompt)} tokens; with rollout.max_new_tokens="
                    f"{cfg.rollout.max_new_tokens} it does not fit data.max_length={cfg.data.max_length}"
                )
            else:
                rows.append(row)
                texts.append(text)
                token_ids.append(prompt)
    if errors:
        raise DataError(f"{len(errors)} prompt(s) too long:\n  " + "\n  ".join(errors[:20]))
    if not rows:
        raise DataError(f"{', '.join(paths)}: no prompts")
    return rows, (texts, token_ids)


def build_reward(specs: list, cfg: RunConfig, *, shaping: bool):
    """The weighted reward of `rl.rewards` (or `rl.eval_rewards`); with `shaping`, DAPO's overlong
    penalty is added when `rl.overlong_penalty` asks for it (evaluations score without it)."""
    from posttrain.rewards import combine

    specs = list(specs)
    if shaping and cfg.rl.overlong_penalty:
        n = cfg.rollout.max_new_tokens
        specs.append(
            {"name": "overlong_penalty", "max_length": n, "cache": cfg.rl.overlong_cache or max(1, n // 5)}
        )
    if not specs:
        raise ConfigError("rl.rewards is empty: an online stage needs at least one reward fn")
    try:
        return combine(specs)
    except (ValueError, TypeError, ImportError) as e:
        raise ConfigError(f"rl.rewards: {e}") from None


def online_evaluator(cfg: RunConfig, rows: list[dict], encoded, engine, reward, accelerator):
    """Greedy held-out evaluation inside training: mean reward and pass@1 (reward >= success_threshold).
    `encoded`: the rows' (texts, token ids) from `prompt_rows`."""
    import torch

    from posttrain.rollout.engine import Sampling
    from posttrain.rollout.source import score_completions

    world, rank = accelerator.num_processes, accelerator.process_index
    mine = rows[rank::world]
    ids = encoded[1][rank::world]
    greedy = Sampling(max_new_tokens=cfg.rollout.max_new_tokens, temperature=0, stop=tuple(cfg.rollout.stop))

    def evaluate(model) -> dict[str, float]:
        completions = [g[0] for g in engine.generate(ids, 1, greedy)]
        try:
            scores = score_completions(reward, mine, completions)
        except RewardError as e:
            raise RewardError(f"held-out evaluation ({', '.join(files(cfg.data.eval))}): {e}") from None
        total = torch.tensor(scores.total, dtype=torch.float32)
        sums = torch.tensor(
            [
                float(len(mine)),
                float(total.sum()),
                float((total >= cfg.rl.success_threshold).sum()),
                float(sum(len(c.token_ids) for c in completions)),
            ],
            device=accelerator.device,
        )
        sums = accelerator.reduce(sums, "sum").cpu()
        n = sums[0].item()
        return {
            "eval/reward": sums[1].item() / n,
            "eval/pass@1": sums[2].item() / n,
            "eval/completion_length": sums[3].item() / n,
        }

    return evaluate


def train_online(cfg: RunConfig, accelerator, run: Run, *, resume: bool = False) -> StageResult:
    """An online RL stage (GRPO family, PPO), into a claimed run directory: the loop over rollouts of the
    policy itself."""
    if getattr(cfg, "env", None) is not None:  # agent episodes (posttrain/train_env.py)
        from posttrain.train_env import train_env

        return train_env(cfg, accelerator, run, resume=resume)
    from accelerate.utils import set_seed

    from posttrain.rollout.source import RolloutSource

    algo = algorithms.get(cfg.algorithm)
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_files, eval_files = files(cfg.data.train), files(cfg.data.eval)
    rows, encoded = prompt_rows(train_files, tokenizer, cfg)
    eval_rows, eval_encoded = prompt_rows(eval_files, tokenizer, cfg) if eval_files else (None, None)
    sandbox_info = sandbox_for(cfg, run)
    reward = build_reward(cfg.rl.rewards, cfg, shaping=True)
    eval_reward = build_reward(cfg.rl.eval_rewards or cfg.rl.rewards, cfg, shaping=False)

    model, reference = online_models(cfg, algo, accelerator)
    record_start(
        run, cfg, accelerator, model,
        what=f"{cfg.algorithm}: {len(rows)} prompts x {cfg.rollout.group_size} samples",
        inputs=train_files + eval_files,
        data={"prompts": len(rows), "eval_prompts": len(eval_rows or [])},
        sandbox=sandbox_info,
    )  # fmt: skip
    model.to(accelerator.device)
    engine = make_engine(cfg, algo.policy(model), tokenizer, accelerator)
    source = RolloutSource(
        cfg,
        rows=rows,
        tokenizer=tokenizer,
        engine=engine,
        reward=reward,
        algo=algo,
        accelerator=accelerator,
        samples_path=run.samples_file if accelerator.is_main_process else None,
        reference=reference,
        encoded=encoded,
    )
    evaluator = None
    if eval_rows:
        evaluator = online_evaluator(cfg, eval_rows, eval_encoded, engine, eval_reward, accelerator)
    return run_source(
        cfg, algo, source, model=model, tokenizer=tokenizer, accelerator=accelerator, run=run,
        evaluator=evaluator, resume=resume,
    )  # fmt: skip
