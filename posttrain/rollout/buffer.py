"""The rollout buffer: one batch of sampled completions with everything training and logging need.

Samples are stored flat, prompt-major: the `group_size` completions of a prompt are consecutive, which is
what group advantages (GRPO, RLOO) rely on. Per-token quantities (sampling log-probs, reference log-probs,
values, advantages) are kept as [N, C] tensors aligned with the completions of the training layout built
by `batch`, so that a minibatch is a row selection, never a re-alignment.

Training layout of a micro-batch: prompts left-padded to the longest prompt (P columns), completions
right-padded to the longest completion (C columns), so that every completion starts in column P:

    input_ids   pad p0 p1 p2 | c0 c1 c2 pad        [N, P + C]
    targets                  | c0 c1 c2 -100       [N, C]: the completion tokens, -100 on padding

Per-token quantities are [N, C]: column t belongs to completion token t. The logits that predict token t
sit at input column P - 1 + t; `completion_forward` returns exactly those [N, C] logits. When several
samples share a prompt (a GRPO group of G), it runs each distinct prompt once and lets its samples attend
to the prompt's cached keys and values: the same numbers, with the prompt's share of the work cut G-fold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from posttrain.data.templates import IGNORE_INDEX
from posttrain.hf_compat import cache_inputs, is_activation_checkpointing, output_cache, output_layer
from posttrain.logprobs import HiddenHead
from posttrain.rollout.engine import Completion, forward_last


@dataclass(frozen=True)
class Rollout:
    """What an advantage estimator reads of one rollout: N samples, prompt-major (the G samples of a
    prompt are consecutive), C = the longest completion. Pure tensors, no model, no config."""

    rewards: Tensor  # [N] total reward of each sample
    group_size: int  # G
    mask: Tensor  # [N, C] bool: the tokens the policy sampled
    old_logps: Tensor  # [N, C] log-probs of the behaviour policy (the ratio's denominator)
    ref_logps: Tensor | None  # [N, C] under the reference model, when there is a KL term
    old_values: Tensor | None  # [N, C] V(s_t) of the critic at rollout time (PPO)
    valid: Tensor | None  # [N] bool: False for samples kept out of baselines (agents' masked episodes)


@dataclass
class RolloutBuffer:
    prompt_ids: list[list[int]]  # per sample (repeated over its group)
    completions: list[Completion]
    rows: list[dict]  # the prompt row of each sample (answer, tests, ... for the reward fns)
    group_size: int
    rewards: Tensor | None = None  # [N] total reward
    components: dict[str, list[float]] = field(default_factory=dict)
    token: dict[str, Tensor] = field(default_factory=dict)  # per-token [N, L] tensors, layout above
    sequence: dict[str, Tensor] = field(default_factory=dict)  # per-sample [N] tensors (advantages, ...)
    valid: Tensor | None = None  # [N] bool: False for a sample left out of the baselines (agents' masked)

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def width(self) -> int:
        """C: the longest completion (the width of per-token tensors)."""
        return max((len(c.token_ids) for c in self.completions), default=0)

    def completion_lengths(self) -> list[int]:
        return [len(c.token_ids) for c in self.completions]

    def layout(self, pad_id: int) -> dict[str, Tensor]:
        """The training layout (module docstring): input_ids, attention_mask, position_ids [N, P + C],
        targets [N, C]; prefix_rows [U] (the first sample of each distinct prompt, in order of first
        appearance among consecutive samples) and prefix_index [N] (each sample's prompt among those)."""
        C = self.width
        P = max(len(p) for p in self.prompt_ids)
        ids, targets, attention, prefix_rows, prefix_index = [], [], [], [], []
        for i, (p, c) in enumerate(zip(self.prompt_ids, self.completions)):  # lists, then one tensor each
            completion = list(c.token_ids)
            left, right = P - len(p), C - len(completion)
            ids.append([pad_id] * left + list(p) + completion + [pad_id] * right)
            targets.append(completion + [IGNORE_INDEX] * right)
            attention.append([0] * left + [1] * (len(p) + len(completion)) + [0] * right)
            if not prefix_rows or p != self.prompt_ids[prefix_rows[-1]]:
                prefix_rows.append(i)
            prefix_index.append(len(prefix_rows) - 1)
        input_ids, targets = torch.tensor(ids, dtype=torch.long), torch.tensor(targets, dtype=torch.long)
        attention = torch.tensor(attention, dtype=torch.long)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": input_ids,
            "targets": targets,
            "attention_mask": attention,
            "position_ids": position_ids,
            "prefix_rows": torch.tensor(prefix_rows),
            "prefix_index": torch.tensor(prefix_index),
        }

    def completion_mask(self) -> Tensor:
        """[N, C] bool: True on each sample's completion tokens."""
        lengths = torch.tensor(self.completion_lengths())
        return torch.arange(self.width)[None, :] < lengths[:, None]

    def rollout(self) -> Rollout:
        """The tensors an advantage estimator reads (after the source annotated the buffer)."""
        return Rollout(
            rewards=self.rewards,
            group_size=self.group_size,
            mask=self.completion_mask(),
            old_logps=self.token["old_logps"],
            ref_logps=self.token.get("ref_logps"),
            old_values=self.token.get("old_values"),
            valid=self.valid,
        )

    def per_token(self, values: list[list[float]]) -> Tensor:
        """Per-completion-token values (e.g. sampling log-probs) as an [N, C] tensor."""
        out = torch.zeros((len(self), self.width), dtype=torch.float32)
        for i, v in enumerate(values):
            if v:
                out[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
        return out

    def select(self, index: list[int]) -> RolloutBuffer:
        """The samples at `index` (in that order), per-token tensors cut to their own width."""
        sub = RolloutBuffer(
            prompt_ids=[self.prompt_ids[i] for i in index],
            completions=[self.completions[i] for i in index],
            rows=[self.rows[i] for i in index],
            group_size=self.group_size,
            rewards=None if self.rewards is None else self.rewards[index],
            components={k: [v[i] for i in index] for k, v in self.components.items()},
            valid=None if self.valid is None else self.valid[index],
        )
        width = sub.width
        sub.token = {k: v[index, :width] for k, v in self.token.items()}
        sub.sequence = {k: v[index] for k, v in self.sequence.items()}
        return sub

    def batch(self, index: list[int], pad_id: int) -> dict[str, Tensor]:
        """One micro-batch: the training layout and every per-token / per-sample tensor, trimmed to the
        longest prompt and completion among `index`."""
        sub = self.select(index)
        clash = set(sub.token) & set(sub.sequence)
        if clash:  # one name, one tensor: a per-sample copy must never shadow the per-token one
            raise ValueError(f"rollout tensors {sorted(clash)} are both per-token and per-sample")
        return {**sub.layout(pad_id), **sub.token, **sub.sequence}

    def write_samples(
        self, path: Path, *, step: int, prompts: list[str], extra: dict[str, list] | None = None
    ):
        """Append one JSON line per sample to samples.jsonl."""
        extra = extra or {}
        with open(path, "a") as f:
            for i, c in enumerate(self.completions):
                record = {
                    "step": step,
                    "group": i // self.group_size,
                    "prompt": prompts[i],
                    "completion": c.text,
                    "reward": None if self.rewards is None else round(float(self.rewards[i]), 6),
                    "components": {k: round(float(v[i]), 6) for k, v in self.components.items()},
                    "finish_reason": c.finish_reason,
                    "tokens": len(c.token_ids),
                    "policy_version": c.policy_version,
                    **{k: v[i] for k, v in extra.items()},
                }
                f.write(json.dumps(record) + "\n")


def completion_forward(
    model, batch: dict, *, share_prompts: bool = True, hidden: bool = False, logits: bool = True
):
    """Logits [N, C, V] predicting each completion token of `batch` (the layout above), and with
    `hidden` the last hidden states [N, C, H] at the same positions (else None). With `logits=False` the
    model keeps the logits of no position and the logits come back as None (the hidden states are then
    returned): `completion_head` turns them into log-probs without a [N, C, V] tensor.

    With `share_prompts` and fewer distinct prompts than samples, each prompt is run once
    (`prefix_rows`), its key / value cache gathered to its samples (`prefix_index`), and the
    completions run on top: gradients reach the prompt positions through the cache, summed over the
    samples that share them, exactly as in the full forward.
    """
    input_ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    C = batch["targets"].shape[1]
    P = input_ids.shape[1] - C
    rows, index = batch.get("prefix_rows"), batch.get("prefix_index")
    shared = (
        share_prompts
        and rows is not None
        and len(rows) < len(input_ids)
        and C > 0
        and not is_activation_checkpointing(model)  # HF drops the cache under activation checkpointing
    )
    hidden = hidden or not logits
    none = torch.zeros(0, dtype=torch.long, device=input_ids.device)  # logits_to_keep: no position
    if not shared:
        out = forward_last(
            model, C + 1 if logits else none, input_ids=input_ids, attention_mask=mask, position_ids=positions,
            use_cache=False, output_hidden_states=hidden,
        )  # fmt: skip
        last = out.hidden_states[-1][:, P - 1 : P - 1 + C] if hidden else None
        return (out.logits[:, -(C + 1) : -1] if logits else None), last
    head = forward_last(
        model, 1 if logits else none, input_ids=input_ids[rows, :P], attention_mask=mask[rows, :P],
        position_ids=positions[rows, :P], use_cache=True, output_hidden_states=hidden,
    )  # fmt: skip
    cache = output_cache(head)
    gather = _row_gather(index)
    _gather_cache(cache, index, gather)
    first = gather(head.logits[:, -1:]) if logits else None  # [N, 1, V]: predicts completion token 0
    if C == 1:
        return first, gather(head.hidden_states[-1][:, P - 1 :]) if hidden else None
    tail = model(
        input_ids=input_ids[:, P : P + C - 1], attention_mask=mask[:, : P + C - 1],
        position_ids=positions[:, P : P + C - 1], **cache_inputs(model, cache), use_cache=True,
        output_hidden_states=hidden, **({} if logits else {"logits_to_keep": none}),
    )  # fmt: skip
    out_logits = torch.cat([first, tail.logits], 1) if logits else None
    if not hidden:
        return out_logits, None
    return out_logits, torch.cat([gather(head.hidden_states[-1][:, P - 1 :]), tail.hidden_states[-1]], 1)


def completion_head(model, batch: dict, temperature: float = 1.0, *, share_prompts: bool = True):
    """(`HiddenHead` or temperature-scaled logits [N, C, V], last hidden states [N, C, H]) of each completion
    token: the hidden-state form where the model's output layer is a plain linear one (`hf_compat.
    output_layer`), so `logprobs.token_stats` never builds the [N, C, V] logits; else the logits."""
    layer = output_layer(model)
    if layer is None:
        logits, last = completion_forward(model, batch, share_prompts=share_prompts, hidden=True)
        return (logits / temperature if temperature != 1.0 else logits), last
    _, last = completion_forward(model, batch, share_prompts=share_prompts, logits=False)
    return HiddenHead(last, *layer, temperature=temperature), last


def _row_gather(index: Tensor):
    """`x -> x[index]` along dim 0, by the op with the cheapest backward: when each prompt's samples are
    consecutive and equally many (a GRPO batch of whole groups), an expand (its backward a sum over the
    group); else `index_select` (an index_add). Advanced indexing, `x[index]`, backpropagates through an
    accumulating index_put, ~10x slower on CPU."""
    U, N = int(index[-1]) + 1, len(index)
    if N % U == 0 and torch.equal(index, torch.arange(U, device=index.device).repeat_interleave(N // U)):
        return lambda x: x.unsqueeze(1).expand(U, N // U, *x.shape[1:]).reshape(N, *x.shape[1:])
    return lambda x: x.index_select(0, index)


def _gather_cache(cache, index: Tensor, gather) -> None:
    """`cache.batch_select_indices(index)` by `gather` (`_row_gather`) where the cache layers are HF's
    dynamic ones (the gather's backward: 4 ms of a 1M model's 85 ms GRPO step with HF's own)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(
        type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers
    ):
        cache.batch_select_indices(index)
        return
    for layer in layers:
        if layer.get_seq_length() > 0:
            layer.keys, layer.values = gather(layer.keys), gather(layer.values)


def tempered_forward(model, batch: dict, temperature: float, *, share_prompts: bool = True):
    """(the sampling distribution of each completion token, None): the forward of a plain language model
    (the policy of the GRPO family; a reference model; a teacher). A `logprobs.HiddenHead` at `temperature`
    (`completion_head`), or logits / temperature [N, C, V] for a model whose head is not a plain linear
    layer; either goes to `logprobs.token_stats`."""
    head, _ = completion_head(model, batch, temperature, share_prompts=share_prompts)
    return head, None
