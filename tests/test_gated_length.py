"""The success-gated length penalty: correct samples pay for length, wrong ones never do."""

from __future__ import annotations

import pytest

from posttrain.rewards import combine, exact_match, success_gated_length_penalty


def test_only_correct_samples_are_penalised_by_hand():
    fn = success_gated_length_penalty(exact_match, 10, coef=0.5)
    completions = ["4", "4", "5", "5"]
    lengths = [2, 14, 2, 14]  # tokens; 14 is past max_length and counts as 10
    scores = fn(["2+2="] * 4, completions, answer=["4"] * 4, completion_lengths=lengths)
    assert scores == pytest.approx([-0.5 * 2 / 10, -0.5, 0.0, 0.0])
    # without token counts it measures characters
    assert fn(["p"], ["4"], answer=["4"]) == pytest.approx([-0.5 * 1 / 10])


def test_through_combine_a_long_correct_answer_still_beats_a_short_wrong_one():
    reward = combine(
        ["exact_match", {"name": "success_gated_length_penalty", "gate": "exact_match", "max_length": 8}]
    )
    total = reward(["q", "q"], ["4", "5"], answer=["4", "4"], completion_lengths=[8, 1])
    assert total == pytest.approx([1.0 - 0.1, 0.0])
    with pytest.raises(ValueError):
        combine([{"name": "success_gated_length_penalty", "gate": "exact_match", "max_lenght": 8}])
    with pytest.raises(ValueError, match="max_length"):
        success_gated_length_penalty(exact_match, 0)
