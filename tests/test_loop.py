"""The one loop, on a toy regression objective: accumulation, schedule, non-finite guard, resume."""

import math
import os
import signal

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.engine.loop import LoopData, lr_lambda, make_accelerator, train_loop
from posttrain.engine.run import Run, read_metrics
from posttrain.errors import TrainingError

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 3.0, 0.5])


class Squares:
    """Sum of squared errors; weight = examples. `nan_at` makes chosen steps' losses NaN."""

    def __init__(self, nan_at=(), kill_at=None):
        self.nan_at, self.kill_at, self.calls = set(nan_at), kill_at, 0

    def weight(self, b):
        return len(b["x"])

    def loss(self, model, b):
        self.calls += 1
        loss = ((model(b["x"]).squeeze(-1) - b["y"]) ** 2).sum()
        if b["step"] in self.nan_at:
            loss = loss * float("nan")
        if self.kill_at is not None and b["step"] == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as if the scheduler preempted us mid-step
        return loss, {"abs_err": (model(b["x"]).squeeze(-1) - b["y"]).abs().sum()}


def data(counter):
    def plan(epoch):
        p = torch.randperm(64, generator=torch.Generator().manual_seed(epoch)).tolist()
        return [p[i : i + 16] for i in range(0, 64, 16)]

    def collate(ix):
        return {"x": X[ix], "y": Y[ix], "step": counter["step"]}

    return LoopData(plan=plan, collate=collate, tokens=lambda b: len(b["x"]), num_examples=64)


def model(dropout=0.1):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1))


def run_loop(tmp, objective=None, resume=False, dropout=0.1, **cfg):
    counter = {"step": 0}
    base = dict(lr=0.02, batch_size=16, max_steps=12, progress=False, tensorboard=False, warmup_steps=2)
    cfg = TrainConfig(**{**base, **cfg})
    objective = objective or Squares()
    run = Run(tmp)
    orig_log = run.log

    def log(step, metrics):  # keeps the toy's step counter in line with the loop's
        counter["step"] = step
        orig_log(step, metrics)

    run.log = log
    net = model(dropout)
    res = train_loop(
        cfg,
        accelerator=make_accelerator("fp32"),
        model=net,
        objective=objective,
        data=data(counter),
        run=run,
        resume=resume,
    )
    return res, net


def flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_gradient_accumulation_changes_nothing(tmp_path):
    # no dropout here: its masks are drawn per micro-batch, which is the one thing that may differ
    _, one = run_loop(tmp_path / "a", micro_batch_size=16, dropout=0.0)
    _, four = run_loop(tmp_path / "b", micro_batch_size=4, dropout=0.0)
    torch.testing.assert_close(flat(one), flat(four), rtol=1e-5, atol=1e-6)
    la = [m["loss"] for m in read_metrics(tmp_path / "a")]
    lb = [m["loss"] for m in read_metrics(tmp_path / "b")]
    assert len(la) == 12 and la == pytest.approx(lb, rel=1e-5)


def test_lr_schedule_by_hand():
    kw = dict(warmup=4, total=14, min_ratio=0.0)
    assert [lr_lambda(s, schedule="cosine", **kw) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_lambda(4, schedule="cosine", **kw) == 1.0
    assert lr_lambda(9, schedule="cosine", **kw) == pytest.approx(0.5)  # halfway through the decay
    assert lr_lambda(14, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_lambda(9, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_lambda(11, schedule="linear", **kw) == pytest.approx(0.3)
    assert lr_lambda(9, schedule="constant", **kw) == 1.0
    assert lr_lambda(14, schedule="cosine", warmup=4, total=14, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_lambda(6, schedule="cosine", warmup=0, total=8, min_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 6 / 8))
    )


def test_logged_lr_follows_schedule(tmp_path):
    run_loop(tmp_path, schedule="linear", lr=0.1, warmup_steps=2, max_steps=6)
    lrs = [m["lr"] for m in read_metrics(tmp_path)]
    assert lrs == pytest.approx([0.1 * x for x in (1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25)])


def test_single_nonfinite_step_is_skipped(tmp_path):
    res, net = run_loop(tmp_path, objective=Squares(nan_at={3}))
    rows = read_metrics(tmp_path)
    skipped = [r["step"] for r in rows if r.get("nonfinite_skipped")]
    assert skipped == [4] and res.step == 12  # the 4th step (counter 3) was skipped, training went on
    assert torch.isfinite(flat(net)).all()


def test_nonfinite_streak_stops_with_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="NaN/Inf for 3 consecutive steps"):
        run_loop(tmp_path, objective=Squares(nan_at=set(range(100))), max_nonfinite_steps=2)


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    _, whole = run_loop(tmp_path / "whole", save_every=5)
    res, _ = run_loop(tmp_path / "cut", objective=Squares(kill_at=6), save_every=5)
    assert res.interrupted == "SIGTERM" and res.step == 7
    assert (tmp_path / "cut" / "checkpoints" / "step-7" / "COMPLETE").exists()
    res, resumed = run_loop(tmp_path / "cut", resume=True, save_every=5)
    assert res.step == 12
    torch.testing.assert_close(flat(whole), flat(resumed), rtol=0, atol=0)  # dropout RNG restored too
    steps = [m["step"] for m in read_metrics(tmp_path / "cut")]
    assert steps == list(range(1, 13))  # no step logged twice


def test_existing_checkpoints_need_resume(tmp_path):
    run_loop(tmp_path, save_every=4)
    with pytest.raises(TrainingError, match="--resume"):
        run_loop(tmp_path)


class SlowSquares(Squares):
    """Each forward takes 0.05 s of the loop's clock (a fake one: the test must not depend on the load of
    the machine it runs on)."""

    clock = [0.0]

    def loss(self, model, b):
        self.clock[0] += 0.05
        return super().loss(model, b)


def test_max_seconds_ends_after_the_step_that_passes_the_budget(tmp_path, monkeypatch):
    import types

    from posttrain.engine import loop

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: SlowSquares.clock[0]))
    res, _ = run_loop(
        tmp_path, objective=SlowSquares(), max_steps=100, max_seconds=0.12, log_every=100, save_every=1
    )
    assert res.step == 3 and not res.interrupted  # 0.05 s a step: the third passes 0.12 s
    assert [m["step"] for m in read_metrics(tmp_path)] == [3]  # the last step is logged
    # a resumed run continues the same budget (0.15 s used), it does not start a new one
    res, _ = run_loop(tmp_path, objective=SlowSquares(), resume=True, max_steps=100, max_seconds=0.25)
    assert res.step == 5
