"""``posttrain collect ...``: the human feedback app's commands (the app is posttrain/collect/)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from posttrain.errors import ConfigError


class ProjectConfig(BaseModel):
    """collect.yaml: every key optional."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    required_votes: int = Field(3, ge=1, description="Votes an item needs before it is complete.")
    lease_minutes: float = Field(30, gt=0, description="How long an item stays leased to one annotator.")
    max_pending: int = Field(8, ge=1, description="Most leases one annotator may hold at once.")
    gold_rate: float = Field(0.1, ge=0, le=1, description="Share of hidden gold items served.")
    qualification_accuracy: float = Field(0.8, ge=0, le=1, description="Gold accuracy to pass qualification.")
    min_alpha: float = Field(0.2, description="Alert when the project's choice alpha is below this.")
    min_gold: float = Field(
        0.6, description="Alert when an annotator's gold-accuracy lower bound is below this."
    )
    min_shared: int = Field(20, ge=2, description="Items two annotators share before their kappa is shown.")
    guidelines: str = Field("", description="Guidelines shown on every item (text, or a path to a .md file).")
    guidelines_version: str = "1"
    rubric: str | dict = Field("default", description="Rubric YAML path, bundled name, or inline mapping.")
    show_suggestions: bool = Field(False, description="Show a judge's pre-label on items that have one.")


def project_path(name: str) -> Path:
    path = Path(name)
    return path if path.suffix in (".sqlite", ".db") else path.with_name(path.name + ".sqlite")


def _store(args):
    from posttrain.collect.store import Store

    return Store(project_path(args.project))


def _init(args) -> int:
    import yaml

    from posttrain.collect.store import Store
    from posttrain.rewards.rubric import load_rubric

    raw = {}
    if args.config:
        try:
            raw = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"collect init: cannot read {args.config}: {e}") from None
    try:
        config = ProjectConfig(**raw)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{args.config}: {where}") from None
    rubric = load_rubric(config.rubric)
    data = config.model_dump()
    if data["guidelines"].endswith(".md") and Path(data["guidelines"]).is_file():
        data["guidelines"] = Path(data["guidelines"]).read_text()
    path = project_path(args.project)
    data["name"] = data["name"] or path.stem
    data["rubric"] = {
        "name": rubric.name,
        "scale": list(rubric.scale),
        "dimensions": [{"name": d.name, "description": d.description} for d in rubric.dimensions],
    }
    Store.create(path, data).close()
    print(f"created {path} (rubric {rubric.name}: {', '.join(d.name for d in rubric.dimensions)})")
    return 0


def _prompts_add(args) -> int:
    from posttrain.collect.ingest import add_prompts

    result = add_prompts(_store(args), args.file)
    print(f"{args.file}: {result['added']} prompts added, {result['duplicates']} duplicates skipped")
    return 0


def _pairs_add(args) -> int:
    from posttrain.collect.ingest import add_pairs

    result = add_pairs(_store(args), args.file)
    print(f"{args.file}: {result['items']} pair items added ({result['prompts_added']} new prompts)")
    return 0


def _generate(args) -> int:
    from posttrain.collect.ingest import generate_pairs

    result = generate_pairs(
        _store(args), args.model_a, args.model_b, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )  # fmt: skip
    print(f"{result['items']} pair items generated")
    return 0


def _annotator_add(args) -> int:
    token = _store(args).add_annotator(args.name, args.role)
    print(f"{args.name} ({args.role}): {args.base_url.rstrip('/')}/login?token={token}")
    print("this link is shown once; the project stores only its hash")
    return 0


def _annotator_remove(args) -> int:
    _store(args).revoke(args.name)
    print(f"{args.name}: token and sessions revoked, pending leases released (votes kept)")
    return 0


def _retire(args) -> int:
    _store(args).retire_item(args.item, args.reason)
    print(f"item {args.item} retired: out of the queue and of every export")
    return 0


def _serve(args) -> int:
    from posttrain.collect.web import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}, reachable from other machines; use TLS in front of it")
    print(f"serving {project_path(args.project)} on http://{args.host}:{args.port} (Ctrl-C stops)")
    serve(project_path(args.project), host=args.host, port=args.port)
    return 0


