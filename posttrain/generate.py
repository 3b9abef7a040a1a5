"""Data generation with AI feedback: the model writes the data, a verifier or a judge labels it.

    best_of_n        sample n per prompt, score (verifier / reward fns / judge), keep the best as SFT
                     data and best-vs-worst as a preference pair (rejection sampling)
    constitutional   draft -> critique against a sampled principle -> revision (Bai et al. 2022,
                     "Constitutional AI", arXiv:2212.08073, sec. 3): SFT on revisions, revision over draft
    label_pairs      RLAIF: an LLM judge relabels existing preference pairs, judged in both orders;
                     pairs whose verdict flips with the order (position bias) or ties are dropped
    filter_rows      dedup, length bounds, score floor, eval contamination; each reports its removals
                     (posttrain/data/filters.py, re-exported here)

Everything generated is a plain row in the shapes ``posttrain.data.schemas`` reads (prompt and
answers both strings, or both message lists), plus a ``provenance`` field: the method, the model,
the scorer or judge and its scores, the principle. ``write_dataset`` writes the rows and a
DATA_CARD.md beside them (sources, labelling protocol, every filter with its removed count).

Generation goes through a *sampler*, ``fn(prompts, n) -> [[text] * n for each prompt]``:
:func:`model_sampler` builds one from a model directory (the rollout engine, with the chat
template); tests pass a stub.
"""

from __future__ import annotations

import json
import random
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from posttrain.data.filters import filter_rows  # noqa: F401 (posttrain.generate.filter_rows, as before)
from posttrain.data.io import read_rows, write_jsonl
from posttrain.errors import ConfigError
from posttrain.rollout.engine import Sampling

Prompt = str | list[dict]
Sampler = Callable[[list[Prompt], int], list[list[str]]]
"""``fn(prompts, n) -> [[text] * n for each prompt]``: n sampled completions per prompt."""

DEFAULT_PRINCIPLES = Path(__file__).parent / "generate_data" / "principles.yaml"


def model_sampler(model_path: str, sampling: Sampling, *, batch_size: int | None = None) -> Sampler:
    """A sampler generating with the model at ``model_path`` (GPU when there is one); message-list
    prompts go through its chat template with the generation prompt."""
    from posttrain.data.templates import encode_prompts
    from posttrain.rollout.engine import load_engine

    engine, tokenizer = load_engine(model_path, batch_size=batch_size)

    def sample(prompts: list[Prompt], n: int) -> list[list[str]]:
        _, ids = encode_prompts(tokenizer, prompts)
        groups = engine.generate(ids, n, sampling)
        truncated = sum(c.finish_reason == "length" for g in groups for c in g)
        if groups and truncated == sum(len(g) for g in groups):
            warnings.warn(
                f"every completion hit max_new_tokens={sampling.max_new_tokens}; raise it", stacklevel=2
            )
        return [[c.text for c in group] for group in groups]

    return sample


def _rows(source: str | Path | Sequence[dict]) -> list[dict]:
    return [row for _, row in read_rows(source)] if isinstance(source, (str, Path)) else list(source)


