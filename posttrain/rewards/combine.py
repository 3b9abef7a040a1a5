"""Turn reward specs from a config into RewardFns, and sum weighted components.

A spec is one of:

- a built-in name: ``"math_answer"``, ``"exact_match"``, ``"code_tests"``;
- a dict with a ``name`` and options: ``{"name": "format_regex", "pattern": "..."}``,
  ``{"name": "overlong_penalty", "max_length": 512, "cache": 128}``,
  ``{"name": "reward_model", "path": "runs/rm/final"}``, ``{"name": "code_tests", "timeout_s": 5}``;
- a user function by import path, ``"package.module:function"`` (options in a dict spec are passed
  to it as keyword arguments on every call);
- a callable, used as is.

Unknown names, missing or misspelled options and unimportable paths fail here, when the config is
read, with the spec in the message, not at the first rollout.

:class:`Combined` sums weighted components, and :meth:`Combined.score` also returns every
component's scores and time, so the trainer can log each one: a total that rises while its
correctness component falls is reward hacking, visible only per component. A weight of 0 logs a
component without training on it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import RewardError
from posttrain.rewards.basic import (
    RewardFn,
    exact_match,
    format_regex,
    length_penalty,
    overlong_penalty,
    success_gated_length_penalty,
)
from posttrain.rewards.code import code_tests
from posttrain.rewards.judge import judge
from posttrain.rewards.math import math_answer
from posttrain.rewards.model import reward_model

REWARD_FNS: dict[str, RewardFn] = {
    "math_answer": math_answer,
    "exact_match": exact_match,
    "code_tests": code_tests,
}
"""Built-in reward fns, usable by name; options in a dict spec become keyword arguments."""

REWARD_FACTORIES: dict[str, Callable[..., RewardFn]] = {
    "format_regex": format_regex,
    "length_penalty": length_penalty,
    "overlong_penalty": overlong_penalty,
    "success_gated_length_penalty": lambda gate, max_length, *, coef=0.1, threshold=1.0: (
        success_gated_length_penalty(resolve(gate), max_length, coef=coef, threshold=threshold)
    ),  # {name: success_gated_length_penalty, gate: math_answer, max_length: 256}: the gate is a spec
    "reward_model": reward_model,
    "judge": judge,  # an LLM judge's pointwise score in [0, 1]
}
"""Built-ins that need options: a dict spec's options are the factory's arguments."""


def _describe(spec) -> str:
    return repr(spec) if not callable(spec) else getattr(spec, "__name__", repr(spec))


def _import_path(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r}: an import path must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({error})") from error
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {path!r}: {attr!r} is not callable (got {type(obj).__name__})")
    return obj


def _with_options(fn: Callable, options: dict, spec) -> RewardFn:
    """``fn`` with ``options`` bound as keyword arguments; a built-in's options must be names of
    its keyword parameters (so a typo fails now; ``**row_fields`` would swallow it silently)."""
    if not options:
        return fn
    if fn in REWARD_FNS.values():
        params = inspect.signature(fn).parameters
        allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"reward {spec!r}: unknown option(s) {unknown}; {fn.__name__} takes {allowed}")
    bound = functools.partial(fn, **options)
    functools.update_wrapper(bound, fn)
    return bound


def resolve(spec, *, base_dir: Path | None = None) -> RewardFn:
    """The RewardFn a config spec names (see the module docstring for the forms). ``base_dir`` (the
    folder of the file holding the spec) is passed to the factories that read files (a judge's rubric).

    Raises:
        ValueError: unknown name, bad or missing options, or an import path whose module or
            attribute is missing or not callable; the message quotes the spec.
    """
    if callable(spec):
        return spec
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"reward {spec!r}: a dict spec needs a 'name' (a built-in or 'module:function')")
    else:
        raise ValueError(f"reward {spec!r}: expected a name, a dict with a 'name', or a callable")
    if name in REWARD_FACTORIES:
        factory = REWARD_FACTORIES[name]
        try:
            inspect.signature(factory).bind(**options)
        except TypeError as error:
            needs = [p for p in inspect.signature(factory).parameters]
            raise ValueError(
                f"reward {spec!r}: {error}; {name} takes {needs}, "
                f"e.g. {{'name': {name!r}, {needs[0]!r}: ...}}"
            ) from None
        if "base_dir" in inspect.signature(factory).parameters:
            options.setdefault("base_dir", base_dir)
        return factory(**options)
    if name in REWARD_FNS:
        return _with_options(REWARD_FNS[name], options, spec)
    if ":" in name:
        return _with_options(_import_path(name), options, spec)
    known = sorted(REWARD_FNS) + sorted(REWARD_FACTORIES)
    raise ValueError(
        f"reward {spec!r}: unknown reward {name!r}; built-ins are {known}, or use 'module:function'"
    )


@dataclass(frozen=True)
class RewardScores:
    """One batch's rewards: the weighted ``total`` per completion, each component's own
    (unweighted) scores, and the seconds each component took."""

    total: list[float]
    components: dict[str, list[float]]
    seconds: dict[str, float]


class Combined:
    """A weighted sum of named reward fns; itself a RewardFn.

    Args:
        components: ``{name: (fn, weight)}``; the names label the logged components.

    Every component gets the same prompts, completions and row fields and must return one
    finite number per completion; anything else is an error that names the component.
    """

    def __init__(self, components: Mapping[str, tuple[RewardFn, float]]):
        if not components:
            raise ValueError("Combined needs at least one reward component")
        self.components: dict[str, tuple[RewardFn, float]] = {}
        for name, entry in components.items():
            if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[0])):
                raise RewardError(f"reward component {name!r}: expected (fn, weight), got {entry!r}")
            fn, weight = entry
            if not math.isfinite(float(weight)):
                raise RewardError(f"reward component {name!r}: weight must be finite, got {weight!r}")
            self.components[name] = (fn, float(weight))

    def __call__(self, prompts: Sequence, completions: Sequence, **row_fields) -> list[float]:
        return self.score(prompts, completions, **row_fields).total

    def score(self, prompts: Sequence, completions: Sequence, **row_fields) -> RewardScores:
        """The total and every component's scores and seconds for one batch."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        for field, values in row_fields.items():
            if isinstance(values, (list, tuple)) and len(values) != n:
                raise ValueError(f"row field {field!r} has {len(values)} values for {n} completions")
        total = [0.0] * n
        components, seconds = {}, {}
        for name, (fn, weight) in self.components.items():
            start = time.perf_counter()
            scores = _checked(name, fn(prompts, completions, **row_fields), n)
            seconds[name] = time.perf_counter() - start
            components[name] = scores
            total = [t + weight * s for t, s in zip(total, scores)]
        return RewardScores(total=total, components=components, seconds=seconds)

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={_describe(fn)}*{w:g}" for name, (fn, w) in self.components.items())
        return f"Combined({parts})"


def _checked(name: str, scores, n: int) -> list[float]:
    """``scores`` as floats, after checking there is one finite number per completion."""
    try:
        values = list(scores)
    except TypeError:
        raise RewardError(
            f"reward component {name!r} returned {type(scores).__name__}, not a list of {n} floats"
        ) from None
    if len(values) != n:
        raise RewardError(f"reward component {name!r} returned {len(values)} scores for {n} completions")
    out = []
    for i, value in enumerate(values):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RewardError(
                f"reward component {name!r} returned a non-number at index {i}: {value!r}"
            ) from None
        if not math.isfinite(value):
            raise RewardError(
                f"reward component {name!r} returned {value} at index {i} (scores must be finite)"
            )
        out.append(value)
    return out


def combine(specs: Sequence | Mapping, *, base_dir: Path | None = None) -> Combined:
    """:class:`Combined` from config specs, each as :func:`resolve` takes (with ``base_dir``), where a
    dict spec may also hold ``weight`` (default 1.0) and ``label`` (the logged name).

    ``specs`` is a list (a component is named by its ``label``, else its ``name``) or a dict
    ``{label: spec}``. Example::

        combine([{"name": "math_answer"},
                 {"name": "overlong_penalty", "max_length": 512, "cache": 128, "weight": 0.5}])
    """
    items = list(specs.items()) if isinstance(specs, Mapping) else [(None, spec) for spec in specs]
    components: dict[str, tuple[RewardFn, float]] = {}
    for key, spec in items:
        weight, label = 1.0, key
        if isinstance(spec, Mapping):
            spec = dict(spec)
            weight = spec.pop("weight", 1.0)
            label = spec.pop("label", None) or key or spec.get("name")
        elif label is None:
            label = spec if isinstance(spec, str) else getattr(spec, "__name__", None)
        if not isinstance(label, str) or not label:
            raise ValueError(f"reward {spec!r}: cannot name this component; give it a 'label'")
        if label in components:
            raise ValueError(f"two reward components are named {label!r}; give one a 'label'")
        components[label] = (resolve(spec, base_dir=base_dir), weight)
    return Combined(components)
