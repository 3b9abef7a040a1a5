"""Synthetic arithmetic: a verifiable task family at graded difficulty.

Every stage of the quickstart trains on it (pretraining, SFT, RL against the exact-match
reward) and every evaluation measures it, because it has three properties real tasks
rarely have together: unlimited fresh training data, an exact answer to check, and
levels a 1M-parameter model climbs one after another:

    level  example question                                          answer
    add1   "3+4"                                                      "7"
    add2   "12+35"                                                    "47"
    sub2   "52-17"                                                    "35"
    add3   "512+349"                                                  "861"
    sub3   "861-349"                                                  "512"
    word2  "Ana has 12 pens and buys 35 more. How many pens now?"     "47"
    eq2    "x+17=52, x=?"                                             "35"

add1 is learnt within seconds; the 3-digit levels need carries across three columns;
word2 hides a 2-digit sum or difference in a sentence with distractor words; eq2 needs
the inverse operation (x+17=52 is solved by 52-17).

**Held-out sets.** Each level has a fixed evaluation set (:func:`held_out`). No training
sampler here (:func:`sample_train`, :func:`sft_rows`, :func:`prompt_rows`,
:func:`pretrain_corpus`) ever emits a problem whose *key* is in any level's held-out set.
The key is the computation that produces the answer, not the surface text:
"12+35", "35+12" and "Ana has 12 pens and buys 35 more..." all have key
``("add", 12, 35)``, and "x+17=52, x=?" has the key of "52-17", ``("sub", 52, 17)``. So a
held-out fact is unseen in every wording, and held-out accuracy measures generalisation,
not recall.
"""

from __future__ import annotations

import functools
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.io import write_jsonl
from posttrain.tasks.tiny import build_tokenizer

LEVELS: tuple[str, ...] = ("add1", "add2", "sub2", "add3", "sub3", "word2", "eq2")
"""All levels, easiest first."""

HELD_OUT_SEED = 1234
"""Seed of the fixed held-out sets. Only these sets are excluded from training."""

HELD_OUT_SIZE = 400
"""Held-out problems per level; fewer where the level has few distinct problems."""

# add1 has only 55 distinct keys (a+b with a, b in 0..9, order ignored). Holding out 400
# is impossible and holding out most would leave nothing to train on, so it keeps 16 (29%)
# for evaluation: enough to see whether single-digit facts are known.
_HELD_OUT_CAP = {"add1": 16}

END = "<|end|>"  # the chat template's end-of-turn token, which is also the eos token