def _answer(prompt: Prompt, text: str):
    """A completion in the prompt's shape: a string, or one assistant message."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _turns(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# --------------------------------------------------------------------------------------- best-of-n


def _scorer(scorer) -> tuple[Callable, list[str], str]:
    """(``fn(prompts, texts, fields) -> scores``, component names, labelling protocol) for a
    :class:`~posttrain.eval.judge.Judge` or anything :func:`posttrain.rewards.combine` takes."""
    from posttrain.eval.judge import Judge
    from posttrain.rewards import combine

    if isinstance(scorer, Judge):

        def judged(prompts, texts, fields) -> list[float]:
            # an unparseable judgment scores 0: it must never beat a judged completion
            return [r.normalised or 0.0 for r in scorer.pointwise(prompts, texts)]

        return judged, [f"judge:{scorer.rubric.name}"], "judge"
    specs = [scorer] if isinstance(scorer, str) or callable(scorer) else scorer
    combined = combine(specs)
    names = list(combined.components)
    judged_by_model = any(
        isinstance(s, Mapping) and s.get("name") in ("judge", "reward_model") for s in specs
    ) or any(name in ("judge", "reward_model") for name in names)

    def scored(prompts, texts, fields) -> list[float]:
        return combined.score(prompts, texts, **fields).total

    return scored, names, "judge" if judged_by_model else "verifier"


def best_of_n(
    model_path: str,
    prompts_file: str | Path | Sequence[dict],
    *,
    n: int,
    scorer,
    sampling: Sampling | None = None,
    min_gap: float = 0.0,
    sampler: Sampler | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """Best-of-n / rejection sampling: sample ``n`` completions per prompt and score them.

    Args:
        model_path: the generator (recorded in every row; loaded unless ``sampler`` is given).
        prompts_file: prompt rows ``{"prompt", **fields}`` (a file or the rows); the fields
            (``answer``...) go to the reward fns and ride along into the output rows.
        scorer: reward specs as :func:`posttrain.rewards.combine` takes them (``["exact_match"]``),
            or a :class:`~posttrain.eval.judge.Judge` (pointwise score in [0, 1]).
        min_gap: a preference pair (best over worst) is kept when their score gap is >= this
            (and > 0: equal scores say nothing about which is better).
        sampler: generates instead of ``model_path``'s model (tests, other engines).

    Returns:
        ``(sft_rows, preference_rows, stats)``. One SFT row per prompt whose best completion is
        not blank (best = highest total score, the first on ties); rows are ``{"prompt",
        "completion", **fields, "provenance"}``. ``stats`` holds the mean score of all samples
        (plain sampling) and of the kept best ones, and the counts.
    """
    if n < 1:
        raise ConfigError(f"best_of_n: n must be >= 1 (got {n})")
    rows = _rows(prompts_file)
    score, names, protocol = _scorer(scorer)
    sample = sampler or model_sampler(model_path, sampling or Sampling())
    prompts = [row["prompt"] for row in rows]
    groups = sample(prompts, n)
    # one scoring call for all samples: every prompt's row fields repeated n times
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_texts = [t for g in groups for t in g]
    fields = {
        k: [row.get(k) for row in rows for _ in range(n)]
        for k in sorted({k for row in rows for k in row} - {"prompt", "provenance"})
    }
    flat_scores = score(flat_prompts, flat_texts, fields)

    sft, pairs = [], []
    counts = Counter()
    for i, (row, texts) in enumerate(zip(rows, groups)):
        scores = flat_scores[i * n : (i + 1) * n]
        best = max(range(n), key=lambda j: (scores[j], -j))
        worst = min(range(n), key=lambda j: (scores[j], j))
        extra = {k: v for k, v in row.items() if k not in ("prompt", "provenance")}
        prov = {"method": "best_of_n", "generator": str(model_path), "scorer": names, "n": n}
        if not texts[best].strip():
            counts["blank_best"] += 1
            continue
        counts["spread"] += scores[best] > scores[worst]
        sft.append(
            {
                "prompt": row["prompt"],
                "completion": _answer(row["prompt"], texts[best]),
                **extra,
                "provenance": {**prov, "score": scores[best], "scores": scores},
            }
        )
        gap = scores[best] - scores[worst]
        if gap <= 0 or gap < min_gap or not texts[worst].strip() or texts[best] == texts[worst]:
            counts["pairs_skipped"] += 1
            continue
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": _answer(row["prompt"], texts[best]),
                "rejected": _answer(row["prompt"], texts[worst]),
                **extra,
                "provenance": {**prov, "score": scores[best], "rejected_score": scores[worst], "gap": gap},
            }
        )
    if rows and counts["spread"] == 0:
        warnings.warn(
            "best_of_n: all n samples of every prompt scored the same; the scorer ranks nothing", stacklevel=2
        )
    stats = {
        "prompts": len(rows),
        "samples": len(flat_texts),
        "n": n,
        "protocol": protocol,
        "score_mean_all": sum(flat_scores) / len(flat_scores) if flat_scores else None,
        "score_mean_best": sum(r["provenance"]["score"] for r in sft) / len(sft) if sft else None,
        "sft_rows": len(sft),
        "preference_rows": len(pairs),
        "blank_best": counts["blank_best"],
        "pairs_below_gap": counts["pairs_skipped"],
    }
    return sft, pairs, stats


# ---------------------------------------------------------------------------------- constitutional


class Principle(BaseModel):
    """One principle: the critique request and the revision request sent after the draft."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(min_length=1)
    critique: StrictStr = Field(min_length=1)
    revision: StrictStr = Field(min_length=1)


