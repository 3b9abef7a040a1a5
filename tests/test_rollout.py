"""The HF generation engine and the rollout buffer's training layout."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from posttrain.data.templates import encode_prompts
from posttrain.eval.generation import generate_greedy
from posttrain.rollout.buffer import RolloutBuffer, completion_forward
from posttrain.rollout.engine import Completion, HFEngine, Sampling, _filter_top_k_top_p
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp("rollout") / "tiny", size="tiny")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tok = tiny
    rows = arithmetic.eval_rows(("add1", "add2", "word2"), n_per_level=4)  # different prompt lengths
    return rows, encode_prompts(tok, [r["prompt"] for r in rows])[1]


def test_greedy_matches_transformers_generate(tiny, prompts):
    model, tok = tiny
    rows, ids = prompts
    ours = [
        g[0].text for g in HFEngine(model, tok).generate(ids, 1, Sampling(max_new_tokens=6, temperature=0))
    ]
    theirs = []
    config = GenerationConfig(
        max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0
    )
    for p in ids:  # one prompt at a time: no padding question on transformers' side
        out = model.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p)), generation_config=config
        )
        new = out[0, len(p) :].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        theirs.append(tok.decode(new, skip_special_tokens=False))
    assert ours == theirs
    # and the evaluators' greedy helper is that engine call
    assert generate_greedy(model, tok, [r["prompt"] for r in rows], max_new_tokens=6) == ours


def test_sampling_logprobs_are_the_policy_logprobs_of_the_full_sequence(tiny, prompts):
    # The engine's per-token log-probs (KV cache, left padding) must equal a plain forward over
    # prompt + completion: the trainer uses them as the PPO ratio's old log-probs.
    model, tok = tiny
    _, ids = prompts
    torch.manual_seed(0)
    groups = HFEngine(model, tok).generate(ids, 3, Sampling(max_new_tokens=5, temperature=0.7))
    assert [len(g) for g in groups] == [3] * len(ids)
    for prompt, group in zip(ids, groups):
        for c in group:
            full = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = model(full).logits[0, len(prompt) - 1 : -1].float() / 0.7
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)
            assert len(c.token_ids) <= 5


def test_finish_reasons_and_eos_handling(tiny, prompts):
    model, tok = tiny
    _, ids = prompts
    torch.manual_seed(1)
    for g in HFEngine(model, tok).generate(ids, 4, Sampling(max_new_tokens=3)):
        for c in g:
            ends_with_eos = bool(c.token_ids) and c.token_ids[-1] == tok.eos_token_id
            assert c.finish_reason == ("stop" if ends_with_eos else "length")
            assert (len(c.token_ids) == 3) or ends_with_eos
            assert tok.eos_token not in c.text  # eos is cut from the text, kept in the tokens


def test_stop_strings_end_the_completion(tiny, prompts):
    model, tok = tiny
    _, ids = prompts
    torch.manual_seed(2)
    free = HFEngine(model, tok).generate(ids, 2, Sampling(max_new_tokens=8))
    # pick a character that the free run produced somewhere: a stop string that actually triggers
    char = next(c.text[1] for g in free for c in g if len(c.text) > 2)
    torch.manual_seed(2)
    stopped = HFEngine(model, tok).generate(ids, 2, Sampling(max_new_tokens=8, stop=(char,)))
    hits = 0
    for g_stop in stopped:
        for b in g_stop:
            assert char not in b.text
            if char in tok.decode(b.token_ids):
                hits += 1
                assert b.finish_reason == "stop" and tok.decode(b.token_ids[-1:]) == char
    assert hits > 0


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus(tiny, prompts):
    model, tok = tiny
    _, ids = prompts
    engine = HFEngine(model, tok)
    greedy = engine.generate(ids, 1, Sampling(max_new_tokens=4, temperature=0))
    top1 = engine.generate(ids, 2, Sampling(max_new_tokens=4, top_k=1))
    for g, t in zip(greedy, top1):
        assert all(c.token_ids == g[0].token_ids for c in t)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _filter_top_k_top_p(logits, 0, 0.7)  # 0.5 + 0.3 reach 0.7: the rest goes
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = _filter_top_k_top_p(logits, 0, 0.4)  # the top token alone
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]


def test_buffer_layout_aligns_targets_and_per_token_values():
    completions = [
        Completion(token_ids=[7, 8, 2], logprobs=[-0.1, -0.2, -0.3], text="", finish_reason="stop"),
        Completion(token_ids=[9], logprobs=[-0.5], text="", finish_reason="length"),
        Completion(token_ids=[6, 2], logprobs=[-0.6, -0.7], text="", finish_reason="stop"),
    ]
    buf = RolloutBuffer(
        prompt_ids=[[1, 2], [1, 2, 3, 4], [1, 2, 3, 4]], completions=completions, rows=[{}] * 3, group_size=1
    )
    lay = buf.layout(pad_id=0)
    # prompts left-padded to 4 columns, completions from column 4, right-padded to 3
    assert lay["input_ids"].tolist() == [[0, 0, 1, 2, 7, 8, 2], [1, 2, 3, 4, 9, 0, 0], [1, 2, 3, 4, 6, 2, 0]]
    assert lay["attention_mask"].tolist() == [
        [0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
    ]
    assert lay["position_ids"][0].tolist()[2:] == [0, 1, 2, 3, 4]
    assert lay["targets"].tolist() == [[7, 8, 2], [9, -100, -100], [6, 2, -100]]
    # samples 1 and 2 share their prompt: it is run once
    assert lay["prefix_rows"].tolist() == [0, 1] and lay["prefix_index"].tolist() == [0, 1, 1]
    lp = buf.per_token([c.logprobs for c in completions])
    assert torch.allclose(lp, torch.tensor([[-0.1, -0.2, -0.3], [-0.5, 0, 0], [-0.6, -0.7, 0]]))
    buf.token["old_logps"] = lp
    sub = buf.batch([1], pad_id=0)  # a selection is trimmed to its own widths
    assert sub["input_ids"].tolist() == [[1, 2, 3, 4, 9]] and sub["old_logps"].shape == (1, 1)
    sub = buf.select([0])
    assert sub.width == 3 and sub.completions[0].token_ids == [7, 8, 2]


def _buffer_from(engine, ids, n, sampling):
    groups = engine.generate(ids, n, sampling)
    return RolloutBuffer(
        prompt_ids=[p for p in ids for _ in range(n)],
        completions=[c for g in groups for c in g],
        rows=[{}] * (len(ids) * n),
        group_size=n,
    )


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("whole_groups", [False, True])  # gathered by index_select / by expand
def test_shared_prompt_forward_equals_the_full_forward_values_and_gradients(
    tiny, prompts, lora, whole_groups
):
    # Each distinct prompt runs once and its samples attend to its cached keys / values: the logits,
    # the last hidden states and the gradients must be those of one full forward per sample.
    model, tok = tiny
    _, ids = prompts
    if lora:  # a PEFT model passes the cache through to the base model
        import copy

        from peft import LoraConfig, get_peft_model

        model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B starts at zero: give the adapters an effect
    engine = HFEngine(model, tok)
    engine.eos = sorted(set(engine.eos) | set(range(10, 60)))  # ragged completion lengths
    torch.manual_seed(3)
    buf = _buffer_from(engine, ids[:6], 4, Sampling(max_new_tokens=6))
    index = list(range(24)) if whole_groups else list(range(2, 22))  # partial groups at both ends
    batch = buf.batch(index, pad_id=tok.pad_token_id)
    assert len(batch["prefix_rows"]) == 6 and batch["targets"].shape[1] > 1
    expected = torch.arange(6).repeat_interleave(4)
    assert torch.equal(batch["prefix_index"], expected) == whole_groups
    weights = torch.randn(*batch["targets"].shape, model.config.vocab_size)
    results = []
    for share in (False, True):
        model.zero_grad()
        logits, hidden = completion_forward(model, batch, share_prompts=share, hidden=True)
        ((logits * weights).sum() + hidden.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((logits.detach(), hidden.detach(), grads))
    (full_l, full_h, full_g), (shared_l, shared_h, shared_g) = results
    mask = batch["targets"] != -100
    assert torch.allclose(full_l[mask], shared_l[mask], atol=1e-5)
    assert torch.allclose(full_h[mask], shared_h[mask], atol=1e-5)
    for a, b in zip(full_g, shared_g):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    # and the logits predict the completion tokens: compare with a forward over prompt + completion
    i = 0
    row = buf.prompt_ids[index[i]] + buf.completions[index[i]].token_ids
    with torch.no_grad():
        alone = model(torch.tensor([row])).logits[0, len(buf.prompt_ids[index[i]]) - 1 : -1]
    n = len(buf.completions[index[i]].token_ids)
    assert torch.allclose(alone, shared_l[0, :n], atol=1e-5)


def test_finished_rows_leave_the_batch_without_changing_the_samples(tiny, prompts):
    # Many "eos" tokens: rows finish at different steps and drop out of the batch and the cache; the
    # log-probs of what remains must still be the policy's, and groups come back in prompt order.
    model, tok = tiny
    _, ids = prompts
    engine = HFEngine(model, tok, batch_size=8)  # 2 prompts x 4 samples per generation batch
    engine.eos = sorted(set(engine.eos) | set(range(10, 60)))
    torch.manual_seed(4)
    groups = engine.generate(ids, 4, Sampling(max_new_tokens=6))
    lengths = {len(c.token_ids) for g in groups for c in g}
    assert len(lengths) > 2  # the rows did finish at different steps
    for prompt, group in zip(ids, groups):
        for c in group:
            full = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = model(full).logits[0, len(prompt) - 1 : -1].float()
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)
            assert (c.finish_reason == "stop") == (c.token_ids[-1] in engine.eos)


def test_ppo_trains_on_per_token_advantages_never_a_per_sample_copy():
    """PPO's GAE advantages are per token: the micro-batch must carry the [N, C] tensor. (A per-sample copy
    of the same name, kept for samples.jsonl, used to shadow it in `batch`, so PPO trained on each
    completion's mean advantage.)"""
    from types import SimpleNamespace

    from posttrain.algorithms import ppo
    from posttrain.rollout.buffer import Rollout

    mask = torch.tensor([[True, True], [True, False]])
    rollout = Rollout(
        rewards=torch.tensor([1.0, 0.0]), group_size=1, mask=mask, old_logps=torch.zeros(2, 2),
        ref_logps=None, old_values=torch.tensor([[0.5, 0.5], [0.2, 0.4]]), valid=None,
    )  # fmt: skip
    cfg = SimpleNamespace(ppo=SimpleNamespace(whiten_rewards=False, gamma=1.0, lam=1.0))
    out = ppo.advantages(rollout, cfg, kl_coef=0.0)
    # by hand, gamma = lam = 1: sample 0's token rewards [0, 1] -> A = [0.5, 0.5], returns [1, 1];
    # sample 1 (one token, reward 0, V 0.2) -> A = [-0.2], returns [0]
    assert out["returns"][mask].tolist() == pytest.approx([1.0, 1.0, 0.0])
    raw = torch.tensor([0.5, 0.5, -0.2])
    whitened = (raw - raw.mean()) / (raw.var() + 1e-8).sqrt()  # whiten: unbiased variance over the mask
    assert out["advantages"][mask].tolist() == pytest.approx(whitened.tolist(), abs=1e-6)
    buffer = RolloutBuffer(
        prompt_ids=[[1], [1]],
        completions=[Completion([2, 3], [0.0, 0.0], "ab", "stop"), Completion([2], [0.0], "a", "stop")],
        rows=[{}, {}],
        group_size=1,
        rewards=rollout.rewards,
    )
    buffer.token["advantages"] = out["advantages"]
    assert buffer.batch([0, 1], 0)["advantages"].shape == (2, 2)
    buffer.sequence["advantages"] = out["advantages"].mean(1)
    with pytest.raises(ValueError, match="both per-token and per-sample"):
        buffer.batch([0, 1], 0)
