"""Adding an algorithm by the steps of posttrain/algorithms/__init__.py's docstring alone: this module is a toy
online algorithm (REINFORCE with the batch-mean baseline), registered and trained for real.

    1. a module with forward, advantages (pure) and Objective       -> this file
    2. its name in algorithms.ONLINE                                -> monkeypatch below
    3. a run type for its config sections                           -> ToyRun
"""

from __future__ import annotations

import sys
from typing import Literal

import pytest
import torch

from posttrain import algorithms, config
from posttrain.config import RLOptions, RolloutRun
from posttrain.data.templates import IGNORE_INDEX
from posttrain.logprobs import token_logprobs
from posttrain.rollout.buffer import Rollout, tempered_forward

# --------------------------------------------------------------------------- 1. the algorithm module

forward = tempered_forward  # a plain language model


def advantages(rollout: Rollout, cfg, kl_coef: float) -> dict[str, torch.Tensor]:
    """REINFORCE with the batch-mean baseline: A_i = r_i - mean(r)."""
    return {"advantages": rollout.rewards - rollout.rewards.mean()}


class Objective:
    """-A_i log pi(y_it | ...), summed over every completion token; weight = the tokens."""

    def __init__(self, cfg):
        self.temperature = cfg.rollout.temperature

    def mask(self, batch):
        return batch["targets"] != IGNORE_INDEX

    def weight(self, batch) -> float:
        return float(self.mask(batch).sum())

    def loss(self, model, batch):
        logits, _ = forward(model, batch, self.temperature)
        logps = token_logprobs(logits, batch["targets"])
        mask = self.mask(batch)
        loss = -(batch["advantages"][:, None] * logps * mask).sum()
        return loss, {"toy/advantage_abs": (batch["advantages"].abs()[:, None] * mask).sum()}


def digit_share(prompts, completions, **_):
    """A dense reward an untrained model already varies on: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# --------------------------------------------------------------------------- 3. its run type


class ToyRun(RolloutRun):  # an online stage: rollout, env and sandbox sections, plus its own `rl`
    algorithm: Literal["toy"]
    rl: RLOptions = RLOptions()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from posttrain.tasks import arithmetic
    from posttrain.tasks.tiny import build_tiny

    root = tmp_path_factory.mktemp("toy")
    build_tiny(root / "tiny", size="tiny")
    files = arithmetic.write_task_files(
        root / "data", n_sft=4, n_prompts=64, n_pretrain_docs=4, levels=("add1",)
    )
    return root / "tiny", files["prompts_train"]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(algorithms.ONLINE, "toy", __name__)  # 2. the name
    monkeypatch.setitem(config.RUN_TYPES, "toy", ToyRun)
    monkeypatch.setitem(config.OWN_SECTIONS, "toy", ("rollout", "env", "sandbox", "rl"))
    return sys.modules[__name__]


def test_the_record_fills_the_optional_hooks(toy):
    algo = algorithms.get("toy")
    assert (algo.forward, algo.advantages, algo.Objective) == (forward, advantages, Objective)
    assert algo.values is False and algo.kind == "prompt" and algo.policy("m") == "m"
    module = type(sys)("broken_module")
    module.forward, module.Objective = forward, Objective
    with pytest.raises(Exception, match="lacks advantages"):
        algorithms.from_module("broken", module, online=True)


def test_the_toy_advantages_by_hand():
    r = Rollout(
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2, mask=torch.ones(4, 3, dtype=torch.bool),
        old_logps=torch.zeros(4, 3), ref_logps=None, old_values=None, valid=None,
    )  # fmt: skip
    assert advantages(r, None, 0.0)["advantages"].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_a_toy_algorithm_trains_through_the_one_loop(toy, task, tmp_path):
    from posttrain.train import train

    tiny_model, arithmetic_prompts = task
    before = {k: v.clone() for k, v in _weights(tiny_model).items()}
    result = train(
        {
            "algorithm": "toy",
            "out": str(tmp_path / "toy"),
            "model": {"path": str(tiny_model)},
            "data": {"train": str(arithmetic_prompts), "max_length": 64},
            "train": {"max_steps": 3, "lr": 1e-3},
            "rollout": {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 6, "temperature": 1.0},
            "rl": {"rewards": [f"{__name__}:digit_share"]},
        }
    )
    assert result.step == 3 and result.final is not None
    assert result.metrics["toy/advantage_abs"] > 0  # the rewards varied: the loss had a gradient
    after = _weights(result.final)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the toy's loss moved no weight"


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))
