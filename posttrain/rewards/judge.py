"""LLM-as-judge: a local model grades completions against a rubric, pointwise or pairwise.

The rubric (dimensions, scale, prompts) and the parsing of the judge's output are in
:mod:`posttrain.rewards.rubric`.

- **Pointwise**: the judge scores one completion on every dimension; the overall score is the
  weighted mean, and :func:`judge` maps it to [0, 1] as a reward fn for suites and RL.
- **Pairwise**: the judge sees two completions and names the better one: ``[[A]]``, ``[[B]]`` or
  ``[[tie]]``. LLM judges favour one position whatever the answers (Zheng et al. 2023, "Judging
  LLM-as-a-Judge with MT-Bench and Chatbot Arena", position bias), so each pair is judged in both
  orders; a pair whose verdict flips with the order is *inconsistent* and becomes a tie or is
  dropped (``inconsistent="tie"|"drop"``). The consistent / inconsistent counts are reported:
  a judge inconsistent on most pairs is measuring position, not quality.

The judge generates greedily through the rollout engine (:class:`~posttrain.rollout.engine.HFEngine`),
so any local causal LM can judge. Its output is parsed by :func:`parse_scores` (a JSON object, or
``dimension: N`` lines) and :func:`parse_verdict`; an output that is missing a dimension, out of
range, ambiguous or garbage is a counted *failure*, never an exception: a judge's failure rate is
one of its numbers. The checks of a judge against human labels (Cohen's kappa) and its
win rate with an interval are in :mod:`posttrain.eval.judge`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from posttrain.rewards.rubric import Rubric, load_rubric, parse_scores, parse_verdict

# --------------------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class PointwiseResult:
    """One pointwise judgment. ``scores`` is None when the output could not be parsed."""

    scores: dict[str, int] | None
    overall: float | None  # weighted mean on the rubric's scale
    normalised: float | None  # overall mapped to [0, 1]
    error: str | None
    raw: str


@dataclass(frozen=True)
class PairwiseResult:
    """One pair, judged in both orders. Verdicts name the original labels: "A" = completion_a."""

    first: str | None  # verdict with A shown first
    swapped: str | None  # verdict with B shown first, mapped back to the original labels
    verdict: str | None  # final: "A", "B", "tie"; None when failed or dropped
    consistent: bool | None  # None without swapping, or when a judgment failed
    error: str | None
    raw: tuple[str, ...]


@dataclass(frozen=True)
class PairwiseReport:
    """Pairwise judgments with the position-swap counts (A's win rate with an interval:
    :func:`posttrain.eval.judge.pairwise_win_rate`)."""

    results: list[PairwiseResult]
    consistent: int
    inconsistent: int
    failures: int  # pairs with an unparseable judgment (in either order)
    dropped: int  # inconsistent pairs dropped (inconsistent="drop")

    @property
    def verdicts(self) -> list[str | None]:
        return [r.verdict for r in self.results]

    def summary(self) -> dict:
        return {
            "pairs": len(self.results),
            "consistent": self.consistent,
            "inconsistent": self.inconsistent,
            "failures": self.failures,
            "dropped": self.dropped,
        }


_SWAP = {"A": "B", "B": "A", "tie": "tie"}


def question_text(prompt) -> str:
    """The request as the judge reads it: a string as is; messages as their text (a single user
    turn bare, a conversation as "role: content" lines)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def _answer_text(completion) -> str:
    from posttrain.rewards.basic import completion_text

    return completion_text(completion)


