"""Run health: rules over the logged metrics, alerts, and the monitor the loop calls each step."""

from posttrain.monitor.health import HealthMonitor, MonitorConfig
from posttrain.monitor.rules import (
    Alert,
    EntropyCollapse,
    EvalRegression,
    GradNormSpike,
    History,
    KLSpike,
    LengthCollapse,
    LengthExplosion,
    NonFinite,
    PolicyLag,
    RewardHacking,
    Rule,
    Threshold,
    default_rules,
)

__all__ = [
    "Alert",
    "EntropyCollapse",
    "EvalRegression",
    "GradNormSpike",
    "HealthMonitor",
    "History",
    "KLSpike",
    "LengthCollapse",
    "LengthExplosion",
    "MonitorConfig",
    "NonFinite",
    "PolicyLag",
    "RewardHacking",
    "Rule",
    "Threshold",
    "default_rules",
]
