"""Health rules: each fires on a stream built to trip it, at the step it should, and the
defaults stay silent on healthy streams with realistic (seeded) noise."""

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from posttrain.monitor import (
    EntropyCollapse,
    EvalRegression,
    GradNormSpike,
    HealthMonitor,
    History,
    KLSpike,
    LengthCollapse,
    LengthExplosion,
    MonitorConfig,
    NonFinite,
    PolicyLag,
    RewardHacking,
    Threshold,
    default_rules,
)

EVAL_EVERY = 25


def healthy_online(steps: int = 400, seed: int = 0) -> list[tuple[int, dict]]:
    """A GRPO-like run going well: KL grows to ~0.05, entropy halves, reward and gold rise,
    lengths drift up 40%; every series noisy (lognormal 20-30% on KL and grad norm)."""
    rng = np.random.default_rng(seed)
    stream = []
    for s in range(1, steps + 1):
        t = s / steps
        m = {
            "loss": 0.1 + rng.normal(0, 0.05),
            "kl": 0.05 * (1 - math.exp(-s / 80)) * math.exp(rng.normal(0, 0.2)),
            "entropy": (1.2 - 0.6 * t) * math.exp(rng.normal(0, 0.05)),
            "grad_norm": 0.8 * math.exp(rng.normal(0, 0.3)),
            "reward/mean": 0.2 + 0.4 * t + rng.normal(0, 0.03),
            "completion_length/mean": 80 + 30 * t + rng.normal(0, 5),
            "policy_lag": float(rng.integers(0, 3)),
            "completion_length/truncated_share": 0.05 * math.exp(rng.normal(0, 0.5)),
            "groups/zero_std_share": 0.6 - 0.4 * t + rng.normal(0, 0.08),
            "lr": 1e-6,
        }
        if s % EVAL_EVERY == 0:
            m["eval/pass@1"] = 0.30 + 0.15 * t + rng.normal(0, 0.015)  # ~1,000-problem eval noise
        stream.append((s, m))
    return stream


def healthy_offline(steps: int = 400, seed: int = 0) -> list[tuple[int, dict]]:
    """An SFT-like run: loss decays with noise, eval loss every 50 steps flattens out."""
    rng = np.random.default_rng(seed)
    stream = []
    for s in range(1, steps + 1):
        m = {
            "loss": 1.0 + 2.0 * math.exp(-s / 60) + rng.normal(0, 0.08),
            "grad_norm": 2.0 * math.exp(rng.normal(0, 0.3)),
        }
        if s % 50 == 0:
            m["eval/loss"] = 1.1 + 2.0 * math.exp(-s / 60) + rng.normal(0, 0.02)
        stream.append((s, m))
    return stream


def run(rules, stream, **kw) -> list:
    monitor = HealthMonitor(rules, echo=None, **kw)
    return [a for step, m in stream for a in monitor.observe(step, m)]


def fired(rules, stream) -> list[tuple[int, str]]:
    return [(a.step, a.rule) for a in run(rules, stream)]


def with_series(stream, name, fn):
    """A copy of the stream with metric `name` at step s set to fn(s) (None: removed)."""
    out = []
    for s, m in stream:
        m = dict(m)
        value = fn(s)
        if value is None:
            m.pop(name, None)
        else:
            m[name] = value
        out.append((s, m))
    return out


# --------------------------------------------------------------------------- healthy runs are quiet


@pytest.mark.parametrize("seed", range(5))
def test_default_rules_silent_on_healthy_online_runs(seed):
    # Over 200 seeds only eval_regression ever fires (5 runs): the best of 16 noisy evals sits
    # ~1.8 sigma above the trend, so a 0.05 drop (3.3 sigma) is sometimes crossed by noise alone.
    assert fired(default_rules("online"), healthy_online(seed=seed)) == []


@pytest.mark.parametrize("seed", range(3))
def test_default_rules_silent_on_healthy_offline_runs(seed):
    assert fired(default_rules("offline"), healthy_offline(seed=seed)) == []


# --------------------------------------------------------------------------- each rule trips


