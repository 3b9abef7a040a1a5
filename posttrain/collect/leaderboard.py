"""An Arena-style leaderboard: Bradley-Terry ratings with bootstrap intervals, and a win-rate matrix.

The maths is Chatbot Arena's published code (FastChat ``serve/monitor/rating_systems.py``:
``compute_bt``, ``compute_bootstrap_bt``, ``compute_style_control``), so numbers are comparable:

- a battle between A and B has outcome y = 1 (A wins), 1/2 (tie *or* both bad) or 0 (B wins);
  P(A beats B) = sigmoid(ln 10 * (theta_A - theta_B));
- theta maximises the weighted log-likelihood sum_cells w (y log p + (1 - y) log(1 - p)) over the
  unique (A, B, y) cells with their counts w, by L-BFGS from 0 (maxiter 100, gtol 1e-6). The
  gradient sums to zero over models, so the iterates stay centred (mean theta = 0);
- ratings are shown as 1000 + 400 theta;
- intervals: ``rounds`` bootstrap resamples drawn *multinomially over the unique cells*
  (rng seed 0), refitted, and the 2.5% / 97.5% quantiles taken;
- length control ("style control" restricted to length): a contextual BT with one more feature,
  the normalised length difference (len_A - len_B) / (len_A + len_B + 1), standardised over the
  battles, and an L2 penalty of 0.5 on all parameters; bootstrap by resampling battles.

"Both bad" counts as a tie for the ratings (as in Arena), and is kept as its own count per model,
so absolute badness is not lost (FastChat#1440). No outcome can give NaN: a pair of models that
never met has no win-rate cell (None), not 0/0.

The fits run with BLAS held to one thread (threadpoolctl): each is a handful of parameters, and a
multi-threaded OpenBLAS inside L-BFGS-B made one fit ~500x slower on a busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

OUTCOMES = {"a": 1.0, "tie": 0.5, "both_bad": 0.5, "b": 0.0}
ALPHA = math.log(10.0)
SCALE, INIT = 400.0, 1000.0


@dataclass
class Battle:
    model_a: str
    model_b: str
    winner: str  # 'a', 'b', 'tie' or 'both_bad'
    len_a: int = 0
    len_b: int = 0


@dataclass
class Leaderboard:
    """Rows are sorted by rating; ``win_rate[i][j]`` is model i's share of points against model j
    (ties half) or None when they never met; ``battles[i][j]`` counts their battles."""

    rows: list[dict]
    models: list[str]
    win_rate: list[list[float | None]]
    battles: list[list[int]]
    n_battles: int
    length_coef: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "models": self.models,
            "win_rate": self.win_rate,
            "battles": self.battles,
            "n_battles": self.n_battles,
            "length_coef": self.length_coef,
            "notes": self.notes,
        }


def _bt_loss_and_grad(ratings, matchups, outcomes, weights, alpha):
    matchup_ratings = ratings[matchups]  # [C, 2]
    probs = expit(alpha * (matchup_ratings[:, 0] - matchup_ratings[:, 1]))
    # this form counts a draw as half a win and half a loss
    loss = -((np.log(probs) * outcomes + np.log(1.0 - probs) * (1.0 - outcomes)) * weights).sum()
    matchup_grads = -alpha * (outcomes - probs) * weights
    # FastChat's np.add.at(grad, matchups, grads * [1, -1]), as two bincounts (the same sums, faster)
    n = len(ratings)
    grad = np.bincount(matchups[:, 0], matchup_grads, n) - np.bincount(matchups[:, 1], matchup_grads, n)
    return loss, grad


def fit_bt(
    matchups, outcomes, weights, n_models: int, *, alpha: float = ALPHA, tol: float = 1e-6
) -> np.ndarray:
    """theta [M] on the natural scale (FastChat ``fit_bt``)."""
    result = minimize(
        _bt_loss_and_grad,
        np.zeros(n_models),
        args=(matchups, outcomes, weights, alpha),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 100, "gtol": tol},
    )
    return result.x


def cells(battles: list[Battle], models: list[str]):
    """Unique (A, B, outcome) cells and their counts (FastChat ``preprocess_for_bt``)."""
    index = {m: i for i, m in enumerate(models)}
    schedule = np.array(
        [(index[b.model_a], index[b.model_b], int(2 * OUTCOMES[b.winner])) for b in battles], dtype=np.int64
    ).reshape(-1, 3)
    unique, counts = np.unique(schedule, return_counts=True, axis=0)
    return unique[:, :2], unique[:, 2] / 2.0, counts.astype(np.float64)


def bootstrap_bt(battles: list[Battle], models: list[str], *, rounds: int = 200, seed: int = 0) -> np.ndarray:
    """[rounds, M] natural-scale thetas of multinomial resamples of the cells."""
    matchups, outcomes, weights = cells(battles, models)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(battles), weights / weights.sum(), size=rounds) / len(battles)
    return np.array([fit_bt(matchups, outcomes, w, len(models)) for w in draws])


def _contextual_loss_and_grad(params, n_models, matchups, features, outcomes, alpha, reg, half_reg):
    ratings, coefs = params[:n_models], params[n_models:]
    matchup_ratings = ratings[matchups]
    probs = expit(alpha * (matchup_ratings[:, 0] - matchup_ratings[:, 1]) + features @ coefs)
    loss = -(np.log(probs) * outcomes + np.log(1.0 - probs) * (1.0 - outcomes)).sum()
    loss += half_reg * np.inner(params, params)
    error = outcomes - probs
    grad = reg * params
    g = -alpha * error
    grad[:n_models] += np.bincount(matchups[:, 0], g, n_models) - np.bincount(matchups[:, 1], g, n_models)
    grad[n_models:] -= features.T @ error
    return loss, grad


def fit_length_controlled(matchups, features, outcomes, n_models: int, *, reg: float = 0.5) -> np.ndarray:
    """[M + F] params of the contextual BT (FastChat ``fit_contextual_bt``, reg 0.5, half_reg reg/2)."""
    result = minimize(
        _contextual_loss_and_grad,
        np.zeros(n_models + features.shape[1]),
        args=(n_models, matchups, features, outcomes, ALPHA, reg, reg / 2.0),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 100, "gtol": 1e-6},
    )
    return result.x


def length_features(battles: list[Battle]) -> np.ndarray:
    """[N, 1] standardised (len_A - len_B) / (len_A + len_B + 1); all 0 when lengths never differ."""
    a = np.array([b.len_a for b in battles], dtype=np.float64)
    b = np.array([b.len_b for b in battles], dtype=np.float64)
    diff = (a - b) / (a + b + 1.0)
    std = diff.std()
    return ((diff - diff.mean()) / std if std > 0 else np.zeros_like(diff))[:, None]


def leaderboard(
    battles: list[Battle], *, rounds: int = 200, length_control: bool = False, seed: int = 0
) -> Leaderboard:
    """Ratings with 95% intervals, per-model counts and the win-rate matrix of these battles."""
    for b in battles:
        if b.winner not in OUTCOMES:
            raise ValueError(f"leaderboard: winner must be one of {', '.join(OUTCOMES)} (got {b.winner!r})")
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    m = len(models)
    index = {name: i for i, name in enumerate(models)}
    points, met = np.zeros((m, m)), np.zeros((m, m), dtype=np.int64)
    counts = {name: {"wins": 0, "losses": 0, "ties": 0, "both_bad": 0} for name in models}
    for b in battles:
        i, j, y = index[b.model_a], index[b.model_b], OUTCOMES[b.winner]
        points[i, j] += y
        points[j, i] += 1 - y
        met[i, j] += 1
        met[j, i] += 1
        for name, win in ((b.model_a, "a"), (b.model_b, "b")):
            key = {"tie": "ties", "both_bad": "both_bad"}.get(b.winner) or (
                "wins" if b.winner == win else "losses"
            )
            counts[name][key] += 1
    notes = []
    if m < 2:
        notes.append("fewer than two models have battles: no ratings")
        return Leaderboard(
            [], models, [[None] * m for _ in range(m)], met.tolist(), len(battles), notes=notes
        )
    with _one_blas_thread():
        theta, boot, coef = _fit(battles, models, index, rounds, length_control, seed)
    low, high = np.quantile(boot, [0.025, 0.975], axis=0)
    return _board(battles, models, theta, low, high, points, met, counts, coef, notes)


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - the collect extra brings it
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _fit(battles, models, index, rounds, length_control, seed):
    """(theta [M], bootstrap thetas [rounds, M], length coefficient or None)."""
    m = len(models)
    coef = None
    if length_control:
        matchups = np.array([(index[b.model_a], index[b.model_b]) for b in battles])
        outcomes = np.array([OUTCOMES[b.winner] for b in battles])
        features = length_features(battles)
        params = fit_length_controlled(matchups, features, outcomes, m)
        theta, coef = params[:m], float(params[m])
        rng = np.random.default_rng(seed)
        boot = np.array(
            [
                fit_length_controlled(matchups[idx], features[idx], outcomes[idx], m)[:m]
                for idx in rng.integers(0, len(battles), size=(rounds, len(battles)))
            ]
        )
    else:
        theta = fit_bt(*cells(battles, models), m)
        boot = bootstrap_bt(battles, models, rounds=rounds, seed=seed)
    return theta, boot, coef


def _board(battles, models, theta, low, high, points, met, counts, coef, notes) -> Leaderboard:
    m = len(models)
    rows = []
    for i, name in enumerate(models):
        rows.append(
            {
                "model": name,
                "rating": INIT + SCALE * float(theta[i]),
                "low": INIT + SCALE * float(low[i]),
                "high": INIT + SCALE * float(high[i]),
                "battles": int(met[i].sum()),
                **counts[name],
            }
        )
    rows.sort(key=lambda r: -r["rating"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
        # Arena's rank: 1 + the number of models whose lower bound is above this one's upper bound
        row["rank_ub"] = 1 + sum(other["low"] > row["high"] for other in rows)
    if any(a["low"] <= b["high"] for a, b in zip(rows, rows[1:])):
        notes.append("neighbouring intervals overlap: those rank differences are not significant")
    rates = [[float(points[i, j] / met[i, j]) if met[i, j] else None for j in range(m)] for i in range(m)]
    return Leaderboard(rows, models, rates, met.tolist(), len(battles), length_coef=coef, notes=notes)
