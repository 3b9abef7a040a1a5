"""Agent episodes in the one online loop (posttrain/agents/source.py): the policy-token loss mask in the
rollout buffer, masked episodes out of the group baselines (numbers by hand), reward fns on the assistant
text only, the grade as the `env` component, length terms over policy tokens, trajectories.jsonl, the
`env:` config section and bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from agent_toys import Toy

from posttrain import algorithms
from posttrain.agents.demos import demo_episodes, demo_rows
from posttrain.agents.policies import Call, ScriptedPolicy
from posttrain.agents.source import EnvSource
from posttrain.agents.trajectory import read_jsonl
from posttrain.config import load_config
from posttrain.data.templates import IGNORE_INDEX, encode_sft_row
from posttrain.engine.loop import make_accelerator
from posttrain.errors import ConfigError, DataError
from posttrain.monitor import HealthMonitor, default_rules
from posttrain.tasks.tiny import build_model, build_tokenizer
from posttrain.train_env import env_reward_fns

TOK = build_tokenizer()
ACC = make_accelerator("fp32")


def scripted(*plans):
    """A ScriptedPolicy playing plans[k % len(plans)] in the k-th episode; a plan is task -> turns."""
    count = itertools.count()

    def make(task):
        plan = plans[next(count) % len(plans)]

        def script(task):
            for turn in plan(task):  # noqa: UP028 — a list cannot take the runner's send()
                yield turn

        return script(task)

    return ScriptedPolicy(TOK, "tiny", make)


def right(task):
    return [[Call("answer", {"value": task["answer"]})]]


def wrong(task):
    return [[Call("answer", {"value": "0"})]]


def broken(task):
    return [["BREAK"]]


def look_then_answer(task):
    return [[Call("look", {})], [Call("answer", {"value": task["answer"]})]]


def config(tmp_path, algorithm="grpo", *, G=4, budgets=None, rl=None, env="agent_toys:Toy", **env_opts):
    return load_config(
        {
            "algorithm": algorithm,
            "out": str(tmp_path / "run"),
            "model": {"path": "unused"},
            "env": {"name": env, "budgets": budgets or {}, **env_opts},
            "rollout": {"prompts_per_step": 1, "group_size": G},
            "rl": rl or {},
        }
    )


def source(cfg, policy, tmp_path=None, tokenizer=TOK, tasks=None):
    b = cfg.env.budgets
    budget = b.get("max_turns", 8) * b.get("max_new_tokens", 128)
    return EnvSource(
        cfg,
        tasks=tasks or Toy.tasks(4),
        tokenizer=tokenizer,
        engine=policy,
        reward=env_reward_fns(cfg, budget),
        algo=algorithms.get(cfg.algorithm),
        accelerator=ACC,
        samples_path=None if tmp_path is None else tmp_path / "samples.jsonl",
    )


def rollout(src):
    generated = src.generate_scored(src.engine)
    src.annotate(None, generated.buffer)
    src.add_advantages(generated.buffer)
    return generated


@pytest.mark.parametrize(
    "algorithm, expected",
    [
        # valid rewards [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3); the infra episode is in neither
        ("grpo", [(2 / 3) / (3**-0.5 + 1e-4), (-1 / 3) / (3**-0.5 + 1e-4), (-1 / 3) / (3**-0.5 + 1e-4), 0.0]),
        # leave-one-out over the valid others: 1 - 0, 0 - 1/2, 0 - 1/2
        ("rloo", [1.0, -0.5, -0.5, 0.0]),
    ],
)
def test_a_masked_infra_episode_is_out_of_the_loss_and_the_group_baseline(tmp_path, algorithm, expected):
    src = source(config(tmp_path, algorithm), scripted(right, wrong, wrong, broken))
    buffer = rollout(src).buffer
    episodes = src.last_episodes
    assert [e.failure for e in episodes] == [None, "answer.wrong", "answer.wrong", "infra.sandbox"]
    assert buffer.valid.tolist() == [True, True, True, False]
    assert buffer.rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert buffer.sequence["advantages"].tolist() == pytest.approx(expected, abs=1e-5)
    targets = buffer.layout(0)["targets"]
    assert (targets[3] == IGNORE_INDEX).all()  # no loss token in the masked episode
    assert (targets[0] != IGNORE_INDEX).sum() == episodes[0].policy_tokens


def test_the_loss_mask_covers_exactly_the_sampled_tokens_and_lengths_count_them_only(tmp_path):
    src = source(config(tmp_path, G=2), scripted(look_then_answer))
    buffer = rollout(src).buffer
    layout = buffer.layout(0)
    for i, e in enumerate(src.last_episodes):
        assert e.stop == "env_done" and e.failure is None and len(e.ids) > e.policy_tokens + 100
        row = layout["targets"][i, : len(e.ids)].tolist()
        assert row == [t if m else IGNORE_INDEX for t, m in zip(e.ids, e.mask)]
        assert (
            layout["input_ids"][i, -buffer.width :][: len(e.ids)].tolist() == e.ids
        )  # inputs keep everything
    assert buffer.completion_lengths() == [e.policy_tokens for e in src.last_episodes]
    metrics = src._metrics(buffer)
    assert metrics["completion_length/mean"] == src.last_episodes[0].policy_tokens
    assert buffer.select([1]).completion_lengths() == [src.last_episodes[1].policy_tokens]


def test_reward_fns_read_the_assistant_text_only_and_the_grade_is_the_env_component(tmp_path):
    cfg = config(tmp_path, G=2, rl={"rewards": ["agent_toys:says_x"]})
    src = source(cfg, scripted(look_then_answer))
    generated = rollout(src)
    # the tool output is 200 x's; the assistant never wrote them
    assert "xxxx" in src.last_episodes[0].turns[2].messages[0]["content"]
    assert generated.buffer.components == {"env": [1.0, 1.0], "agent_toys:says_x": [0.0, 0.0]}
    assert generated.buffer.rewards.tolist() == [1.0, 1.0]


def test_dapo_overlong_penalty_counts_policy_tokens_only(tmp_path):
    # budget 2 turns x 32 tokens = 64 policy tokens, penalty ramping in over the last 12; the episodes have
    # ~45 policy tokens and over 200 environment tokens: counted with those they would get the full -1
    budgets = {"max_turns": 2, "max_new_tokens": 32}
    cfg = config(tmp_path, "dapo", G=2, budgets=budgets, rl={"overlong_cache": 12})
    src = source(cfg, scripted(look_then_answer))
    generated = rollout(src)
    assert all(32 < e.policy_tokens <= 52 < len(e.ids) - 64 for e in src.last_episodes)
    assert generated.buffer.components["overlong_penalty"] == [0.0, 0.0]


def test_dr_grpo_normaliser_is_the_policy_token_budget_and_trajectories_are_written(tmp_path):
    budgets = {"max_turns": 3, "max_new_tokens": 40}
    cfg = config(tmp_path, "dr_grpo", budgets=budgets)
    src = source(cfg, scripted(look_then_answer, wrong, right, wrong), tmp_path)
    model = build_model(TOK, num_hidden_layers=1, seed=0)
    step = src.next_step(type("S", (), {"step": 0})(), model)
    buffer = src._last_buffer
    adv = buffer.sequence["advantages"]
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5])  # Dr. GRPO: r - mean, no std
    batch = {k: v for k, v in step.micro[0].items()}
    batch["old_logps"] = src.forward_logps(model, buffer.select(_order(buffer, batch)))["logps"]
    loss, _ = src.algo.Objective(cfg).loss(model, batch)
    # ratio 1 everywhere: each policy token's loss is -A; summed, over the constant 3 x 40 = 120
    n = {e.task_id + str(e.index): e.policy_tokens for e in src.last_episodes}
    expected = -sum(a * p for a, p in zip(adv.tolist(), n.values())) / 120
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    lines = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {
        "step",
        "reward",
        "advantage",
        "turns",
        "grade",
        "stop",
        "failure",
        "ids",
        "mask",
    } <= set(lines[0])
    turn = lines[0]["turns"][1]
    assert turn["sampled"] and turn["policy_version"] == 0 and turn["calls"][0]["status"] == "ok"
    assert (
        lines[0]["turns"][2]["results"][0]["seconds"] >= 0
        and "truncated" in lines[0]["turns"][2]["results"][0]
    )
    assert [e.reward for e in read_jsonl(tmp_path / "trajectories.jsonl")] == [1.0, 0.0, 1.0, 0.0]


def _order(buffer, batch):
    """The buffer rows of a micro-batch (matched by their ids)."""
    rows = [buffer.layout(0)["input_ids"][i] for i in range(len(buffer))]
    out = []
    for ids in batch["input_ids"]:
        out.append(
            next(
                i for i, r in enumerate(rows) if torch.equal(r[-len(ids) :], ids[-len(r) :]) and i not in out
            )
        )
    return out


def test_gradients_at_environment_tokens_are_zero_through_the_objective(tmp_path):
    # one full forward per sample (no shared prompt cache). The last hidden state at a position feeds only the
    # head's logits there (the head may compute them in vocabulary chunks, never as a module call), so its
    # gradient at the positions predicting environment tokens must be exactly zero.
    src = source(
        config(tmp_path, "grpo", G=2, rl={"share_prompts": False}), scripted(look_then_answer, wrong)
    )
    model = build_model(TOK, num_hidden_layers=1, seed=0)
    buffer = rollout(src).buffer
    buffer.token["old_logps"] = src.forward_logps(model, buffer)["logps"]  # ratio 1: nothing clipped
    batch = buffer.batch([0, 1], 0)
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["hidden"] = out

    hook = model.model.norm.register_forward_hook(keep)
    try:
        loss, _ = src.algo.Objective(src.cfg).loss(model, {**batch, **src.step_scalars()})
        loss.backward()
    finally:
        hook.remove()
    grad = seen["hidden"].grad  # [rows, positions, hidden]
    C = batch["targets"].shape[1]
    P = batch["input_ids"].shape[1] - C
    per_target = grad[:, P - 1 : P - 1 + C].abs().sum(-1)  # the positions predicting each completion token
    env = batch["targets"] == IGNORE_INDEX
    assert (per_target[env] == 0).all() and (per_target[~env] > 0).all()


# --------------------------------------------------------------------------- config and bad input


@pytest.mark.parametrize(
    "env, want",
    [
        ({"name": "calculatr"}, "unknown environment 'calculatr'"),
        ({"name": "calculator", "format": "json"}, "unknown tool format: 'json'"),
        ({"name": "calculator", "budgets": {"max_turn": 3}}, "Did you mean max_turns?"),
        ({"name": "calculator", "budgets": {"truncate": "middle"}}, "'tail' or 'head'"),
    ],
)
def test_env_section_errors_are_config_errors_at_load(tmp_path, env, want):
    from posttrain.stage import load_stage

    with pytest.raises(ConfigError, match="env") as e:
        load_stage({"algorithm": "grpo", "out": str(tmp_path), "model": {"path": "m"}, "env": env})
    assert want in str(e.value)


def test_env_section_belongs_to_online_algorithms_and_fills_data_and_rewards(tmp_path):
    with pytest.raises(ConfigError, match="section 'env' is for algorithm"):
        load_config(
            {
                "algorithm": "sft",
                "out": "o",
                "model": {"path": "m"},
                "data": {"train": "x"},
                "env": {"name": "guess"},
            }
        )
    cfg = load_config({"algorithm": "ppo", "out": "o", "model": {"path": "m"}, "env": {"name": "guess"}})
    assert cfg.data.train == [] and cfg.rl.rewards == [] and cfg.env.format == "tiny"


def test_wrong_env_options_are_a_config_error_at_start(tmp_path):
    with pytest.raises(ConfigError, match="env.options .* do not fit environment 'agent_toys:Toy'"):
        source(config(tmp_path, options={"longtext": 3}), scripted(right))


def test_a_task_row_missing_a_field_names_file_line_and_field(tmp_path):
    from posttrain.agents.config import task_rows

    path = tmp_path / "tasks.jsonl"
    path.write_text('{"id": "a", "answer": "1"}\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"tasks.jsonl:2: field 'answer' missing"):
        task_rows(config(tmp_path).env, [str(path)], split="train")


def test_an_environment_that_raises_or_hangs_is_a_label_not_a_crash(tmp_path):
    cfg = config(tmp_path, G=3, budgets={"tool_timeout_s": 0.3})
    hang = lambda task: [["HANG"]]  # noqa: E731
    src = source(cfg, scripted(broken, hang, right))
    buffer = rollout(src).buffer
    assert [e.failure for e in src.last_episodes] == ["infra.sandbox", "budget.time", None]
    assert buffer.valid.tolist() == [False, True, True]  # the hang is the policy's budget: kept, reward 0


def test_a_template_that_cannot_render_a_tool_turn_is_a_config_error(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ConfigError, match="cannot render a 'tool' message"):
        source(config(tmp_path), scripted(right), tokenizer=tok)


def test_the_monitor_alerts_on_any_hack_attempt_and_on_infra_above_a_share():
    monitor = HealthMonitor(default_rules("online"), echo=None)
    ok = {"agent/hack_frac": 0.0, "agent/infra_frac": 0.05, "agent/drift_frac": 0.0}
    assert monitor.observe(1, ok) == []
    alerts = monitor.observe(2, {**ok, "agent/hack_frac": 1 / 64, "agent/infra_frac": 0.1})
    assert sorted(a.rule for a in alerts) == ["agent_hack", "agent_infra"]
    assert [a.rule for a in monitor.observe(3, {**ok, "agent/drift_frac": 0.01})] == ["agent_drift"]


def test_golden_demo_rows_train_exactly_the_policy_mask():
    episodes = demo_episodes("calculator", TOK, n=4)
    rows = demo_rows("calculator", TOK, n=4)
    assert len(rows) == 4
    for ep, row in zip(episodes, rows):
        ex = encode_sft_row(row, TOK, max_length=1024)
        ids = ep.prompt_ids + ep.ids
        mask = [False] * len(ep.prompt_ids) + ep.mask
        assert ex.input_ids == ids
        assert ex.targets == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX]


@pytest.mark.slow  # ~15 s alone, more on a busy machine
def test_the_example_config_trains_writes_trajectories_and_the_report_shows_agent_metrics(tmp_path):
    from posttrain.engine.run import read_metrics
    from posttrain.report import write_report
    from posttrain.tasks.tiny import build_tiny
    from posttrain.train import train

    model = build_tiny(tmp_path / "tiny", seed=0)
    cfg = load_config(
        "examples/agent_calculator.yaml",
        [
            f"model.path={model}",
            f"out={tmp_path / 'run'}",
            "env.tasks=8",
            "env.eval_tasks=2",
            "env.budgets.max_new_tokens=12",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "train.max_steps=1",
            "train.eval_every=1",
            "train.progress=false",
            "train.tensorboard=false",
        ],
    )
    res = train(cfg)
    m = {k: v for line in read_metrics(res.run_dir) for k, v in line.items()}
    for name in (
        "agent/turns",
        "agent/env_token_frac",
        "agent/hack_frac",
        "agent/infra_frac",
        "agent/success",
    ):
        assert name in m
    assert any(k.startswith("agent/stop/") for k in m) and "eval/pass@1" in res.eval_metrics
    lines = (res.run_dir / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x)["step"] == 1 for x in lines)
    page = write_report(res.run_dir).read_text()
    assert "Agent episodes at step 1" in page and 'class="sampled"' in page and "stop reason" in page


def test_ppo_on_episodes_puts_advantages_on_policy_tokens_only(tmp_path):
    from posttrain.algorithms.ppo import PolicyWithValue

    torch.manual_seed(0)
    src = source(config(tmp_path, "ppo", G=2), scripted(look_then_answer, wrong))
    model = PolicyWithValue(build_model(TOK, num_hidden_layers=1, seed=0))
    torch.nn.init.normal_(model.value_head.weight, std=0.1)  # values that differ per token
    buffer = src.generate_scored(src.engine).buffer
    src.annotate(model, buffer)
    src.add_advantages(buffer)
    adv, returns, mask = buffer.token["advantages"], buffer.token["returns"], buffer.completion_mask()
    assert (adv[~mask] == 0).all() and (returns[~mask] == 0).all()
    assert (adv[mask] != 0).all()
    # GAE bridges over the tool result: the last policy token before it bootstraps from the first after it
    e = src.last_episodes[0]
    assert not all(e.mask) and mask[0].sum() == e.policy_tokens


def test_agent_metrics_are_over_every_processs_episodes(monkeypatch):
    import accelerate.utils

    from posttrain.agents.envs.calculator import CalculatorEnv
    from posttrain.agents.source import agent_metrics

    def wrong(task):
        yield [Call("answer", {"value": "0"})]

    here = demo_episodes("calculator", TOK, n=3, seed=0)  # this process: 3 golden episodes, all pass
    there = demo_episodes(CalculatorEnv, TOK, n=1, seed=1, script=wrong)  # the other: 1 wrong answer
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda local: [*local, *there])
    two = type("A", (), {"num_processes": 2, "process_index": 0})()
    one = type("A", (), {"num_processes": 1, "process_index": 0})()
    assert agent_metrics(here, one)["agent/success"] == 1.0  # what one process alone would log
    m = agent_metrics(here, two)
    assert m["agent/success"] == 3 / 4 and m["agent/failure/answer.wrong"] == 1 / 4
    assert m["agent/tool_calls/calc"] == 3 / 4 and m["agent/turns"] == (3 * 2 + 1) / 4