def test_non_finite_fires_at_the_nan_step():
    stream = with_series(healthy_online(100), "loss", lambda s: math.nan if s == 37 else 0.1)
    assert fired([NonFinite()], stream) == [(37, "non_finite")]
    alert = run([NonFinite()], stream)[0]
    assert "loss=nan" in alert.message
    # Watching other metrics only: silent.
    assert fired([NonFinite(metrics=["kl", "reward/mean"])], stream) == []
    inf = with_series(healthy_online(100), "grad_norm", lambda s: math.inf if s == 5 else 1.0)
    assert fired([NonFinite()], inf) == [(5, "non_finite")]


def test_kl_spike_relative_and_absolute():
    stream = [(s, {**m, "kl": 0.5}) if s == 150 else (s, m) for s, m in healthy_online()]  # ~10x
    assert fired([KLSpike()], stream) == [(150, "kl_spike")]
    # An absolute bound fires even where the relative test would not (KL creeping up).
    creeping = with_series(healthy_online(), "kl", lambda s: 0.001 * s)
    assert fired([KLSpike(max_value=0.25, factor=None)], creeping) == [(251, "kl_spike")]


def test_kl_spike_warmup_and_floor():
    # A 10x jump at step 5 is inside the warmup; early KL near 0 does not count as a baseline.
    stream = with_series(healthy_online(60), "kl", lambda s: 0.05 if s == 5 else 0.001)
    assert fired([KLSpike()], stream) == []
    assert fired(
        [KLSpike(warmup=0, min_baseline=0.0)], with_series(stream, "kl", lambda s: 0.01 if s == 8 else 0.001)
    ) == [(8, "kl_spike")]


def test_entropy_collapse():
    entropy = lambda s: 1.0 * math.exp(-s / 40)  # noqa: E731  (decays to 0.01 by step 184)
    stream = with_series(healthy_online(200), "entropy", entropy)
    initial = np.mean([entropy(s) for s in range(1, 11)])
    expected = next(s for s in range(11, 201) if entropy(s) < 0.1 * initial)
    assert fired([EntropyCollapse()], stream) == [(expected, "entropy_collapse")]
    assert fired([EntropyCollapse(fraction=None, min_value=0.05)], stream) == [(120, "entropy_collapse")]


def test_grad_norm_spike():
    stream = [(s, {**m, "grad_norm": 20.0}) if s == 120 else (s, m) for s, m in healthy_online(200)]
    assert fired([GradNormSpike()], stream) == [(120, "grad_norm_spike")]
    early = [(s, {**m, "grad_norm": 20.0}) if s == 15 else (s, m) for s, m in healthy_online(200)]
    assert fired([GradNormSpike()], early) == []  # warmup: 20 steps


def test_length_explosion_and_collapse():
    tripling = lambda s: 100.0 if s <= 100 else 100.0 + 3.0 * (s - 100)  # noqa: E731  (400 at step 200)
    stream = with_series(healthy_online(200), "completion_length/mean", tripling)
    expected = next(s for s in range(1, 201) if tripling(s) > 300)
    assert fired([LengthExplosion(), LengthCollapse()], stream) == [(expected, "length_explosion")]
    shrinking = with_series(healthy_online(200), "completion_length/mean", lambda s: 120.0 * 0.98**s)
    expected = next(
        s for s in range(1, 201) if 120.0 * 0.98**s < 120.0 * np.mean(0.98 ** np.arange(1, 11)) / 3
    )
    assert fired([LengthExplosion(), LengthCollapse()], shrinking) == [(expected, "length_collapse")]


def reward_hacking_stream(proxy_slope: float = 0.003) -> list[tuple[int, dict]]:
    """Proxy reward rises throughout; gold (every 20 steps) rises to 0.40 at step 100, then
    loses 0.03 per eval. Window of 4 gold values: at step 140 (0.38, 0.40, 0.37, 0.34) the
    least-squares change is -0.015 x 3 = -0.045 (not yet -0.05); at 160 (0.40 ... 0.31) -0.09."""
    gold = {20: 0.32, 40: 0.34, 60: 0.36, 80: 0.38, 100: 0.40, 120: 0.37, 140: 0.34, 160: 0.31, 180: 0.28}
    stream = []
    for s in range(1, 201):
        m = {"reward/mean": 0.2 + proxy_slope * s, "loss": 0.1}
        if s in gold:
            m["eval/pass@1"] = gold[s]
        stream.append((s, m))
    return stream


