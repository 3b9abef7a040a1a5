"""Sampler/trainer mismatch: the metrics by hand, and end to end with a bfloat16 sampler while training in
fp32 (nonzero mismatch, bounded importance weights) against the same precision (exactly zero)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.engine.run import read_metrics
from posttrain.losses import mismatch_stats
from posttrain.train import train
from tests.test_online import _reward_module_importable, config, task  # noqa: F401, F811  (fixtures)


def test_mismatch_stats_by_hand():
    trainer = torch.log(torch.tensor([[1.0, 3.0, 0.25], [1.0, 1.0, 9.0]]))
    sampler = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # ratios 1, 3, 0.25, 1, 1 (9 is padding)
    m = mismatch_stats(trainer, sampler, mask, bound=2.0)
    k3 = [0.0, 3 - 1 - math.log(3), 0.25 - 1 - math.log(0.25), 0.0, 0.0]
    assert m["mismatch/kl"] == pytest.approx(sum(k3) / 5, rel=1e-6)
    assert m["mismatch/logp_diff_max"] == pytest.approx(math.log(4), rel=1e-6)
    assert m["mismatch/ratio_min"] == pytest.approx(0.25) and m["mismatch/ratio_max"] == pytest.approx(3.0)
    assert m["mismatch/ratio_p50"] == pytest.approx(1.0)
    assert m["mismatch/share_past_bound"] == pytest.approx(2 / 5)  # 3 > 2 and 0.25 < 1/2
    same = mismatch_stats(trainer, trainer, mask)
    assert all(v == 0.0 for k, v in same.items() if "ratio" not in k)
    assert same["mismatch/ratio_p05"] == same["mismatch/ratio_max"] == 1.0
    empty = mismatch_stats(trainer, sampler, torch.zeros_like(mask))
    assert set(empty.values()) == {0.0}


def test_bfloat16_sampler_is_measured_and_corrected(task, tmp_path):  # noqa: F811
    cfg = config(
        task, tmp_path / "bf16", max_steps=3,
        rollout={"dtype": "bfloat16", "is_correction": "token_truncate", "is_clip_max": 1.001},
    )  # fmt: skip
    rows = read_metrics(train(cfg).run_dir)
    for m in rows:
        assert m["mismatch/kl"] > 0 and m["mismatch/logp_diff_max"] > 0
        assert m["mismatch/ratio_max"] > 1 > m["mismatch/ratio_min"]
        # bf16 moves the tiny model's token ratios by ~0.5%: past the bound, and the correction caps them
        assert m["mismatch/ratio_max"] > 1.001 and m["mismatch/is_weight_max"] == pytest.approx(1.001)
        assert m["mismatch/share_past_bound"] > 0
        assert math.isfinite(m["loss"])


def test_same_precision_sampler_has_exactly_zero_mismatch(task, tmp_path):  # noqa: F811
    rows = read_metrics(train(config(task, tmp_path / "fp32", max_steps=2)).run_dir)
    for m in rows:
        assert m["mismatch/kl"] == 0.0 and m["mismatch/logp_diff_max"] == 0.0
        assert m["mismatch/share_past_bound"] == 0.0
        assert m["mismatch/ratio_min"] == m["mismatch/ratio_max"] == 1.0
