"""Stored agent episodes as training data: rejection sampling / expert iteration for agents.

    posttrain replay RUN_DIR --to-sft sft.jsonl     # the successful episodes, as chat rows
    posttrain replay RUN_DIR --to-dpo pairs.jsonl   # success vs failure on the same task

SFT rows are ``{"messages", "tools", "provenance"}``: the episode's conversation (opening, assistant turns,
tool results as rendered after truncation) and its tools. SFT renders them with the same chat template, so
the loss falls on the assistant turns only, the positions the episode's policy mask marks; tool turns are
unmasked context (``tests/test_agents_replay.py`` checks it token by token). An episode that ends on an
observation (``guess``: the last reply stays in the transcript) has the next turn's generation header at
its end; the row stops at the tool message, one header shorter, with no policy token in between.

Preference rows are text rows ``{"prompt", "chosen", "rejected", "provenance"}``: the rendered opening as
the prompt, and the rendered rest of a passed and of a failed episode of the same task (the same task
hash) as chosen and rejected. The chat preference schema holds assistant messages only, so the rest is
text, and DPO's log-ratios include the environment's tokens of both (identical tool outputs cancel out
only where the two episodes agree); the data card says so.

Kept: episodes that passed (graded passed, no failure label) and are not masked; for SFT, also only those
whose sampled ids are the canonical tokenization of their text (``verification.retokenized == 0``):
for the others the chat row would train a different tokenization of the same text than the policy's. Rejected sides: failed
episodes that are not masked (an infra, data or drift failure says nothing about the policy). Every row
carries ``provenance``: run, step, episode index, task id and hash, environment and version, grade.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from posttrain.agents.replay import Record, load_records, trajectories_file
from posttrain.errors import ConfigError


def passed(r: Record) -> bool:
    e = r.episode
    return e.grade is not None and e.grade.passed and e.failure is None and not e.masked


def provenance(r: Record, run: str) -> dict:
    e = r.episode
    return {
        "run": r.extra.get("run_id") or run,
        "step": r.step,
        "episode": e.index,
        "task_id": e.task_id,
        "task_hash": e.task_hash,
        "env": e.env,
        "env_version": e.env_version,
        "grade": None if e.grade is None else {"reward": e.grade.reward, "passed": e.grade.passed},
        "reward": e.reward,
        "failure": e.failure,
    }


def sft_rows(records: list[Record], run: str) -> tuple[list[dict], list[tuple[str, int]]]:
    """SFT rows of the passed episodes, and the filters with the rows each removed."""
    kept = [r for r in records if passed(r)]
    rows, empty, retokenized = [], 0, 0
    for r in kept:
        if (r.episode.verification or {}).get("retokenized", 0):
            retokenized += 1  # SFT would train the canonical tokens of the text, not the ones sampled
            continue
        messages = r.episode.messages()
        if any(m["role"] == "assistant" and not str(m.get("content", "")).strip() for m in messages):
            empty += 1  # an empty assistant turn would train the model to say nothing
            continue
        rows.append({"messages": messages, "tools": r.episode.tools, "provenance": provenance(r, run)})
    filters = [
        ("not passed (or masked)", len(records) - len(kept)),
        ("non-canonical sampled tokens", retokenized),
    ]
    return rows, filters + [("an empty assistant turn", empty)]


def _rest(r: Record) -> str:
    return "".join(t.text for t in r.episode.turns[1:] if not t.dropped)


def dpo_rows(
    records: list[Record], run: str, *, max_pairs: int = 4
) -> tuple[list[dict], list[tuple[str, int]]]:
    """Preference rows: per task, up to ``max_pairs`` pairs of a passed and a failed episode."""
    by_task: dict[str, tuple[list[Record], list[Record]]] = defaultdict(lambda: ([], []))
    masked = 0
    for r in records:
        if r.episode.masked or not r.episode.turns:
            masked += 1
            continue
        by_task[r.episode.task_hash][0 if passed(r) else 1].append(r)
    rows, unpaired, same = [], 0, 0
    for good, bad in by_task.values():
        if not good or not bad:
            unpaired += len(good) + len(bad)
            continue
        for i in range(min(max_pairs, max(len(good), len(bad)))):
            g, b = good[i % len(good)], bad[i % len(bad)]
            chosen, rejected = _rest(g), _rest(b)
            if chosen == rejected:
                same += 1
                continue
            rows.append(
                {
                    "prompt": g.episode.turns[0].text,
                    "chosen": chosen,
                    "rejected": rejected,
                    "provenance": {"chosen": provenance(g, run), "rejected": provenance(b, run)},
                }
            )
    return rows, [
        ("masked", masked),
        ("no success-failure pair on its task", unpaired),
        ("identical pair", same),
    ]


def export(run_dir, *, sft: str | None = None, dpo: str | None = None, max_pairs: int = 4):
    """Write the SFT or the preference rows of a run and their DATA_CARD.md; (path, rows, card path)."""
    from posttrain.audit.data_card import data_card

    if bool(sft) == bool(dpo):
        raise ConfigError("replay export: give exactly one of --to-sft / --to-dpo")
    source = trajectories_file(run_dir)
    records = load_records(run_dir)
    run = source.parent.name
    if sft:
        rows, filters = sft_rows(records, run)
        out, what = Path(sft), "SFT rows of the successful episodes"
    else:
        rows, filters = dpo_rows(records, run, max_pairs=max_pairs)
        out, what = Path(dpo), "preference rows: a successful vs a failed episode of the same task"
    if not rows:
        raise ConfigError(
            f"{source}: no episode qualifies ({'; '.join(f'{n}: {k}' for n, k in filters if k)})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    envs = sorted({f"{r.episode.env} {r.episode.env_version}".strip() for r in records})
    limitations = [
        "Episodes were sampled by the policy of the run; they show what it could do, not the optimum."
    ]
    if dpo:
        limitations.append(
            "Chosen and rejected are rendered text: DPO's log-ratios include the environment's tokens "
            "(tool results) of both sides, not only the policy's."
        )
    card = data_card(
        out,
        sources=[str(source)],
        filters=filters,
        protocol="verifier",
        judge=f"the environment's grader ({', '.join(envs)})",
        title=out.name,
        description=f"{what}, exported by `posttrain replay` from run {run}.",
        out=out.with_name(out.stem + ".DATA_CARD.md"),
        extra={"episodes": len(records), "steps": len({r.step for r in records})},
        limitations=limitations,
    )
    return out, len(rows), card