def test_reward_hacking_fires_when_proxy_rises_and_gold_falls():
    assert fired([RewardHacking()], reward_hacking_stream()) == [(160, "reward_hacking")]
    alert = run([RewardHacking()], reward_hacking_stream())[0]
    assert "reward/mean rose" in alert.message and "eval/pass@1 fell" in alert.message
    # Gold falling while the proxy is flat is a regression, not reward hacking.
    assert fired([RewardHacking()], reward_hacking_stream(proxy_slope=0.0)) == []


def test_reward_hacking_with_gold_logged_in_its_own_call():
    # The loop may log eval metrics in a second call for the same step; the proxy is then in history.
    monitor = HealthMonitor([RewardHacking()], echo=None)
    alerts = []
    for s, m in reward_hacking_stream():
        alerts += monitor.observe(s, {k: v for k, v in m.items() if k != "eval/pass@1"})
        if "eval/pass@1" in m:
            alerts += monitor.observe(s, {"eval/pass@1": m["eval/pass@1"]})
    assert [(a.step, a.rule) for a in alerts] == [(160, "reward_hacking")]


def test_eval_regression_max_and_min_modes():
    values = {25: 0.30, 50: 0.35, 75: 0.40, 100: 0.38, 125: 0.33, 150: 0.41}
    stream = [(s, {"eval/pass@1": values[s]} if s in values else {"loss": 1.0}) for s in range(1, 151)]
    assert fired([EvalRegression()], stream) == [(125, "eval_regression")]  # 0.07 below the best 0.40
    losses = {50: 2.0, 100: 1.5, 150: 1.55, 200: 1.7}
    stream = [(s, {"eval/loss": v}) for s, v in losses.items()]
    assert fired([EvalRegression(metric="eval/loss", mode="min", max_drop=0.1)], stream) == [
        (200, "eval_regression")
    ]


def test_policy_lag():
    stream = with_series(healthy_online(100), "policy_lag", lambda s: 6.0 if s >= 50 else 1.0)
    assert fired([PolicyLag()], stream) == [(50, "policy_lag")]  # once: the condition lasts


def test_threshold_rules():
    stream = with_series(
        healthy_online(100), "completion_length/truncated_share", lambda s: 0.8 if s >= 60 else 0.1
    )
    assert fired(default_rules("online"), stream) == [(60, "truncation")]
    stream = with_series(healthy_online(100), "groups/zero_std_share", lambda s: 1.0)
    assert fired(default_rules("online"), stream) == [(1, "no_signal")]  # from the first step
    band = Threshold(metric="x", above=2.0, below=1.0)
    assert fired([band], [(1, {"x": 1.5}), (2, {"x": 0.5}), (3, {"x": 1.5}), (4, {"x": 3.0})]) == [
        (2, "threshold"),
        (4, "threshold"),
    ]
    with pytest.raises(ValidationError, match="needs `above`, `below`"):
        Threshold(metric="x")


# --------------------------------------------------------------------------- the monitor


def test_alert_fires_once_per_episode():
    lag = lambda s: 9.0 if 10 <= s < 20 or 30 <= s < 35 else 0.0  # noqa: E731
    stream = [(s, {"policy_lag": lag(s)}) for s in range(1, 50)]
    assert fired([PolicyLag()], stream) == [(10, "policy_lag"), (30, "policy_lag")]


def test_rules_skip_steps_without_their_metric():
    # EvalRegression stays "active" across the steps between evals, so it reports once.
    values = {10: 0.5, 20: 0.3, 30: 0.3, 40: 0.5, 50: 0.3}
    stream = [(s, {"eval/pass@1": values[s]} if s in values else {"loss": 1.0}) for s in range(1, 51)]
    assert fired([EvalRegression()], stream) == [(20, "eval_regression"), (50, "eval_regression")]


