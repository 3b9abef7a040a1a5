"""The DPO family of preference losses: `preference_loss(kind, ...)`, one small function per kind (the reward
model's Bradley–Terry loss and KTO, the other sequence-level losses, are in `losses/sequence.py`).

Every function takes per-example tensors and returns a per-example loss of shape [B]; the caller takes the
mean, so that gradient accumulation weights examples, not micro-batches (AOT is the one exception: it sorts
across the batch, see `_aot`). `*_logps` are log-probabilities SUMMED over each completion's tokens. Kinds
that work on per-token averages (SimPO, ORPO, length-normalised DPO/IPO) take the completion lengths as
`chosen_lengths` / `rejected_lengths` and divide by them here, in one place (`_pair`).

Notation in the docstrings: π_c, π_r are the policy's summed log-probs of the chosen / rejected completion,
ref_c, ref_r the reference model's; Δ_c = π_c − ref_c and Δ_r = π_r − ref_r (the implicit rewards divided
by β); h = Δ_c − Δ_r, the log-ratio difference; σ is the logistic sigmoid; ε is `label_smoothing`.

Where the maths is the same, the numbers are TRL 1.16's (tests/test_losses.py calls TRL's own code on the
same tensors). Departures from TRL are said in the docstring of the kind concerned.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.errors import unknown
from posttrain.losses.sequence import check_same_shape

__all__ = ["PREFERENCE_KINDS", "REFERENCE_FREE_KINDS", "preference_loss", "preference_rewards"]

Lengths = Tensor | Sequence[int]


# ---------------------------------------------------------------------------------------------------------
# Preference family (DPO and friends): one entry point, one small function per kind
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    """What a kind computes its loss from; built once per call by `_pair`.

    chosen_B / rejected_B are Δ_c / Δ_r (reference-free kinds: π_c / π_r), already divided by the
    completion lengths when the kind uses lengths. h_B = chosen_B − rejected_B. The raw summed log-probs are
    kept for AOT, which sorts policy and reference differences separately.
    """

    chosen_B: Tensor
    rejected_B: Tensor
    h_B: Tensor
    policy_chosen_B: Tensor
    policy_rejected_B: Tensor
    ref_chosen_B: Tensor | None
    ref_rejected_B: Tensor | None


@dataclass(frozen=True)
class _Kind:
    fn: Callable[..., Tensor]
    needs_ref: bool
    lengths: str  # "none" | "optional" | "required"
    options: dict[str, Any]  # the keyword-only arguments of fn, with their defaults


_KINDS: dict[str, _Kind] = {}
# Names other libraries or papers use for a kind that is here under another name.
_RENAMED = {
    "dpo": "sigmoid (DPO)",
    "cdpo": "sigmoid with label_smoothing > 0 (conservative DPO)",
    "rdpo": "robust",
    "aot_pair": "aot_unpaired (older TRL releases called it 'aot_pair')",
    "kto": "kto_loss, a separate function (KTO's data is unpaired)",
    "kto_pair": "kto_loss (TRL removed its paired variant)",
}


def _kind(name: str, *, needs_ref: bool = True, lengths: str = "none"):
    """Register `fn(pair, beta, *, options...)` as preference kind `name`."""

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = inspect.signature(fn).parameters.values()
        options = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        _KINDS[name] = _Kind(fn, needs_ref, lengths, options)
        return fn

    return register


def preference_loss(
    kind: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    **kind_options,
) -> Tensor:
    """Per-pair loss of a preference-optimisation method (DPO and its family).

    Args:
        kind: one of `PREFERENCE_KINDS`; each kind's docstring (`_<kind>` in this module) gives its formula
            and paper. Reference-free kinds (`REFERENCE_FREE_KINDS`: simpo, orpo) must not be given
            reference log-probs; all other kinds need them.
        policy_chosen_logps, policy_rejected_logps: [B] summed log-probs of each completion under the policy.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the frozen reference model.
        beta: β, the inverse temperature / regularisation strength (the meaning per kind is in its docstring).
            The default 0.1 is TRL's for every method; SimPO's paper uses β of 2.0–2.5.
        kind_options: the kind's own options (label_smoothing, gamma, tau, delta) and, for the kinds that
            use them, chosen_lengths / rejected_lengths ([B] completion token counts, all > 0). A name the
            kind does not take is an error.

    Returns:
        loss_B: [B] (take the mean). Use `preference_rewards` for the logged rewards / margins / accuracy.

    Raises:
        ValueError: unknown kind or option, missing or superfluous reference log-probs, mismatched shapes,
            zero or negative lengths, an out-of-range option.
    """
    spec = _KINDS.get(kind)
    if spec is None:
        raise ValueError(unknown("preference loss kind", kind, _KINDS, hint=_RENAMED.get(kind)))
    length_options = {"chosen_lengths", "rejected_lengths"} if spec.lengths != "none" else set()
    for name in kind_options:
        if name not in spec.options and name not in length_options:
            allowed = sorted(set(spec.options) | length_options)
            raise ValueError(unknown(f"option for kind {kind!r}", name, allowed))
    chosen_lengths = kind_options.pop("chosen_lengths", None)
    rejected_lengths = kind_options.pop("rejected_lengths", None)

    has_ref = (ref_chosen_logps is not None, ref_rejected_logps is not None)
    if spec.needs_ref and not all(has_ref):
        raise ValueError(
            f"preference loss {kind!r} needs ref_chosen_logps and ref_rejected_logps (reference model "
            f"log-probs); only {sorted(REFERENCE_FREE_KINDS)} are reference-free"
        )
    if not spec.needs_ref and any(has_ref):
        # Ignoring them would hide a config mistake (e.g. 'simpo' chosen where 'sigmoid' was meant).
        raise ValueError(
            f"preference loss {kind!r} is reference-free: do not pass reference log-probs (they would be ignored)"
        )
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(
            f"preference loss {kind!r}: give both chosen_lengths and rejected_lengths, or neither"
        )
    if spec.lengths == "required" and chosen_lengths is None:
        raise ValueError(
            f"preference loss {kind!r} works on per-token average log-probs: pass chosen_lengths and "
            "rejected_lengths (completion token counts, [B])"
        )

    pair = _pair(
        kind,
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
    )
    return spec.fn(pair, beta, **kind_options)


def preference_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Implicit rewards β·(π − ref) of chosen and rejected completions, detached, for metrics.

    Matches TRL's `rewards/chosen`, `rewards/rejected`; from them `rewards/margins` = mean(chosen − rejected)
    and `rewards/accuracies` = mean(chosen > rejected). Without reference log-probs (reference-free kinds)
    the reward is β·π, as TRL's CPO/SimPO and ORPO trainers log it (they pass average log-probs).

    Returns:
        (chosen_rewards_B, rejected_rewards_B): [B] each, no gradient.
    """
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
    chosen_B, rejected_B = policy_chosen_logps.detach(), policy_rejected_logps.detach()
    if ref_chosen_logps is not None:
        chosen_B = chosen_B - ref_chosen_logps.detach()
        rejected_B = rejected_B - ref_rejected_logps.detach()
    return beta * chosen_B, beta * rejected_B


