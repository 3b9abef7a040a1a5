"""The golden loss curves (tests/golden_runs.py): SFT, DPO and GRPO on the tiny model, 20 steps at a fixed
seed, step by step within 1e-4 of the stored curves. If this fails after a change that is meant to move
them, regenerate with `python tests/golden_runs.py` and review the diff; otherwise something changed the
maths, the loop, the data order or the optimiser."""

import pytest
from golden_runs import KEYS, STAGES, load, run


@pytest.mark.parametrize("stage", STAGES)
def test_the_curve_is_the_golden_one(stage, tmp_path):
    want, got = load(stage), run(stage, tmp_path)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for key in KEYS[stage]:
        mine, golden = [m[key] for m in got], [m[key] for m in want]
        assert mine == pytest.approx(golden, rel=1e-4, abs=1e-6), f"{stage} {key} moved"
