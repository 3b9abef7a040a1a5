"""Generation engines: the policy samples completions for online RL (and for evals, greedily).

One protocol, two engines:

    engine.generate(prompt_ids, n, sampling) -> [[Completion] * n for each prompt]
    engine.load_weights(model, version)       # the trainer's new weights; bumps policy_version
    engine.policy_version                     # version of the weights that generate() samples from

`HFEngine` (the default, CPU or GPU) runs a batched KV-cached sampling loop over any Hugging Face
causal LM. When it shares the trained module it needs no weight copies at all; given its own copy
(the asynchronous mode generates with a stale policy while the trainer updates the live one) it
copies the state dict in. `posttrain.rollout.vllm.VLLMEngine` does the same with vLLM on a GPU.

Prompts are token ids, rendered by the caller, so that the tokens the policy is trained on are the
tokens it was sampled from. Each completion carries the log-probability of each sampled token under
the temperature-scaled distribution `log_softmax(logits / temperature)`, taken before top-k / top-p
truncation: that is exactly what the trainer computes for the same tokens, so with a synchronous
engine these sampling log-probs serve as the PPO ratio's "old" log-probs without another forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from posttrain.hf_compat import cache_inputs, output_cache


@dataclass(frozen=True)
class Sampling:
    """How to sample. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    stop: tuple[str, ...] = ()  # stop strings (kept in the completion's tokens, cut from its text)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled completion."""

    token_ids: list[int]  # sampled tokens, up to and including the eos / the token completing a stop string
    logprobs: list[float]  # sampling log-prob of each token (see the module docstring)
    text: str  # decoded, cut before the eos or stop string; other special tokens kept
    finish_reason: str  # "stop" (eos or stop string) or "length" (max_new_tokens reached)
    policy_version: int = 0


class Engine(Protocol):
    """What the rollout source needs of a generation engine (HFEngine, VLLMEngine)."""

    policy_version: int  # the rollouts the weights it samples with had trained on
    exact_logprobs: bool  # its sampling log-probs are the trainer's own numbers (same model and precision)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling) -> list[list[Completion]]: ...

    def load_weights(self, model, version: int) -> None: ...


def eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus any the model's generation config adds (chat models often stop on an
    end-of-turn token and the document end alike)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def _filter_top_k_top_p(logits_BV: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the most likely token always
    survives)."""
    if top_k and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, descending=True, dim=-1)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = (probs_BV.cumsum(-1) - probs_BV) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order_BV, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def forward_last(model, keep, **inputs):
    """`model(**inputs)` with logits for the last `keep` positions (an int; or a tensor of the positions, an
    empty one for none) only where the model supports it
    (nearly all HF causal LMs): a prompt's logits would otherwise cost [rows, prompt, vocab] memory
    (16 prompts of 2,000 tokens at a 150k vocabulary: 19 GB in fp32)."""
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError as e:
        if "logits_to_keep" not in str(e):
            raise
        out = model(**inputs)
        out.logits = out.logits[:, keep] if isinstance(keep, torch.Tensor) else out.logits[:, -keep:]
        return out


class HFEngine:
    """Batched, KV-cached sampling with any Hugging Face causal LM. Its log-probs are the trainer's
    own numbers (`exact_logprobs`): same model, same precision, same temperature scaling.

    Args:
        model: the causal LM to sample from. The trainer's own module (no copy; `load_weights` then only
            records the version) or, for asynchronous generation, a separate copy.
        tokenizer: for decoding and the pad / eos tokens.
        batch_size: sequences per forward (prompts x n); None: all at once.
    """

    exact_logprobs = True
    carries_kv = True  # generate(..., carry=TurnCache, keys=...) keeps caches between turns (turn_cache.py)

    def __init__(self, model, tokenizer, *, batch_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.policy_version = 0
        self._compact = True  # drop finished rows from the batch (off if the model's cache cannot)
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.prefill_tokens = 0  # prompt tokens prefilled so far (padding not counted)

    @classmethod
    def copy_of(cls, model, tokenizer, **kw) -> HFEngine:
        """An engine with its own frozen copy of `model` (asynchronous generation)."""
        clone = copy.deepcopy(model).eval().requires_grad_(False)
        return cls(clone, tokenizer, **kw)

    def load_weights(self, model, version: int) -> None:
        if model is not None and model is not self.model:
            with torch.no_grad():
                self.model.load_state_dict(model.state_dict())
        self.policy_version = version

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: Sampling, *, carry=None, keys=None
    ) -> list[list[Completion]]:
        """n completions of each prompt. With ``carry`` (a ``turn_cache.TurnCache``) and one key per prompt
        (n = 1), a prompt that extends the tokens cached under its key prefills only the new tokens, and
        each row's cache is kept under its key for the next turn."""
        if not prompt_ids:
            return []
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("an empty prompt cannot be continued (give it at least a bos token)")
        if carry is not None and (n != 1 or keys is None or len(keys) != len(prompt_ids)):
            raise ValueError("carry needs n = 1 and one key per prompt")
        # Each prompt is prefilled once and its keys / values shared by its n samples.
        per_batch = max(1, (self.batch_size or len(prompt_ids) * n) // n)
        # Sort by length so that each batch wastes little on padding; restore the order after.
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        done: list[list[Completion] | None] = [None] * len(prompt_ids)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(sampling.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), per_batch):
                batch = order[start : start + per_batch]
                batch_keys = None if carry is None else [keys[i] for i in batch]
                samples = self._sample(
                    [prompt_ids[i] for i in batch], n, sampling, generator, carry, batch_keys
                )
                for j, i in enumerate(batch):
                    done[i] = samples[j * n : (j + 1) * n]
        finally:
            self.model.train(was_training)
        return done

    @property
    def _device(self):
        return next(self.model.parameters()).device

    def _sample(
        self, prompts: list[list[int]], n: int, sampling: Sampling, generator, carry=None, keys=None
    ) -> list[Completion]:
        """n completions of each prompt, in prompt order. Finished rows leave the batch (and the cache) at
        once, so a step costs what the rows still running cost. With ``carry``, rows start from their
        cached columns (``TurnCache.past``) and only their new tokens are prefilled."""
        device, P = self._device, len(prompts)
        past, past_mask_PC, new = None, torch.zeros((P, 0), dtype=torch.long, device=device), prompts
        if carry is not None:
            entries, new = carry.split(keys, prompts, self.policy_version)
            past, past_mask_PC = carry.past(entries, device)
        width = max(len(p) for p in new)
        ids_PL = torch.full((P, width), self.pad_id, dtype=torch.long)
        mask_PL = torch.zeros((P, width), dtype=torch.long)
        for b, p in enumerate(new):  # left padding: every row's next token lands in the same column
            ids_PL[b, width - len(p) :] = torch.tensor(p)
            mask_PL[b, width - len(p) :] = 1
        ids_PL, mask_PL = ids_PL.to(device), torch.cat([past_mask_PC, mask_PL.to(device)], 1)
        pos_PL = (mask_PL.cumsum(-1) - 1).clamp(min=0)[:, -width:]  # each row's own positions, past included
        eos = torch.tensor(self.eos, device=device)
        self.prefill_tokens += sum(len(p) for p in new)

        out = forward_last(
            self.model,
            1,
            input_ids=ids_PL,
            attention_mask=mask_PL,
            position_ids=pos_PL,
            use_cache=True,
            **({} if past is None else cache_inputs(self.model, past)),
        )
        cache, logits_BV, mask_BL = output_cache(out), out.logits[:, -1], mask_PL
        if n > 1:
            try:
                cache.batch_repeat_interleave(n)
            except (AttributeError, NotImplementedError):  # a cache that cannot be shared: prefill n times
                return self._sample([p for p in prompts for _ in range(n)], 1, sampling, generator)
            logits_BV, mask_BL = logits_BV.repeat_interleave(n, 0), mask_PL.repeat_interleave(n, 0)
        B = P * n
        next_pos_B1 = mask_BL.sum(-1, keepdim=True)
        rows_A = torch.arange(B, device=device)  # the rows in the batch (A of them)
        done_A = torch.zeros(B, dtype=torch.bool, device=device)  # finished but kept (no compaction)
        tokens_BT = torch.full((B, sampling.max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        logps_BT = torch.zeros((B, sampling.max_new_tokens), device=device)
        stopped_by_string = [False] * B
        texts = [""] * B
        steps = 0
        for t in range(sampling.max_new_tokens):
            logits_AV = logits_BV.float()
            if sampling.greedy:
                token_A = logits_AV.argmax(-1)
                logp_A = torch.log_softmax(logits_AV, -1).gather(1, token_A[:, None]).squeeze(1)
            else:
                scaled_AV = logits_AV / sampling.temperature
                logp_all_AV = torch.log_softmax(scaled_AV, -1)
                kept_AV = _filter_top_k_top_p(scaled_AV, sampling.top_k, sampling.top_p)
                token_A = torch.multinomial(torch.softmax(kept_AV, -1), 1, generator=generator).squeeze(1)
                logp_A = logp_all_AV.gather(1, token_A[:, None]).squeeze(1)
            token_A = torch.where(done_A, self.pad_id, token_A)
            tokens_BT[rows_A, t] = token_A
            logps_BT[rows_A, t] = logp_A
            steps = t + 1
            finished_A = done_A | torch.isin(token_A, eos)
            if sampling.stop:
                running = ~done_A
                hits = self._check_stop(
                    token_A[running], rows_A[running], sampling.stop, stopped_by_string, texts
                )
                finished_A[running] |= hits
            last = bool(finished_A.all()) or steps == sampling.max_new_tokens
            if carry is not None:  # keep each row's cache as it ends: prompt + sampled tokens but this one
                for a in ((~done_A if last else finished_A & ~done_A).nonzero().squeeze(1)).tolist():
                    b = int(rows_A[a])
                    tokens = prompts[b] + tokens_BT[b, :t].tolist()
                    carry.keep(keys[b], tokens, cache, a, mask_BL[a], self.policy_version)
            if last:
                break
            if bool(finished_A.any()) and self._compact:
                keep_A = (~finished_A).nonzero().squeeze(1)
                try:
                    cache.batch_select_indices(keep_A)
                except (AttributeError, NotImplementedError):  # keep finished rows in the batch instead
                    self._compact = False
                else:
                    rows_A, token_A = rows_A[keep_A], token_A[keep_A]
                    mask_BL, next_pos_B1 = mask_BL[keep_A], next_pos_B1[keep_A]
                    finished_A = finished_A[keep_A]
            done_A = finished_A
            mask_BL = torch.cat([mask_BL, torch.ones_like(mask_BL[:, :1])], 1)
            out = self.model(
                input_ids=token_A[:, None],
                attention_mask=mask_BL,
                position_ids=next_pos_B1,
                **cache_inputs(self.model, cache),
                use_cache=True,
            )
            cache, logits_BV = output_cache(out), out.logits[:, -1]
            next_pos_B1 = next_pos_B1 + 1

        tokens = tokens_BT[:, :steps].tolist()
        logps = logps_BT[:, :steps].tolist()
        eos_set = set(self.eos)
        result = []
        for b in range(B):
            row, stop_reason, keep = tokens[b], "length", len(tokens[b])
            for j, tok in enumerate(row):
                if tok in eos_set:
                    keep, stop_reason = j + 1, "stop"
                    break
            if stopped_by_string[b]:
                keep, stop_reason = self._stop_length(row, sampling.stop), "stop"
            ids = row[:keep]
            text_ids = ids[:-1] if ids and ids[-1] in eos_set else ids
            text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
            if stopped_by_string[b]:
                text = _cut_at_stop(text, sampling.stop)
            result.append(
                Completion(
                    token_ids=ids,
                    logprobs=logps[b][:keep],
                    text=text,
                    finish_reason=stop_reason,
                    policy_version=self.policy_version,
                )
            )
        return result

    def _check_stop(self, token_A, rows_A, stop, stopped: list[bool], texts: list[str]) -> Tensor:
        """Extend the running rows' texts by their new tokens; True where a stop string now appears."""
        hits = []
        for b, tok in zip(rows_A.tolist(), token_A.tolist()):
            texts[b] += self.tokenizer.decode([tok], skip_special_tokens=False)
            stopped[b] = any(s in texts[b] for s in stop)
            hits.append(stopped[b])
        return torch.tensor(hits, dtype=torch.bool, device=token_A.device)

    def _stop_length(self, row: list[int], stop: tuple[str, ...]) -> int:
        """Tokens up to and including the one that completes the first stop string."""
        text = ""
        for j, tok in enumerate(row):
            text += self.tokenizer.decode([tok], skip_special_tokens=False)
            if any(s in text for s in stop):
                return j + 1
        return len(row)


def load_engine(path: str, *, batch_size: int | None = None):
    """``(HFEngine, tokenizer)`` for a model directory or hub name (GPU when there is one)."""
    import torch

    from posttrain.config import ModelConfig
    from posttrain.models import load_model, load_tokenizer

    cfg = ModelConfig(path=str(path))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, trainable=False)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return HFEngine(model, tokenizer, batch_size=batch_size), tokenizer


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text
