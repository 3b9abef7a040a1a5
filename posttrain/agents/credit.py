"""Per-turn credit assignment for agent episodes, as pure functions of per-turn rewards and the group.

An episode of K assistant turns has per-turn rewards ``r_1..r_K``: the reward of the observation that
follows turn k (the environment's shaping, ``Observation.reward``), with the outcome (the rest of the
episode's total: the grade, the reward functions) added to the last turn, so ``sum(r) == total`` always
(:func:`turn_rewards`). The group is the ``group_size`` consecutive episodes of one task (the GRPO group).
Every mode returns one advantage per assistant turn of each episode; :func:`token_advantages` spreads
them over the policy tokens (environment tokens get 0 and are out of the loss anyway).

Modes (``CREDIT``):

- ``trajectory``: every turn gets the episode's group-normalised advantage
  ``A_i = (R_i - mean_g R) / (std_g R + eps)`` (today's GRPO: Shao et al. 2024, arXiv:2402.03300).
- ``discounted``: turn k gets its discounted return-to-go ``G_ik = sum_{j>=k} gamma^(j-k) r_ij``, centred
  and scaled by the group's statistics of the returns from the start (``G_i1``):
  ``A_ik = (G_ik - mean_g G_1) / (std_g G_1 + eps)``. With gamma = 1 and no shaping this is exactly
  ``trajectory``; with a per-turn penalty a late turn is no longer charged for an early mistake.
- ``anchor``: GiGPO (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training",
  arXiv:2505.10978, Eqs. 5-8): ``A_ik = A^E_i + omega * A^S_ik``. ``A^E`` is the episode-level group
  advantage (``trajectory``); ``A^S`` groups the turns of the whole group by the environment's state
  key before the turn (``Env.state_key``: the same state reached by different episodes is an *anchor
  state*) and normalises each turn's discounted return within its anchor group:
  ``A^S_ik = (G_ik - mean_{s=s_ik} G) / (std_{s=s_ik} G + eps)``. A turn whose state is unique in the
  group, or has no key (None), gets ``A^S = 0``.

``per_turn_samples`` is the fourth layout: one training sample per turn (the context so far as its
prompt, the turn's own tokens as its completion, that turn's advantage), as step-wise agent trainers do.

Standard deviations are the unbiased ones with eps = 1e-4 (as ``posttrain.advantages.group_advantages``);
with ``scale="none"`` nothing is divided (Dr. GRPO). Invalid (masked) episodes are left out of every
mean and std and get advantage 0 on every turn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.advantages import group_advantages
from posttrain.agents.trajectory import Episode

CREDIT = ("trajectory", "discounted", "anchor")
SCALES = ("std", "none")


def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """``G_k = r_k + gamma * G_{k+1}`` backwards from the last turn (``G_{K+1} = 0``)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"credit: gamma must be in [0, 1], got {gamma}")
    out, g = [0.0] * len(rewards), 0.0
    for k in range(len(rewards) - 1, -1, -1):
        g = float(rewards[k]) + gamma * g
        out[k] = g
    return out


def _stats(values: list[float], scale: str, eps: float) -> tuple[float, float]:
    """(mean, divisor) of a list: the divisor is std + eps (unbiased std, 0 for one value) or 1."""
    mean = sum(values) / len(values)
    if scale == "none":
        return mean, 1.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var) + eps


def _check(turn_rewards, group_size: int, valid, scale: str) -> list[bool]:
    if scale not in SCALES:
        raise ValueError(f"credit: unknown scale {scale!r}; known: {', '.join(SCALES)}")
    if group_size < 1 or len(turn_rewards) % group_size:
        raise ValueError(f"credit: {len(turn_rewards)} episodes do not split into groups of {group_size}")
    valid = [True] * len(turn_rewards) if valid is None else [bool(v) for v in valid]
    if len(valid) != len(turn_rewards):
        raise ValueError(f"credit: {len(valid)} valid flags for {len(turn_rewards)} episodes")
    return valid


def trajectory_credit(
    turn_rewards: Sequence[Sequence[float]],
    group_size: int,
    *,
    scale: str = "std",
    eps: float = 1e-4,
    valid: Sequence[bool] | None = None,
) -> list[list[float]]:
    """Every turn of episode i gets the group advantage of its total ``sum(turn_rewards[i])``."""
    valid = _check(turn_rewards, group_size, valid, scale)
    totals = torch.tensor([float(sum(r)) for r in turn_rewards], dtype=torch.float64)
    adv = group_advantages(totals, group_size, scale=scale, eps=eps, valid=torch.tensor(valid))
    return [[float(adv[i])] * len(r) for i, r in enumerate(turn_rewards)]


def discounted_credit(
    turn_rewards: Sequence[Sequence[float]],
    group_size: int,
    *,
    gamma: float = 1.0,
    scale: str = "std",
    eps: float = 1e-4,
    valid: Sequence[bool] | None = None,
) -> list[list[float]]:
    """Discounted return-to-go of each turn against the group's returns from the start (module docstring)."""
    valid = _check(turn_rewards, group_size, valid, scale)
    returns = [discounted_returns(r, gamma) for r in turn_rewards]
    out = [[0.0] * len(r) for r in turn_rewards]
    for g0 in range(0, len(turn_rewards), group_size):
        members = [i for i in range(g0, g0 + group_size) if valid[i]]
        if not members:
            continue
        mean, div = _stats([returns[i][0] if returns[i] else 0.0 for i in members], scale, eps)
        for i in members:
            out[i] = [(g - mean) / div for g in returns[i]]
    return out


