"""Batch plans, padded and packed collation, and the packing no-cross-contamination check."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.data.batching import collate, packing_supported, plan_batches
from posttrain.data.templates import IGNORE_INDEX, Example, to_example
from posttrain.logprobs import token_logprobs

PAD = 0
VOCAB = 64


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    """Random-init tiny Llama (as posttrain/tasks builds, smaller), built here to stay independent."""
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def random_examples(lengths: list[int], seed: int = 0) -> list[Example]:
    """Examples of the given lengths whose second half is the loss region."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, VOCAB) for _ in range(n)]
        out.append(to_example(ids, [t >= n // 2 for t in range(n)]))
    return out


# -------------------------------------------------------------------------------------- plan_batches


def test_plan_is_deterministic_and_depends_on_epoch():
    lengths = list(range(1, 101))
    plan = plan_batches(lengths, 8, seed=1, epoch=0)
    assert plan == plan_batches(lengths, 8, seed=1, epoch=0)
    assert plan != plan_batches(lengths, 8, seed=1, epoch=1)
    assert plan != plan_batches(lengths, 8, seed=2, epoch=0)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_every_index_once_per_epoch(group_by_length):
    lengths = [random.Random(i).randrange(1, 500) for i in range(1003)]
    for epoch in range(3):
        plan = plan_batches(lengths, 16, seed=0, epoch=epoch, group_by_length=group_by_length)
        assert sorted(i for b in plan for i in b) == list(range(1003))
        assert all(len(b) == 16 for b in plan[:-1]) and len(plan[-1]) == 1003 % 16

        dropped = plan_batches(
            lengths, 16, seed=0, epoch=epoch, group_by_length=group_by_length, drop_last=True
        )
        assert len(dropped) == 1003 // 16 and all(len(b) == 16 for b in dropped)


def test_group_by_length_cuts_padding_and_puts_the_longest_first():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5, 1)) + 1 for _ in range(2000)]  # long-tailed, like real chat data

    def padding(plan):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plan)

    shuffled = plan_batches(lengths, 8, seed=0, epoch=0)
    grouped = plan_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert padding(grouped) < 0.1 * padding(shuffled)  # measured: ~0.04
    assert max(lengths) in [lengths[i] for i in grouped[0]]
    # Batches are still shuffled, not sorted by length across the epoch.
    batch_max = [max(lengths[i] for i in b) for b in grouped[1:]]
    assert batch_max != sorted(batch_max, reverse=True)


# ------------------------------------------------------------------------------------------ collate


def test_padded_collate():
    examples = random_examples([5, 3, 7])
    batch = collate(examples, pad_id=PAD, packing=False, pad_to_multiple_of=4)
    assert set(batch) == {"input_ids", "targets", "position_ids", "example_index", "attention_mask"}
    assert batch["input_ids"].shape == (3, 8) and batch["input_ids"].dtype == torch.long
    for r, ex in enumerate(examples):
        n = len(ex)
        assert batch["input_ids"][r, :n].tolist() == ex.input_ids
        assert batch["targets"][r, :n].tolist() == ex.targets
        assert (batch["input_ids"][r, n:] == PAD).all() and (batch["targets"][r, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (8 - n)
        assert batch["example_index"][r].tolist() == [r] * n + [-1] * (8 - n)
        assert batch["position_ids"][r, :n].tolist() == list(range(n))


def test_packed_collate():
    lengths = [9, 3, 6, 2, 5, 4, 1]
    examples = random_examples(lengths)
    batch = collate(examples, pad_id=PAD, packing=True, max_length=10)
    assert "attention_mask" not in batch
    R, L = batch["input_ids"].shape
    assert L <= 10 and R == -(-sum(lengths) // 10)  # first-fit-decreasing is optimal here: 30 tokens, 3 rows
    idx = batch["example_index"]
    for i, ex in enumerate(examples):
        where = (idx == i).nonzero()
        assert len(where) == len(ex) and where[:, 0].unique().numel() == 1  # one example, one row, contiguous
        r, cols = where[0, 0], where[:, 1]
        assert cols.tolist() == list(range(cols[0], cols[0] + len(ex)))
        assert batch["input_ids"][r, cols].tolist() == ex.input_ids
        assert batch["targets"][r, cols].tolist() == ex.targets
        assert batch["position_ids"][r, cols].tolist() == list(range(len(ex)))  # restarts per example
    pad = idx == -1
    assert (batch["targets"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == PAD).all()
    for r in range(R):
        n_pad = int(pad[r].sum())
        assert batch["position_ids"][r, L - n_pad :].tolist() == list(range(n_pad))


def test_collate_errors():
    examples = random_examples([5, 12])
    with pytest.raises(ValueError, match="longer than max_length=10"):
        collate(examples, pad_id=PAD, packing=True, max_length=10)
    with pytest.raises(ValueError, match="packing needs max_length"):
        collate(examples, pad_id=PAD, packing=True)


# ---------------------------------------------------------------------------- packing equivalence


def per_example_logps(model, batch, n_examples: int, **forward_kwargs) -> torch.Tensor:
    """Summed target logprobs of each example: [n_examples]."""
    logits = model(input_ids=batch["input_ids"], use_cache=False, **forward_kwargs).logits
    logps_RL = token_logprobs(logits, batch["targets"])
    idx = batch["example_index"]
    keep = idx >= 0
    return torch.zeros(n_examples).scatter_add_(0, idx[keep], logps_RL[keep])


@torch.no_grad()
def test_packed_and_padded_batches_give_the_same_logprobs(tiny_llama):
    examples = random_examples([17, 5, 11, 3, 20, 8, 2, 13], seed=1)
    padded = collate(examples, pad_id=PAD, packing=False)
    packed = collate(examples, pad_id=PAD, packing=True, max_length=24, pad_to_multiple_of=8)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples really share rows

    ref = per_example_logps(
        tiny_llama,
        padded,
        len(examples),
        attention_mask=padded["attention_mask"],
        position_ids=padded["position_ids"],
    )
    got = per_example_logps(tiny_llama, packed, len(examples), position_ids=packed["position_ids"])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    # Each example alone (no padding at all) agrees too.
    for i, ex in enumerate(examples):
        alone = collate([ex], pad_id=PAD, packing=False)
        torch.testing.assert_close(per_example_logps(tiny_llama, alone, 1)[0], ref[i], atol=1e-5, rtol=0)

    # The test can fail: position ids that run on across a row let examples attend to their row-mates.
    wrong_pos = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    wrong = per_example_logps(tiny_llama, packed, len(examples), position_ids=wrong_pos)
    shares_row = [i for i in range(len(examples)) if not (packed["example_index"] == i)[:, 0].any()]
    assert shares_row, "some example must sit after another one in its row"
    assert (wrong[shares_row] - ref[shares_row]).abs().min() > 1e-3


class _IgnoresPositionIds(torch.nn.Module):
    """A model whose attention cannot see sequence boundaries (drops position_ids)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_packing_supported_probe(tiny_llama):
    tiny_llama.train()
    assert packing_supported(tiny_llama)
    assert tiny_llama.training  # mode restored
    tiny_llama.eval()
    assert not packing_supported(_IgnoresPositionIds(tiny_llama))