def test_rollbacks_escalate_to_stop():
    rule = PolicyLag(action="rollback", adjust={"lr": 0.5})
    lag = lambda s: 9.0 if s in (5, 10, 15) else 0.0  # noqa: E731
    alerts = run([rule], [(s, {"policy_lag": lag(s)}) for s in range(1, 20)], max_rollbacks=2)
    assert [(a.step, a.action) for a in alerts] == [(5, "rollback"), (10, "rollback"), (15, "stop")]
    assert "rollback limit 2" in alerts[-1].message
    assert HealthMonitor.decision(alerts[:2]) == "rollback"
    assert HealthMonitor.decision(alerts) == "stop"
    assert HealthMonitor.decision([]) is None


def test_rollback_scales_multiply():
    rules = [
        PolicyLag(action="rollback", adjust={"lr": 0.5}),
        Threshold(
            name="kl_high", metric="kl", above=1.0, action="rollback", adjust={"lr": 0.5, "kl_coef": 2.0}
        ),
    ]
    monitor = HealthMonitor(rules, echo=None, max_rollbacks=5)
    alerts = monitor.observe(1, {"policy_lag": 9.0, "kl": 3.0})
    assert HealthMonitor.decision(alerts) == "rollback"
    assert monitor.scales == {"lr": 0.25, "kl_coef": 2.0} and monitor.rollbacks == 1  # one per step


def test_alerts_jsonl_and_echo(tmp_path):
    path = tmp_path / "run" / "alerts.jsonl"
    printed = []
    monitor = HealthMonitor([NonFinite(), PolicyLag()], alerts_path=path, echo=printed.append)
    monitor.open()
    monitor.observe(1, {"loss": 0.5, "policy_lag": 1})
    monitor.observe(2, {"loss": math.nan, "policy_lag": 7, "grad_norm": np.float32(1.5)})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["rule"], r["action"]) for r in records] == [
        (2, "non_finite", "warn"),
        (2, "policy_lag", "warn"),
    ]
    assert records[0]["metrics"] == {"loss": "nan", "policy_lag": 7, "grad_norm": 1.5}
    assert records[0]["message"] == "non-finite loss=nan" and records[0]["adjust"] == {}
    assert printed == [
        "health: step 2 non_finite [warn]: non-finite loss=nan",
        "health: step 2 policy_lag [warn]: policy_lag 7 is above 4",
    ]
    # Resume from a checkpoint at step 1: alerts of later steps go (they will be run again).
    HealthMonitor([], alerts_path=path).open(resume_step=1)
    assert path.read_text() == ""
    monitor.observe(3, {"loss": math.inf})
    HealthMonitor([], alerts_path=path).open()  # a fresh run starts with no alerts file
    assert not path.exists()


def test_state_round_trip_resumes_exactly():
    stream = reward_hacking_stream()
    stream = [(s, {**m, "policy_lag": 9.0 if 95 <= s <= 105 else 0.0}) for s, m in stream]
    rules = [RewardHacking(), PolicyLag(), EvalRegression(max_drop=0.02)]
    whole = [(a.step, a.rule) for a in run(rules, stream)]
    assert (100, "policy_lag") not in whole and (95, "policy_lag") in whole

    first = HealthMonitor(rules, echo=None)
    alerts = [a for s, m in stream[:100] for a in first.observe(s, m)]
    state = json.loads(json.dumps(first.state_dict()))  # plain data: survives JSON and torch.save
    second = HealthMonitor(rules, echo=None)
    second.load_state_dict(state)
    alerts += [a for s, m in stream[100:] for a in second.observe(s, m)]
    assert [(a.step, a.rule) for a in alerts] == whole
    assert second.state_dict() == json.loads(json.dumps(run_state(rules, stream)))


def run_state(rules, stream) -> dict:
    monitor = HealthMonitor(rules, echo=None)
    for s, m in stream:
        monitor.observe(s, m)
    return monitor.state_dict()


def test_monitor_history_covers_the_rules_windows():
    monitor = HealthMonitor([EntropyCollapse(initial_window=300), KLSpike(window=5000)], echo=None)
    assert (monitor.history.head, monitor.history.tail) == (300, 5000)