def load_principles(path: str | Path = DEFAULT_PRINCIPLES) -> list[Principle]:
    """A YAML list of ``{id, critique, revision}``; ConfigError naming the file and entry."""
    from posttrain.sections import read_yaml, validate

    raw = read_yaml(path)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: expected a non-empty YAML list of {{id, critique, revision}}")
    principles = [validate(Principle, item, f"{path} entry {i}") for i, item in enumerate(raw)]
    dupes = [k for k, c in Counter(p.id for p in principles).items() if c > 1]
    if dupes:
        raise ConfigError(f"{path}: principle ids must be unique; repeated: {dupes}")
    return principles


def constitutional(
    model_path: str,
    prompts_file: str | Path | Sequence[dict],
    *,
    principles: str | Path | Sequence[Principle] = DEFAULT_PRINCIPLES,
    sampling: Sampling | None = None,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """Critique-and-revise: for each prompt the model drafts a response, critiques its draft
    against one principle (drawn with ``random.Random(seed)``, the same draw for the same seed),
    and revises it. Critique and revision continue the conversation, as in the paper:

        user: prompt / assistant: draft / user: critique request / assistant: critique /
        user: revision request / assistant: revision

    Returns:
        ``(sft_rows, preference_rows, stats)``: SFT rows are the revisions, preference rows the
        revision over the draft (when both are non-blank and differ). ``provenance`` records the
        model, the principle id, the draft and the critique.
    """
    rows = _rows(prompts_file)
    if isinstance(principles, (str, Path)):
        principles = load_principles(principles)
    rng = random.Random(seed)
    drawn = [rng.choice(principles) for _ in rows]
    sample = sampler or model_sampler(model_path, sampling or Sampling())
    prompts = [row["prompt"] for row in rows]
    drafts = [g[0] for g in sample(prompts, 1)]
    asked = [
        _turns(p) + [{"role": "assistant", "content": d}, {"role": "user", "content": pr.critique}]
        for p, d, pr in zip(prompts, drafts, drawn)
    ]
    critiques = [g[0] for g in sample(asked, 1)]
    asked = [
        a + [{"role": "assistant", "content": c}, {"role": "user", "content": pr.revision}]
        for a, c, pr in zip(asked, critiques, drawn)
    ]
    revisions = [g[0] for g in sample(asked, 1)]

    sft, pairs = [], []
    blank = unchanged = 0
    for row, draft, critique, revision, principle in zip(rows, drafts, critiques, revisions, drawn):
        prompt = row["prompt"]
        extra = {k: v for k, v in row.items() if k not in ("prompt", "provenance")}
        prov = {
            "method": "constitutional",
            "generator": str(model_path),
            "principle": principle.id,
            "seed": seed,
            "draft": draft,
            "critique": critique,
        }
        if not revision.strip():
            blank += 1
            continue
        sft.append({"prompt": prompt, "completion": _answer(prompt, revision), **extra, "provenance": prov})
        if not draft.strip() or draft.strip() == revision.strip():
            unchanged += 1
            continue
        pairs.append(
            {
                "prompt": prompt,
                "chosen": _answer(prompt, revision),
                "rejected": _answer(prompt, draft),
                **extra,
                "provenance": prov,
            }
        )
    stats = {
        "prompts": len(rows),
        "sft_rows": len(sft),
        "preference_rows": len(pairs),
        "blank_revisions": blank,
        "revision_same_as_draft": unchanged,
        "principles": dict(Counter(p.id for p in drawn)),
    }
    return sft, pairs, stats


# --------------------------------------------------------------------------------------- labelling


def label_pairs(pairs_file: str | Path | Sequence[dict], judge, *, judge_name: str = "judge"):
    """RLAIF: relabel preference pairs with an LLM judge (pairwise, both orders).

    Each pair is judged with the original chosen shown first and shown second; a verdict that
    changes with the order is position bias, not preference, so the pair is dropped, as are ties
    and failed judgments. A pair the judge prefers the other way round is flipped.

    Args:
        pairs_file: rows ``{"prompt", "chosen", "rejected", ...}`` (a file or the rows).
        judge: a :class:`~posttrain.eval.judge.Judge`.
        judge_name: recorded in each row's provenance (the judge model's path).

    Returns:
        ``(rows, stats)``: the kept pairs, ``provenance`` holding the judge, both verdicts and
        whether the pair was flipped; stats count consistent, inconsistent, failures, ties,
        kept, agreed (kept as given), flipped and dropped.
    """
    rows = _rows(pairs_file)
    report = judge.pairwise(
        [r["prompt"] for r in rows],
        [r["chosen"] for r in rows],
        [r["rejected"] for r in rows],
        swap=True,
        inconsistent="drop",
    )
    out, counts = [], Counter()
    for row, result in zip(rows, report.results):
        if result.verdict not in ("A", "B"):  # None: failed or inconsistent; "tie": no preference
            counts["ties" if result.verdict == "tie" else "dropped_other"] += 1
            continue
        flipped = result.verdict == "B"
        counts["flipped" if flipped else "agreed"] += 1
        chosen, rejected = (row["rejected"], row["chosen"]) if flipped else (row["chosen"], row["rejected"])
        prov = {
            "method": "rlaif_label",
            "judge": judge_name,
            "rubric": judge.rubric.name,
            "verdicts": [result.first, result.swapped],
            "flipped": flipped,
            "original": row.get("provenance"),
        }
        rest = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "provenance")}
        out.append(
            {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, **rest, "provenance": prov}
        )
    stats = {
        "pairs": len(rows),
        "consistent": report.consistent,
        "inconsistent": report.inconsistent,
        "failures": report.failures,
        "ties": counts["ties"],
        "kept": len(out),
        "agreed": counts["agreed"],
        "flipped": counts["flipped"],
        "dropped": len(rows) - len(out),
    }
    if rows and report.failures > len(rows) / 2:
        warnings.warn(
            f"label_pairs: {report.failures} of {len(rows)} judgments could not be parsed; check the judge "
            "model and its max_new_tokens",
            stacklevel=2,
        )
    if rows and report.inconsistent > report.consistent:
        warnings.warn(
            f"label_pairs: the judge was position-inconsistent on {report.inconsistent} of {len(rows)} pairs; "
            "it is measuring position, not quality",
            stacklevel=2,
        )
    return out, stats


def write_dataset(
    out_dir: str | Path,
    rows: list[dict],
    *,
    filters: Sequence[Mapping],
    sources: Sequence,
    protocol: str,
    generator: str | None = None,
    judge: str | None = None,
    stats: Mapping | None = None,
    title: str | None = None,
) -> Path | None:
    """``out_dir/data.jsonl`` and ``out_dir/DATA_CARD.md`` beside it; None (and a warning) when
    no row is left, since an empty file would only fail later, in training."""
    if not rows:
        warnings.warn(f"no rows left for {out_dir}; nothing written", stacklevel=2)
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(out_dir / "data.jsonl", rows)
    from posttrain.audit.data_card import data_card

    data_card(
        path,
        sources=sources,
        filters=filters,
        protocol=protocol,
        title=title,
        generator=generator,
        judge=judge,
        extra={k: json.dumps(v) if isinstance(v, dict) else v for k, v in (stats or {}).items()},
    )
    return path