class Judge:
    """A judge: a text generator (prompt texts in, outputs out) and a rubric.

    Args:
        generate: ``fn(list[str]) -> list[str]``, one judge output per judge prompt. Build it from
            a model with :meth:`from_pretrained` or :meth:`from_engine`; tests pass a stub.
        rubric: a :class:`Rubric`, a bundled rubric's name or a YAML path.
    """

    def __init__(self, generate: Callable[[list[str]], list[str]], rubric: Rubric | str | Path = "default"):
        self.generate = generate
        self.rubric = load_rubric(rubric)

    @classmethod
    def from_engine(cls, engine, tokenizer, rubric: Rubric | str | Path = "default", *, max_new_tokens=256):
        """A judge generating greedily with ``engine``; each judge prompt is one user turn
        rendered with the tokenizer's chat template (raw text when it has none)."""
        from posttrain.data.templates import encode_prompts
        from posttrain.rollout.engine import Sampling

        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)

        def generate(texts: list[str]) -> list[str]:
            _, ids = encode_prompts(tokenizer, texts)  # the one prompt rule (data/templates.py)
            return [group[0].text for group in engine.generate(ids, 1, sampling)]

        return cls(generate, rubric)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        rubric: Rubric | str | Path = "default",
        *,
        max_new_tokens: int = 256,
        batch_size: int | None = None,
    ) -> Judge:
        """A judge from a model directory or hub name (on the GPU when there is one)."""
        from posttrain.rollout.engine import load_engine

        engine, tokenizer = load_engine(path, batch_size=batch_size)
        return cls.from_engine(engine, tokenizer, rubric, max_new_tokens=max_new_tokens)

    def _outputs(self, texts: list[str]) -> list[str]:
        outputs = list(self.generate(texts)) if texts else []
        if len(outputs) != len(texts):
            raise RuntimeError(f"the judge returned {len(outputs)} outputs for {len(texts)} prompts")
        return outputs

    def pointwise(self, prompts: Sequence, completions: Sequence) -> list[PointwiseResult]:
        """Score each completion on every dimension of the rubric (one judge call each)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        texts = [
            self.rubric.pointwise_text(question_text(p), _answer_text(c))
            for p, c in zip(prompts, completions)
        ]
        results = []
        for raw in self._outputs(texts):
            scores, error = parse_scores(raw, self.rubric)
            overall = None if scores is None else self.rubric.overall(scores)
            normalised = None if overall is None else self.rubric.normalise(overall)
            results.append(PointwiseResult(scores, overall, normalised, error, raw))
        return results

    def pairwise(
        self,
        prompts: Sequence,
        completions_a: Sequence,
        completions_b: Sequence,
        *,
        swap: bool = True,
        inconsistent: str = "tie",
    ) -> PairwiseReport:
        """Which of each pair is better: A (``completions_a``), B, or a tie.

        Args:
            swap: also judge every pair with B shown first, and compare (position-swap
                consistency). Without it, position bias goes unmeasured.
            inconsistent: what a pair whose verdict changes with the order becomes: "tie"
                (default: the judge could not tell them apart) or "drop" (left out of the win rate).
        """
        if inconsistent not in ("tie", "drop"):
            raise ValueError(f"inconsistent must be 'tie' or 'drop' (got {inconsistent!r})")
        if not len(prompts) == len(completions_a) == len(completions_b):
            raise ValueError(
                f"pairwise needs aligned inputs (got {len(prompts)} prompts, {len(completions_a)} A, "
                f"{len(completions_b)} B)"
            )
        questions = [question_text(p) for p in prompts]
        a = [_answer_text(c) for c in completions_a]
        b = [_answer_text(c) for c in completions_b]
        texts = [self.rubric.pairwise_text(q, x, y) for q, x, y in zip(questions, a, b)]
        if swap:
            texts += [self.rubric.pairwise_text(q, y, x) for q, x, y in zip(questions, a, b)]
        outputs = self._outputs(texts)
        n = len(questions)
        results, counts = [], {"consistent": 0, "inconsistent": 0, "failures": 0, "dropped": 0}
        for i in range(n):
            first, error = parse_verdict(outputs[i])
            errors = [f"A first: {error}"] if error else []
            raw: tuple[str, ...] = (outputs[i],)
            swapped, consistent = None, None
            if swap:
                raw += (outputs[n + i],)
                v2, error2 = parse_verdict(outputs[n + i])
                swapped = None if v2 is None else _SWAP[v2]
                errors += [f"B first: {error2}"] if error2 else []
            verdict = first
            if errors:
                verdict = None
                counts["failures"] += 1
            elif swap:
                consistent = first == swapped
                counts["consistent" if consistent else "inconsistent"] += 1
                if not consistent:
                    verdict = "tie" if inconsistent == "tie" else None
                    counts["dropped"] += inconsistent == "drop"
            error = "; ".join(errors) or None
            results.append(PairwiseResult(first, swapped, verdict, consistent, error, raw))
        return PairwiseReport(results=results, **counts)


# --------------------------------------------------------------------------------------- reward fn


class JudgeRewardFn:
    """``fn(prompts, completions, **row_fields) -> list[float]``: the judge's pointwise overall
    score mapped to [0, 1]; an unparseable judgment scores ``on_failure``.

    Build it with :func:`judge`. ``calls`` and ``failures`` count judgments over the fn's life,
    ``last_failures`` those of the latest call (suites report it as a failure rate).
    """

    __name__ = "judge"

    def __init__(self, source, *, rubric="default", on_failure: float = 0.0, **load_options):
        self.source, self.on_failure = source, float(on_failure)
        self.rubric = source.rubric if isinstance(source, Judge) else load_rubric(rubric)
        self.load_options = load_options
        self._judge = source if isinstance(source, Judge) else None
        self._lock = threading.Lock()
        self.calls = self.failures = self.last_failures = 0

    @property
    def judge(self) -> Judge:
        with self._lock:  # loaded on the first call, once, like reward_model
            if self._judge is None:
                self._judge = Judge.from_pretrained(str(self.source), self.rubric, **self.load_options)
        return self._judge

    def __call__(self, prompts: Sequence, completions: Sequence, **_row_fields) -> list[float]:
        results = self.judge.pointwise(prompts, completions)
        self.last_failures = sum(r.normalised is None for r in results)
        self.calls += len(results)
        self.failures += self.last_failures
        return [self.on_failure if r.normalised is None else r.normalised for r in results]

    def __repr__(self) -> str:
        return f"judge({self.source!r}, rubric={self.rubric.name!r})"


def judge(
    model_path: str,
    *,
    rubric: str | Path | dict | Rubric = "default",
    max_new_tokens: int = 256,
    batch_size: int | None = None,
    on_failure: float = 0.0,
    base_dir: str | Path | None = None,
) -> JudgeRewardFn:
    """A RewardFn: a local model judges each completion against ``rubric`` (pointwise, greedy);
    the weighted mean of its dimension scores, mapped from the rubric's scale to [0, 1], is the
    reward. The model loads on the first call; the rubric and the path are checked now.

    Args:
        model_path: the judge model: a directory or hub name.
        rubric: a bundled rubric's name (``default``), a YAML path, a dict or a :class:`Rubric`.
        max_new_tokens: the judge's budget; a judge cut off before its scores is a failure.
        batch_size: sequences per generation forward; default all at once.
        on_failure: the reward of a completion whose judgment could not be parsed. 0.0 by
            default; in RL, a policy can learn to confuse the judge if failures pay better.
        base_dir: a relative rubric path is looked up here first (the folder of the suite naming it).
    """
    if isinstance(rubric, str) and base_dir is not None and (Path(base_dir) / rubric).is_file():
        rubric = str(Path(base_dir) / rubric)
    path = str(model_path)
    if (path.startswith((".", "/", "~")) or path.count("/") > 1) and not Path(path).expanduser().exists():
        raise ValueError(f"judge model path not found: {path} (no such directory)")
    if not math.isfinite(on_failure):
        raise ValueError(f"judge on_failure must be finite (got {on_failure})")
    return JudgeRewardFn(
        path, rubric=rubric, on_failure=on_failure, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
