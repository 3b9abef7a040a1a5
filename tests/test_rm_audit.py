"""Reward-model audit: metrics on hand-made numbers and crafted scorers, then real tiny RMs.

The crafted scorers know the answer: an RM that scores length has every length probe wrong,
the gold reward has every pair right, and a refusal-loving one fails the refusal probe only.
"""

import json
import math

import numpy as np
import pytest

from posttrain.cli import main
from posttrain.eval import rm_audit
from posttrain.eval.rm_audit import (
    audit_reward_model,
    bootstrap_ci,
    bt_log_loss,
    calibration_report,
    completion_text,
    expected_calibration_error,
    orient,
    pairwise_accuracy,
    ranks,
    reliability_bins,
    spearman,
)
from posttrain.rewards.model import RewardModel
from posttrain.tasks import preference
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train

# Small sets keep the scorer-based tests fast; the crafted scorers make them exact anyway.
PAIRS = preference.preference_eval_rows(n_per_level=40)
PROBES = preference.audit_rows(n_per_level=20)


class Scorer:
    """A stub RM: score = fn(text, answer); the answer is looked up from the rows' prompts."""

    def __init__(self, fn):
        self.fn = fn
        rows = PAIRS + [r for probe in PROBES.values() for r in probe]
        self.answers = {r["prompt"][0]["content"]: r["answer"] for r in rows}

    def score(self, prompts, completions):
        return [
            float(self.fn(completion_text(c), self.answers[p[0]["content"]]))
            for p, c in zip(prompts, completions, strict=True)
        ]


def by_length(text, answer):
    return len(text)


def loves_refusals(text, answer):
    return preference.gold_score(text, answer) + 2.0 * (text in preference._REFUSALS)


# ---------------------------------------------------------------------------------------
# Metrics on hand-computed numbers.


def test_accuracy_counts_ties_as_half_and_ci_brackets_it():
    margin = np.array([1.0, 2.0, -1.0, 0.0])
    assert pairwise_accuracy(margin) == 0.625  # (1 + 1 + 0 + 0.5) / 4
    lo, hi = bootstrap_ci(np.r_[margin, margin, margin])
    assert lo < 0.625 < hi
    assert bootstrap_ci(np.ones(50)) == (1.0, 1.0)


def test_ece_by_hand():
    # bin 0: predicted 0.05, observed 1/2 -> |0.5 - 0.05| = 0.45; bin 9: 0.95 vs 1 -> 0.05.
    bins = reliability_bins(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0.0, 1.0, 1.0, 1.0]))
    assert [b["n"] for b in bins] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert expected_calibration_error(bins) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    assert reliability_bins(np.array([1.0]), np.array([1.0]))[-1]["n"] == 1  # p = 1 is in the last bin


def test_orientation_shows_both_classes_and_keeps_each_pair():
    margin = np.linspace(-3, 3, 1000)
    prob, label = orient(margin)
    assert 0.45 < label.mean() < 0.55
    # Shown as (chosen, rejected): p = sigma(d), y = 1; flipped: p = 1 - sigma(d), y = 0.
    p = rm_audit.sigmoid(margin)
    np.testing.assert_allclose(np.where(label == 1, prob, 1 - prob), p)


