"""Per-turn credit assignment (posttrain.agents.credit) against numbers worked out by hand on a toy group.

The toy group (one task, three episodes, a step penalty of 0.1 per wrong guess, 1.0 for the answer):

    e0: r = [-0.1, 1.0]          total 0.9    states (1,15) (1,7)
    e1: r = [-0.1, -0.1, 1.0]    total 0.8    states (1,15) (9,15) (9,11)
    e2: r = [-0.1, -0.1]         total -0.2   states (1,15) (1,7)
"""

from __future__ import annotations

import math

import pytest

from posttrain.agents import credit
from posttrain.agents.envs.guess import GuessEnv
from posttrain.agents.policies import Call, ScriptedPolicy
from posttrain.agents.runner import EpisodeRunner
from posttrain.tasks.tiny import build_tokenizer

R = [[-0.1, 1.0], [-0.1, -0.1, 1.0], [-0.1, -0.1]]
KEYS = [[[1, 15], [1, 7]], [[1, 15], [9, 15], [9, 11]], [[1, 15], [1, 7]]]
EPS = 1e-4


def approx(rows):
    return [pytest.approx(r, abs=1e-6) for r in rows]


def test_discounted_returns_by_hand():
    assert credit.discounted_returns([-0.1, -0.1, 1.0], 0.5) == pytest.approx([0.1, 0.4, 1.0])
    assert credit.discounted_returns([1.0, 2.0], 1.0) == [3.0, 2.0]
    with pytest.raises(ValueError, match="gamma"):
        credit.discounted_returns([1.0], 1.5)


def test_trajectory_credit_is_todays_grpo_on_every_turn():
    # totals 0.9, 0.8, -0.2: mean 0.5, deviations 0.4, 0.3, -0.7
    assert credit.trajectory_credit(R, 3, scale="none") == approx([[0.4] * 2, [0.3] * 3, [-0.7] * 2])
    std = math.sqrt((0.4**2 + 0.3**2 + 0.7**2) / 2)  # unbiased: sqrt(0.37)
    got = credit.trajectory_credit(R, 3)
    assert got == approx([[0.4 / (std + EPS)] * 2, [0.3 / (std + EPS)] * 3, [-0.7 / (std + EPS)] * 2])
    # a masked episode is out of the mean and gets 0: mean(0.9, 0.8) = 0.85
    got = credit.trajectory_credit(R, 3, scale="none", valid=[True, True, False])
    assert got == approx([[0.05] * 2, [-0.05] * 3, [0.0] * 2])


def test_discounted_credit_by_hand():
    # gamma 0.5: G(e0) = [0.4, 1.0], G(e1) = [0.1, 0.4, 1.0], G(e2) = [-0.15, -0.1]
    # baseline: mean of the returns from the start = (0.4 + 0.1 - 0.15) / 3 = 0.35 / 3
    b = 0.35 / 3
    got = credit.discounted_credit(R, 3, gamma=0.5, scale="none")
    assert got == approx([[0.4 - b, 1.0 - b], [0.1 - b, 0.4 - b, 1.0 - b], [-0.15 - b, -0.1 - b]])
    # with the std: the std of the start returns 0.4, 0.1, -0.15
    s = math.sqrt(((0.4 - b) ** 2 + (0.1 - b) ** 2 + (-0.15 - b) ** 2) / 2) + EPS
    assert credit.discounted_credit(R, 3, gamma=0.5)[2] == pytest.approx([(-0.15 - b) / s, (-0.1 - b) / s])