def _dump(value) -> str:
    from posttrain.collect.export import jsonable

    return json.dumps(jsonable(value), indent=2)


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _status(args) -> int:
    from posttrain.collect.export import project_status

    status = project_status(_store(args))
    print(_dump(status) if args.json else "  ".join(f"{k} {v}" for k, v in status.items()))
    return 0


def _agreement(args) -> int:
    from posttrain.collect.agreement import agreement, health_alerts

    store = _store(args)
    report = agreement(store)
    if args.json:
        print(_dump(report))
    else:
        for q, a in report["questions"].items():
            extra = f"  percent {_fmt(a['percent'])}" if "percent" in a else ""
            print(f"{q:<24} alpha {_fmt(a['alpha'])}{extra}  items {a['items']}")
        for p in report["pairs"]:
            print(f"kappa {p['a']} / {p['b']}: {_fmt(p['kappa'])} over {p['shared']} items")
        print(
            f"{'annotator':<14}{'votes':>6}{'gold':>8}{'gold 95% CI':>14}{'left':>7}{'median s':>9}{'kappa-maj':>10}"
        )
        for name, a in report["annotators"].items():
            ci = f"{_fmt(a['gold_low'], '.2f')}-{_fmt(a['gold_high'], '.2f')}"
            print(f"{name:<14}{a['votes']:>6}{a['gold_correct']:>4}/{a['gold_answered']:<3}{ci:>14}"
                  f"{_fmt(a['left_share'], '.2f'):>7}{_fmt(a['median_seconds'], '.1f'):>9}{_fmt(a['kappa_vs_majority']):>10}")  # fmt: skip
    alerts = health_alerts(store, report, alerts_path=args.alerts, echo=None if args.json else print)
    return 1 if alerts and args.fail else 0


def _leaderboard(args) -> int:
    from posttrain.collect.export import battles
    from posttrain.collect.leaderboard import leaderboard

    b = battles(_store(args), exclude=tuple(args.exclude_annotators or ()))
    if not b:
        raise ConfigError("collect leaderboard: no votes on pairs yet")
    board = leaderboard(b, rounds=args.rounds, length_control=args.length_control)
    if args.json:
        print(_dump(board.to_dict()))
        return 0
    print(f"{'rank':<5}{'model':<28}{'rating':>8}{'95% CI':>16}{'battles':>9}  W/L/T/both-bad")
    for r in board.rows:
        ci = f"{r['low']:.0f}-{r['high']:.0f}"
        print(f"{r['rank_ub']:<5}{r['model']:<28}{r['rating']:>8.0f}{ci:>16}"
              f"{r['battles']:>9}  {r['wins']}/{r['losses']}/{r['ties']}/{r['both_bad']}")  # fmt: skip
    if board.length_coef is not None:
        print(f"length coefficient {board.length_coef:.3f} (positive: longer answers win more)")
    for note in board.notes:
        print(f"note: {note}")
    return 0


