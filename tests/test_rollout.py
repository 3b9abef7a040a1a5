"""The HF generation engine and the rollout buffer's training layout."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.eval.generation import generate_greedy
from posttrain.rollout.buffer import RolloutBuffer
from posttrain.rollout.engine import Completion, HFEngine, Sampling, _filter_top_k_top_p
from posttrain.rollout.source import encode_prompts
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
    return rows, encode_prompts(tok, rows)[1]


def test_greedy_matches_transformers_generate(tiny, prompts):
    model, tok = tiny
    rows, ids = prompts
    ours = [
        g[0].text for g in HFEngine(model, tok).generate(ids, 1, Sampling(max_new_tokens=6, temperature=0))
    ]
    theirs = generate_greedy(model, tok, [r["prompt"] for r in rows], max_new_tokens=6)
    assert ours == theirs


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
    ]
    buf = RolloutBuffer(
        prompt_ids=[[1, 2], [1, 2, 3, 4]], completions=completions, rows=[{}, {}], group_size=1
    )
    lay = buf.layout(pad_id=0)
    assert lay["input_ids"].tolist() == [[1, 2, 7, 8, 2], [1, 2, 3, 4, 9]]
    assert lay["targets"].tolist() == [[-100, 7, 8, 2, -100], [-100, -100, -100, 9, -100]]
    assert lay["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    lp = buf.per_token([c.logprobs for c in completions])
    # each value sits at the position whose target is its token
    assert lp[0].tolist() == pytest.approx([0, -0.1, -0.2, -0.3, 0])
    assert lp[1].tolist() == pytest.approx([0, 0, 0, -0.5, 0])
    buf.token["old_logps"] = lp
    sub = buf.batch([1], pad_id=0)  # a selection is trimmed to its own width
    assert sub["input_ids"].tolist() == [[1, 2, 3, 4, 9]] and sub["old_logps"].shape == (1, 5)
    sub = buf.select([0])
    assert sub.width == 5 and sub.completions[0].token_ids == [7, 8, 2]