def _pair(
    kind: str,
    policy_chosen_B: Tensor,
    policy_rejected_B: Tensor,
    ref_chosen_B: Tensor | None,
    ref_rejected_B: Tensor | None,
    chosen_lengths: Lengths | None,
    rejected_lengths: Lengths | None,
) -> _Pair:
    """Check shapes and compute Δ_c, Δ_r and h — the one place the log-ratio difference is written."""
    tensors = {"policy_chosen_logps": policy_chosen_B, "policy_rejected_logps": policy_rejected_B}
    if ref_chosen_B is not None:
        tensors |= {"ref_chosen_logps": ref_chosen_B, "ref_rejected_logps": ref_rejected_B}
    check_same_shape(**tensors)

    chosen_B, rejected_B = policy_chosen_B, policy_rejected_B
    if ref_chosen_B is not None:
        chosen_B, rejected_B = chosen_B - ref_chosen_B, rejected_B - ref_rejected_B
    if chosen_lengths is not None:
        chosen_B = chosen_B / _lengths(kind, "chosen_lengths", chosen_lengths, policy_chosen_B)
        rejected_B = rejected_B / _lengths(kind, "rejected_lengths", rejected_lengths, policy_chosen_B)
    return _Pair(
        chosen_B,
        rejected_B,
        chosen_B - rejected_B,
        policy_chosen_B,
        policy_rejected_B,
        ref_chosen_B,
        ref_rejected_B,
    )


