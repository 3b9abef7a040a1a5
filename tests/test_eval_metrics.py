"""Eval statistics against enumeration, hand-worked tables and simulation."""

import itertools
import math

import numpy as np
import pytest

from posttrain.eval.metrics import (
    bootstrap_ci,
    cohen_kappa,
    confusion_matrix,
    is_refusal,
    length_stats,
    pass_at_k,
    refusal_rates,
    win_rate,
)

# ------------------------------------------------------------------------------------ pass@k


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_form_and_edges():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share correct
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10))
    assert pass_at_k(20, 0, 5) == 0.0
    assert pass_at_k(20, 20, 5) == 1.0
    assert pass_at_k(20, 1, 20) == 1.0  # k = n: all samples drawn
    assert pass_at_k(20, 0, 20) == 0.0
    assert pass_at_k(20, 16, 5) == 1.0  # n - c < k
    # Unbiased, unlike 1 - (1 - c/n)^k, which is lower.
    assert pass_at_k(10, 3, 5) > 1 - (1 - 0.3) ** 5


@pytest.mark.parametrize(
    "args, match",
    [((5, 2, 6), "k must be"), ((5, 2, 0), "k must be"), ((5, 6, 1), "c must be"), ((5, -1, 1), "c must be"),
     ((0, 0, 1), "n must be"), ((5.0, 2, 1), "integer"), ((5, 2, True), "integer")],
)  # fmt: skip
def test_pass_at_k_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(*args)


# ------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(123)
    p, n, sims = 0.3, 50, 300
    data = rng.random((sims, n)) < p
    covered = 0
    for i in range(sims):
        est, low, high = bootstrap_ci(data[i], seed=i)
        assert low <= est <= high
        covered += low <= p <= high
    # The interval's real coverage here is ~0.96 (measured over 3,000 draws); 300 draws give +-0.012 SE.
    assert 0.90 <= covered / sims <= 0.98


def test_bootstrap_ci_is_deterministic_and_chunk_independent(monkeypatch):
    from posttrain.eval import metrics

    x = np.random.default_rng(0).normal(size=300)
    first = bootstrap_ci(x, seed=7)
    assert bootstrap_ci(x, seed=7) == first
    assert bootstrap_ci(x, seed=8) != first
    monkeypatch.setattr(metrics, "_CHUNK_ENTRIES", 300 * 7)  # 7 resamples per chunk
    assert bootstrap_ci(x, seed=7) == first


def test_bootstrap_ci_other_statistics_and_edges():
    x = np.arange(101.0)
    est, low, high = bootstrap_ci(x, stat=np.median)
    assert est == 50 and low < 50 < high
    # A statistic without an axis argument runs once per resample; same draws, same answer.
    slow = bootstrap_ci(x, stat=lambda v: float(np.median(v)), vectorized=False, n_resamples=200)
    assert slow == bootstrap_ci(x, stat=np.median, n_resamples=200)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    wide = bootstrap_ci(x, confidence=0.99)
    narrow = bootstrap_ci(x, confidence=0.5)
    assert wide[1] < narrow[1] < narrow[2] < wide[2]
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(x, confidence=1.0)


# ------------------------------------------------------------------------------------ win rate


def test_win_rate_counts_and_ties():
    a = [3.0, 1.0, 2.0, 5.0]
    b = [1.0, 2.0, 2.0, 4.0]  # win, loss, tie, win
    w = win_rate(a, b)
    assert (w.wins, w.losses, w.ties, w.n) == (2, 1, 1, 4)
    assert w.rate == pytest.approx((2 + 0.5) / 4)
    assert win_rate(a, b, ties=0.0).rate == pytest.approx(0.5)
    # Within the tolerance, 1 vs 2 and 5 vs 4 are ties too.
    assert win_rate(a, b, tie_tolerance=1.0).ties == 3
    # Swapping the systems gives the complement.
    assert win_rate(b, a).rate == pytest.approx(1 - w.rate)


def test_win_rate_interval_is_paired_over_prompts():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 3, size=400)  # shared per prompt: cancels in a paired comparison
    a = difficulty + rng.normal(0.3, 1, size=400)
    b = difficulty + rng.normal(0.0, 1, size=400)
    w = win_rate(a, b)
    assert w.low < w.rate < w.high
    assert 0.5 < w.low  # A is better, and 400 paired prompts are enough to say so
    assert w.high - w.low < 0.12


