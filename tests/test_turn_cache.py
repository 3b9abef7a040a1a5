"""KV carry-over across turns (rollout/turn_cache.py): the tokens and log-probs sampled with each
episode's cache carried between turns equal those of re-prefilling the whole conversation every turn
(greedy and seeded sampling; the char-level tiny Llama and a BPE + ChatML Qwen2 built here); the prefill
shrinks to the new tokens exactly; a prompt that does not extend the cache, or new weights, rebuild it;
episodes that drop out, padding of rows of different lengths and batches split by batch_size keep every
row's numbers. Through the episode runner on multi-turn episodes too, and its switch turns it off."""

from __future__ import annotations

import random

import pytest
import torch
from agent_toys import Echo
from chatml import chatml_tokenizer

from posttrain.agents.runner import Budgets, EpisodeRunner
from posttrain.config.online import EnvConfig
from posttrain.logprobs import token_logprobs
from posttrain.rollout.engine import HFEngine, Sampling
from posttrain.rollout.turn_cache import TurnCache
from posttrain.tasks.tiny import build_model, build_tokenizer

TINY = build_tokenizer()
CHATML = chatml_tokenizer()
SAMPLINGS = {"greedy": Sampling(temperature=0.0), "seeded": Sampling(temperature=1.0, seed=7)}


@pytest.fixture(scope="module", params=["tiny", "chatml"])
def lm(request):
    """(tokenizer, model): the tiny tokenizer with a 2-layer Llama, or the test BPE with a 2-layer Qwen2."""
    if request.param == "tiny":
        return TINY, build_model(TINY, num_hidden_layers=2, seed=0).eval()
    return CHATML, build_model(CHATML, arch="qwen2", num_hidden_layers=2, seed=0).eval()


def turns(engine, tok, sampling, carry=None, *, n_turns=4, drop_after=1):
    """Five conversations of different lengths over n_turns turns: each turn appends the sampled tokens
    and a few 'tool result' tokens; conversation 2 drops out after turn ``drop_after``. Returns the
    completions in order, the final contexts, where conversation 0's last turn starts, and the prefill a
    carried cache needs: the first prompts whole, then per row what the last turn added after the tokens
    it fed (all but its last sampled token)."""
    rnd = random.Random(0)
    vocab = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    contexts = [[rnd.choice(vocab) for _ in range(rnd.randrange(3, 14))] for _ in range(5)]
    keys, out, cached, need, last_start = list(range(5)), [], [0] * 5, 0, 0
    for t in range(n_turns):
        s = Sampling(
            max_new_tokens=rnd.randrange(3, 9),
            temperature=sampling.temperature,
            seed=None if sampling.seed is None else sampling.seed + t,
        )
        need += sum(len(c) - k for c, k in zip(contexts, cached))
        last_start = len(contexts[0])
        kv = {} if carry is None else {"carry": carry, "keys": keys}
        for i, (c,) in enumerate(engine.generate(contexts, 1, s, **kv)):
            out.append(c)
            cached[i] = len(contexts[i]) + len(c.token_ids) - 1
            contexts[i] = contexts[i] + c.token_ids + [rnd.choice(vocab) for _ in range(rnd.randrange(1, 6))]
        if t == drop_after:
            del contexts[2], keys[2], cached[2]
            if carry is not None:
                carry.drop(2)
    return out, contexts, last_start, need


@pytest.mark.parametrize("mode", list(SAMPLINGS))
def test_carried_cache_samples_the_same_tokens_and_logprobs_with_less_prefill(lm, mode):
    tok, model = lm
    # Batches of 2 rows (sorted by length, as the engine does): each turn regroups rows whose caches were
    # kept in other batches. The same batch size both ways: seeded draws depend on the batch's shape.
    plain = HFEngine(model, tok, batch_size=2)
    want, contexts, start, need = turns(plain, tok, SAMPLINGS[mode])
    carry, carried = TurnCache(), HFEngine(model, tok, batch_size=2)
    got, _, _, _ = turns(carried, tok, SAMPLINGS[mode], carry)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for a, b in zip(got, want):
        assert a.finish_reason == b.finish_reason
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    assert carried.prefill_tokens == need == carry.stats["prefill_tokens"]
    assert plain.prefill_tokens == need + carry.stats["reused_tokens"]
    assert carry.stats["hits"] == 5 + 4 + 4 and carry.stats["rebuilt"] == 0
    assert carried.prefill_tokens < plain.prefill_tokens / 2
    # The carried numbers are the model's own on the whole conversation, from one plain forward.
    ids = torch.tensor([contexts[0]])
    with torch.no_grad():
        logps_L = token_logprobs(model(ids).logits[:, :-1].float(), ids[:, 1:])[0]
    last = got[-4]  # conversation 0's last turn (4 rows are left)
    assert contexts[0][start : start + len(last.token_ids)] == last.token_ids
    assert torch.allclose(
        logps_L[start - 1 : start - 1 + len(last.token_ids)], torch.tensor(last.logprobs), atol=1e-5
    )


