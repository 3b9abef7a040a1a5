"""Evaluation: suites, metrics (pass@k, win-rate with a CI, agreement), the RM audit, judge checks, gates.

The metrics are the stable interface (DESIGN.md): `from posttrain.eval import pass_at_k`.
"""

from posttrain.eval.metrics import WinRate, bootstrap_ci, cohen_kappa, pass_at_k, win_rate

__all__ = ["WinRate", "bootstrap_ci", "cohen_kappa", "pass_at_k", "win_rate"]