def test_discounted_with_gamma_one_and_no_shaping_equals_trajectory():
    outcome = [[0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    assert credit.discounted_credit(outcome, 2, gamma=1.0) == approx(credit.trajectory_credit(outcome, 2))


def test_anchor_credit_gigpo_by_hand():
    # episode part (scale none): 0.4, 0.3, -0.7
    # anchor (1,15): G = 0.4, 0.1, -0.15 (mean 0.35/3) -> 0.2833, -0.0167, -0.2667
    # anchor (1,7):  G = 1.0 (e0, turn 2), -0.1 (e2, turn 2) (mean 0.45) -> 0.55, -0.55
    # (9,15), (9,11): reached once -> 0
    b = 0.35 / 3
    got = credit.anchor_credit(R, KEYS, 3, gamma=0.5, omega=1.0, scale="none")
    assert got == approx(
        [[0.4 + 0.4 - b, 0.4 + 0.55], [0.3 + 0.1 - b, 0.3, 0.3], [-0.7 - 0.15 - b, -0.7 - 0.55]]
    )
    half = credit.anchor_credit(R, KEYS, 3, gamma=0.5, omega=0.5, scale="none")
    assert half[0][1] == pytest.approx(0.4 + 0.5 * 0.55)
    # no state keys: the episode advantage alone
    none = [[None] * len(r) for r in R]
    assert credit.anchor_credit(R, none, 3, scale="none") == approx(
        credit.trajectory_credit(R, 3, scale="none")
    )
    # with the std inside the anchor group (1,7): |1.0 - 0.45| / (std(1.0, -0.1) + eps)
    s = math.sqrt(2 * 0.55**2) + EPS
    e_std = math.sqrt(0.37) + EPS
    got = credit.anchor_credit(R, KEYS, 3, gamma=0.5)
    assert got[0][1] == pytest.approx(0.4 / e_std + 0.55 / s, abs=1e-6)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="groups of 2"):
        credit.trajectory_credit(R, 2)
    with pytest.raises(ValueError, match="one key per turn"):
        credit.anchor_credit(R, [[None]] * 3, 3)
    with pytest.raises(ValueError, match="unknown mode"):
        credit.episode_credit([], 1, mode="nope")


# --- from real episodes -------------------------------------------------------------------------

TOK = build_tokenizer()


def guess_group():
    """Three episodes of guess N=15, target 5, step penalty 0.1: found in 2, found in 3, not found."""
    plans = [[8, 5], [8, 4, 5], [1, 15, 14, 13]]
    task = {"id": "t", "n": 15, "target": 5}

    it = iter(plans)

    def scripts(task):
        guesses = next(it)

        def play(task):
            for g in guesses:
                yield [Call("guess", {"n": g})]

        return play(task)

    policy = ScriptedPolicy(TOK, "tiny", scripts)
    return EpisodeRunner(TOK).run(policy, lambda t: GuessEnv(t, step_penalty=0.1), [task], group_size=3)


def test_turn_rewards_state_keys_and_token_advantages_from_episodes():
    eps = guess_group()
    assert [e.reward for e in eps] == pytest.approx([0.9, 0.8, -0.4])
    rewards = [credit.turn_rewards(e) for e in eps]
    assert rewards == approx([[-0.1, 1.0], [-0.1, -0.1, 1.0], [-0.1, -0.1, -0.1, -0.1]])
    keys = [credit.state_keys(e) for e in eps]
    assert keys == [[[1, 15], [1, 7]], [[1, 15], [1, 7], [5, 7]], [[1, 15], [2, 15], [2, 14], [2, 13]]]
    # a combined total (other reward fns) lands on the last turn
    assert credit.turn_rewards(eps[0], total=2.0) == pytest.approx([-0.1, 2.1])
    got = credit.episode_credit(eps, 3, mode="anchor", gamma=0.5, scale="none")
    assert got == approx(credit.anchor_credit(rewards, keys, 3, gamma=0.5, scale="none"))
    # tokens: each sampled token carries its turn's advantage, environment tokens 0
    adv = credit.token_advantages(eps[1], got[1])
    P = len(eps[1].prompt_ids)
    sampled = [t for t in eps[1].turns if t.sampled]
    for t, a in zip(sampled, got[1]):
        assert adv[t.start - P : t.end - P] == pytest.approx([a] * (t.end - t.start))
    env_tokens = [a for a, m in zip(adv, eps[1].mask) if not m]
    assert env_tokens and set(env_tokens) == {0.0}
    # one sample per turn: the context so far is the prompt, the turn's tokens the completion
    samples = credit.per_turn_samples(eps, got)
    assert len(samples) == 2 + 3 + 4
    s = samples[3]  # e1, second turn
    assert (s.episode, s.turn, s.advantage) == (1, 1, pytest.approx(got[1][1]))
    full = eps[1].prompt_ids + eps[1].ids
    assert (
        s.prompt_ids == full[: sampled[1].start]
        and s.completion_ids == full[sampled[1].start : sampled[1].end]
    )


# --- the environment step source's option -------------------------------------------------------


def credit_source(tmp_path, credit_cfg, rl=None):
    from posttrain import algorithms
    from posttrain.agents.source import EnvSource
    from posttrain.config import load_config
    from posttrain.engine.loop import make_accelerator
    from posttrain.train_env import env_reward_fns

    cfg = load_config(
        {
            "algorithm": "grpo",
            "out": str(tmp_path / "run"),
            "model": {"path": "unused"},
            "env": {"name": "guess", "options": {"step_penalty": 0.1}, "credit": credit_cfg},
            "rollout": {"prompts_per_step": 1, "group_size": 3},
            "rl": rl if rl is not None else {"scale": "none"},
        }
    )
    plans = iter([[8, 5], [8, 4, 5], [1, 15, 14, 13]])

    def scripts(task):
        guesses = next(plans)

        def play(task):
            for g in guesses:
                yield [Call("guess", {"n": g})]

        return play(task)

    return EnvSource(
        cfg,
        tasks=[{"id": "t", "n": 15, "target": 5}],
        tokenizer=TOK,
        engine=ScriptedPolicy(TOK, "tiny", scripts),
        reward=env_reward_fns(cfg, 1024),
        algo=algorithms.get("grpo"),
        accelerator=make_accelerator("fp32"),
        samples_path=tmp_path / "samples.jsonl",
    )


def test_env_credit_discounted_puts_per_turn_advantages_on_the_policy_tokens(tmp_path):
    src = credit_source(tmp_path, {"mode": "discounted", "gamma": 0.5})
    buffer = src.generate_scored(src.engine).buffer
    src.annotate(None, buffer)
    src.add_advantages(buffer)
    # G(e0) = [0.4, 1.0]; G(e1) = [0.1, 0.4, 1.0]; G(e2) = [-0.1875, -0.175, -0.15, -0.1]
    b = (0.4 + 0.1 - 0.1875) / 3
    want = [[0.4 - b, 1.0 - b], [0.1 - b, 0.4 - b, 1.0 - b], [g - b for g in (-0.1875, -0.175, -0.15, -0.1)]]
    assert src.last_turn_advantages == approx(want)
    assert "advantages" not in buffer.sequence
    adv = buffer.token["advantages"]
    for i, e in enumerate(src.last_episodes):
        row = adv[i, : len(e.ids)].tolist()
        assert row == pytest.approx(credit.token_advantages(e, want[i]), abs=1e-6)
        assert all(a == 0.0 for a, m in zip(row, e.mask) if not m)


def test_env_credit_trajectory_leaves_grpo_as_it_is_and_bad_options_are_config_errors(tmp_path):
    from posttrain.errors import ConfigError

    src = credit_source(tmp_path, {})
    buffer = src.generate_scored(src.engine).buffer
    src.annotate(None, buffer)
    src.add_advantages(buffer)
    mean = (0.9 + 0.8 - 0.4) / 3
    assert buffer.sequence["advantages"].tolist() == pytest.approx(
        [0.9 - mean, 0.8 - mean, -0.4 - mean], abs=1e-5
    )
    with pytest.raises(ConfigError, match="unknown; known: trajectory"):
        credit_source(tmp_path, {"mode": "per_token"})
    with pytest.raises(ConfigError, match="unknown key"):
        credit_source(tmp_path, {"mode": "anchor", "lambda": 1})
    with pytest.raises(ConfigError, match="rl.advantage 'group'"):
        credit_source(tmp_path, {"mode": "anchor"}, rl={"advantage": "rloo"})