def _lengths(kind: str, name: str, lengths: Lengths, like_B: Tensor) -> Tensor:
    """Completion lengths as a float tensor like `like_B`; a zero length is an error, not an inf/NaN loss."""
    lengths_B = torch.as_tensor(lengths, device=like_B.device).to(like_B.dtype)
    if lengths_B.shape != like_B.shape:
        raise ValueError(f"{name} has shape {tuple(lengths_B.shape)}, the log-probs {tuple(like_B.shape)}")
    bad = (lengths_B <= 0).nonzero().flatten().tolist()  # one host sync; cheap next to a forward pass
    if bad:
        raise ValueError(
            f"preference loss {kind!r}: {name} is <= 0 at batch positions {bad[:10]}; a completion with no "
            "tokens cannot be length-normalised (drop empty completions when building the dataset)"
        )
    return lengths_B


def _check_smoothing(kind: str, eps: float, *, low_open: bool = False) -> None:
    """ε is the weight put on "the rejected answer is better": at 1/2 or more the labels flip."""
    ok = (0.0 < eps if low_open else 0.0 <= eps) and eps < 0.5
    if not ok:
        interval = "(0, 0.5)" if low_open else "[0, 0.5)"
        raise ValueError(f"preference loss {kind!r}: label_smoothing must lie in {interval}, got {eps}")


