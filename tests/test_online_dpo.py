"""Online DPO (algorithms/online_dpo.py): the pairs by hand, the loss against the DPO formula computed by hand on
a real model's log-probs, ties, pairs kept whole through minibatches and micro-batches, and short runs."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import algorithms
from posttrain.algorithms.online_dpo import Objective, preference_signs
from posttrain.config import load_config
from posttrain.engine.run import read_metrics
from posttrain.errors import ConfigError
from posttrain.rollout.buffer import RolloutBuffer
from posttrain.rollout.engine import Completion
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train

REWARD_MODULE = '''
def digit_share(prompts, completions, **_):
    """Share of digits among the completion's characters: dense, and learnable from scratch."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) if c else 0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_dpo")
    build_tiny(root / "tiny", size="tiny")
    files = arithmetic.write_task_files(
        root / "data", n_sft=10, n_prompts=2000, n_pretrain_docs=10, levels=("add1", "add2")
    )
    (root / "rewards_for_online_dpo.py").write_text(REWARD_MODULE)
    return root, files


@pytest.fixture(autouse=True)
def _reward_module_importable(task, monkeypatch):
    monkeypatch.syspath_prepend(str(task[0]))


def config(task, out, *, rollout=None, rl=None, dpo=None, **train_opts):
    root, files = task
    return {
        "algorithm": "online_dpo",
        "out": str(out),
        "model": {"path": str(root / "tiny")},
        "data": {"train": str(files["prompts_train"]), "max_length": 64},
        "rollout": {"prompts_per_step": 16, "max_new_tokens": 4, **(rollout or {})},
        "rl": {"rewards": ["rewards_for_online_dpo:digit_share"], **(rl or {})},
        "dpo": {"beta": 0.1, **(dpo or {})},
        "train": {"lr": 3e-3, "max_steps": 12, "progress": False, "tensorboard": False, **train_opts},
    }


# --------------------------------------------------------------------------- pairs


def test_preference_signs_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.7, 1.0, 0.0])
    assert preference_signs(rewards).tolist() == [1, -1, 0, 0, -1, 1, 1, -1]
    valid = torch.tensor([True, True, True, True, True, True, True, False])  # last pair: a sample left out
    assert preference_signs(rewards, valid).tolist() == [1, -1, 0, 0, -1, 1, 0, 0]
    with pytest.raises(ValueError, match="in pairs"):
        preference_signs(torch.zeros(3))


def test_the_run_type_presets_pairs_and_refuses_what_does_not_apply(task, tmp_path):
    cfg = load_config(config(task, tmp_path / "c"))
    assert cfg.rollout.group_size == 2 and cfg.dpo.kind == "sigmoid" and cfg.train.betas == (0.9, 0.99)
    for bad, says in [
        ({"rollout": {"group_size": 4}}, "group_size must be 2"),
        ({"train": {"micro_batch_size": 3}}, "must be even"),
        ({"rl": {"kl_coef": 0.1}}, "dpo.beta is the KL strength"),
        ({"dpo": {"kind": "simpo", "label_smoothing": 0.1, "tau": 1.0}}, "does not take tau"),
    ]:
        raw = config(task, tmp_path / "c")
        for section, values in bad.items():
            raw[section] = {**raw.get(section, {}), **values}
        with pytest.raises(ConfigError, match=says):
            load_config(raw)
    algo = algorithms.get("online_dpo")
    assert algo.whole_groups and algo.reference(cfg).path == cfg.model.path
    simpo = load_config(config(task, tmp_path / "c", dpo={"kind": "simpo", "beta": 2.0}))
    assert algo.reference(simpo) is None  # a reference-free kind loads no reference


# --------------------------------------------------------------------------- the loss by hand


