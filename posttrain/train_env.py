"""An online RL stage on agent episodes (a run config with an `env:` section): the same loop, objectives
and checkpoints as `train.train_online`, with `agents.source.EnvSource` as the step source.

    posttrain train examples/agent_calculator.yaml

Files beside the usual ones: trajectories.jsonl (one line per episode: turns, token spans, tool calls
and results, grade, stop reason, failure label, ids and mask), and eval/* metrics from greedy episodes
on held-out tasks (eval/pass@1 is the share of held-out tasks done).
"""

from __future__ import annotations

import torch

from posttrain import algorithms
from posttrain.agents.audit import env_audit, record_trajectories
from posttrain.agents.config import task_rows
from posttrain.agents.source import EnvSource, agent_shares, env_reward, make_runner, passed
from posttrain.config import RunConfig
from posttrain.engine.run import Run
from posttrain.errors import ConfigError
from posttrain.models import load_tokenizer
from posttrain.stage import (
    StageResult,
    files,
    make_engine,
    online_models,
    record_start,
    run_source,
    sandbox_for,
)


def env_reward_fns(cfg: RunConfig, policy_token_budget: int):
    """The reward: the environment's grade (component `env`, weight `env.weight`) plus `rl.rewards` on
    the assistant's text, plus DAPO's overlong penalty over policy tokens when `rl.overlong_penalty`."""
    from posttrain.rewards import Combined, combine

    components = {"env": (env_reward, cfg.env.weight)}
    specs = list(cfg.rl.rewards)
    if cfg.rl.overlong_penalty:
        n = policy_token_budget
        specs.append(
            {"name": "overlong_penalty", "max_length": n, "cache": cfg.rl.overlong_cache or max(1, n // 5)}
        )
    if specs:
        try:
            extra = combine(specs).components
        except (ValueError, TypeError, ImportError) as e:
            raise ConfigError(f"rl.rewards: {e}") from None
        if "env" in extra:
            raise ConfigError(
                "rl.rewards: the component name 'env' is the environment's grade; give it a 'label'"
            )
        components.update(extra)
    return Combined(components)


def env_evaluator(cfg: RunConfig, tasks: list[dict], engine, tokenizer, factory, accelerator):
    """Greedy episodes on held-out tasks: eval/pass@1 (share done), eval/reward, eval/turns and the
    agent shares (hack, infra, drift)."""
    runner = make_runner(cfg, tokenizer, greedy=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = tasks[rank::world]

    def evaluate(model) -> dict[str, float]:
        episodes = runner.run(engine, factory, mine, env_name=factory.name)
        sums = torch.tensor(
            [
                float(len(episodes)),
                float(sum(passed(e) for e in episodes)),
                float(sum(e.reward for e in episodes)),
                float(sum(sum(t.sampled for t in e.turns) for e in episodes)),
                float(sum(e.policy_tokens for e in episodes)),
            ],
            device=accelerator.device,
        )
        sums = accelerator.reduce(sums, "sum").cpu()
        n = max(1.0, sums[0].item())
        out = {
            "eval/pass@1": sums[1].item() / n,
            "eval/reward": sums[2].item() / n,
            "eval/turns": sums[3].item() / n,
            "eval/completion_length": sums[4].item() / n,
        }
        out.update({f"eval/{k.removeprefix('agent/')}": v for k, v in agent_shares(episodes).items()})
        return out

    return evaluate


def train_env(cfg: RunConfig, accelerator, run: Run, *, resume: bool = False) -> StageResult:
    """An online RL stage on episodes of `cfg.env` into a run directory `train.train` claimed (module
    docstring)."""
    from accelerate.utils import set_seed

    algo = algorithms.get(cfg.algorithm)
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_files, eval_files = files(cfg.data.train), files(cfg.data.eval)
    sandbox_info = sandbox_for(cfg, run)  # the env's tools run code in it
    tasks = task_rows(cfg.env, train_files, split="train")
    eval_tasks = task_rows(cfg.env, eval_files, split="held_out")

    model, reference = online_models(cfg, algo, accelerator)
    record_start(
        run, cfg, accelerator, model,
        what=f"{cfg.algorithm} on {cfg.env.name}: {len(tasks)} tasks x {cfg.rollout.group_size} episodes",
        inputs=train_files + eval_files,
        data={"tasks": len(tasks), "eval_tasks": len(eval_tasks), "env": cfg.env.name},
        sandbox=sandbox_info,
        env=env_audit(cfg.env, tasks, eval_tasks),  # source and task hashes (posttrain replay checks them)
    )  # fmt: skip
    model.to(accelerator.device)
    engine = make_engine(cfg, algo.policy(model), tokenizer, accelerator)
    main = accelerator.is_main_process
    budget = make_runner(cfg, tokenizer).budgets
    source = EnvSource(
        cfg,
        tasks=tasks,
        tokenizer=tokenizer,
        engine=engine,
        reward=env_reward_fns(cfg, budget.max_turns * budget.max_new_tokens),
        algo=algo,
        accelerator=accelerator,
        samples_path=run.samples_file if main else None,
        reference=reference,
    )
    evaluator = None
    if eval_tasks:
        evaluator = env_evaluator(cfg, eval_tasks, engine, tokenizer, source.factory, accelerator)
    return run_source(
        cfg, algo, source, model=model, tokenizer=tokenizer, accelerator=accelerator, run=run,
        evaluator=evaluator, resume=resume,
        after_close=lambda: record_trajectories(run),  # the trajectories file's sha256 in the manifest's env block
    )  # fmt: skip