def _smoothed_logistic(x_B: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x): logistic loss with label smoothing ε (cDPO, AOT, SimPO)."""
    return -F.logsigmoid(x_B) * (1 - eps) - F.logsigmoid(-x_B) * eps


# --- reference-based kinds --------------------------------------------------------------------------------


@_kind("sigmoid", lengths="optional")
def _sigmoid(p: _Pair, beta: float, *, label_smoothing: float = 0.0) -> Tensor:
    """DPO: −log σ(β·h); with ε = label_smoothing > 0, conservative DPO: −(1−ε)·log σ(β·h) − ε·log σ(−β·h).

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    arXiv:2305.18290 (Eq. 7). cDPO: Mitchell 2023, "A note on DPO with noisy preferences & relationship to
    IPO" (a note, no arXiv id). TRL 1.16's `sigmoid` has no label smoothing (ε = 0 here is identical to it);
    cDPO with ε > 0 is checked against TRL's CPO trainer, which keeps the smoothed form.
    With chosen_lengths / rejected_lengths, h uses per-token average log-ratios: see `sigmoid_norm`.
    """
    _check_smoothing("sigmoid", label_smoothing)
    return _smoothed_logistic(beta * p.h_B, label_smoothing)


# Length-normalised DPO, TRL's `sigmoid_norm`: −log σ(β·(Δ_c/|y_c| − Δ_r/|y_r|)). Tülu 3, Lambert et al. 2024,
# "Tülu 3: Pushing Frontiers in Open Language Model Post-Training", arXiv:2411.15124.
_kind("sigmoid_norm", lengths="required")(_sigmoid)


@_kind("ipo", lengths="optional")
def _ipo(p: _Pair, beta: float) -> Tensor:
    """IPO: (h − 1/(2β))², β being the paper's τ.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036 (Eq. 17). Without lengths this is the paper's formula on whole-sequence log-ratios.
    TRL 1.16 always averages each log-ratio over the completion's tokens, h = Δ_c/|y_c| − Δ_r/|y_r| (its
    comment: the squared loss otherwise scales with length, and the IPO authors confirmed their results use
    the averaged form); pass chosen_lengths / rejected_lengths to get TRL's convention. TRL clamps a zero
    length to 1; here it is an error.
    """
    return (p.h_B - 1 / (2 * beta)) ** 2


@_kind("hinge")
def _hinge(p: _Pair, beta: float) -> Tensor:
    """Hinge: max(0, 1 − β·h).

    RSO: Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization",
    arXiv:2309.06657, the reference-based form of SLiC (Zhao et al. 2023, "SLiC-HF: Sequence
    Likelihood Calibration with Human Feedback", arXiv:2305.10425). 1/β plays SLiC's margin δ.
    """
    return torch.relu(1 - beta * p.h_B)


@_kind("robust")
def _robust(p: _Pair, beta: float, *, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO: [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε), ε = the rate of flipped labels.

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    arXiv:2403.00409. An unbiased loss under label noise ε; ε = 0 is DPO. TRL only warns for
    ε outside [0, 0.5); here it is an error (at ε = 0.5 the loss divides by zero).
    """
    _check_smoothing("robust", label_smoothing)
    eps = label_smoothing
    clean_B = -(1 - eps) * F.logsigmoid(beta * p.h_B)
    flipped_B = -eps * F.logsigmoid(-beta * p.h_B)
    return (clean_B - flipped_B) / (1 - 2 * eps)


@_kind("exo_pair")
def _exo_pair(p: _Pair, beta: float, *, label_smoothing: float = 0.0) -> Tensor:
    """EXO (pairwise): KL(q ‖ p_ε) with q = (σ(β·h), σ(−β·h)) and target p_ε = (1−ε, ε):
    σ(β·h)·(log σ(β·h) − log(1−ε)) + σ(−β·h)·(log σ(−β·h) − log ε).

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", arXiv:2402.00856
    (Eq. 16, K = 2). ε must be set, > 0 (log ε appears), as in TRL; the paper recommends 1e-3. TRL accepts
    any ε > 0; here ε must also be < 0.5 (above, the target prefers the rejected answer).
    """
    if label_smoothing == 0:
        raise ValueError(
            "preference loss 'exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3)"
        )
    _check_smoothing("exo_pair", label_smoothing, low_open=True)
    x_B = beta * p.h_B
    chosen_B = torch.sigmoid(x_B) * (F.logsigmoid(x_B) - math.log1p(-label_smoothing))
    rejected_B = torch.sigmoid(-x_B) * (F.logsigmoid(-x_B) - math.log(label_smoothing))
    return chosen_B + rejected_B


@_kind("bco_pair")
def _bco_pair(p: _Pair, beta: float, *, delta: Tensor | float = 0.0) -> Tensor:
    """BCO (pairwise): −log σ(β·Δ_c − δ) − log σ(−(β·Δ_r − δ)).

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", arXiv:2404.04656.
    δ is the paper's reward shift, a running mean of the rewards that the caller keeps; TRL 1.16's
    `bco_pair` uses δ = 0, the default here.
    """
    return -F.logsigmoid(beta * p.chosen_B - delta) - F.logsigmoid(-(beta * p.rejected_B - delta))


@_kind("sppo_hard")
def _sppo_hard(p: _Pair, beta: float) -> Tensor:
    """SPPO with hard labels: (Δ_c − 1/(2β))² + (Δ_r + 1/(2β))².

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", arXiv:2405.00675
    (Eq. 4.7 with η = 1/β and the win probability P set to 1 for the chosen, 0 for the rejected; the paper
    estimates a soft P with a preference model, which this kind does not do).
    """
    return (p.chosen_B - 1 / (2 * beta)) ** 2 + (p.rejected_B + 1 / (2 * beta)) ** 2


@_kind("nca_pair")
def _nca_pair(p: _Pair, beta: float) -> Tensor:
    """NCA (pairwise): −log σ(β·Δ_c) − ½·log σ(−β·Δ_c) − ½·log σ(−β·Δ_r).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv:2402.05369 (the pairwise case: K = 2, binary rewards). Unlike DPO it pushes Δ_c up in absolute terms,
    so the chosen likelihood does not fall with the rejected one.
    """
    chosen_B, rejected_B = beta * p.chosen_B, beta * p.rejected_B
    return -F.logsigmoid(chosen_B) - 0.5 * F.logsigmoid(-chosen_B) - 0.5 * F.logsigmoid(-rejected_B)


@_kind("apo_zero")
def _apo_zero(p: _Pair, beta: float) -> Tensor:
    """APO-zero: (1 − σ(β·Δ_c)) + σ(β·Δ_r): raise the chosen, lower the rejected likelihood.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions: Addressing
    Underspecification in Alignment", arXiv:2408.06266 (Eq. 7). For chosen answers better than the model's.
    """
    return (1 - torch.sigmoid(beta * p.chosen_B)) + torch.sigmoid(beta * p.rejected_B)


@_kind("apo_down")
def _apo_down(p: _Pair, beta: float) -> Tensor:
    """APO-down: σ(β·Δ_c) + (1 − σ(β·h)): lower both likelihoods, the rejected more.

    D'Oosterlinck et al. 2024, arXiv:2408.06266 (Eq. 8). For chosen answers worse than the model's own.
    """
    return torch.sigmoid(beta * p.chosen_B) + (1 - torch.sigmoid(beta * p.h_B))


@_kind("aot")
def _aot(p: _Pair, beta: float, *, label_smoothing: float = 0.0) -> Tensor:
    """AOT (paired): u = sort_B(π_c − π_r) − sort_B(ref_c − ref_r); −(1−ε)·log σ(β·u) − ε·log σ(−β·u).

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882 (with the logistic loss). The sorts make the constraint first-order stochastic dominance
    of the policy's margins over the reference's, across the batch. Batch-level: element i of the result is
    the i-th order statistic, not example i; only the mean means something, and splitting a batch into
    micro-batches changes the loss (the batch is the sample of the distributions being compared).
    """
    _check_smoothing("aot", label_smoothing)
    policy_sorted_B, _ = torch.sort(p.policy_chosen_B - p.policy_rejected_B, dim=0)
    ref_sorted_B, _ = torch.sort(p.ref_chosen_B - p.ref_rejected_B, dim=0)
    return _smoothed_logistic(beta * (policy_sorted_B - ref_sorted_B), label_smoothing)


@_kind("aot_unpaired")
def _aot_unpaired(p: _Pair, beta: float, *, label_smoothing: float = 0.0) -> Tensor:
    """AOT (unpaired): u = sort_B(Δ_c) − sort_B(Δ_r); −(1−ε)·log σ(β·u) − ε·log σ(−β·u).

    Melnyk et al. 2024, arXiv:2406.05882: dominance of the chosen log-ratio distribution over the rejected
    one, for data whose chosen and rejected answers are not paired. Batch-level, as `aot`. TRL 1.16 calls
    this `aot_unpaired`; older TRL releases called the same formula `aot_pair`.
    """
    _check_smoothing("aot_unpaired", label_smoothing)
    chosen_sorted_B, _ = torch.sort(p.chosen_B, dim=0)
    rejected_sorted_B, _ = torch.sort(p.rejected_B, dim=0)
    return _smoothed_logistic(beta * (chosen_sorted_B - rejected_sorted_B), label_smoothing)


@_kind("discopop")
def _discopop(p: _Pair, beta: float, *, tau: float = 0.05) -> Tensor:
    """DiscoPOP (log-ratio modulated loss): with x = β·h and m = σ(x/τ),
    (1 − m)·(−log σ(x)) + m·exp(−x).

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language Models",
    arXiv:2406.08414 (Eq. 5); τ = 0.05 is the paper's (TRL's `discopop_tau`). m·exp(−x) is computed as
    exp(log σ(x/τ) − x): the same number, but finite where TRL's product is 0·∞ = NaN (x ≪ 0, e.g. β·h < −89
    in float32).
    """
    if tau <= 0:
        raise ValueError(f"preference loss 'discopop': tau must be > 0, got {tau}")
    x_B = beta * p.h_B
    m_B = torch.sigmoid(x_B / tau)
    return -F.logsigmoid(x_B) * (1 - m_B) + torch.exp(F.logsigmoid(x_B / tau) - x_B)


# --- reference-free kinds ---------------------------------------------------------------------------------


@_kind("simpo", needs_ref=False, lengths="required")
def _simpo(p: _Pair, beta: float, *, gamma: float = 0.5, label_smoothing: float = 0.0) -> Tensor:
    """SimPO: −log σ(β·(π_c/|y_c| − π_r/|y_r|) − γ), reference-free, on per-token average log-probs.

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734. γ is the target reward margin (TRL's `simpo_gamma`, default 0.5). β here
    defaults to 0.1 like every kind (TRL's CPOConfig default too), but the paper tunes β in [2.0, 2.5] with
    γ in [0.3, 1.6]: set both. label_smoothing ε > 0 gives the smoothed form of TRL's CPO trainer.
    """
    _check_smoothing("simpo", label_smoothing)
    return _smoothed_logistic(beta * p.h_B - gamma, label_smoothing)


# Largest average log-prob ORPO accepts: at 0 (probability 1) the odds are infinite and TRL's loss is
# inf/NaN; this happens in fp32 when every token of a completion has log-prob exactly 0.
_ORPO_MAX_AVG_LOGP = -1e-6


@_kind("orpo", needs_ref=False, lengths="required")
def _orpo(p: _Pair, beta: float) -> Tensor:
    """ORPO's odds-ratio term: −β·log σ(log odds(y_c) − log odds(y_l)), odds(y) = P/(1−P), P = exp(π/|y|).

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691 (Eqs. 4, 7); β is the paper's λ (TRL's `beta`, default 0.1). With a = π/|y|,
    log odds = a − log(1 − exp(a)). This is only L_OR: the full ORPO loss adds the SFT negative
    log-likelihood of the chosen completions, which the ORPO algorithm computes (per token, over the batch).
    Like TRL, the maths runs in at least float32. Departure: average log-probs are clamped at −1e-6, where
    TRL returns inf/NaN for a completion of probability 1 (the clamp only touches such completions).
    """
    dtype = torch.promote_types(p.chosen_B.dtype, torch.float32)
    chosen_B = p.chosen_B.to(dtype).clamp(max=_ORPO_MAX_AVG_LOGP)
    rejected_B = p.rejected_B.to(dtype).clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds_B = (chosen_B - rejected_B) - (_log1mexp(chosen_B) - _log1mexp(rejected_B))
    return -beta * F.logsigmoid(log_odds_B)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, switching formulas at −log 2 to avoid cancellation (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


PREFERENCE_KINDS: tuple[str, ...] = tuple(_KINDS)
REFERENCE_FREE_KINDS: frozenset[str] = frozenset(k for k, spec in _KINDS.items() if not spec.needs_ref)


def kind_options(kind: str) -> tuple[str, ...]:
    """The keyword options `preference_loss(kind, ...)` takes, with the lengths where the kind
    requires them (optional lengths change the maths, e.g. IPO, so they are never implied)."""
    spec = _kind_spec(kind)
    return tuple(spec.options) + (
        ("chosen_lengths", "rejected_lengths") if spec.lengths == "required" else ()
    )


def kind_option_defaults(kind: str) -> dict[str, Any]:
    """The kind's own options (label_smoothing, gamma, tau, delta, ...) and their defaults: each kind
    declares its options once, in its function's signature; the `dpo` config section is checked against it."""
    return dict(_kind_spec(kind).options)


def _kind_spec(kind: str) -> _Kind:
    if kind not in _KINDS:
        raise ValueError(unknown("preference loss kind", kind, PREFERENCE_KINDS, _RENAMED.get(kind)))
    return _KINDS[kind]
