"""``posttrain generate best-of-n | constitutional | label``: data with AI feedback."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.generate import (
    DEFAULT_PRINCIPLES,
    best_of_n,
    constitutional,
    filter_rows,
    label_pairs,
    write_dataset,
)
from posttrain.rollout.engine import Sampling


def _sampling(args) -> Sampling:
    return Sampling(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )


def _filter_options(args) -> dict:
    return {
        "dedup": args.dedup,
        "min_chars": args.min_chars,
        "max_chars": args.max_chars,
        "against": args.contamination or (),
        "contamination_n": args.contamination_n,
        "contamination_unit": args.contamination_unit,
    }


def _write_all(
    args, outputs: dict[str, list[dict]], stats: dict, *, protocol, sources, generator, judge, min_score=None
) -> None:
    print(json.dumps(stats))
    for kind, rows in outputs.items():
        kept, steps = filter_rows(rows, **_filter_options(args), min_score=min_score)
        path = write_dataset(
            Path(args.out) / kind,
            kept,
            filters=steps,
            sources=sources,
            protocol=protocol,
            generator=generator,
            judge=judge,
            stats=stats,
            title=f"{args.generate_command} {kind}",
        )
        removed = ", ".join(f"{s['name']} -{s['removed']}" for s in steps) or "no filters"
        print(f"{kind}: {len(rows)} rows, {len(kept)} kept after filters ({removed}) -> {path}")


def _reward_spec(text: str):
    return json.loads(text) if text.lstrip().startswith("{") else text


def _best_of_n(args) -> int:
    from posttrain.eval.judge import Judge

    if bool(args.reward) == bool(args.judge):
        raise ConfigError("best-of-n: give either --reward (repeatable) or --judge MODEL")
    scorer = (
        Judge.from_pretrained(args.judge, args.rubric)
        if args.judge
        else [_reward_spec(r) for r in args.reward]
    )
    sft, pairs, stats = best_of_n(
        args.model, args.prompts, n=args.n, scorer=scorer, sampling=_sampling(args), min_gap=args.min_gap
    )
    _write_all(
        args,
        {"sft": sft, "preference": pairs},
        stats,
        protocol=stats["protocol"],
        sources=[args.prompts],
        generator=args.model,
        judge=args.judge or ", ".join(map(str, args.reward)),
        min_score=args.min_score,
    )
    return 0


def _constitutional(args) -> int:
    sft, pairs, stats = constitutional(
        args.model, args.prompts, principles=args.principles, sampling=_sampling(args), seed=args.seed
    )
    _write_all(
        args,
        {"sft": sft, "preference": pairs},
        stats,
        protocol="judge",
        sources=[args.prompts, str(args.principles)],
        generator=args.model,
        judge=f"{args.model} (self-critique)",
    )
    return 0


def _label(args) -> int:
    from posttrain.eval.judge import Judge

    judge = Judge.from_pretrained(args.judge, args.rubric, max_new_tokens=args.max_new_tokens)
    rows, stats = label_pairs(args.pairs, judge, judge_name=args.judge)
    _write_all(
        args,
        {"preference": rows},
        stats,
        protocol="judge",
        sources=[args.pairs],
        generator=None,
        judge=f"{args.judge} (rubric {args.rubric}, both orders)",
    )
    return 0


def _common(p, *, sampling: bool = True) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/<kind>/data.jsonl + DATA_CARD.md")
    if sampling:
        p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default: %(default)s")
        p.add_argument("--temperature", type=float, default=1.0, help="default: %(default)s")
        p.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
        p.add_argument(
            "--seed", type=int, default=0, help="sampling (and principle) seed; default: %(default)s"
        )
    f = p.add_argument_group("filters (applied to every output, in this order; the card lists removals)")
    f.add_argument("--dedup", choices=["near", "exact", "none"], default="near", help="default: %(default)s")
    f.add_argument("--min-chars", type=int, metavar="N", help="drop rows with an answer shorter than N chars")
    f.add_argument("--max-chars", type=int, metavar="N", help="drop rows with an answer longer than N chars")
    f.add_argument(
        "--contamination",
        action="append",
        metavar="EVAL",
        help="eval file whose prompts must not appear (n-gram overlap with the row's prompt); repeatable",
    )
    f.add_argument("--contamination-n", type=int, default=13, metavar="N", help="n-gram length; default: 13")
    f.add_argument("--contamination-unit", choices=["word", "char"], default="word", help="default: word")


def add_parsers(subparsers) -> None:
    """Add ``posttrain generate {best-of-n, constitutional, label}`` to ``posttrain``'s subparsers."""
    g = subparsers.add_parser(
        "generate",
        help="generate training data with AI feedback: best-of-n, constitutional revisions, RLAIF labels",
        description="Generate SFT and preference data with a model and a verifier or judge. Every row records "
        "its provenance; each output gets a DATA_CARD.md with its sources and filter counts.",
    )
    gsub = g.add_subparsers(dest="generate_command", required=True, metavar="GENERATE_COMMAND")
    b = gsub.add_parser(
        "best-of-n",
        help="sample n per prompt, keep the best (SFT) and best-vs-worst (preference)",
        description="Rejection sampling: n completions per prompt scored by reward fns (a verifier such as "
        "exact_match, using the prompt rows' fields) or an LLM judge; the best becomes an SFT row, best over "
        "worst a preference pair when their score gap is >= --min-gap.",
    )
    b.add_argument("--model", required=True, metavar="DIR", help="generator model (directory or hub name)")
    b.add_argument("--prompts", required=True, metavar="FILE", help="prompt rows {prompt, ...fields}")
    b.add_argument("-n", type=int, default=8, help="samples per prompt (default: %(default)s)")
    b.add_argument(
        "--reward",
        action="append",
        metavar="SPEC",
        help="reward spec: a name (exact_match, math_answer), module:function or a JSON dict; repeatable",
    )
    b.add_argument("--judge", metavar="DIR", help="score with this LLM judge (pointwise) instead of --reward")
    b.add_argument("--rubric", default="default", help="judge rubric (default: %(default)s)")
    b.add_argument("--min-gap", type=float, default=0.0, help="least best-worst score gap for a pair")
    b.add_argument("--min-score", type=float, help="filter: drop rows whose kept answer scored below this")
    _common(b)
    b.set_defaults(func=_best_of_n)

    c = gsub.add_parser(
        "constitutional",
        help="draft, critique against a principle, revise (Constitutional AI)",
        description="For each prompt the model drafts, critiques its draft against a principle drawn with "
        "--seed, and revises: revisions become SFT rows, revision-over-draft preference pairs.",
    )
    c.add_argument(
        "--model", required=True, metavar="DIR", help="the model that drafts, critiques and revises"
    )
    c.add_argument("--prompts", required=True, metavar="FILE", help="prompt rows {prompt, ...}")
    c.add_argument(
        "--principles",
        default=str(DEFAULT_PRINCIPLES),
        metavar="YAML",
        help="list of {id, critique, revision} (default: the bundled principles.yaml)",
    )
    _common(c)
    c.set_defaults(func=_constitutional)

    lab = gsub.add_parser(
        "label",
        help="relabel preference pairs with an LLM judge (RLAIF), dropping position-inconsistent labels",
        description="Judge each pair in both orders; keep it (flipped if the judge prefers the rejected answer) "
        "only when both orders agree on a winner. Prints consistent / flipped / dropped counts.",
    )
    lab.add_argument(
        "--pairs", required=True, metavar="FILE", help="preference rows {prompt, chosen, rejected}"
    )
    lab.add_argument("--judge", required=True, metavar="DIR", help="the judge model (directory or hub name)")
    lab.add_argument("--rubric", default="default", help="judge rubric (default: %(default)s)")
    lab.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="judge budget")
    _common(lab, sampling=False)
    lab.set_defaults(func=_label)