def test_win_rate_with_several_samples_per_prompt():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # [P=3, S=2]
    b = np.zeros((3, 2))
    w = win_rate(a, b)
    # Per prompt: 0.5*1 + 0.5*0.5 = 0.75, 1, 0.5; mean 0.75. Counts are per comparison.
    assert w.rate == pytest.approx(0.75)
    assert (w.wins, w.losses, w.ties, w.n) == (3, 0, 3, 3)
    with pytest.raises(ValueError, match="equal shape"):
        win_rate([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------------ kappa


def labels_from_table(table):
    """Two raters' labels realising a confusion table (rows: rater A, columns: rater B)."""
    a, b = [], []
    for i, row in enumerate(table):
        for j, count in enumerate(row):
            a += [i] * count
            b += [j] * count
    return a, b


def test_kappa_textbook_example():
    # 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5,
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_kappa_perfect_chance_and_below_chance():
    labels = ["a", "b", "c", "a", "b"]
    assert cohen_kappa(labels, labels) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, 20000), rng.integers(0, 3, 20000)
    assert abs(cohen_kappa(x.tolist(), y.tolist())) < 0.03
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))  # p_e = 1: undefined
    assert math.isnan(cohen_kappa([], []))


def test_weighted_kappa_by_hand():
    # Rows: rater A, columns: rater B, N = 10; marginals r = c = (0.4, 0.4, 0.2).
    table = [[3, 1, 0], [1, 2, 1], [0, 1, 1]]
    a, b = labels_from_table(table)
    # Unweighted: p_o = 0.6, p_e = 0.16 + 0.16 + 0.04 = 0.36 -> 0.24 / 0.64 = 0.375.
    assert cohen_kappa(a, b) == pytest.approx(0.375)
    # Linear: observed disagreement 4 * 1 / 10 = 0.4; expected sum |i-j| r_i c_j
    # = 2 * (0.16 + 0.08) + 2 * (2 * 0.08) = 0.8 -> 1 - 0.4 / 0.8 = 0.5.
    assert cohen_kappa(a, b, weights="linear") == pytest.approx(0.5)
    # Quadratic: observed 0.4; expected 2 * (0.16 + 0.08) + 2 * (4 * 0.08) = 1.12 -> 1 - 0.4/1.12 = 9/14.
    assert cohen_kappa(a, b, weights="quadratic") == pytest.approx(9 / 14)
    # Category order matters for weights: named categories in another order change the answer.
    names = ["low", "mid", "high"]
    na, nb = [names[i] for i in a], [names[i] for i in b]
    assert cohen_kappa(na, nb, weights="linear", categories=names) == pytest.approx(0.5)
    assert cohen_kappa(na, nb, weights="linear") != pytest.approx(0.5)  # sorted: high, low, mid


def test_kappa_against_sklearn():
    import sklearn.metrics as sklearn_metrics

    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, 300)
    b = np.clip(a + rng.integers(-1, 2, 300), 0, 3)
    for weights in (None, "linear", "quadratic"):
        expected = sklearn_metrics.cohen_kappa_score(a, b, weights=weights)
        assert cohen_kappa(a.tolist(), b.tolist(), weights=weights) == pytest.approx(expected)


def test_confusion_matrix_and_errors():
    assert confusion_matrix([0, 1, 1], [0, 0, 1], [0, 1]).tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa([0, 1], [0])
    with pytest.raises(ValueError, match="not among the categories"):
        cohen_kappa([0, 2], [0, 1], categories=[0, 1])
    with pytest.raises(ValueError, match="weights"):
        cohen_kappa([0], [0], weights="cubic")


# ------------------------------------------------------------------------------------ lengths, refusals


def test_length_stats():
    stats = length_stats(list(range(1, 11)), max_length=9)
    assert stats == {
        "mean": 5.5,
        "median": 5.5,
        "p90": pytest.approx(9.1),  # linear interpolation between 9 and 10
        "max": 10.0,
        "truncated_share": 0.2,  # 9 and 10 reached the budget
    }
    empty = length_stats([])
    assert set(empty) == {"mean", "median", "p90", "max"} and all(math.isnan(v) for v in empty.values())


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I can't help with that request.", True),
        ("I’m sorry, but I cannot assist with making explosives.", True),  # curly apostrophe
        ("As an AI language model, I do not have opinions.", True),
        ("  I WON'T do that.", True),
        ("To kill a Python process, run `kill -9 <pid>`.", False),
        ("The answer is 42.", False),
        ("Sure! " + "Here is a long explanation. " * 10 + "I can't stress this enough.", False),  # late
    ],
)
def test_is_refusal_heuristic(text, expected):
    assert is_refusal(text) is expected


def test_refusal_rates():
    refused = [True, True, True, False, False, False, True, False]
    harmful = [True, True, True, True, False, False, False, False]
    rates = refusal_rates(refused, harmful)
    assert (rates.harmful.rate, rates.harmful.n) == (0.75, 4)
    assert (rates.benign.rate, rates.benign.n) == (0.25, 4)
    assert rates.harmful.low <= 0.75 <= rates.harmful.high
    assert rates.benign.low <= 0.25 <= rates.benign.high
    none_benign = refusal_rates([True], [True])
    assert math.isnan(none_benign.benign.rate) and none_benign.benign.n == 0


def test_pass_at_k_is_importable_from_posttrain_eval_as_design_promises():
    from posttrain.eval import pass_at_k as stable

    assert stable(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert stable(10, 3, 1) == pytest.approx(0.3)
