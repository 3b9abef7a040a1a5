"""From votes to training rows: dpo | rm | kto | sft | eval | redteam, with provenance, a data card and lineage.

Rows are in the shapes posttrain's trainers read (``posttrain.data.schemas``; TRL's conversational
column names):

    dpo, rm   {"prompt": [msgs], "chosen": [{"role": "assistant", ...}], "rejected": [...], "margin", "meta"}
    kto       {"prompt": [msgs], "completion": [assistant msg], "label": bool, "meta"}
    sft       {"messages": [...prompt, {"role": "assistant", "content": edited text}], "meta"}
    eval      {"prompt": [msgs], "gold": {...} | null, "human": {...}, "meta"}   (frozen: content hashes)
    redteam   {"prompt": [msgs], "flags": {flag: votes}, "responses": [{model, text}], "meta"}

How votes become a decision, per pair item: each vote has a weight (1, or with ``weighting="gold"`` the
annotator's Beta-smoothed gold accuracy (correct + 1) / (answered + 2)); the decision is the choice with
the largest total weight, and the item's agreement is that choice's share of the weight. A decision of
A or B gives a dpo/rm pair whose ``margin`` is the weighted mean signed strength toward the chosen side
(1 = better, 2 = much better; votes against count negative). Every edit gives an SFT row and an
edited-over-original pair with margin 2 (pairs of two identical answers are left out, and counted). kto: the chosen side True and the rejected side False
(TRL's ``unpair_preference_dataset``), and single answers by their mean rubric score (``kto_threshold``).

Filters (counted in the data card): ``min_votes``, ``min_agreement``, ``exclude_annotators``,
``drop_ties`` (eval: leave out items the humans called a tie). Gold items are never training rows;
eval exports them with their answers. Annotators appear only as salted hashes.

Lineage: the export writes ``manifest.json`` beside its file (the sha256 of a consistent snapshot of the
database, and the model directories that generated the answers), so a training run on the file names the
export as its parent, and the export names the runs that made the models.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from posttrain.collect.agreement import agreement, responses, signed
from posttrain.collect.leaderboard import Battle
from posttrain.collect.store import Store
from posttrain.errors import ConfigError

FORMATS = ("dpo", "rm", "kto", "sft", "eval", "redteam")


def jsonable(value):
    """NaN and infinities as None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _generations(store: Store) -> dict[int, dict]:
    rows = store.read().execute(
        "SELECT g.id, g.text, g.gen_config_json, g.seed, m.name, m.path, m.revision FROM generation g "
        "JOIN model m ON m.id = g.model_id"
    )
    return {
        r["id"]: {
            "text": r["text"],
            "model": {"name": r["name"], "path": r["path"], "revision": r["revision"]},
            "gen_config": json.loads(r["gen_config_json"]),
            "seed": r["seed"],
        }
        for r in rows
    }


def _prompts(store: Store) -> dict[int, dict]:
    rows = store.read().execute("SELECT id, messages_json, content_sha256 FROM prompt")
    return {
        r["id"]: {"messages": json.loads(r["messages_json"]), "sha256": r["content_sha256"]} for r in rows
    }


def battles(store: Store, *, exclude: tuple[str, ...] = ()) -> list[Battle]:
    """One battle per vote on a non-gold pair item (Arena counts votes, not items)."""
    gens = _generations(store)
    out = []
    for v in responses(store):
        if v["kind"] != "pair" or v["is_gold"] or v["annotator"] in exclude or v["choice"] is None:
            continue
        a, b = gens[v["gen_a"]], gens[v["gen_b"]]
        out.append(
            Battle(a["model"]["name"], b["model"]["name"], v["choice"], len(a["text"]), len(b["text"]))
        )
    return out


