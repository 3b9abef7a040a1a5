"""Data generation with AI feedback: best-of-n beats plain sampling under a verifier on a partly trained
tiny model, pairs respect min_gap, critique-revise rows carry their provenance, the judge's labels drop
position-inconsistent pairs, filters count removals and the data card lists them."""

import argparse
import json
import re
import warnings

import pytest

from posttrain import generate
from posttrain.cli import generate as generate_cli
from posttrain.data.io import Location
from posttrain.data.schemas import validate_rows
from posttrain.eval.judge import Judge
from posttrain.rollout.engine import Sampling
from posttrain.tasks import arithmetic
from posttrain.tasks.tiny import build_tiny
from posttrain.train import train


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny model after a short SFT on single-digit sums: it answers some of them right."""
    root = tmp_path_factory.mktemp("generate")
    build_tiny(root / "tiny", size="tiny")
    files = arithmetic.write_task_files(
        root / "data", n_sft=640, n_prompts=32, n_pretrain_docs=10, levels=("add1",)
    )
    cfg = {
        "algorithm": "sft",
        "out": str(root / "sft"),
        "model": {"path": str(root / "tiny")},
        "data": {"train": str(files["sft_train"]), "max_length": 64},
        "train": {"lr": 3e-3, "batch_size": 16, "max_steps": 40, "schedule": "constant", "progress": False,
                  "tensorboard": False},
    }  # fmt: skip
    return str(train(cfg).final), files


def _checked(rows, kind):
    return validate_rows([(Location("generated", i), r) for i, r in enumerate(rows)], kind)


def test_best_of_n_raises_the_verifier_pass_rate(task, tmp_path):
    model, files = task
    sampling = Sampling(max_new_tokens=6, temperature=1.0, seed=0)
    sft, pairs, stats = generate.best_of_n(
        model, files["prompts_train"], n=8, scorer=["exact_match"], sampling=sampling, min_gap=0.5
    )
    plain = stats["score_mean_all"]  # the verifier's pass rate over all n samples: plain sampling
    kept = [arithmetic.exact_match(r["completion"][0]["content"], r["answer"]) for r in sft]
    best = sum(kept) / len(kept)
    print(f"pass rate: best-of-8 {best:.3f} vs plain sampling {plain:.3f} ({stats['samples']} samples)")
    assert 0 < plain < 0.5 and best > plain + 0.1
    assert stats["protocol"] == "verifier" and stats["samples"] == 32 * 8
    _checked(sft, "sft"), _checked(pairs, "preference")  # chat prompts, assistant-message answers
    prov = sft[0]["provenance"]
    assert prov["generator"] == model and prov["scorer"] == ["exact_match"] and prov["n"] == 8
    assert len(prov["scores"]) == 8 and prov["score"] == max(prov["scores"])
    assert pairs and all(p["provenance"]["gap"] >= 0.5 for p in pairs)  # verified right over wrong
    assert all(arithmetic.exact_match(p["chosen"][0]["content"], p["answer"]) == 1.0 for p in pairs)

    kept_rows, steps = generate.filter_rows(sft, min_score=1.0)
    path = generate.write_dataset(
        tmp_path / "sft", kept_rows, filters=steps, sources=[str(files["prompts_train"])],
        protocol=stats["protocol"], generator=model, judge="exact_match", stats=stats,
    )  # fmt: skip
    card = (path.parent / "DATA_CARD.md").read_text()
    assert "score floor" in card and "verifier" in card and model in card


def _stub_sampler(outputs):
    """A sampler returning fixed groups of texts, one group per prompt in order."""

    def sample(prompts, n):
        return [outputs[p if isinstance(p, str) else p[-1]["content"]][:n] for p in prompts]

    return sample


def test_preference_pairs_respect_min_gap():
    rows = [{"prompt": q} for q in ("q1", "q2", "q3")]
    outputs = {"q1": ["a", "bb", "ccc"], "q2": ["a", "bbbbb", "c"], "q3": ["same", "same", "same"]}

    def length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    sft, pairs, stats = generate.best_of_n(
        "stub", rows, n=3, scorer=[length], min_gap=3, sampler=_stub_sampler(outputs)
    )
    assert [r["completion"] for r in sft] == ["ccc", "bbbbb", "same"]  # strings in, strings out
    # q1's gap is 2 < 3, q3 has none: only q2 makes a pair
    assert [(p["prompt"], p["chosen"], p["rejected"], p["provenance"]["gap"]) for p in pairs] == [
        ("q2", "bbbbb", "a", 4.0)
    ]
    assert stats["pairs_below_gap"] == 2 and stats["preference_rows"] == 1
    _, pairs, _ = generate.best_of_n("stub", rows, n=3, scorer=[length], sampler=_stub_sampler(outputs))
    assert len(pairs) == 2  # min_gap 0 still needs a gap: equal scores are no preference


def test_critique_revise_on_the_tiny_model_records_provenance(task):
    model, files = task
    rows = arithmetic.prompt_rows(4, seed=3, levels=("add1",))
    sampling = Sampling(max_new_tokens=8, temperature=1.0, seed=0)
    sft, pairs, stats = generate.constitutional(model, rows, sampling=sampling, seed=1)
    ids = {p.id for p in generate.load_principles()}
    assert stats["prompts"] == 4 and sum(stats["principles"].values()) == 4
    assert stats["sft_rows"] == len(sft) > 0 and stats["preference_rows"] == len(pairs)
    for row in sft + pairs:
        prov = row["provenance"]
        assert prov["method"] == "constitutional" and prov["generator"] == model and prov["principle"] in ids
        assert {"draft", "critique"} <= set(prov) and row["answer"]  # the prompt row's fields ride along
    _checked(sft, "sft"), _checked(pairs, "preference")


def test_critique_revise_content_with_a_stub_model():
    principles = [
        generate.Principle(id="p1", critique="Critique by p1.", revision="Revise by p1."),
        generate.Principle(id="p2", critique="Critique by p2.", revision="Revise by p2."),
    ]
    seen = []

    def sample(prompts, n):  # draft, critique or revision, told apart by the last user turn
        seen.extend(prompts)
        out = []
        for p in prompts:
            last = p if isinstance(p, str) else p[-1]["content"]
            if last.startswith("Critique"):
                out.append([f"critique of {p[1]['content']}"])
            elif last.startswith("Revise"):
                out.append(["draft" if p[0]["content"] == "keep" else f"revised ({last[-3:-1]})"])
            else:
                out.append(["draft"])
        return out

    rows = [{"prompt": "q1"}, {"prompt": "keep"}, {"prompt": [{"role": "user", "content": "q3"}]}]
    sft, pairs, stats = generate.constitutional(
        "stub-model", rows, principles=principles, seed=7, sampler=sample
    )
    again = generate.constitutional("stub-model", rows, principles=principles, seed=7, sampler=sample)
    assert [r["provenance"]["principle"] for r in again[0]] == [r["provenance"]["principle"] for r in sft]
    p = sft[0]["provenance"]["principle"]
    assert sft[0] == {
        "prompt": "q1",
        "completion": f"revised ({p})",
        "provenance": {"method": "constitutional", "generator": "stub-model", "principle": p, "seed": 7,
                       "draft": "draft", "critique": "critique of draft"},
    }  # fmt: skip
    # the revision request continues the whole conversation, with the sampled principle's texts
    revision_turns = [c for c in seen if isinstance(c, list) and c[-1]["content"].startswith("Revise")]
    assert [m["role"] for m in revision_turns[0]] == ["user", "assistant", "user", "assistant", "user"]
    assert revision_turns[0][2]["content"] == f"Critique by {p}."
    # "keep": revision == draft gives an SFT row but no pair; chat prompts give chat answers
    assert len(sft) == 3 and len(pairs) == 2 and stats["revision_same_as_draft"] == 1
    assert pairs[0]["chosen"] == f"revised ({p})" and pairs[0]["rejected"] == "draft"
    assert pairs[1]["chosen"][0]["role"] == "assistant" and _checked(pairs, "preference")


def _pair_judge(prefer):
    """A stub judge: prefers the answer for which ``prefer(a, b)`` says "A"/"B", or is position-biased."""

    def outputs(texts):
        out = []
        for t in texts:
            a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", t, re.S).group(1)
            b = re.search(r"\[Answer B\]\n(.*?)\n\nExplain", t, re.S).group(1)
            out.append(f"reasoning [[{prefer(a, b)}]]")
        return out

    return Judge(outputs)


def test_judge_labelling_drops_position_inconsistent_labels():
    rows = [
        {"prompt": "p0", "chosen": "good 0", "rejected": "bad 0", "id": 0},  # agreed
        {"prompt": "p1", "chosen": "bad 1", "rejected": "good 1", "id": 1},  # flipped
        {"prompt": "p2", "chosen": "meh 2", "rejected": "poor 2", "id": 2},  # position A wins: dropped
        {"prompt": "p3", "chosen": "good 3", "rejected": "good 3b", "id": 3},  # tie: dropped
    ]

    def prefer(a, b):
        if a.startswith("good") and b.startswith("good"):
            return "tie"
        if "good" in (a.split()[0], b.split()[0]):
            return "A" if a.startswith("good") else "B"
        return "A"  # no good answer: the judge just picks the first one shown

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mostly consistent judge raises no position-bias warning
        out, stats = generate.label_pairs(rows, _pair_judge(prefer), judge_name="stub-judge")
    assert [(r["id"], r["chosen"], r["provenance"]["flipped"]) for r in out] == [
        (0, "good 0", False),
        (1, "good 1", True),
    ]
    assert stats == {"pairs": 4, "consistent": 3, "inconsistent": 1, "failures": 0, "ties": 1, "kept": 2,
                     "agreed": 1, "flipped": 1, "dropped": 2}  # fmt: skip
    assert out[1]["provenance"]["judge"] == "stub-judge" and out[1]["provenance"]["verdicts"] == ["B", "B"]
    with pytest.warns(UserWarning, match="position-inconsistent"):
        generate.label_pairs(rows[2:3], _pair_judge(lambda a, b: "A"))


def test_filters_count_removals_and_the_card_lists_them(tmp_path):
    def row(prompt, completion, score):
        return {"prompt": prompt, "completion": completion, "provenance": {"score": score}}

    rows = [
        row("What is 12+35?", "47", 1.0),
        row("what is 12 + 35 ?", "47", 1.0),  # exact duplicate once normalised
        row("What is 20+22?", "4" * 50, 1.0),  # too long
        row("What is 30+31?", "61", 0.0),  # below the score floor
        row("What is 3+4?", "7", 1.0),  # in the eval set
        row("What is 5+6?", "11", 1.0),
    ]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": "What is 3+4?", "answer": "7"}) + "\n")
    kept, steps = generate.filter_rows(
        rows, dedup="exact", max_chars=20, min_score=0.5, against=[eval_file], contamination_n=13
    )
    assert [r["completion"] for r in kept] == ["47", "11"]
    assert [(s["name"], s["removed"]) for s in steps] == [
        ("dedup (exact)", 1),
        ("length", 1),
        ("score floor", 1),
        ("contamination", 1),
    ]
    path = generate.write_dataset(tmp_path / "out", kept, filters=steps, sources=["inline"], protocol="judge")
    card = (path.parent / "DATA_CARD.md").read_text()
    for name, removed in [("dedup (exact)", 1), ("length", 1), ("score floor", 1), ("contamination", 1)]:
        assert re.search(rf"\| {re.escape(name)} \| \d+ \| {removed} \|", card), name
    with pytest.raises(Exception, match="no provenance.score"):
        generate.filter_rows([{"prompt": "a", "completion": "b"}], min_score=0.5)


def test_cli_wiring():
    parser = argparse.ArgumentParser(prog="posttrain")
    generate_cli.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["generate", "best-of-n", "--model", "m", "--prompts", "p.jsonl", "--out", "o", "-n", "4",
         "--reward", "exact_match", "--reward", '{"name": "format_regex", "pattern": "\\\\d+"}', "--min-gap", "1"]
    )  # fmt: skip
    assert args.func is generate_cli._best_of_n and args.n == 4 and args.min_gap == 1.0
    assert generate_cli._reward_spec(args.reward[1]) == {"name": "format_regex", "pattern": "\\d+"}
    args = parser.parse_args(["generate", "constitutional", "--model", "m", "--prompts", "p", "--out", "o"])
    assert args.principles == str(generate.DEFAULT_PRINCIPLES) and args.dedup == "near"
    args = parser.parse_args(["generate", "label", "--pairs", "p", "--judge", "j", "--out", "o"])
    assert args.func is generate_cli._label and not hasattr(args, "temperature")
    assert len(generate.load_principles()) >= 4
