"""The environment step source: agent episodes in place of single completions, in the one online loop.

    task rows -> EpisodeRunner.run (turn waves on the engine, tool steps concurrent, finished episodes
    drop out) -> reward fns on the assistant text + the environment's grade as component "env"
    -> EpisodeBuffer (the rollout buffer, with the policy-token loss mask) -> the algorithm's annotate /
    advantages (GRPO and its presets, RLOO, PPO: unchanged) -> epochs x minibatches of steps

:class:`EnvSource` is a :class:`~posttrain.rollout.source.RolloutSource` whose rollouts are episodes: the
prompt cursor, checkpointing, minibatching, reference / value passes and metrics are the parent's. What
differs is written here once:

- **The loss mask is the policy's.** :class:`EpisodeBuffer` puts ``-100`` in ``targets`` wherever the
  environment wrote a token (bridges, tool results), so every objective's ``targets != -100`` mask, the
  loss units, entropy and KL metrics, and PPO's GAE (which bridges over masked positions) see sampled
  tokens only. A masked episode (infra, data, drift) has no loss token at all.
- **Lengths are policy tokens.** ``completion_lengths`` (length metrics, DAPO's overlong penalty) counts
  sampled tokens only; Dr. GRPO's constant normaliser is the episode's policy-token budget
  (``max_turns x max_new_tokens``), exposed as ``policy_token_budget``.
- **Baselines skip masked episodes.** ``EpisodeBuffer.valid`` is False for them; group and leave-one-out
  advantages leave them out of every mean and std (``advantages.group_advantages(valid=...)``).
- **Rewards read the assistant's text only** (``Episode.assistant_text``: a tool output that holds the
  answer earns nothing by itself); the episode's reward (``grade().reward`` read from the environment's
  state, zeroed by the runner on a budget stop, a hack or a forgery) arrives as the row field
  ``env_reward`` and is the reward component ``env``.

Every rollout appends one line per episode to ``trajectories.jsonl`` (``trajectory.Episode.to_json`` plus
``step``, the combined ``reward`` and the ``advantage``) and logs the agent metrics of
``trajectory.summarize`` with the hack / infra / drift shares the monitor's agent rules watch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from posttrain.agents.config import budgets as config_budgets
from posttrain.agents.config import check_options, env_factory
from posttrain.agents.credit import CREDIT, SCALES, episode_credit, token_advantages
from posttrain.agents.runner import EpisodeRunner
from posttrain.agents.trajectory import Episode, completion, summarize
from posttrain.data.templates import IGNORE_INDEX
from posttrain.errors import ConfigError
from posttrain.rollout.buffer import RolloutBuffer
from posttrain.rollout.engine import Sampling
from posttrain.rollout.source import Generated, RolloutSource


@dataclass
class EpisodeBuffer(RolloutBuffer):
    """A rollout buffer of episodes: ``policy_masks[i][t]`` is True where completion token t of sample i
    was sampled by the policy (False on environment tokens; all False for a masked episode); ``valid[i]``
    is False for a masked episode (left out of the group baselines)."""

    policy_masks: list[list[bool]] = field(default_factory=list)

    def completion_lengths(self) -> list[int]:
        return [sum(m) for m in self.policy_masks]

    def completion_mask(self) -> Tensor:
        out = torch.zeros((len(self), self.width), dtype=torch.bool)
        for i, m in enumerate(self.policy_masks):
            if m:
                out[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        return out

    def layout(self, pad_id: int) -> dict[str, Tensor]:
        out = super().layout(pad_id)
        out["targets"] = torch.where(self.completion_mask(), out["targets"], IGNORE_INDEX)
        return out

    def select(self, index: list[int]) -> EpisodeBuffer:
        sub = super().select(index)
        return EpisodeBuffer(
            **{f.name: getattr(sub, f.name) for f in fields(RolloutBuffer)},
            policy_masks=[self.policy_masks[i] for i in index],
        )


def env_reward(prompts, completions, env_reward, **_row_fields) -> list[float]:
    """The reward component ``env``: each episode's own reward (its grade, read from the environment's state)."""
    return [float(r) for r in env_reward]


class EnvSource(RolloutSource):
    """Agent episodes as rollouts (module docstring).

    Args:
        cfg: the run config, with an ``env`` section.
        tasks: task rows (``agents.config.task_rows``).
        tokenizer, engine, algo, accelerator, reference: as :class:`RolloutSource`.
        reward: a ``Combined`` with the component ``env`` (``env_reward``) and any reward fns of the
            assistant text (``agents.config``'s caller builds it: ``train_env.env_reward_fns``).
        samples_path: samples.jsonl (main process) or None; trajectories.jsonl goes beside it.

    Raises:
        ConfigError: asynchronous generation (``rollout.max_policy_lag > 0``), options that do not fit the
            environment, a tool format or chat template that cannot render a tool turn.
    """

    def __init__(
        self, cfg, *, tasks, tokenizer, engine, reward, algo, accelerator, samples_path=None, reference=None
    ):
        if cfg.rollout.max_policy_lag > 0:
            raise ConfigError("env runs generate synchronously: set rollout.max_policy_lag to 0")
        if not tasks:
            raise ConfigError("the environment gave no training tasks (env.tasks / data.train)")
        super().__init__(
            cfg,
            rows=tasks,
            tokenizer=tokenizer,
            engine=engine,
            reward=reward,
            algo=algo,
            accelerator=accelerator,
            samples_path=samples_path,
            reference=reference,
            encoded=([], []),  # episodes render their own openings
        )
        env = cfg.env
        self.factory = env_factory(env)
        check_options(env, self.factory, tasks[0])
        self.runner = make_runner(cfg, tokenizer)
        b = self.runner.budgets
        self.policy_token_budget = b.max_turns * b.max_new_tokens
        self.trajectories_path = Path(samples_path).with_name("trajectories.jsonl") if samples_path else None
        self.last_episodes: list[Episode] = []
        self.credit = check_credit(cfg)
        self.last_turn_advantages: list[list[float]] | None = None

    # ------------------------------------------------------------------ episodes

    def generate_scored(self, engine) -> Generated:
        """Run group_size episodes of each of this process's next tasks and score them; with dynamic
        sampling, groups whose rewards are all equal are replaced by fresh tasks' groups (as the parent)."""
        G, want = self.ro.group_size, self.local_prompts
        kept, dropped, rounds, drawn = [], [], 0, 0
        seconds = {"generate": 0.0, "tools": 0.0, "grade": 0.0, "reward": 0.0}
        kv = {"reused_tokens": 0, "prefill_tokens": 0}
        while len(kept) < want and rounds <= (self.rl.max_resample_rounds if self.rl.dynamic_sampling else 0):
            need = want - len(kept) if rounds == 0 else min(4 * (want - len(kept)), 4 * want)
            tasks = [self.rows[i] for i in self._draw(need)]
            drawn += need
            episodes = self.runner.run(engine, self.factory, tasks, group_size=G, env_name=self.factory.name)
            for k, v in self.runner.seconds.items():
                seconds[k] += v
            for k in kv:
                kv[k] += self.runner.kv_stats.get(k, 0)
            t0 = time.perf_counter()
            scores = self.score(episodes, [t for t in tasks for _ in range(G)])
            seconds["reward"] += time.perf_counter() - t0
            for j in range(len(tasks)):
                eps = episodes[j * G : (j + 1) * G]
                item = (
                    eps,
                    scores.total[j * G : (j + 1) * G],
                    {k: v[j * G : (j + 1) * G] for k, v in scores.components.items()},
                )
                live = [r for r, e in zip(item[1], eps) if not e.masked]
                informative = G == 1 or (len(live) > 1 and max(live) > min(live))
                (kept if informative or not self.rl.dynamic_sampling else dropped).append(item)
            rounds += 1
        informative = len(kept)
        kept = (kept + dropped)[:want]
        episodes = [e for eps, _, _ in kept for e in eps]
        totals = [r for _, rs, _ in kept for r in rs]
        components: dict[str, list[float]] = {}
        for _, _, comps in kept:
            for k, v in comps.items():
                components.setdefault(k, []).extend(v)
        buffer = self.episode_buffer(episodes, totals, components)
        self.last_episodes, self._last_buffer = episodes, buffer
        elapsed = sum(seconds.values())
        policy_tokens = sum(e.policy_tokens for e in episodes)
        metrics = {
            **agent_metrics(episodes, self.accelerator),
            "generation/seconds": seconds["generate"],
            "generation/tokens_per_s": policy_tokens / max(seconds["generate"], 1e-9),
            "generation/samples_per_s": drawn * G / max(elapsed, 1e-9),
            "agent/tool_seconds": seconds["tools"],
            "agent/grade_seconds": seconds["grade"],
            "reward/seconds": seconds["reward"],
        }
        if kv["reused_tokens"] + kv["prefill_tokens"]:  # KV carry-over: the prompt tokens not prefilled again
            metrics["generation/kv_reused_share"] = kv["reused_tokens"] / (
                kv["reused_tokens"] + kv["prefill_tokens"]
            )
        if self.rl.dynamic_sampling:
            metrics["dynamic_sampling/rounds"] = rounds
            metrics["dynamic_sampling/informative_share"] = min(informative, want) / want
        prompts = [_opening(e) for e in episodes]
        return Generated(buffer=buffer, prompts=prompts, metrics=metrics)

    def score(self, episodes: list[Episode], tasks: list[dict]):
        """The combined reward of each episode: reward fns get the opening messages as the prompt, the
        assistant's text only as the completion, the task's fields, ``completion_lengths`` in policy
        tokens, and ``env_reward``. A masked episode's total is 0 (it is in no baseline and no loss)."""
        keys = [k for k in dict.fromkeys(k for t in tasks for k in t) if k not in ("prompt", "env_reward")]
        fields_ = {k: [t.get(k) for t in tasks] for k in keys}
        fields_["completion_lengths"] = [e.policy_tokens for e in episodes]
        fields_["finish_reasons"] = [completion(e)[0].finish_reason for e in episodes]
        fields_["env_reward"] = [e.reward for e in episodes]
        scores = self.reward.score(
            [_opening(e) for e in episodes], [e.assistant_text() for e in episodes], **fields_
        )
        total = [0.0 if e.masked else t for e, t in zip(episodes, scores.total)]
        return dataclasses.replace(scores, total=total)

    def episode_buffer(self, episodes: list[Episode], totals: list[float], components: dict) -> EpisodeBuffer:
        completions, masks, prompts = [], [], []
        for e in episodes:
            c, m = completion(e)
            completions.append(c)
            masks.append(m)
            prompts.append(list(e.prompt_ids) or [self.pad_id])  # an episode that never opened (masked)
        return EpisodeBuffer(
            prompt_ids=prompts,
            completions=completions,
            rows=[{"task_id": e.task_id} for e in episodes],
            group_size=self.ro.group_size,
            rewards=torch.tensor(totals, dtype=torch.float32),
            components=components,
            policy_masks=masks,
            valid=torch.tensor([not e.masked for e in episodes]),
        )

    def add_advantages(self, buffer) -> None:
        """The algorithm's advantages; with a per-turn ``env.credit`` mode, per-token advantages of
        ``agents.credit`` in their place (each policy token its turn's advantage)."""
        self.last_turn_advantages = None
        if self.credit.get("mode", "trajectory") == "trajectory":
            return super().add_advantages(buffer)
        turns = episode_credit(
            self.last_episodes,
            buffer.group_size,
            totals=buffer.rewards.tolist(),
            scale=self.rl.scale,
            **self.credit,
        )
        self.last_turn_advantages = turns
        buffer.sequence.pop("advantages", None)
        buffer.token["advantages"] = buffer.per_token(
            [token_advantages(e, a) for e, a in zip(self.last_episodes, turns)]
        )

    def _rollout(self, model, step: int):
        steps = super()._rollout(model, step)
        if self.trajectories_path is not None:
            buffer = self._last_buffer
            adv = buffer.sequence.get("advantages")
            with open(self.trajectories_path, "a") as f:
                for i, e in enumerate(self.last_episodes):
                    record = {
                        "step": step,  # as samples.jsonl: the first optimiser step that trains on them
                        "run_id": self.trajectories_path.parent.name,
                        "reward": round(float(buffer.rewards[i]), 6),
                        "advantage": None if adv is None else round(float(adv[i]), 6),
                        **self._turn_record(i),
                        **e.to_json(),
                    }
                    f.write(json.dumps(record) + "\n")
        return steps

    def _turn_record(self, i: int) -> dict:
        if self.last_turn_advantages is None:
            return {}
        return {"turn_advantages": [round(a, 6) for a in self.last_turn_advantages[i]]}


def check_credit(cfg) -> dict:
    """``env.credit`` checked: a known mode, known keys, an advantage estimator it can replace."""
    credit = dict(getattr(cfg.env, "credit", None) or {})
    unknown = set(credit) - {"mode", "gamma", "omega"}
    if unknown:
        raise ConfigError(
            f"env.credit: unknown key(s) {', '.join(sorted(unknown))}; known: mode, gamma, omega"
        )
    mode = credit.get("mode", "trajectory")
    if mode not in CREDIT:
        raise ConfigError(f"env.credit.mode {mode!r} unknown; known: {', '.join(CREDIT)}")
    if mode != "trajectory" and (
        getattr(cfg.rl, "advantage", None) != "group" or getattr(cfg.rl, "scale", None) not in SCALES
    ):
        raise ConfigError(
            f"env.credit.mode {mode!r} replaces GRPO's group advantages: it needs rl.advantage 'group' "
            f"and rl.scale 'std' or 'none'"
        )
    return credit


def make_runner(cfg, tokenizer, *, greedy: bool = False) -> EpisodeRunner:
    """The episode runner of a run's `env` section: its format, budgets, verification and loss policy,
    sampling at the rollout's temperature / top-p / top-k (greedy for evaluation)."""
    ro = cfg.rollout
    sampling = (
        Sampling(temperature=0.0)
        if greedy
        else Sampling(temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k)
    )
    return EpisodeRunner(
        tokenizer,
        cfg.env.format,
        budgets=config_budgets(cfg.env),
        sampling=sampling,
        verify=cfg.env.verify,
        loss_policy=cfg.env.loss_policy or None,
        kv_carry=cfg.env.kv_carry,
    )


def agent_metrics(episodes: list[Episode], accelerator=None) -> dict[str, float]:
    """Every ``agent/*`` metric of a step, over the episodes of *all* processes: each process's episodes
    are gathered first, so a label's rate is its share of the whole step, not
    one process's share (which would also miss labels that occurred elsewhere)."""
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        from accelerate.utils import gather_object

        episodes = gather_object(list(episodes))
    n = max(1, len(episodes))
    return {
        **summarize(episodes),
        **agent_shares(episodes),
        **grade_components(episodes),
        "agent/policy_tokens": sum(e.policy_tokens for e in episodes) / n,
    }


def agent_shares(episodes: list[Episode]) -> dict[str, float]:
    """What the monitor's agent rules watch, always logged (0 when nothing happened): the share of
    episodes with a hack attempt among their events, with an infra.* primary label, with drift; and the
    share that passed (graded passed, no failure)."""
    n = max(1, len(episodes))
    return {
        "agent/hack_frac": sum("hack.attempt" in e.events for e in episodes) / n,
        "agent/infra_frac": sum((e.failure or "").startswith("infra.") for e in episodes) / n,
        "agent/drift_frac": sum(e.failure == "tokenization.drift" for e in episodes) / n,
        "agent/success": sum(passed(e) for e in episodes) / n,
    }


def passed(e: Episode) -> bool:
    return e.grade is not None and e.grade.passed and e.failure is None


def grade_components(episodes: list[Episode]) -> dict[str, float]:
    """Mean of each grade component (``correct``, ``used_calc``, ...) over the graded episodes."""
    sums: dict[str, list[float]] = {}
    for e in episodes:
        for k, v in (e.grade.components if e.grade else {}).items():
            sums.setdefault(k, []).append(float(v))
    return {f"agent/grade/{k}": sum(v) / len(v) for k, v in sums.items()}


def _opening(e: Episode):
    return e.turns[0].messages if e.turns and e.turns[0].role == "prompt" else []