def project_status(store: Store) -> dict:
    db = store.read()
    q = lambda sql: db.execute(sql).fetchone()[0] or 0  # noqa: E731
    return {
        "items": q("SELECT COUNT(*) FROM item WHERE is_gold = 0"),
        "complete": q("SELECT COUNT(*) FROM item WHERE is_gold = 0 AND status = 'complete'"),
        "gold": q("SELECT COUNT(*) FROM item WHERE is_gold = 1"),
        "votes": q("SELECT COUNT(*) FROM response"),
        "pending": q("SELECT COUNT(*) FROM assignment WHERE status = 'pending'"),
        "skipped": q("SELECT COUNT(*) FROM assignment WHERE status = 'skipped'"),
        "annotators": q("SELECT COUNT(*) FROM annotator WHERE disabled = 0"),
        "flagged": q("SELECT COUNT(*) FROM response WHERE flags_json != '[]'"),
        "edits": q("SELECT COUNT(*) FROM response WHERE edits_json != '{}'"),
    }


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def build_rows(
    store: Store,
    fmt: str,
    *,
    min_votes: int = 1,
    min_agreement: float = 0.0,
    exclude_annotators: tuple[str, ...] = (),
    drop_ties: bool = False,
    weighting: str = "none",
    kto_threshold: float | None = None,
) -> tuple[list[dict], list[tuple[str, int]]]:
    """(rows, filters with the items each removed) of one format; see the module docstring."""
    if fmt not in FORMATS:
        raise ConfigError(f"collect export: format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if weighting not in ("none", "gold"):
        raise ConfigError(f"collect export: weighting must be 'none' or 'gold' (got {weighting!r})")
    config = store.config
    weights = {}
    if weighting == "gold":
        weights = {name: a["weight"] for name, a in agreement(store)["annotators"].items()}
    gens, prompts = _generations(store), _prompts(store)
    items = {r["id"]: dict(r) for r in store.read().execute("SELECT * FROM item")}
    votes_by_item: dict[int, list[dict]] = defaultdict(list)
    excluded = 0
    for v in responses(store):
        if v["annotator"] in exclude_annotators:
            excluded += 1
            continue
        votes_by_item[v["item_id"]].append(v)
    removed: Counter = Counter()
    rows: list[dict] = []
    scale = config.get("rubric", {}).get("scale", [1, 5])
    threshold = kto_threshold if kto_threshold is not None else (scale[0] + scale[1]) / 2
    exported_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for item_id, item in sorted(items.items()):
        votes = votes_by_item.get(item_id, [])
        gold = json.loads(item["gold_json"]) if item["gold_json"] else None
        if item["is_gold"] and fmt != "eval":
            continue
        if item["status"] == "retired":
            removed["retired items"] += 1
            continue
        if len(votes) < min_votes and not (fmt == "eval" and item["is_gold"]):
            removed["min_votes"] += 1
            continue
        total = Counter()
        for v in votes:
            total[v["choice"]] += weights.get(v["annotator"], 1.0)
        weight_sum = sum(total.values())
        decision, top = max(total.items(), key=lambda kv: kv[1]) if total else (None, 0.0)
        share = top / weight_sum if weight_sum else math.nan
        if item["kind"] == "pair" and votes and share < min_agreement:
            removed["min_agreement"] += 1
            continue
        if drop_ties and decision in ("tie", "both_bad"):
            removed["drop_ties"] += 1
            continue
        a, b = gens[item["gen_a"]], gens.get(item["gen_b"])
        prompt = prompts[item["prompt_id"]]
        meta = {
            "item_id": item_id,
            "project": config.get("name"),
            "guidelines_version": config.get("guidelines_version"),
            "models": {"a": a["model"], **({"b": b["model"]} if b else {})},
            "generation": {"a": {"config": a["gen_config"], "seed": a["seed"]}}
            | ({"b": {"config": b["gen_config"], "seed": b["seed"]}} if b else {}),
            "n_votes": len(votes),
            "votes": [
                {
                    "annotator": store.annotator_hash(v["annotator_id"]),
                    "choice": v["choice"],
                    "strength": v["strength"],
                    "weight": weights.get(v["annotator"], 1.0),
                    "duration_ms": v["duration_ms"],
                    "rubric": v["rubric"],
                    "flags": v["flags"],
                }
                for v in votes
            ],
            "decision": decision,
            "agreement": share,
            "is_gold": bool(item["is_gold"]),
            "sampling_policy": item["sampling_policy"],
            "item_meta": json.loads(item["meta_json"]),
            "exported_at": exported_at,
        }
        text = {"a": a["text"], "b": b["text"] if b else None}
        if fmt in ("dpo", "rm"):
            if decision in ("a", "b") and b and text["a"] == text["b"]:
                removed["identical_answers"] += 1
            elif decision in ("a", "b") and b:
                other = "b" if decision == "a" else "a"
                sign = 1 if decision == "a" else -1
                margin = (
                    sum(weights.get(v["annotator"], 1.0) * sign * (signed(v) or 0) for v in votes)
                    / weight_sum
                )
                rows.append(
                    {"prompt": prompt["messages"], "chosen": _assistant(text[decision]),
                     "rejected": _assistant(text[other]), "margin": margin, "meta": meta | {"source": "vote"}}
                )  # fmt: skip
            elif b:
                removed["no_preference (tie / both bad)"] += 1
        if fmt in ("dpo", "rm", "sft"):
            for v in votes:
                for side, edited in (v["edits"] or {}).items():
                    m = meta | {
                        "source": "edit",
                        "edited_side": side,
                        "editor": store.annotator_hash(v["annotator_id"]),
                    }
                    if fmt == "sft":
                        rows.append({"messages": prompt["messages"] + _assistant(edited), "meta": m})
                    else:
                        rows.append(
                            {"prompt": prompt["messages"], "chosen": _assistant(edited),
                             "rejected": _assistant(text[side]), "margin": 2.0, "meta": m}
                        )  # fmt: skip
        if fmt == "kto":
            if decision in ("a", "b") and b:
                other = "b" if decision == "a" else "a"
                for side, label in ((decision, True), (other, False)):
                    rows.append({"prompt": prompt["messages"], "completion": _assistant(text[side]), "label": label,
                                 "meta": meta | {"source": "pair", "side": side}})  # fmt: skip
            for side in ("a", "b"):
                scores = [s for v in votes for s in (v["rubric"] or {}).get(side, {}).values()]
                if scores and (item["kind"] == "single" or decision not in ("a", "b")):
                    mean = sum(scores) / len(scores)
                    rows.append({"prompt": prompt["messages"], "completion": _assistant(text[side]),
                                 "label": mean >= threshold, "meta": meta | {"source": "rubric", "side": side,
                                 "rubric_mean": mean}})  # fmt: skip
        if fmt == "eval":
            rows.append(
                {"prompt": prompt["messages"], "gold": gold, "human": {"decision": decision, "agreement": share},
                 "meta": meta | {"prompt_sha256": prompt["sha256"]}}
            )  # fmt: skip
        if fmt == "redteam":
            flags = Counter(f for v in votes for f in v["flags"] or [])
            if flags:
                responses_ = [{"side": "a", "model": a["model"]["name"], "text": a["text"]}]
                if b:
                    responses_.append({"side": "b", "model": b["model"]["name"], "text": b["text"]})
                rows.append(
                    {
                        "prompt": prompt["messages"],
                        "flags": dict(flags),
                        "responses": responses_,
                        "meta": meta,
                    }
                )
    filters = [("exclude_annotators (votes)", excluded)] if exclude_annotators else []
    filters += [(name, n) for name, n in removed.items()]
    return [jsonable(r) for r in rows], filters


def export(store: Store, fmt: str, out: str | Path, *, actor: str = "cli", **filters) -> dict:
    """Write the rows of ``fmt`` to ``out`` (jsonl), DATA_CARD.md and manifest.json beside it."""
    from posttrain import __version__
    from posttrain.audit.data_card import data_card
    from posttrain.audit.hashes import hash_inputs, sha256_file
    from posttrain.data.io import write_jsonl
    from posttrain.engine.run import Run

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = out.parent / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("algorithm") != "collect_export":
        raise ConfigError(
            f"collect export: {manifest_path} belongs to another run; export into its own directory"
        )
    rows, removed = build_rows(store, fmt, **filters)
    if not rows:
        raise ConfigError(f"collect export: no {fmt} rows pass the filters ({removed or 'no votes yet'})")
    with tempfile.TemporaryDirectory() as tmp:
        db_sha = sha256_file(store.backup(Path(tmp) / "snapshot.sqlite"))
    for row in rows:
        row["meta"]["db_sha256"] = db_sha
        row["meta"]["posttrain_version"] = __version__
    write_jsonl(out, rows)
    models = sorted(
        {
            m["path"]
            for r in rows
            for m in r["meta"]["models"].values()
            if m.get("path") and Path(m["path"]).is_dir()
        }
    )
    config = {
        "algorithm": "collect_export",
        "format": fmt,
        "filters": {k: list(v) if isinstance(v, tuple) else v for k, v in filters.items()},
    }
    run = Run(out.parent)
    run.write_manifest(config=config, seed=0, inputs=[], models=models)
    run.update_manifest(
        inputs={
            **hash_inputs([]),
            f"{store.path} (snapshot)": db_sha,
            **json.loads(manifest_path.read_text())["inputs"],
        },
        collect={"project": store.config.get("name"), "format": fmt, "rows": len(rows), "output": out.name},
    )
    votes = sum(r["meta"].get("n_votes", 0) for r in rows)
    card = data_card(
        out, sources=[{"name": f"collect project {store.config.get('name')}", "sha256": db_sha, "description": str(store.path)}],
        filters=removed, protocol="human", title=f"collect {fmt} export", out=out.parent / "DATA_CARD.md",
        extra={"format": fmt, "filters": json.dumps(config["filters"]), "votes behind the rows": votes,
               "guidelines_version": store.config.get("guidelines_version")},
    )  # fmt: skip
    sha = sha256_file(out)
    with store.write() as db:
        db.execute(
            "INSERT INTO export (format, filters_json, path, sha256, n_rows, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (fmt, json.dumps(config["filters"]), str(out), sha, len(rows), time.time()),
        )
        store.log(db, actor, "export", {"format": fmt, "path": str(out), "rows": len(rows), "sha256": sha})
    return {"rows": len(rows), "path": str(out), "card": str(card), "removed": removed, "sha256": sha}
