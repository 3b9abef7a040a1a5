"""Agreement between annotators and the reliability of each, with health alerts.

Per question (survey §4.6), over non-gold items with at least two votes:

- ``choice``: Krippendorff's alpha, nominal, on A / B / tie / both-bad;
- ``strength``: alpha, ordinal, on the signed preference -2 (B much better) .. +2 (A much better),
  ties 0 (both-bad votes are left out: they say nothing about the direction);
- ``rubric/<dim>``: alpha, ordinal, per rubric dimension, a unit being one response of one item;
- raw percent agreement on the choice (the share of agreeing vote pairs), since alpha alone hides
  how often people actually agree (human pairwise agreement on LLM outputs is ~65-70%);
- Cohen's kappa for each pair of annotators with at least ``min_shared`` items in common.

Per annotator: votes, gold accuracy with a Wilson interval and its Beta(1, 1)-smoothed value
(correct + 1) / (answered + 2) (the weight ``export --weighting gold`` uses), the share of left
picks among decisive votes (position bias), median seconds per item, and kappa against the
leave-one-out majority of the other annotators.

Alerts go through :class:`posttrain.monitor.HealthMonitor` with :class:`~posttrain.monitor.Threshold`
rules: project choice alpha below ``min_alpha`` (0.2), an annotator's gold-accuracy lower bound below
``min_gold`` (0.6), or a left-pick share outside [0.4, 0.6] over at least 20 decisive votes.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import Counter, defaultdict

from posttrain.collect.store import Store
from posttrain.eval.metrics import cohen_kappa, krippendorff_alpha, wilson_interval
from posttrain.monitor import HealthMonitor, Threshold


def responses(store: Store) -> list[dict]:
    """Every submitted vote, joined with its item (gold answer included: for statistics, not pages)."""
    rows = store.read().execute(
        "SELECT r.*, a.item_id, a.annotator_id, a.swapped, n.name AS annotator, i.kind, i.is_gold, i.gold_json, "
        "i.prompt_id, i.gen_a, i.gen_b, i.meta_json AS item_meta FROM response r "
        "JOIN assignment a ON a.id = r.assignment_id JOIN annotator n ON n.id = a.annotator_id "
        "JOIN item i ON i.id = a.item_id ORDER BY r.id"
    )
    out = []
    for r in rows:
        d = dict(r)
        for key in ("rubric_json", "edits_json", "flags_json", "gold_json", "item_meta"):
            d[key.removesuffix("_json")] = json.loads(d.pop(key)) if d.get(key) else None
        out.append(d)
    return out


def signed(vote: dict) -> int | None:
    """The preference as one ordinal number: +strength for A, -strength for B, 0 for a tie."""
    if vote["choice"] == "a":
        return vote["strength"] or 1
    if vote["choice"] == "b":
        return -(vote["strength"] or 1)
    return 0 if vote["choice"] == "tie" else None


def percent_agreement(groups: list[list]) -> float:
    pairs = agree = 0
    for values in groups:
        for x, y in itertools.combinations(values, 2):
            pairs += 1
            agree += x == y
    return agree / pairs if pairs else math.nan


def _majority(values: list):
    if not values:
        return None
    (top, n), *rest = Counter(values).most_common()
    return None if rest and rest[0][1] == n else top


def agreement(store: Store, *, min_shared: int | None = None) -> dict:
    """The project's agreement report (see the module docstring); numbers are NaN where undefined."""
    config = store.config
    min_shared = int(config.get("min_shared", 20)) if min_shared is None else min_shared
    votes = responses(store)
    regular = [v for v in votes if not v["is_gold"] and v["kind"] == "pair"]
    by_item: dict[int, dict[str, dict]] = defaultdict(dict)
    for v in regular:
        by_item[v["item_id"]][v["annotator"]] = v
    multi = {i: vs for i, vs in by_item.items() if len(vs) >= 2}
    choice_units = [[v["choice"] for v in vs.values()] for vs in multi.values()]
    questions = {
        "choice": {
            "alpha": krippendorff_alpha(choice_units, level="nominal"),
            "percent": percent_agreement(choice_units),
            "items": len(multi),
        },
        "strength": {
            "alpha": krippendorff_alpha(
                [[signed(v) for v in vs.values()] for vs in multi.values()], level="ordinal"
            ),
            "items": len(multi),
        },
    }
    dims = [d["name"] for d in config.get("rubric", {}).get("dimensions", [])]
    rated = [v for v in votes if not v["is_gold"]]
    for dim in dims:
        units: dict[tuple, list] = defaultdict(list)
        for v in rated:
            for side, scores in (v["rubric"] or {}).items():
                if dim in scores:
                    units[(v["item_id"], side)].append(scores[dim])
        questions[f"rubric/{dim}"] = {
            "alpha": krippendorff_alpha(list(units.values()), level="ordinal"),
            "items": sum(len(u) >= 2 for u in units.values()),
        }

    names = sorted({v["annotator"] for v in votes})
    pairs = []
    for x, y in itertools.combinations(names, 2):
        shared = [vs for vs in by_item.values() if x in vs and y in vs]
        if len(shared) >= min_shared:
            kappa = cohen_kappa([vs[x]["choice"] for vs in shared], [vs[y]["choice"] for vs in shared])
            pairs.append({"a": x, "b": y, "shared": len(shared), "kappa": kappa})

    annotators = {}
    for name in names:
        mine = [v for v in votes if v["annotator"] == name]
        gold = [v for v in mine if v["is_gold"] and (v["gold"] or {}).get("choice")]
        correct = sum(v["choice"] == v["gold"]["choice"] for v in gold)
        low, high = wilson_interval(correct, len(gold))
        decisive = [v["left_pick"] for v in mine if v["left_pick"] is not None]
        seconds = [v["duration_ms"] / 1000 for v in mine if v["duration_ms"]]
        loo_mine, loo_rest = [], []
        for vs in multi.values():
            if name in vs:
                rest = _majority([v["choice"] for other, v in vs.items() if other != name])
                if rest is not None:
                    loo_mine.append(vs[name]["choice"])
                    loo_rest.append(rest)
        annotators[name] = {
            "votes": len(mine),
            "gold_answered": len(gold),
            "gold_correct": correct,
            "gold_accuracy": correct / len(gold) if gold else math.nan,
            "gold_low": low,
            "gold_high": high,
            "weight": (correct + 1) / (len(gold) + 2),
            "left_share": sum(decisive) / len(decisive) if decisive else math.nan,
            "decisive": len(decisive),
            "median_seconds": statistics.median(seconds) if seconds else math.nan,
            "kappa_vs_majority": cohen_kappa(loo_mine, loo_rest) if len(loo_mine) >= 2 else math.nan,
            "compared_with_majority": len(loo_mine),
        }
    return {"questions": questions, "pairs": pairs, "annotators": annotators, "votes": len(votes)}


