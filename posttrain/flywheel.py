"""The data flywheel: product / chat logs -> SFT, preference, KTO, eval and red-team splits.

One log row is one conversation as the product saw it (OpenAI-style messages), with what the user did:

    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}],   # the last turn is the answer shown
     "thumbs": "up" | "down" | null,
     "edited": "the user's corrected answer" | null,
     "regenerations": ["an earlier answer the user regenerated away from", ...],
     "flagged": false | true | "reason",
     "consent": true,                                                 # may the row be used for training
     "id": "...", ...}                                                # anything else is kept in meta

The pipeline, in order, each step counted in every split's data card (``report.json`` has them all):

1. **consent**: rows without ``consent: true`` are dropped (``assume_consent`` lifts this, for logs
   whose consent was settled upstream);
2. **PII**: e-mails, phone numbers, keys, card numbers and IPs are replaced by ``[KIND]`` in every text
   (:mod:`posttrain.data.pii`); counted per kind, never logged;
3. **red team**: rows the user flagged, or whose prompt matches the harmful-request patterns below, go to
   the red-team split (prompt, the answers given, whether they refused) and nowhere else;
4. **dedup**: exact and near duplicates of (prompt, answer) (:func:`posttrain.data.quality.dedup`);
5. **eval**: a stable share of distinct prompts (chosen by the hash of the prompt, so the same prompt is
   always on the same side) is held out, frozen as ``eval/data.jsonl`` with each prompt's sha256; with
   ``against`` files (existing eval sets) those are held out too;
6. **contamination**: training rows whose prompt shares a long n-gram with any held-out prompt are dropped
   (:func:`posttrain.data.quality.contamination`);
7. **routing**: ``sft/`` gets edited answers and thumbs-up answers; ``preference/`` gets edited over original
   and the kept answer over each regenerated-away one; ``kto/`` gets thumbs as labels.

Rows whose signals disagree (a thumbs-down with no better answer, a regenerated answer then thumbed down)
are *uncertain*: they are written to ``uncertain.jsonl``, which :func:`posttrain.collect.ingest.send_to_review`
puts in a ``posttrain collect`` project for people to judge, with an optional pre-label from a judge (shown to
annotators only when the project enables suggestions).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from posttrain.data.io import read_rows, write_jsonl
from posttrain.data.pii import scrub
from posttrain.errors import DataError

HARMFUL = re.compile(
    r"(?i)\b(?:how (?:do|can|to) (?:i |you |we )?(?:make|build|synthesi[sz]e|cook|get) (?:a |an |some )?"
    r"(?:bomb|explosive|pipe bomb|nerve agent|sarin|ricin|meth(?:amphetamine)?|untraceable gun|bioweapon)"
    r"|(?:write|create|build) (?:a |some )?(?:ransomware|keylogger|malware|computer virus)"
    r"|(?:hack|break) into (?:my |someone'?s |a |an |the )?(?:[\w']+ ){0,2}(?:account|email|phone|network|server)"
    r"|(?:poison|kill|hurt|stalk) (?:my (?:wife|husband|partner|neighbou?r|boss|ex|family|child|kid)|someone|somebody|"
    r"people|a person|a child)\b"
    r"|launder (?:money|cash)|steal (?:a |someone'?s )?(?:credit card|identity|car))"
)
"""Clearly harmful requests (weapons, malware, intrusion, violence, fraud): a pattern list, not a classifier.
User flags catch what it misses; put a moderation model in front of it for real traffic."""


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string (got {type(value).__name__})")
    return value


def parse_row(loc, row: dict) -> dict:
    """A validated log row (errors name file, line and field)."""
    where = str(loc)
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(
            f"{where}: field 'messages' must list the conversation, ending with the assistant's answer"
        )
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: field 'messages[{k}]' needs a role (system, user, assistant, tool)")
        _text(m.get("content"), where, f"messages[{k}].content")
    if messages[-1]["role"] != "assistant" or messages[-2]["role"] not in ("user", "tool"):
        raise DataError(f"{where}: field 'messages' must end with a user turn and the assistant's answer")
    thumbs = row.get("thumbs")
    if thumbs not in (None, "up", "down"):
        raise DataError(f"{where}: field 'thumbs' must be 'up', 'down' or null (got {thumbs!r})")
    edited = row.get("edited")
    if edited is not None:
        _text(edited, where, "edited")
    regens = row.get("regenerations") or []
    if not isinstance(regens, list):
        raise DataError(f"{where}: field 'regenerations' must be a list of earlier answers")
    regens = [
        _text(r.get("content") if isinstance(r, dict) else r, where, f"regenerations[{i}]")
        for i, r in enumerate(regens)
    ]
    known = {"messages", "thumbs", "edited", "regenerations", "flagged", "consent"}
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in messages[:-1]],
        "answer": messages[-1]["content"],
        "thumbs": thumbs,
        "edited": edited
        if edited and edited.strip() and edited.strip() != messages[-1]["content"].strip()
        else None,
        "regenerations": [r for r in regens if r.strip() and r.strip() != messages[-1]["content"].strip()],
        "flagged": bool(row.get("flagged")),
        "flag_reason": row.get("flagged") if isinstance(row.get("flagged"), str) else None,
        "consent": row.get("consent") is True,
        "meta": {k: v for k, v in row.items() if k not in known} | {"source": where},
    }


def prompt_hash(prompt: list[dict]) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _prompt_text(prompt: list[dict]) -> str:
    return "\n".join(m["content"] for m in prompt if m["role"] == "user")


def _scrub_row(r: dict, counts: Counter) -> dict:
    r = dict(r)
    r["prompt"] = [{**m, "content": scrub(m["content"], counts)[0]} for m in r["prompt"]]
    r["answer"] = scrub(r["answer"], counts)[0]
    r["edited"] = scrub(r["edited"], counts)[0] if r["edited"] else None
    r["regenerations"] = [scrub(x, counts)[0] for x in r["regenerations"]]
    return r


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def flywheel(
    logs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    eval_share: float = 0.1,
    against: Sequence[str | Path] = (),
    assume_consent: bool = False,
    near_threshold: float = 0.8,
    contamination_n: int = 8,
    seed: int = 0,
) -> dict:
    """Run the pipeline (module docstring); writes ``out/{sft,preference,kto,eval,redteam}/data.jsonl``
    each with DATA_CARD.md, plus ``out/report.json`` and ``out/uncertain.jsonl``; returns the report."""
    from posttrain.audit.data_card import data_card
    from posttrain.data.quality import contamination, dedup, read_texts
    from posttrain.eval.metrics import is_refusal

    files = [logs] if isinstance(logs, (str, Path)) else list(logs)
    rows, errors = [], []
    for f in files:
        for loc, row in read_rows(f):
            try:
                rows.append(parse_row(loc, row))
            except DataError as e:
                errors.append(str(e))
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} bad log row(s):\n  " + "\n  ".join(errors[:20]) + more)
    out = Path(out)
    removed: list[tuple[str, int, str]] = []
    total = len(rows)

    kept = rows if assume_consent else [r for r in rows if r["consent"]]
    removed.append(("no consent", len(rows) - len(kept), "rows without consent: true"))
    pii: Counter = Counter()
    kept = [_scrub_row(r, pii) for r in kept]

    redteam_rows = [r for r in kept if r["flagged"] or HARMFUL.search(_prompt_text(r["prompt"]))]
    kept = [r for r in kept if not (r["flagged"] or HARMFUL.search(_prompt_text(r["prompt"])))]
    removed.append(("red team (flagged or harmful prompt)", len(redteam_rows), "moved to the red-team split"))

    texts = [_prompt_text(r["prompt"]) + "\n" + r["answer"] for r in kept]
    result = dedup(texts, threshold=near_threshold, seed=seed)
    removed.append(
        ("exact and near duplicates", len(kept) - len(result.kept), f"MinHash Jaccard >= {near_threshold}")
    )
    kept = [kept[i] for i in result.kept]

    # hold out a stable share of distinct prompts: the first 8 hex digits of the prompt's hash, as a number
    # in [0, 1), below eval_share
    def held(r) -> bool:
        return int(prompt_hash(r["prompt"])[:8], 16) / 16**8 < eval_share

    eval_rows, seen = [], set()
    for r in kept:
        h = prompt_hash(r["prompt"])
        if held(r) and h not in seen:
            seen.add(h)
            eval_rows.append({"prompt": r["prompt"], "sha256": h, "meta": r["meta"]})
    train = [r for r in kept if not held(r)]
    removed.append(
        ("held out for eval", len(kept) - len(train), f"{eval_share:.0%} of distinct prompts, by hash")
    )
    reference = [_prompt_text(e["prompt"]) for e in eval_rows]
    for f in against:
        reference += [text for _, _, text in read_texts(str(f))]
    if reference and train:
        # each training prompt against every held-out text: the share of its n-grams found there (a prompt
        # shorter than n counts as leaked when it appears whole inside an eval text)
        prompts = [_prompt_text(r["prompt"]) for r in train]
        overlaps = contamination(reference, prompts, n=contamination_n, threshold=0.5)
        leaked = {o.index for o in overlaps if o.flagged}
        removed.append(
            (
                "eval contamination",
                len(leaked),
                f"over half the prompt's {contamination_n}-grams in an eval text",
            )
        )
        train = [r for t, r in enumerate(train) if t not in leaked]

    sft, pref, kto, uncertain = [], [], [], []
    for r in train:
        meta = r["meta"]
        if r["edited"]:
            sft.append(
                {"messages": r["prompt"] + _assistant(r["edited"]), "meta": meta | {"source_signal": "edit"}}
            )
            pref.append({"prompt": r["prompt"], "chosen": _assistant(r["edited"]), "rejected": _assistant(r["answer"]),
                         "meta": meta | {"source_signal": "edit_over_original"}})  # fmt: skip
        elif r["thumbs"] == "up":
            sft.append(
                {
                    "messages": r["prompt"] + _assistant(r["answer"]),
                    "meta": meta | {"source_signal": "thumbs_up"},
                }
            )
        if r["regenerations"] and r["thumbs"] != "down":
            for discarded in r["regenerations"]:
                pref.append({"prompt": r["prompt"], "chosen": _assistant(r["edited"] or r["answer"]),
                             "rejected": _assistant(discarded), "meta": meta | {"source_signal": "regeneration"}})  # fmt: skip
        if r["thumbs"] is not None:
            kto.append({"prompt": r["prompt"], "completion": _assistant(r["answer"]), "label": r["thumbs"] == "up",
                        "meta": meta | {"source_signal": "thumbs"}})  # fmt: skip
        if r["thumbs"] == "down" and not r["edited"]:
            uncertain.append(r)
    red = [
        {"prompt": r["prompt"], "flags": {"user_flag": r["flagged"], "reason": r["flag_reason"],
         "harmful_pattern": bool(HARMFUL.search(_prompt_text(r["prompt"])))},
         "responses": [{"text": t, "refused": is_refusal(t)} for t in [r["answer"], *r["regenerations"]]],
         "failed": [t for t in [r["answer"], *r["regenerations"]] if not is_refusal(t)], "meta": r["meta"]}
        for r in redteam_rows
    ]  # fmt: skip

    report = {
        "rows_read": total,
        "removed": {name: n for name, n, _ in removed},
        "pii_replaced": dict(pii),
        "splits": {
            "sft": len(sft),
            "preference": len(pref),
            "kto": len(kto),
            "eval": len(eval_rows),
            "redteam": len(red),
        },
        "uncertain": len(uncertain),
    }
    filters = [{"name": name, "removed": n, "description": note} for name, n, note in removed]
    extra = {f"pii replaced: {k}": v for k, v in sorted(pii.items())} | {"rows read": total}
    for name, split_rows in (
        ("sft", sft),
        ("preference", pref),
        ("kto", kto),
        ("eval", eval_rows),
        ("redteam", red),
    ):
        if not split_rows:
            continue
        (out / name).mkdir(parents=True, exist_ok=True)
        path = write_jsonl(out / name / "data.jsonl", split_rows)
        data_card(
            path, sources=[str(f) for f in files], filters=filters, protocol="human", title=f"flywheel {name}",
            description="Product logs through posttrain's flywheel (posttrain data flywheel): the filter counts "
            "are over the whole log, before routing.", extra=extra,
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        out / "uncertain.jsonl",
        [{"prompt": r["prompt"], "answer": r["answer"], "meta": r["meta"]} for r in uncertain],
    )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