def _batch(model_dir, prompts, completions, advantages, ref_logps):
    """A micro-batch in the rollout layout of `prompts[i] + completions[i]` (token id lists)."""
    buffer = RolloutBuffer(
        prompt_ids=prompts,
        completions=[
            Completion(token_ids=c, logprobs=[0.0] * len(c), text="", finish_reason="stop")
            for c in completions
        ],
        rows=[{}] * len(prompts),
        group_size=2,
    )
    batch = buffer.layout(pad_id=0)
    C = batch["targets"].shape[1]
    batch["ref_logps"] = torch.tensor([r + [0.0] * (C - len(r)) for r in ref_logps])
    batch["advantages"] = torch.tensor(advantages, dtype=torch.float32)
    batch["pair_index"] = torch.arange(len(prompts)) // 2
    batch["loss_mask"] = torch.ones(len(prompts))
    return batch


def _seq_logp(model, prompt, completion) -> float:
    """log pi(completion | prompt), summed, from one plain forward and log_softmax (not posttrain's code)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion))


@pytest.fixture(scope="module")
def tiny_model(task):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(task[0] / "tiny").eval()


def _objective(task, tmp_path, **dpo):
    return Objective(load_config(config(task, tmp_path / "o", dpo={"beta": 0.5, **dpo})))


def test_the_loss_of_a_hand_made_pair_is_the_dpo_formula(task, tmp_path, tiny_model):
    prompt, a, b = [5, 6, 7], [8, 9], [10, 11, 12]
    ref = [[-1.0, -2.0], [-0.5, -1.5, -1.0]]
    # the second sample scored higher: it is the chosen one
    batch = _batch(task[0], [prompt, prompt], [a, b], [-1.0, 1.0], ref)
    loss, metrics = _objective(task, tmp_path).loss(tiny_model, batch)
    logp_a, logp_b = _seq_logp(tiny_model, prompt, a), _seq_logp(tiny_model, prompt, b)
    margin = (logp_b - (-3.0)) - (logp_a - (-3.0))  # (chosen - its ref) - (rejected - its ref)
    expected = -math.log(1.0 / (1.0 + math.exp(-0.5 * margin)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["rewards/margin"].item() == pytest.approx(0.5 * margin, rel=1e-5)
    assert metrics["logps/chosen"].item() == pytest.approx(logp_b, rel=1e-5)
    assert metrics["online_dpo/tie_share"].item() == 0.0
    # IPO on the same pair: (margin - 1 / (2 beta))^2
    ipo, _ = _objective(task, tmp_path, kind="ipo").loss(tiny_model, batch)
    assert ipo.item() == pytest.approx((margin - 1.0) ** 2, rel=1e-5)


def test_a_tie_is_dropped_and_counted(task, tmp_path, tiny_model):
    prompt, a, b, c, d = [5, 6, 7], [8, 9], [10, 11, 12], [13], [14, 15]
    ref = [[-1.0, -2.0], [-0.5, -1.5, -1.0], [-1.0], [-1.0, -1.0]]
    objective = _objective(task, tmp_path)
    both = _batch(task[0], [prompt] * 4, [a, b, c, d], [1.0, -1.0, 0.0, 0.0], ref)  # pair 2 tied
    alone = _batch(task[0], [prompt] * 2, [a, b], [1.0, -1.0], ref[:2])
    loss, metrics = objective.loss(tiny_model, both)
    assert loss.item() == pytest.approx(objective.loss(tiny_model, alone)[0].item(), rel=1e-6)
    assert objective.weight(both) == 2 and metrics["online_dpo/tie_share"].item() == 1.0
    # a micro-batch of only ties: a zero loss that still backpropagates (a zero gradient), not an error
    ties = _batch(task[0], [prompt] * 2, [c, d], [0.0, 0.0], ref[2:])
    zero, _ = objective.loss(tiny_model, ties)
    assert zero.item() == 0.0 and zero.requires_grad


def test_a_split_pair_is_an_error(task, tmp_path, tiny_model):
    prompt = [5, 6, 7]
    batch = _batch(task[0], [prompt] * 2, [[8], [9]], [1.0, -1.0], [[-1.0], [-1.0]])
    batch["pair_index"] = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="split a pair"):
        _objective(task, tmp_path).loss(tiny_model, batch)


# --------------------------------------------------------------------------- pairs through the source


def _steps(task, tmp_path, algorithm, **rl):
    """The source's optimiser steps over a buffer of 8 prompts of different lengths x 2 samples."""
    from posttrain.rollout.source import RolloutSource

    raw = config(task, tmp_path / "s", rl=rl, micro_batch_size=2)
    if algorithm != "online_dpo":
        raw = {k: v for k, v in raw.items() if k != "dpo"} | {"algorithm": algorithm}
        raw["rollout"] = {**raw["rollout"], "group_size": 2}
    cfg = load_config(raw)
    source = RolloutSource.__new__(RolloutSource)  # only what _steps reads
    source.cfg, source.rl, source.algo = cfg, cfg.rl, algorithms.get(algorithm)
    source.rollouts, source.pad_id = 0, 0
    prompts = [[1] * (1 + (7 * u) % 5) for u in range(8) for _ in range(2)]
    buffer = RolloutBuffer(
        prompt_ids=prompts,
        completions=[
            Completion(token_ids=[2, 3], logprobs=[0.0, 0.0], text="", finish_reason="stop") for _ in prompts
        ],
        rows=[{}] * 16,
        group_size=2,
    )
    buffer.sequence["sample"] = torch.arange(16)
    return source._steps(buffer, {})


