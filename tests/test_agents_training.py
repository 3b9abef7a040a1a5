"""What training takes from an episode: the loss mask is exactly the sampled positions (through the real
HF engine and a tiny model), gradients at environment tokens are zero, and tool-result tokens cannot move
the policy loss; the same checks fail with the mask off."""

from __future__ import annotations

import pytest
import torch
from agent_toys import Echo

from posttrain.agents.envs.guess import GuessEnv
from posttrain.agents.policies import ScriptedPolicy
from posttrain.agents.runner import Budgets, EpisodeRunner
from posttrain.agents.trajectory import completion, training_arrays
from posttrain.logprobs import token_logprobs
from posttrain.rollout.engine import HFEngine, Sampling
from posttrain.tasks.tiny import build_model, build_tokenizer

TOK = build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return build_model(TOK, num_hidden_layers=2, seed=0).eval()


def test_hf_engine_episodes_mask_exactly_the_sampled_tokens_and_keep_their_logprobs(model):
    # A random tiny model rarely ends a turn by itself; raising its end-of-turn logit makes turns a few
    # tokens long, so that episodes have several turns joined by bridges.
    bias = torch.zeros(model.config.vocab_size)
    bias[TOK.eos_token_id] = 3.5
    hook = model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    try:
        runner = EpisodeRunner(
            TOK, budgets=Budgets(max_new_tokens=16), sampling=Sampling(temperature=1.0, seed=0)
        )
        eps = runner.run(HFEngine(model, TOK), Echo, [{"id": str(i)} for i in range(6)])
        multi = 0
        for ep in eps:
            assert ep.failure in (None, "budget.tokens", "format.forged_observation"), (ep.failure, ep.error)
            assert ep.verification["text_equal"]
            turns = [t for t in ep.turns if t.sampled]
            multi += len(turns) > 1
            full = ep.prompt_ids + ep.ids
            sampled_at = {i for t in turns for i in range(t.start, t.end)}
            assert ep.mask == [i + len(ep.prompt_ids) in sampled_at for i in range(len(ep.ids))]
            # The engine's log-probs are the model's own on the stitched ids: the context it sampled
            # from is exactly the context training sees.
            ids = torch.tensor([full])
            with torch.no_grad():
                logps = token_logprobs(model(ids).logits[:, :-1].float(), ids[:, 1:])[0]
            P = len(ep.prompt_ids)
            at = [i for i, m in enumerate(ep.mask) if m]
            assert torch.allclose(
                logps[[P + i - 1 for i in at]], torch.tensor([ep.logprobs[i] for i in at]), atol=1e-4
            )
            assert all(ep.logprobs[i] == 0.0 for i, m in enumerate(ep.mask) if not m)
            c, mask = completion(ep)
            assert c.token_ids == ep.ids and mask == ep.mask and c.text == ep.assistant_text()
        assert multi >= 3  # bridges were exercised
    finally:
        hook.remove()


def guess_episode():
    """Two guesses of a binary search (8, 4) for 1, cut by max_turns: it ends with a tool result."""
    runner = EpisodeRunner(TOK, budgets=Budgets(max_turns=2))
    (ep,) = runner.run(
        ScriptedPolicy(TOK, "tiny", GuessEnv.golden), GuessEnv, [{"id": "g", "n": 15, "target": 1}]
    )
    assert ep.stop == "max_turns" and ep.turns[-1].role == "observation"
    return ep


def policy_loss(model, ids_L, mask_L):
    """-sum of log-probs of the masked tokens; returns (loss, logits) with logits' grad retained."""
    logits = model(ids_L[None]).logits
    if logits.requires_grad:
        logits.retain_grad()
    logps = token_logprobs(logits[:, :-1], ids_L[None, 1:])
    return -(logps * mask_L[None, 1:]).sum(), logits


@pytest.mark.parametrize("mask_on", [True, False])
def test_gradients_at_environment_tokens_are_zero_only_with_the_mask(model, mask_on):
    ep = guess_episode()
    ids, mask, _ = training_arrays(ep)
    P = len(ep.prompt_ids)
    used = mask if mask_on else torch.arange(len(ids)) >= P  # mask off: every token after the prompt
    model.zero_grad()
    loss, logits = policy_loss(model, ids, used)
    loss.backward()
    grad_L = logits.grad[0, :-1].abs().sum(-1)  # row t predicts token t + 1
    env = [t for t in range(P, len(ids) - 1) if not mask[t + 1]]
    sampled = [t for t in range(len(ids) - 1) if mask[t + 1]]
    assert env and sampled and bool((grad_L[sampled] > 0).all())
    assert bool((grad_L[env] == 0).all()) == mask_on


@pytest.mark.parametrize("mask_on", [True, False])
def test_changing_tool_result_tokens_leaves_the_policy_loss_unchanged_only_with_the_mask(model, mask_on):
    ep = guess_episode()
    ids, mask, _ = training_arrays(ep)
    used = mask if mask_on else torch.arange(len(ids)) >= len(ep.prompt_ids)
    last = ep.turns[-1]  # the final tool result: nothing the policy sampled comes after it
    other = ids.clone()
    other[last.start : last.end] = torch.tensor(TOK("higher!" * 9, add_special_tokens=False)["input_ids"])[
        : last.end - last.start
    ]
    assert not torch.equal(other, ids)
    with torch.no_grad():
        a, _ = policy_loss(model, ids, used)
        b, _ = policy_loss(model, other, used)
    assert (a.item() == pytest.approx(b.item(), abs=1e-5)) == mask_on
