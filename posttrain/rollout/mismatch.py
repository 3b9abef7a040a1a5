"""The sampler/trainer mismatch of a rollout: measured every step, corrected on request.

The engine's log-probs (`Completion.logprobs`) are the sampler's numbers; `old_logps` are the trainer's
(the same tensor for the HF engine in the training precision: an exact engine). Where they differ (vLLM,
or `rollout.dtype: bfloat16` while training in fp32) the rollout carries `sampler_logps` (the off-policy
mask's behaviour policy) and, with `rollout.is_correction`, the importance weights `is_weights` [N, C]
the policy loss multiplies each token by (`losses.importance_weights`).
"""

from __future__ import annotations

from posttrain.losses import importance_weights, mismatch_stats


def annotate_mismatch(ro, buffer) -> dict[str, float]:
    """Add `sampler_logps` (and `is_weights`) to a buffer whose `old_logps` are set; the mismatch metrics
    (`losses.mismatch_stats`, all 0 for an exact engine, plus the weights' mean and max when correcting)."""
    mask = buffer.completion_mask()
    sampler = buffer.per_token([c.logprobs for c in buffer.completions])
    old = buffer.token["old_logps"]
    buffer.token["sampler_logps"] = sampler
    metrics = mismatch_stats(old, sampler, mask, bound=ro.is_clip_max)
    if ro.is_correction != "none":
        w = importance_weights(
            old, sampler, mask, mode=ro.is_correction, clip_min=ro.is_clip_min, clip_max=ro.is_clip_max
        )
        w = w.expand_as(old).contiguous()
        buffer.token["is_weights"] = w
        valid = w[mask.bool()]
        metrics["mismatch/is_weight_mean"] = float(valid.mean()) if valid.numel() else 1.0
        metrics["mismatch/is_weight_max"] = float(valid.max()) if valid.numel() else 1.0
    return metrics
