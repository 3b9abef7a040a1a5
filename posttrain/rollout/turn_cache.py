"""KV carry-over across the turns of multi-turn episodes: keep each episode's keys / values between turns
and prefill only the tokens the turn added.

An agent episode is append-only in tokens: turn k+1's prompt is turn k's prompt, the tokens sampled in
turn k, and the bridge tokens of the observation (``agents.bridge``). Re-encoding the whole conversation
every turn costs O(T^2) prefill over an episode of T turns; carrying the cache costs O(T).

    carry = TurnCache()
    engine.generate(contexts, 1, sampling, carry=carry, keys=[episode ids])   # every turn
    carry.drop(key)                                                          # an episode that ended

After a turn, :meth:`keep` stores each row's cache *without its padding columns* (a batch pads rows to
one width; a padding column's key is never attended to, so removing it changes no number), with the
tokens it encodes: the prompt and the sampled tokens but the last (the last one is sampled, never fed).
The next turn :meth:`split` checks the new prompt: an exact extension of the stored tokens (and the same
weights, ``policy_version``) reuses the entry and leaves only the suffix to prefill; anything else drops
it and the row is prefilled whole (``rebuilt`` counts these). :meth:`past` lays the reused rows out for
one batched forward:

    row i:  [zeros x (C - L_i) | its L_i cached columns] [pads x (W - N_i) | its N_i new tokens]
    mask:   [0 ...             | 1 ...                 ] [0 ...            | 1 ...             ]

with C the longest cached length and W the longest suffix; position ids come from the mask's cumulative
sum, so row i's new tokens sit at positions L_i .. L_i + N_i - 1, where a full re-prefill puts them.
Padding in the middle of a row is a plain attention-mask zero to the model's own attention code; the
cache is transformers' ``DynamicCache`` (``hf_compat.cache_layers`` / ``make_cache``), nothing here
computes attention. Models whose cache cannot be cut into rows (sliding windows, linear attention) run
without carry-over, counted in ``unsupported``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.hf_compat import cache_layers, make_cache


@dataclass
class _Entry:
    tokens: list[int]  # the tokens whose keys / values are cached, no padding
    layers: list[tuple[Tensor, Tensor]]  # (keys, values) [1, H, L, D] per layer
    version: int  # the policy_version of the weights that computed them


class TurnCache:
    """Each running episode's KV cache between turns (module docstring), keyed by the caller's episode key.

    ``stats``: ``hits`` (rows that reused an entry), ``rebuilt`` (an entry was there but the prompt did not
    extend it, or the weights changed), ``reused_tokens`` (prompt tokens not prefilled again),
    ``prefill_tokens`` (prompt tokens prefilled), ``unsupported`` (rows whose cache could not be kept).
    """

    def __init__(self):
        self.entries: dict[Hashable, _Entry] = {}
        self.stats = dict.fromkeys(("hits", "rebuilt", "reused_tokens", "prefill_tokens", "unsupported"), 0)

    def __len__(self) -> int:
        return len(self.entries)

    def drop(self, key: Hashable) -> None:
        """Forget an episode's cache (it ended, or its next prompt will not extend it)."""
        self.entries.pop(key, None)

    def keep_only(self, keys) -> None:
        """Forget every episode's cache but these (the ones still running)."""
        for key in [k for k in self.entries if k not in keys]:
            del self.entries[key]

    def split(
        self, keys: Sequence[Hashable], prompts: Sequence[list[int]], version: int
    ) -> tuple[list[_Entry | None], list[list[int]]]:
        """The reusable entry (or None) and the tokens left to prefill, per prompt. Entries are taken out:
        :meth:`keep` stores the row again after the turn."""
        entries, suffixes = [], []
        for key, prompt in zip(keys, prompts):
            e = self.entries.pop(key, None)
            n = len(e.tokens) if e is not None else 0
            # at least one new token: its logits are the next token's distribution
            if e is not None and (e.version != version or n >= len(prompt) or prompt[:n] != e.tokens):
                self.stats["rebuilt"] += 1
                e, n = None, 0
            self.stats["hits"] += e is not None
            self.stats["reused_tokens"] += n
            self.stats["prefill_tokens"] += len(prompt) - n
            entries.append(e)
            suffixes.append(list(prompt[n:]))
        return entries, suffixes

    @staticmethod
    def past(entries: list[_Entry | None], device) -> tuple[object | None, Tensor]:
        """A ``DynamicCache`` of the rows' cached columns, right-aligned to the longest, and its attention
        mask [B, C]; (None, an empty [B, 0] mask) when no row has an entry."""
        C = max((len(e.tokens) for e in entries if e is not None), default=0)
        mask_BC = torch.zeros((len(entries), C), dtype=torch.long, device=device)
        if C == 0:
            return None, mask_BC
        template = next(e for e in entries if e is not None).layers
        layers = []
        for layer, (k0, v0) in enumerate(template):
            k_BHCD = k0.new_zeros((len(entries), k0.shape[1], C, k0.shape[3]))
            v_BHCD = v0.new_zeros((len(entries), v0.shape[1], C, v0.shape[3]))
            for b, e in enumerate(entries):
                if e is not None:
                    L = len(e.tokens)
                    k_BHCD[b, :, C - L :] = e.layers[layer][0][0]
                    v_BHCD[b, :, C - L :] = e.layers[layer][1][0]
            layers.append((k_BHCD, v_BHCD))
        for b, e in enumerate(entries):
            if e is not None:
                mask_BC[b, C - len(e.tokens) :] = 1
        return make_cache(layers), mask_BC

    def keep(self, key: Hashable, tokens: list[int], cache, row: int, mask_L: Tensor, version: int) -> None:
        """Store row ``row`` of a batch cache: its columns where ``mask_L`` (the row's attention mask over
        the cache's columns) is 1, which must be exactly ``tokens``."""
        layers = cache_layers(cache)
        cols = mask_L.nonzero().squeeze(1)
        if layers is None or len(cols) != len(tokens) or layers[0][0].shape[2] != mask_L.shape[0]:
            self.stats["unsupported"] += 1
            return
        kept = [
            (k[row : row + 1, :, cols], v[row : row + 1, :, cols]) for k, v in layers
        ]  # copies (indexing)
        self.entries[key] = _Entry(list(tokens), kept, version)