Key = tuple[str, int, int]


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem.

    Attributes:
        level: one of :data:`LEVELS`.
        question: the text the user sees, e.g. ``"12+35"``.
        answer: the exact expected answer, e.g. ``"47"``.
        key: the canonical computation behind the answer (see :func:`fact_key`); two
            problems with the same key are the same fact in different words.
    """

    level: str
    question: str
    answer: str
    key: Key


def fact_key(op: str, a: int, b: int) -> Key:
    """Canonical key of the computation ``a op b``: addition is commutative, so its operands
    are sorted; subtraction keeps its order."""
    if op == "add":
        return ("add", min(a, b), max(a, b))
    if op == "sub":
        return ("sub", a, b)
    raise ValueError(f"unknown operation {op!r}")


# ---------------------------------------------------------------------------------------
# Generators: one per level, each rng -> Problem. They know nothing about held-out sets.


def _number(rng: random.Random, n_digits: int) -> int:
    """A uniformly random number with exactly ``n_digits`` digits (0..9 for one digit)."""
    low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return rng.randint(low, 10**n_digits - 1)


def _operands(rng: random.Random, n_digits: int, op: str) -> tuple[int, int]:
    """Two ``n_digits`` operands; for subtraction the larger comes first, so no answer is negative."""
    a, b = _number(rng, n_digits), _number(rng, n_digits)
    if op == "sub" and a < b:
        a, b = b, a
    return a, b


def _expression(level: str, op: str, n_digits: int, rng: random.Random) -> Problem:
    a, b = _operands(rng, n_digits, op)
    if op == "add":
        return Problem(level, f"{a}+{b}", str(a + b), fact_key("add", a, b))
    return Problem(level, f"{a}-{b}", str(a - b), fact_key("sub", a, b))


_NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade")
_THINGS = ("pens", "apples", "stamps", "marbles", "books", "coins", "shells", "cards")
# Several wordings per operation, so the model has to read the verb, not a fixed position.
_ADD_STORIES = (
    "{name} has {a} {things} and buys {b} more. How many {things} now?",
    "{name} had {a} {things}. A friend gave {name} {b} more. How many {things} does {name} have?",
    "There are {a} {things} on a shelf and {b} in a bag. How many {things} in all?",
)
_SUB_STORIES = (
    "{name} has {a} {things} and gives away {b}. How many {things} are left?",
    "There are {a} {things} in a box. {name} takes {b} out. How many {things} are in the box now?",
    "{name} had {a} {things} and lost {b}. How many {things} does {name} have now?",
)


def _word(rng: random.Random) -> Problem:
    """A one-step story problem over two 2-digit numbers (sum or difference)."""
    op = rng.choice(("add", "sub"))
    a, b = _operands(rng, 2, op)
    story = rng.choice(_ADD_STORIES if op == "add" else _SUB_STORIES)
    question = story.format(name=rng.choice(_NAMES), things=rng.choice(_THINGS), a=a, b=b)
    answer = a + b if op == "add" else a - b
    return Problem("word2", question, str(answer), fact_key(op, a, b))


def _equation(rng: random.Random) -> Problem:
    """A linear equation in x over 2-digit numbers. The key is the computation that solves
    it: "x+17=52" and "17+x=52" are solved by 52-17, "x-17=35" by 17+35."""
    form = rng.choice(("x+b=c", "b+x=c", "x-b=c"))
    if form == "x-b=c":
        b, c = _operands(rng, 2, "add")
        return Problem("eq2", f"x-{b}={c}, x=?", str(b + c), fact_key("add", b, c))
    c, b = _operands(rng, 2, "sub")  # c >= b, so x = c - b >= 0
    lhs = f"x+{b}" if form == "x+b=c" else f"{b}+x"
    return Problem("eq2", f"{lhs}={c}, x=?", str(c - b), fact_key("sub", c, b))


_GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "add1": functools.partial(_expression, "add1", "add", 1),
    "add2": functools.partial(_expression, "add2", "add", 2),
    "sub2": functools.partial(_expression, "sub2", "sub", 2),
    "add3": functools.partial(_expression, "add3", "add", 3),
    "sub3": functools.partial(_expression, "sub3", "sub", 3),
    "word2": _word,
    "eq2": _equation,
}
assert tuple(_GENERATORS) == LEVELS


def _check_levels(levels: Sequence[str] | str) -> tuple[str, ...]:
    # A bare string would otherwise be iterated character by character.
    levels = (levels,) if isinstance(levels, str) else tuple(levels)
    unknown = [level for level in levels if level not in _GENERATORS]
    if not levels or unknown:
        raise ValueError(f"unknown or empty levels {unknown or levels!r}; choose from {LEVELS}")
    return levels


# ---------------------------------------------------------------------------------------
# Held-out sets and the training sampler that avoids them.


@functools.cache
def _held_out_full(level: str, seed: int) -> tuple[Problem, ...]:
    """The level's whole held-out list; :func:`held_out` returns prefixes of it, so a
    smaller evaluation set is always a subset of the excluded one."""
    rng = random.Random(f"held-out-{level}-{seed}")  # str seeds are stable across processes
    size = _HELD_OUT_CAP.get(level, HELD_OUT_SIZE)
    problems: dict[Key, Problem] = {}
    while len(problems) < size:
        problem = _GENERATORS[level](rng)
        problems.setdefault(problem.key, problem)
    return tuple(problems.values())


@functools.lru_cache(maxsize=1)
def held_out_keys() -> frozenset[Key]:
    """Keys of every level's fixed held-out set: what no training sampler may emit."""
    return frozenset(p.key for level in LEVELS for p in _held_out_full(level, HELD_OUT_SEED))


def held_out(level: str, n: int = HELD_OUT_SIZE, seed: int = HELD_OUT_SEED) -> list[Problem]:
    """The fixed evaluation set of ``level``: the same problems on every call, distinct keys.

    Args:
        level: one of :data:`LEVELS`.
        n: how many; at most :data:`HELD_OUT_SIZE` (16 for add1) are available, and
            ``n`` beyond that returns them all.
        seed: leave at :data:`HELD_OUT_SEED`. Another seed gives another set that the
            training samplers do NOT avoid (a warning says so).
    """
    (level,) = _check_levels(level)
    if seed != HELD_OUT_SEED:
        warnings.warn(
            f"held_out(seed={seed}) is not the fixed held-out set: training samplers do not avoid it",
            stacklevel=2,
        )
    return list(_held_out_full(level, seed)[:n])


def sample_train(rng: random.Random, levels: Sequence[str] = LEVELS) -> Problem:
    """One training problem: a level drawn uniformly from ``levels``, then a problem of that
    level whose key is in no level's held-out set (rejection sampling; at most ~30% of
    draws are rejected, in add1)."""
    level = rng.choice(_check_levels(levels))
    excluded = held_out_keys()
    while True:
        problem = _GENERATORS[level](rng)
        if problem.key not in excluded:
            return problem


# ---------------------------------------------------------------------------------------
# Rows in the shapes the data loaders read.


