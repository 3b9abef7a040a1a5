"""Reward fns: each against hand-computed values, then combination, config resolution and a tiny RM."""

import math
import threading

import pytest

from posttrain.rewards import (
    REWARD_FACTORIES,
    REWARD_FNS,
    Combined,
    code_tests,
    combine,
    exact_match,
    extract_answer,
    extract_code,
    format_regex,
    length_penalty,
    math_answer,
    math_equal,
    overlong_penalty,
    resolve,
    reward_model,
)

# ---------------------------------------------------------------------------------------
# math_answer


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("1/2", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "1/2"),
        ("\\dfrac{3}{4}", "0.75"),
        ("-3", "-3"),
        ("3,000", "3000"),
        ("47.0", "47"),
        ("x = 5", "5"),
        ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}"),
    ],
)
def test_math_equal_numeric_and_symbolic(prediction, gold):
    assert math_equal(prediction, gold)


@pytest.mark.parametrize(
    "prediction, gold", [("2", "3"), ("-3", "3"), ("0.5", "0.25"), ("\\frac{1}{3}", "0.3"), ("x", "y")]
)
def test_math_equal_rejects_different_values(prediction, gold):
    assert not math_equal(prediction, gold)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("First 12, then \\boxed{5}, finally \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # last box
        ("So \\boxed{\\frac{a}{\\sqrt{b}}} wins", "\\frac{a}{\\sqrt{b}}"),  # nested braces
        ("12 + 35 = 47, so the final answer is 47. Check: 40 + 7.", "47"),  # anchor beats last number
        ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Answer: **12**", "12"),
        ("Ana has 47 pens... #### 47", "47"),
        ("The answer is 42, which is what we wanted", "42"),
        ("We get 12, then 35, and in total 47 pens.", "47"),  # last number
        ("x = 5-3", "3"),  # "-3" glued to "5" is not a negative number
        ("the change is -3 degrees", "-3"),
        ("half: \\frac{1}{2}", "\\frac{1}{2}"),
        ("The answer isn't obvious, but 2 + 2 = 4", "4"),  # "answer is" needs a whole word
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_math_answer_scores():
    completions = [
        "The sum is \\boxed{47}.",
        "I think it is 46.",
        "Half of it: \\boxed{0.5}",
        "so we get 1/2",
        "The answer is -7.",
        "",
        "\\boxed{\\frac{ } { garbage",
        "}{$$\\\\boxed{{{",
        "9" * 5000,
    ]
    answers = ["47", "47", "\\frac{1}{2}", "0.5", "-7", "1", "1", "1", "1"]
    assert math_answer([""] * 9, completions, answers) == [1, 0, 1, 1, 1, 0, 0, 0, 0]


def test_math_answer_row_shapes():
    chat = [[{"role": "assistant", "content": "It is \\boxed{12}"}]]
    prompt = [[{"role": "user", "content": "5+7?"}]]
    assert math_answer(prompt, chat, ["12"], level=["add1"]) == [1.0]  # unused row fields are ignored
    assert math_answer(["q"], ["\\boxed{72}"], ["Natalia sold 48 + 24 = 72 clips.\n#### 72"]) == [1.0]
    assert math_answer(["q"], ["\\boxed{72}"], [72]) == [1.0]  # a numeric gold answer
    assert math_answer(["q"], ["\\boxed{72}"], [None]) == [0.0]
    with pytest.raises(ValueError, match="'answer' has 1 values for 2 completions"):
        math_answer(["a", "b"], ["1", "2"], ["1"])


def test_math_answer_off_the_main_thread():
    # math-verify's timeouts use signal.alarm, which raises outside the main thread unless disabled.
    out = []
    args = (["", ""], ["\\boxed{0.5}", "3"], ["1/2", "4"])
    thread = threading.Thread(target=lambda: out.append(math_answer(*args)))
    thread.start()
    thread.join()
    assert out == [[1.0, 0.0]]


# ---------------------------------------------------------------------------------------
# exact_match, format_regex, length penalties


def test_exact_match_uses_the_arithmetic_task_rule():
    completions = ["47<|end|>", " 47 \nmore text", "47 and more", "46", "47"]
    assert exact_match([""] * 5, completions, ["47"] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert exact_match(["p"], [[{"role": "assistant", "content": "35<|end|>"}]], ["35"]) == [1.0]


def test_format_regex_fullmatch_and_search():
    pattern = r"<think>.*?</think>\s*<answer>.*?</answer>"
    good = "<think>12+35\nis 47</think>\n<answer>47</answer>"
    trailing = good + " bye"
    full = format_regex(pattern)
    anywhere = format_regex(pattern, mode="search")
    assert full([""] * 3, [good, trailing, "47"]) == [1.0, 0.0, 0.0]  # DOTALL: the newline inside is fine
    assert anywhere([""] * 3, [good, trailing, "47"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="invalid pattern"):
        format_regex("(unclosed")
    with pytest.raises(ValueError, match="'fullmatch' or 'search'"):
        format_regex("x", mode="match")


def dapo_formula(length, l_max, l_cache):
    """Eq. of DAPO's soft overlong punishment, written out independently of the implementation."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


def test_overlong_penalty_matches_dapo_in_every_region():
    fn = overlong_penalty(max_length=8, cache=2)
    lengths = list(range(0, 12))
    expected = [0, 0, 0, 0, 0, 0, 0, -0.5, -1, -1, -1, -1]  # safe up to 6, ramp over 7..8, -1 beyond
    scores = fn([""] * len(lengths), ["x"] * len(lengths), completion_lengths=lengths)
    assert scores == pytest.approx(expected)
    assert scores == pytest.approx([dapo_formula(n, 8, 2) for n in lengths])
    big = overlong_penalty(20480, 4096)  # the paper's setting
    lengths = [16384, 16385, 18432, 20480, 20481]
    assert big([""] * 5, [""] * 5, completion_lengths=lengths) == pytest.approx([0, -1 / 4096, -0.5, -1, -1])


def test_length_fns_count_characters_without_token_lengths():
    fn = overlong_penalty(max_length=8, cache=2)
    assert fn([""] * 3, ["a" * 6, "a" * 7, "a" * 20]) == pytest.approx([0.0, -0.5, -1.0])
    with pytest.raises(ValueError, match="'completion_lengths' has 1 values for 2 completions"):
        fn(["", ""], ["a", "b"], completion_lengths=[1])
    with pytest.raises(ValueError, match="0 < cache <= max_length"):
        overlong_penalty(max_length=4, cache=8)
    with pytest.raises(ValueError, match="0 < cache <= max_length"):
        overlong_penalty(max_length=4, cache=0)


def test_length_penalty():
    fn = length_penalty(10)
    assert fn([""] * 4, ["a" * 5, "a" * 10, "a" * 15, "a" * 30]) == pytest.approx([0, 0, -0.5, -2])
    assert length_penalty(10, coef=0.1)([""], ["x"], completion_lengths=[20]) == pytest.approx([-0.1])
    with pytest.raises(ValueError, match="positive"):
        length_penalty(0)


# ---------------------------------------------------------------------------------------
# code_tests


def test_extract_code_takes_the_last_python_block():
    text = (
        "First try:\n```python\ndef f(x):\n    return 0\n```\n"
        "Better:\n```py\ndef f(x):\n    return x\n```\n"
        "Output:\n```text\n3\n```\n"
    )
    assert extract_code(text) == "def f(x):\n    return x\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"  # no block: all of it
    assert extract_code("```python\ndef f(): return 1") == "```python\ndef f(): return 1"  # unclosed


def test_code_tests_scores_the_share_of_tests_passed():
    tests = [
        ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
        ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
        ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 1) == 1", "assert add(5, 5) == 10"],
        ["assert add(1, 2) == 3"],
        ["assert add(1, 2) == 3"],
        [],
        "assert add(1, 1) == 2",
    ]
    completions = [
        "Here:\n```python\ndef add(a, b):\n    return a + b\n```",
        "def add(a, b):\n    return a - b",  # whole text is the code; add(0, 0) == 0 still passes
        "```python\ndef add(a, b):\n    return a + b if a != b else 0\n```",  # fails 2+2 and 5+5
        "```python\ndef add(a, b)\n    return a + b\n```",  # syntax error
        "```python\nraise SystemExit(3)\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a + b\n```",  # no tests
        "```python\nadd = lambda a, b: a + b\n```",  # one snippet as a plain string
    ]
    scores = code_tests([""] * 7, completions, tests, timeout_s=5.0)
    assert scores == pytest.approx([1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0])


def test_code_tests_a_hanging_program_scores_zero():
    completions = ["```python\nwhile True:\n    pass\n```", "```python\nx = 1\n```"]
    scores = code_tests(["", ""], completions, [["assert True"], ["assert x == 1"]], timeout_s=1.0)
    assert scores == [0.0, 1.0]
    with pytest.raises(ValueError, match="tests has 1 rows for 2 completions"):
        code_tests(["", ""], completions, [["assert True"]])


# ---------------------------------------------------------------------------------------
# Combined and resolve


def constant(value):
    def fn(prompts, completions, **_):
        return [value] * len(completions)

    return fn


def test_combined_weights_components_and_seconds():
    length = lambda prompts, completions, **_: [float(len(c)) for c in completions]  # noqa: E731
    combined = Combined(
        {"exact": (exact_match, 2.0), "length": (length, -0.1), "logged": (constant(5.0), 0.0)}
    )
    scores = combined.score(["q", "q"], ["47", "46x"], answer=["47", "47"], level=["add2", "add2"])
    assert scores.components == {"exact": [1.0, 0.0], "length": [2.0, 3.0], "logged": [5.0, 5.0]}
    assert scores.total == pytest.approx([2.0 - 0.2, -0.3])  # weight 0: logged, not trained on
    assert set(scores.seconds) == {"exact", "length", "logged"}
    assert all(s >= 0 for s in scores.seconds.values())
    assert combined(["q", "q"], ["47", "46x"], answer=["47", "47"]) == scores.total


@pytest.mark.parametrize(
    "bad, message",
    [
        (constant(1.0), None),  # fine: the control case
        (lambda p, c, **_: [1.0], "'bad' returned 1 scores for 2 completions"),
        (lambda p, c, **_: [1.0, math.nan], r"'bad' returned nan at index 1"),
        (lambda p, c, **_: [1.0, math.inf], r"'bad' returned inf at index 1"),
        (lambda p, c, **_: [1.0, "high"], r"'bad' returned a non-number at index 1"),
        (lambda p, c, **_: 1.0, r"'bad' returned float, not a list"),
    ],
)
def test_combined_validates_each_component(bad, message):
    combined = Combined({"good": (constant(0.0), 1.0), "bad": (bad, 1.0)})
    if message is None:
        assert combined(["", ""], ["a", "b"]) == [1.0, 1.0]
    else:
        with pytest.raises(ValueError, match=message):
            combined(["", ""], ["a", "b"])


def test_combined_checks_row_fields_and_construction():
    combined = Combined({"exact": (exact_match, 1.0)})
    with pytest.raises(ValueError, match="row field 'answer' has 1 values for 2 completions"):
        combined(["", ""], ["a", "b"], answer=["a"])
    with pytest.raises(ValueError, match="at least one"):
        Combined({})
    with pytest.raises(ValueError, match="expected \\(fn, weight\\)"):
        Combined({"x": exact_match})


def test_resolve_built_ins_and_options():
    assert resolve("math_answer") is math_answer and resolve(exact_match) is exact_match
    assert set(REWARD_FNS) == {"math_answer", "exact_match", "code_tests"}
    assert set(REWARD_FACTORIES) == {
        "format_regex",
        "length_penalty",
        "overlong_penalty",
        "success_gated_length_penalty",
        "reward_model",
        "judge",
    }
    overlong = resolve({"name": "overlong_penalty", "max_length": 8, "cache": 2})
    assert overlong([""], ["x"], completion_lengths=[7]) == [-0.5]
    fmt = resolve({"name": "format_regex", "pattern": r"\d+", "mode": "search"})
    assert fmt(["", ""], ["a 1", "b"]) == [1.0, 0.0]
    code = resolve({"name": "code_tests", "timeout_s": 2.0})
    assert code.keywords == {"timeout_s": 2.0} and code.__name__ == "code_tests"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown reward 'nope'; built-ins are"),
        ({"pattern": "x"}, "needs a 'name'"),
        ("format_regex", "format_regex takes \\['pattern'"),
        ({"name": "overlong_penalty", "max_length": 8}, "missing a required argument: 'cache'"),
        ({"name": "math_answer", "timeout": 3}, r"unknown option\(s\) \['timeout'\]"),
        ({"name": "reward_model", "path": "/no/such/rm"}, "reward_model path not found: /no/such/rm"),
        (3, "expected a name, a dict"),
    ],
)
def test_resolve_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve(spec)


def test_resolve_import_paths(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions, bonus=0.0, **_):\n"
        "    return [float(c.isupper()) + bonus for c in completions]\n"
        "NOT_A_FUNCTION = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve("my_rewards:shout")
    assert fn(["", ""], ["HI", "hi"]) == [1.0, 0.0]
    with_bonus = resolve({"name": "my_rewards:shout", "bonus": 0.5})
    assert with_bonus(["", ""], ["HI", "hi"]) == [1.5, 0.5]
    with pytest.raises(ValueError, match="'no_such_module_xyz:f': cannot import module 'no_such_module_xyz'"):
        resolve("no_such_module_xyz:f")
    with pytest.raises(
        ValueError, match="'my_rewards:whisper': module 'my_rewards' has no attribute 'whisper'"
    ):
        resolve("my_rewards:whisper")
    with pytest.raises(
        ValueError, match="'my_rewards:NOT_A_FUNCTION': 'NOT_A_FUNCTION' is not callable \\(got int\\)"
    ):
        resolve("my_rewards:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        resolve("my_rewards:")


def test_combine_from_config():
    reward = combine(
        [
            "exact_match",
            {"name": "overlong_penalty", "max_length": 8, "cache": 2, "weight": 0.5},
            {"name": "format_regex", "pattern": r"\d+", "label": "digits", "weight": 0.0},
        ]
    )
    assert list(reward.components) == ["exact_match", "overlong_penalty", "digits"]
    scores = reward.score([""] * 2, ["47", "4747474"], answer=["47", "47"], completion_lengths=[2, 7])
    assert scores.components["overlong_penalty"] == [0.0, -0.5]
    assert scores.total == pytest.approx([1.0, -0.25])
    by_label = combine({"correct": "exact_match", "short": {"name": "length_penalty", "target_length": 4}})
    assert list(by_label.components) == ["correct", "short"]
    with pytest.raises(ValueError, match="two reward components are named 'exact_match'"):
        combine(["exact_match", {"name": "exact_match", "weight": 2}])


# ---------------------------------------------------------------------------------------
# reward_model


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A tiny reward model (random head) saved like a reward stage's final/, and the RM it came from."""
    from posttrain.rewards.model import RewardModel
    from posttrain.tasks.tiny import build_tiny

    root = tmp_path_factory.mktemp("rewards_rm")
    build_tiny(root / "tiny", size="tiny")
    rm = RewardModel.from_pretrained(str(root / "tiny"))
    rm.save_pretrained(root / "rm")
    rm.tokenizer.save_pretrained(root / "rm")
    return root / "rm", rm


def test_reward_model_fn_matches_the_reward_model(tiny_rm):
    path, rm = tiny_rm
    fn = resolve({"name": "reward_model", "path": str(path), "batch_size": 2})
    assert fn.model is None  # loaded on the first call, not when the config is read
    prompts = ["12+35", [{"role": "user", "content": "3+4"}], "9-2"]
    completions = ["47", "7", "8"]
    scores = fn(prompts, completions, answer=["47", "7", "7"])
    assert fn.model is not None and len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(rm.score(prompts, completions), abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) > 1  # it does look at the text
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        fn(["a", "b"], ["c"])
    assert reward_model(str(path)).path == str(path)