def test_pairs_stay_whole_and_in_order_through_minibatches_and_micro_batches(task, tmp_path):
    steps = _steps(task, tmp_path, "online_dpo", epochs=2, minibatches=2)
    assert len(steps) == 4
    for step in steps:
        seen = torch.cat([b["sample"] for b in step.micro])
        assert len(seen) == 8 and all(len(b["sample"]) == 2 for b in step.micro)
        for b in step.micro:  # each micro-batch is one pair: samples 2k, 2k + 1
            first, second = b["sample"].tolist()
            assert first % 2 == 0 and second == first + 1
    per_epoch = [torch.cat([b["sample"] for s in steps[e * 2 : e * 2 + 2] for b in s.micro]) for e in (0, 1)]
    assert all(sorted(e.tolist()) == list(range(16)) for e in per_epoch)  # every sample once an epoch
    assert per_epoch[0].tolist() != per_epoch[1].tolist()  # and shuffled, by pairs
    # the GRPO family shuffles samples singly: the same settings split pairs (what the option prevents)
    grpo = _steps(task, tmp_path, "grpo", epochs=2, minibatches=2)
    split = [b["sample"].tolist() for s in grpo for b in s.micro]
    assert any(not (x % 2 == 0 and y == x + 1) for x, y in split)


# --------------------------------------------------------------------------- runs


def test_online_dpo_raises_a_dense_reward_on_the_arithmetic_prompts(task, tmp_path):
    # micro-batches of 2 pairs and 2 minibatches x 2 epochs per rollout: the loss checks every pair is whole
    res = train(
        config(task, tmp_path / "run", micro_batch_size=4, max_steps=16, rl={"minibatches": 2, "epochs": 2})
    )
    metrics = read_metrics(res.run_dir)
    r = [m["reward/mean"] for m in metrics[::4]]  # a rollout serves 4 steps, each logs its reward
    assert len(r) == 4 and r[-1] > r[0] + 0.15, r
    last = metrics[-1]
    for key in ("rewards/margin", "rewards/accuracy", "online_dpo/tie_share", "kl", "groups/zero_std_share"):
        assert key in last, key
    assert last["rewards/margin"] > 0


def test_a_reference_free_kind_trains_without_a_reference(task, tmp_path):
    res = train(config(task, tmp_path / "simpo", max_steps=2, dpo={"kind": "simpo", "beta": 2.0}))
    assert res.step == 2 and "kl" not in read_metrics(res.run_dir)[-1]