def test_history_is_bounded_and_keeps_best():
    monitor = HealthMonitor([EvalRegression()], echo=None, history=History(head=3, tail=10))
    for s in range(1, 101):
        monitor.observe(s, {"eval/pass@1": 0.9 if s == 3 else 0.5, "x": "not a number"})
    assert len(monitor.history.points("eval/pass@1")) == 10
    assert monitor.history.best("eval/pass@1", "max") == 0.9
    assert monitor.history.first("eval/pass@1", 5) == [0.5, 0.5, 0.9]  # only 3 kept
    assert monitor.history.points("x") == []


def test_rollbacks_and_scales_survive_loading_checkpoints():
    monitor = HealthMonitor([PolicyLag(action="rollback", adjust={"lr": 0.5})], echo=None, max_rollbacks=2)
    saved = monitor.state_dict()
    monitor.observe(1, {"policy_lag": 9.0})
    assert (monitor.rollbacks, monitor.scales) == (1, {"lr": 0.5})
    monitor.load_state_dict(saved)  # the rollback returns to a checkpoint saved before it
    assert (monitor.rollbacks, monitor.scales) == (1, {"lr": 0.5})
    [alert] = monitor.observe(1, {"policy_lag": 9.0})  # the history was restored: fires again
    assert alert.action == "rollback" and monitor.scales == {"lr": 0.25}
    after = monitor.state_dict()
    monitor.load_state_dict(saved)
    [alert] = monitor.observe(1, {"policy_lag": 9.0})
    assert alert.action == "stop" and monitor.scales == {"lr": 0.25}  # escalated: no new scale
    # A fresh process resuming from a checkpoint saved after two rollbacks takes them over.
    fresh = HealthMonitor([PolicyLag(action="rollback", adjust={"lr": 0.5})], echo=None, max_rollbacks=2)
    fresh.load_state_dict(after)
    assert (fresh.rollbacks, fresh.scales) == (2, {"lr": 0.25})


# --------------------------------------------------------------------------- config


def test_monitor_config_builds_rules():
    cfg = MonitorConfig.model_validate(
        {
            "rules": [
                {
                    "rule": "kl_spike",
                    "max_value": 0.5,
                    "action": "rollback",
                    "adjust": {"lr": 0.5, "kl_coef": 2.0},
                },
                {"rule": "reward_hacking", "gold": "eval/accuracy"},
                {"rule": "eval_regression", "name": "accuracy_drop", "metric": "eval/accuracy"},
                {"rule": "eval_regression", "name": "loss_rise", "metric": "eval/loss", "mode": "min"},
            ],
            "max_rollbacks": 1,
        }
    )
    monitor = cfg.build("online", echo=None)
    assert [r.id for r in monitor.rules] == ["kl_spike", "reward_hacking", "accuracy_drop", "loss_rise"]
    assert isinstance(monitor.rules[0], KLSpike) and monitor.rules[0].adjust == {"lr": 0.5, "kl_coef": 2.0}
    assert monitor.max_rollbacks == 1
    assert [type(r) for r in MonitorConfig().build("offline").rules] == [
        type(r) for r in default_rules("offline")
    ]
    assert MonitorConfig(enabled=False).build("online") is None


@pytest.mark.parametrize(
    "rules, match",
    [
        ([{"rule": "kl_spik"}], "does not match any of the expected tags"),
        ([{"rule": "kl_spike", "factr": 2}], "Extra inputs"),
        ([{"rule": "kl_spike", "adjust": {"lr": 0.5}}], "rollback only"),
        ([{"rule": "kl_spike", "action": "rollback", "adjust": {"lr": 0}}], "must be > 0"),
        ([{"rule": "policy_lag"}, {"rule": "policy_lag"}], "distinct `name`"),
        ([{"rule": "policy_lag", "action": "explode"}], "action"),
    ],
)
def test_monitor_config_errors(rules, match):
    with pytest.raises(ValidationError, match=match):
        MonitorConfig.model_validate({"rules": rules})