def anchor_credit(
    turn_rewards: Sequence[Sequence[float]],
    state_keys: Sequence[Sequence],
    group_size: int,
    *,
    gamma: float = 0.95,
    omega: float = 1.0,
    scale: str = "std",
    eps: float = 1e-4,
    valid: Sequence[bool] | None = None,
) -> list[list[float]]:
    """GiGPO: the episode advantage plus ``omega`` times the anchor-state advantage (module docstring).

    Args:
        state_keys: per episode, the state key before each turn (JSON-able; None: no anchor).
    """
    valid = _check(turn_rewards, group_size, valid, scale)
    if [len(k) for k in state_keys] != [len(r) for r in turn_rewards]:
        raise ValueError("credit: state_keys must have one key per turn of each episode")
    episode = trajectory_credit(turn_rewards, group_size, scale=scale, eps=eps, valid=valid)
    returns = [discounted_returns(r, gamma) for r in turn_rewards]
    out = [[0.0] * len(r) for r in turn_rewards]
    for g0 in range(0, len(turn_rewards), group_size):
        anchors: dict[str, list[tuple[int, int]]] = {}
        for i in range(g0, g0 + group_size):
            if not valid[i]:
                continue
            for k, key in enumerate(state_keys[i]):
                if key is not None:
                    anchors.setdefault(json.dumps(key, sort_keys=True), []).append((i, k))
            out[i] = list(episode[i])
        for steps in anchors.values():
            if len(steps) < 2:
                continue
            mean, div = _stats([returns[i][k] for i, k in steps], scale, eps)
            for i, k in steps:
                out[i][k] += omega * (returns[i][k] - mean) / div
    return out


# --- from episodes ------------------------------------------------------------------------------


def turn_rewards(episode: Episode, total: float | None = None) -> list[float]:
    """Per-assistant-turn rewards of an episode: the reward of the observation after each turn, the rest
    of ``total`` (default ``episode.reward``) on the last turn, so they sum to ``total``. A masked episode's
    are all 0."""
    total = episode.reward if total is None else float(total)
    out: list[float] = []
    for t in episode.turns:
        if t.sampled:
            out.append(0.0)
        elif t.role == "observation" and out:
            out[-1] += t.reward
    if episode.masked or not out:
        return [0.0] * len(out)
    out[-1] += total - sum(out)
    return out


def state_keys(episode: Episode) -> list:
    """The environment's state key before each assistant turn (None where the environment has none)."""
    return [t.state_key for t in episode.turns if t.sampled]


def episode_credit(
    episodes: Sequence[Episode],
    group_size: int,
    *,
    mode: str = "trajectory",
    totals: Sequence[float] | None = None,
    gamma: float = 1.0,
    omega: float = 1.0,
    scale: str = "std",
) -> list[list[float]]:
    """Per-turn advantages of a batch of episodes (groups of ``group_size`` consecutive episodes)."""
    if mode not in CREDIT:
        raise ValueError(f"credit: unknown mode {mode!r}; known: {', '.join(CREDIT)}")
    totals = [e.reward for e in episodes] if totals is None else list(totals)
    rewards = [turn_rewards(e, t) for e, t in zip(episodes, totals)]
    valid = [not e.masked for e in episodes]
    if mode == "trajectory":
        return trajectory_credit(rewards, group_size, scale=scale, valid=valid)
    if mode == "discounted":
        return discounted_credit(rewards, group_size, gamma=gamma, scale=scale, valid=valid)
    keys = [state_keys(e) for e in episodes]
    return anchor_credit(rewards, keys, group_size, gamma=gamma, omega=omega, scale=scale, valid=valid)


def token_advantages(episode: Episode, advantages: Sequence[float]) -> list[float]:
    """One advantage per token of ``episode.ids``: each sampled token gets its turn's, others 0."""
    P, out = len(episode.prompt_ids), [0.0] * len(episode.ids)
    sampled = [t for t in episode.turns if t.sampled]
    if len(sampled) != len(advantages):
        raise ValueError(f"credit: {len(advantages)} advantages for {len(sampled)} assistant turns")
    for t, a in zip(sampled, advantages):
        for pos in range(t.start - P, t.end - P):
            if episode.mask[pos]:
                out[pos] = float(a)
    return out


@dataclass
class TurnSample:
    """One turn as its own training sample: ``prompt_ids`` is the whole context before the turn (opening,
    earlier turns, observations), ``completion_ids`` the turn's sampled tokens, ``logprobs`` theirs."""

    episode: int
    turn: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    advantage: float


def per_turn_samples(episodes: Sequence[Episode], advantages: Sequence[Sequence[float]]) -> list[TurnSample]:
    """One sample per assistant turn (masked episodes give none)."""
    out = []
    for n, (e, adv) in enumerate(zip(episodes, advantages)):
        if e.masked:
            continue
        context, P = list(e.prompt_ids) + list(e.ids), len(e.prompt_ids)
        sampled = [t for t in e.turns if t.sampled]
        for k, (t, a) in enumerate(zip(sampled, adv)):
            if t.end > t.start:
                out.append(
                    TurnSample(
                        n,
                        k,
                        context[: t.start],
                        context[t.start : t.end],
                        list(e.logprobs[t.start - P : t.end - P]),
                        float(a),
                    )
                )
    return out