def test_a_prompt_that_does_not_extend_the_cache_or_new_weights_rebuild_it(lm):
    tok, model = lm
    greedy = Sampling(max_new_tokens=4, temperature=0.0)
    carry, engine = TurnCache(), HFEngine(model, tok)
    prompts = [[5, 6, 7, 8, 9], [9, 8, 7]]
    first = engine.generate(prompts, 1, greedy, carry=carry, keys=["a", "b"])
    assert len(carry) == 2 and carry.entries["a"].tokens == prompts[0] + first[0][0].token_ids[:-1]
    # "a" edits a token inside its cached prefix (a re-rendered conversation), "b" extends its own.
    edited = [5, 7] + prompts[0][2:] + first[0][0].token_ids + [11]
    extended = prompts[1] + first[1][0].token_ids + [11, 12]
    got = engine.generate([edited, extended], 1, greedy, carry=carry, keys=["a", "b"])
    assert carry.stats["rebuilt"] == 1 and carry.stats["hits"] == 1
    want = HFEngine(model, tok).generate([edited, extended], 1, greedy)
    for (g,), (w,) in zip(got, want):
        assert g.token_ids == w.token_ids
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5)
    # New weights (a new policy_version): every cache is stale.
    engine.load_weights(None, 1)
    longer = [edited + got[0][0].token_ids + [13], extended + got[1][0].token_ids + [13]]
    engine.generate(longer, 1, greedy, carry=carry, keys=["a", "b"])
    assert carry.stats["rebuilt"] == 3 and carry.stats["hits"] == 1
    with pytest.raises(ValueError, match="one key per prompt"):
        engine.generate(longer, 2, greedy, carry=carry, keys=["a", "b"])


@pytest.mark.parametrize("mode", list(SAMPLINGS))
def test_runner_episodes_are_the_same_with_and_without_carry_over(lm, mode):
    tok, model = lm
    # A random model rarely ends a turn by itself: a raised end-of-turn logit keeps turns short.
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 3.0 if tok is TINY else 7.0
    hook = model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    tasks = [{"id": str(i), "turns": 1 + i % 4} for i in range(6)]
    fmt = "tiny" if tok is TINY else "hermes"
    try:
        episodes, stats = {}, {}
        for carry in (False, True):
            runner = EpisodeRunner(
                tok,
                fmt,
                budgets=Budgets(max_new_tokens=12, max_turns=4),
                sampling=SAMPLINGS[mode],
                kv_carry=carry,
            )
            episodes[carry] = runner.run(HFEngine(model, tok), Echo, tasks, group_size=2)
            stats[carry] = runner.kv_stats
    finally:
        hook.remove()
    assert stats[False] == {} and stats[True]["hits"] > 0 and stats[True]["rebuilt"] == 0
    assert stats[True]["unsupported"] == 0
    assert sum(sum(t.sampled for t in e.turns) > 2 for e in episodes[True]) >= 3  # several turns carried
    for a, b in zip(episodes[True], episodes[False]):
        assert a.prompt_ids + a.ids == b.prompt_ids + b.ids and a.mask == b.mask and a.stop == b.stop
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_the_config_switch_reaches_the_runner():
    from posttrain.agents.source import make_runner

    class Cfg:
        env = EnvConfig(name="calculator", kv_carry=False)
        rollout = type("R", (), {"temperature": 1.0, "top_p": 1.0, "top_k": 0})()

    assert EnvConfig(name="calculator").kv_carry is True
    assert make_runner(Cfg, TINY).kv_carry is False