def health_metrics(report: dict, *, min_decisive: int = 20) -> dict[str, float]:
    """The numbers the health rules watch, under ``collect/...`` names."""
    metrics = {"collect/alpha/choice": report["questions"]["choice"]["alpha"]}
    for name, a in report["annotators"].items():
        if a["gold_answered"]:
            metrics[f"collect/annotator/{name}/gold_low"] = a["gold_low"]
        if a["decisive"] >= min_decisive:
            metrics[f"collect/annotator/{name}/left_share"] = a["left_share"]
    return metrics


def health_alerts(store: Store, report: dict | None = None, *, alerts_path=None, echo=None) -> list:
    """Alerts (posttrain.monitor) for low project alpha, unreliable annotators and position bias."""
    config = store.config
    report = report or agreement(store)
    rules = [
        Threshold(name="low_alpha", metric="collect/alpha/choice", below=float(config.get("min_alpha", 0.2)))
    ]
    for name in report["annotators"]:
        rules.append(
            Threshold(
                name=f"low_reliability/{name}",
                metric=f"collect/annotator/{name}/gold_low",
                below=float(config.get("min_gold", 0.6)),
            )
        )
        rules.append(
            Threshold(
                name=f"position_bias/{name}",
                metric=f"collect/annotator/{name}/left_share",
                above=0.6,
                below=0.4,
            )
        )
    monitor = HealthMonitor(rules, alerts_path=alerts_path, echo=echo)
    return monitor.observe(report["votes"], health_metrics(report))