def _user(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _prompt_row(problem: Problem) -> dict:
    return {"prompt": _user(problem.question), "answer": problem.answer, "level": problem.level}


def sft_rows(n: int, *, seed: int = 0, levels: Sequence[str] = LEVELS) -> list[dict]:
    """``n`` supervised chat rows: ``{"messages": [user, assistant], "level": ...}``."""
    rng = random.Random(f"sft-{seed}")  # its own stream: not the same problems as prompt_rows
    rows = []
    for _ in range(n):
        problem = sample_train(rng, levels)
        messages = _user(problem.question) + [{"role": "assistant", "content": problem.answer}]
        rows.append({"messages": messages, "level": problem.level})
    return rows


def prompt_rows(n: int, *, seed: int = 0, levels: Sequence[str] = LEVELS) -> list[dict]:
    """``n`` RL prompts: ``{"prompt": [user], "answer": ..., "level": ...}``."""
    rng = random.Random(f"prompts-{seed}")
    return [_prompt_row(sample_train(rng, levels)) for _ in range(n)]


def eval_rows(levels: Sequence[str] = LEVELS, n_per_level: int = HELD_OUT_SIZE) -> list[dict]:
    """The held-out sets of ``levels`` as prompt rows (same shape as :func:`prompt_rows`)."""
    return [_prompt_row(p) for level in _check_levels(levels) for p in held_out(level, n_per_level)]


# ---------------------------------------------------------------------------------------
# Pretraining corpus for the tiny base model.


def plain_text(problem: Problem) -> str:
    """The problem and its answer as one line of plain text: "12+35=47",
    "x+17=52, x=35", "Ana has ... How many pens now? 47"."""
    if problem.level == "word2":
        return f"{problem.question} {problem.answer}"
    if problem.level == "eq2":
        return problem.question.removesuffix("?") + problem.answer
    return f"{problem.question}={problem.answer}"


@functools.lru_cache(maxsize=1)
def _chat_tokenizer():
    return build_tokenizer()  # only to render the chat template, the one source of the format


def _plain_document(rng: random.Random, max_chars: int, levels: Sequence[str]) -> tuple[str, list[Problem]]:
    n_lines = rng.randint(3, 8)
    lines, problems = [], []
    while len(lines) < n_lines:
        problem = sample_train(rng, levels)
        line = plain_text(problem)
        if lines and len("\n".join(lines + [line])) > max_chars:
            break
        lines.append(line)
        problems.append(problem)
    return "\n".join(lines), problems


def _chat_document(rng: random.Random, levels: Sequence[str]) -> tuple[str, list[Problem]]:
    problems = [sample_train(rng, levels) for _ in range(rng.randint(1, 3))]
    messages = []
    for problem in problems:
        messages += _user(problem.question) + [{"role": "assistant", "content": problem.answer}]
    return _chat_tokenizer().apply_chat_template(messages, tokenize=False), problems


def _documents(n_docs: int, seed: int, chat_fraction: float, max_chars: int, levels: Sequence[str] = LEVELS):
    """Yield ``(text, problems)`` per document; the problems let tests check the keys."""
    rng = random.Random(f"pretrain-{seed}")
    for _ in range(n_docs):
        if rng.random() < chat_fraction:
            yield _chat_document(rng, levels)
        else:
            yield _plain_document(rng, max_chars, levels)


def pretrain_corpus(
    n_docs: int,
    *,
    seed: int = 0,
    chat_fraction: float = 0.3,
    max_chars: int = 240,
    levels: Sequence[str] = LEVELS,
) -> list[dict]:
    """``{"text": ...}`` documents for pretraining the tiny base model.

    Most documents are a few lines of plain solved problems from ``levels``
    (:func:`plain_text`); a ``chat_fraction`` of them are 1-3 question/answer turns
    rendered with the chat template ("<|user|>12+35<|end|><|assistant|>47<|end|>"), so
    the base model has met the chat format (and learnt to stop after ``<|end|>``) before
    SFT. No document contains a held-out problem in any wording.

    Args:
        max_chars: plain documents stop adding lines before passing this length, so that a
            document is never cut by a 256-token context (the tokenizer is char-level).
    """
    docs = _documents(n_docs, seed, chat_fraction, max_chars, _check_levels(levels))
    return [{"text": text} for text, _ in docs]


# ---------------------------------------------------------------------------------------
# Scoring and files.


def exact_match(completion: str, answer: str) -> float:
    """1.0 iff the completion, cut at the end token and at the first newline and stripped
    of surrounding whitespace, is exactly ``answer``; else 0.0. Trailing text after the
    answer (without an end token) counts as wrong: the model must learn to stop."""
    text = completion.split(END, 1)[0].split("\n", 1)[0].strip()
    return float(text == answer.strip())


def write_task_files(
    out_dir: str | Path,
    *,
    n_sft: int = 20_000,
    n_prompts: int = 20_000,
    n_pretrain_docs: int = 20_000,
    seed: int = 0,
    levels: Sequence[str] = LEVELS,
    prompt_levels: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write the task's jsonl files into ``out_dir``; the RL prompts are of ``prompt_levels``
    (default: ``levels``).

    Returns:
        ``{"sft_train": ..., "prompts_train": ..., "eval": ..., "pretrain": ...}``, each the
        path of ``<name>.jsonl``. The eval file holds every level's full held-out set.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        "sft_train": sft_rows(n_sft, seed=seed, levels=levels),
        "prompts_train": prompt_rows(n_prompts, seed=seed, levels=prompt_levels or levels),
        "eval": eval_rows(levels),
        "pretrain": pretrain_corpus(n_pretrain_docs, seed=seed, levels=levels),
    }
    return {name: write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in tables.items()}