def _export(args) -> int:
    from posttrain.collect.export import export

    result = export(
        _store(args), args.format, args.out, min_votes=args.min_votes, min_agreement=args.min_agreement,
        exclude_annotators=tuple(args.exclude_annotators or ()), drop_ties=args.drop_ties,
        weighting=args.weighting, kto_threshold=args.kto_threshold,
    )  # fmt: skip
    removed = ", ".join(f"{name} -{n}" for name, n in result["removed"]) or "nothing removed"
    print(f"{result['rows']} {args.format} rows -> {result['path']} ({removed}); card {result['card']}")
    return 0


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """Add ``collect`` to ``posttrain``'s subparsers."""
    p = subparsers.add_parser(
        "collect",
        help="human feedback: a local web app to compare, rate, edit and flag answers; agreement, leaderboard, export",
        description="Collect human preferences in a local web app backed by one SQLite file (PROJECT.sqlite). "
        "The web server needs the extra: pip install 'posttrain[collect]'.",
    )
    sub = p.add_subparsers(dest="collect_command", required=True, metavar="COLLECT_COMMAND")

    def cmd(name, func, help, description=None):
        c = sub.add_parser(name, help=help, description=description or help)
        c.add_argument("project", metavar="PROJECT", help="the project (PROJECT.sqlite)")
        c.set_defaults(func=func)
        return c

    c = cmd(
        "init", _init, "create a project", "Create PROJECT.sqlite from collect.yaml (every key optional)."
    )
    c.add_argument(
        "--config", metavar="YAML", help="project settings (required_votes, gold_rate, rubric, ...)"
    )
    for name, func, what in (
        ("prompts", _prompts_add, "prompts (jsonl of messages or prompts; deduplicated)"),
        ("pairs", _pairs_add, 'ready-made pairs: {"prompt", "a", "b", "model_a", "model_b"} per row'),
    ):
        group = sub.add_parser(name, help=f"add {what}", description=f"Add {what}.")
        gsub = group.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")
        add = gsub.add_parser("add", help=f"add {what}", description=f"Add {what}.")
        add.add_argument("project", metavar="PROJECT")
        add.add_argument("file", metavar="FILE")
        add.set_defaults(func=func)
    g = cmd("generate", _generate, "two local checkpoints answer every prompt; one pair item each")
    g.add_argument("--model-a", required=True, metavar="PATH", help="model directory (or hub name)")
    g.add_argument("--model-b", required=True, metavar="PATH", help="model directory (or hub name)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.7, help="(default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    a = sub.add_parser("annotator", help="add an annotator (prints a login link)", description="Annotators.")
    asub = a.add_subparsers(dest="annotator_command", required=True, metavar="ACTION")
    aa = asub.add_parser("add", help="add an annotator; prints their login link once")
    aa.add_argument("project", metavar="PROJECT")
    aa.add_argument("name", metavar="NAME")
    aa.add_argument("--role", choices=["annotator", "reviewer", "admin"], default="annotator")
    aa.add_argument(
        "--base-url", default="http://127.0.0.1:8765", help="where the app is served (default: %(default)s)"
    )
    aa.set_defaults(func=_annotator_add)
    ar = asub.add_parser("remove", help="revoke an annotator's token and sessions (their votes are kept)")
    ar.add_argument("project", metavar="PROJECT")
    ar.add_argument("name", metavar="NAME")
    ar.set_defaults(func=_annotator_remove)
    ir = cmd("retire", _retire, "take an item out of the queue and out of every export (logged)")
    ir.add_argument("item", type=int, metavar="ITEM_ID")
    ir.add_argument("--reason", required=True, help="why (kept in the event log)")
    s = cmd("serve", _serve, "serve the annotation app (127.0.0.1 by default)")
    s.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    s.add_argument("--port", type=int, default=8765, help="(default: %(default)s)")
    cmd("status", _status, "items, votes, leases, skips, flags").add_argument("--json", action="store_true")
    ag = cmd("agreement", _agreement, "alpha and kappa per question, annotator reliability; health alerts")
    ag.add_argument("--json", action="store_true")
    ag.add_argument("--alerts", metavar="JSONL", help="also append the alerts to this file")
    ag.add_argument("--fail", action="store_true", help="exit 1 when an alert fires (for CI)")
    lb = cmd(
        "leaderboard", _leaderboard, "Bradley-Terry ratings with bootstrap 95%% intervals (Arena's maths)"
    )
    lb.add_argument("--json", action="store_true")
    lb.add_argument("--rounds", type=int, default=200, help="bootstrap rounds (default: %(default)s)")
    lb.add_argument("--length-control", action="store_true", help="control for answer length (contextual BT)")
    lb.add_argument(
        "--exclude-annotators", type=_names, metavar="A,B", help="leave these annotators' votes out"
    )
    e = cmd(
        "export", _export, "write dpo | rm | kto | sft | eval | redteam rows with provenance and a data card"
    )
    e.add_argument("--format", required=True, choices=["dpo", "rm", "kto", "sft", "eval", "redteam"])
    e.add_argument(
        "--out", required=True, metavar="FILE", help="jsonl file; DATA_CARD.md and manifest.json go beside it"
    )
    e.add_argument("--min-votes", type=int, default=1, help="(default: %(default)s)")
    e.add_argument(
        "--min-agreement", type=float, default=0.0, help="weight share of the decision (default: %(default)s)"
    )
    e.add_argument(
        "--exclude-annotators", type=_names, metavar="A,B", help="leave these annotators' votes out"
    )
    e.add_argument("--drop-ties", action="store_true", help="leave out items decided as tie or both bad")
    e.add_argument(
        "--weighting", choices=["none", "gold"], default="none", help="vote weights (default: %(default)s)"
    )
    e.add_argument(
        "--kto-threshold", type=float, help="kto: mean rubric score for a good answer (default: mid-scale)"
    )
    return p