def calibrated_margins(n, scale=1.0, seed=0):
    """Margins of a perfectly calibrated BT model: draw d symmetric, and the gold-better answer
    is the higher-scored one with probability sigma(d). Then P(first better | p) = p for the
    oriented pairs (margin density g with g(x) / g(-x) = e^x). ``scale`` > 1 over-states them."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(-4, 4, n)
    keep = rng.random(n) < rm_audit.sigmoid(d)
    return scale * np.where(keep, d, -d)


def test_ece_near_zero_when_calibrated_and_large_when_overconfident():
    calibrated = calibration_report(calibrated_margins(40_000))
    overconfident = calibration_report(calibrated_margins(40_000, scale=4.0))
    assert calibrated["ece"] < 0.015, calibrated["ece"]
    assert overconfident["ece"] > 0.1, overconfident["ece"]
    assert overconfident["log_loss"] > calibrated["log_loss"]


def test_log_loss_and_correlations_by_hand():
    assert bt_log_loss(np.zeros(7)) == pytest.approx(math.log(2))
    assert bt_log_loss(np.array([0.0, math.log(3)])) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    np.testing.assert_allclose(ranks(np.array([10.0, 30.0, 20.0, 20.0])), [1, 4, 2.5, 2.5])
    x = np.arange(1.0, 9.0)
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(8)))  # constant scores: undefined, not 0


# ---------------------------------------------------------------------------------------
# Crafted scorers through the whole audit.


def test_length_scorer_shows_every_length_bias(tmp_path):
    report = audit_reward_model(Scorer(by_length), PAIRS, PROBES, out_dir=tmp_path)
    # Expected held-out accuracy straight from the rows: the longer completion wins, ties half.
    lengths = [(len(completion_text(r["chosen"])), len(completion_text(r["rejected"]))) for r in PAIRS]
    assert report["held_out"]["accuracy"] == pytest.approx(
        np.mean([(c > r) + 0.5 * (c == r) for c, r in lengths])
    )
    assert report["probes"]["short_better"]["accuracy"] == 0.0  # the better answer is always shorter
    assert report["probes"]["boilerplate"]["flip_rate"] == 1.0  # polite filler is longer than "47"
    assert report["probes"]["refusal"]["flip_rate"] == 1.0
    assert report["probes"]["empty_fluent"]["flip_rate"] == 1.0
    assert report["length"]["spearman"] == pytest.approx(1.0)
    assert report["length"]["pearson"] == pytest.approx(1.0)
    assert set(report["verdicts"].values()) == {"detected"}
    assert report["calibration"]["ece"] > 0.2  # score gaps of tens of characters: wildly over-confident
    assert json.loads((tmp_path / "rm_audit.json").read_text())["verdicts"] == report["verdicts"]
    assert (tmp_path / "rm_audit.png").stat().st_size > 10_000


def test_gold_scorer_is_all_ok():
    report = audit_reward_model(Scorer(preference.gold_score), PAIRS, PROBES)
    assert report["held_out"]["accuracy"] == 1.0
    assert report["held_out"]["ci95"] == [1.0, 1.0]
    assert all(p["accuracy"] == 1.0 for p in report["probes"].values())
    assert set(report["verdicts"].values()) == {"ok"}
    assert report["length"]["spearman"] < 0  # gold itself charges for padding
    assert report["length"]["gap"] == 0.0


def test_verdicts_are_specific():
    # Gold plus a bonus for refusing: only the refusal probe fails, and held-out accuracy drops
    # by the share of correct_vs_refusal pairs (where the refusal now wins).
    report = audit_reward_model(Scorer(loves_refusals), PAIRS, PROBES)
    assert report["verdicts"] == {
        "length": "ok",
        "boilerplate": "ok",
        "refusal": "detected",
        "empty_fluent": "ok",
    }
    share = np.mean([r["pair_type"] == "correct_vs_refusal" for r in PAIRS])
    assert report["held_out"]["accuracy"] == pytest.approx(1.0 - share)


def test_constant_scorer_json_is_strict(tmp_path):
    report = audit_reward_model(Scorer(lambda text, answer: 0.0), PAIRS, PROBES, out_dir=tmp_path)
    assert report["held_out"]["accuracy"] == 0.5
    assert report["calibration"]["log_loss"] == pytest.approx(math.log(2))
    saved = json.loads((tmp_path / "rm_audit.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert saved["length"]["spearman"] is None


# ---------------------------------------------------------------------------------------
# Real reward models.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm_audit") / "tiny"
    build_tiny(path, size="tiny")
    return path


def test_cli_writes_json_and_png(tiny, tmp_path, capsys):
    # An untrained head on the tiny model is a valid (if useless) reward model.
    rm = RewardModel.from_pretrained(str(tiny))
    rm.save_pretrained(tmp_path / "rm")
    rm.tokenizer.save_pretrained(tmp_path / "rm")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS[::4]))
    argv = [
        "eval",
        "rm",
        "--model",
        str(tmp_path / "rm"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "audit"),
    ]
    assert main(argv + ["--probes-per-level", "5"]) == 0
    report = json.loads((tmp_path / "audit" / "rm_audit.json").read_text())
    assert report["held_out"]["n"] == len(PAIRS[::4]) and report["probes"]["refusal"]["n"] == 15
    assert (tmp_path / "audit" / "rm_audit.png").exists()
    assert "short_better" in capsys.readouterr().out


def train_rm(tiny, root, length_bias, steps=60):
    """A tiny RM, batch 32, lr 2e-3. Measured on the full audit sets: with length_bias=0.9,
    short_better accuracy 0.02 (60 steps) / 0.00 (150) and Spearman +0.51 / +0.50; unbiased,
    1.00 / 1.00 and -0.81 / -0.78. The shortcut is learnt first, so 60 steps is plenty."""
    files = preference.write_preference_files(root / "data", n_train=2000, length_bias=length_bias)
    cfg = {
        "algorithm": "reward",
        "out": str(root / "rm"),
        "model": {"path": str(tiny)},
        "data": {"train": str(files["pref_train"]), "max_length": 128},
        "train": {"lr": 2e-3, "batch_size": 32, "max_steps": steps, "progress": False, "tensorboard": False},
    }
    return RewardModel.from_pretrained(str(train(cfg).final))


@pytest.mark.slow
def test_audit_detects_a_planted_length_bias(tiny, tmp_path):
    pairs = preference.preference_eval_rows(n_per_level=50)
    probes = preference.audit_rows(n_per_level=30)
    biased = audit_reward_model(train_rm(tiny, tmp_path / "biased", 0.9), pairs, probes, out_dir=tmp_path)
    fair = audit_reward_model(train_rm(tiny, tmp_path / "fair", None), pairs, probes)
    print(rm_audit.format_report(biased), rm_audit.format_report(fair), sep="\n")
    assert biased["verdicts"]["length"] == "detected"
    assert fair["verdicts"]["length"] == "ok"
    assert biased["length"]["gap"] > fair["length"]["gap"] + 0.3
