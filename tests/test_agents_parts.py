"""Agent layer components: tool-call parsing, the tool base class, failure labels, masked group
advantages (numbers by hand), token truncation at its boundaries, the trajectory record."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.agents.bridge import TRUNCATION_MARKER, truncate_tokens
from posttrain.agents.env import Action, ParseStatus, ToolEnv, tool, validate_args
from posttrain.agents.failures import LABELS, is_masked, masked_group_advantages, primary_failure
from posttrain.agents.formats import HermesFormat, TinyFormat, get_format
from posttrain.agents.trajectory import Episode, Turn, read_jsonl, training_arrays, write_jsonl
from posttrain.errors import ConfigError
from posttrain.tasks.tiny import build_tokenizer


class Shop(ToolEnv):
    name = "shop"
    fields = ("item",)

    def reset(self):
        return [{"role": "user", "content": "buy"}]

    @tool
    def price(self, item: str) -> str:
        """Look up a price.

        Args:
            item: the item's name
        """
        if item == "boom":
            raise KeyError("no such item")
        return "12"

    @tool
    def buy(self, item: str, count: int) -> str:
        """Buy items.

        Args:
            item: the item's name
            count: how many
        """
        return f"bought {count} {item}"

    @tool(terminal=True)
    def done(self) -> str:
        """Finish."""
        return "bye"


TOOLS = Shop({"item": "x"}).tools


# --- tool schemas and dispatch ------------------------------------------------------------------


def test_tool_schemas_come_from_signature_and_docstring_in_definition_order():
    assert [t["function"]["name"] for t in TOOLS] == ["price", "buy", "done"]
    buy = TOOLS[1]["function"]
    assert buy["description"] == "Buy items."
    assert buy["parameters"]["properties"] == {
        "item": {"type": "string", "description": "the item's name"},
        "count": {"type": "integer", "description": "how many"},
    }
    assert buy["parameters"]["required"] == ["item", "count"]


def test_validate_args_coerces_only_unambiguous_types():
    schema = TOOLS[1]
    assert validate_args(schema, {"item": 7, "count": "3"}) == ({"item": "7", "count": 3}, "")
    assert validate_args(schema, {"item": "a", "count": "three"})[0] is None
    assert "missing" in validate_args(schema, {"item": "a"})[1]
    assert "unexpected" in validate_args(schema, {"item": "a", "count": 1, "colour": "red"})[1]
    assert validate_args(schema, {"item": "a", "count": True})[0] is None  # a bool is not an integer


def test_task_row_missing_a_field_is_a_clear_error():
    with pytest.raises(Exception, match=r"task 't7' of environment 'shop': missing field\(s\) item"):
        Shop({"id": "t7", "colour": "red"})


def test_dispatch_turns_every_outcome_into_a_typed_result():
    env = Shop({"item": "x"})
    calls = TinyFormat().parse(
        "<call>price(apple)</call><call>price(boom)</call><call>fly()</call><call>buy(1)</call>"
        "<call>done()</call><call>price(pear)</call>",
        TOOLS,
    )
    obs = env.step(Action("", calls))
    assert [r.status for r in obs.results] == ["ok", "error", "error", "error", "ok", "skipped"]
    assert obs.events == ["tool.error", "tool.unknown", "tool.bad_args"]
    assert obs.results[1].content == "error: KeyError: 'no such item'"
    assert obs.done and obs.messages == []  # a terminal call ends the episode
    no_call = env.step(Action("just text", ()))
    assert no_call.done and no_call.events == ["format.no_action"]


# --- tool-call formats --------------------------------------------------------------------------


def test_tiny_format_reads_raw_single_arguments_and_literal_lists():
    f = TinyFormat()
    text = "a <call>price(red lamp)</call> b <call>buy('pen', count=2)</call><call>done()</call>"
    calls = f.parse(text, TOOLS)
    assert [(c.name, c.args, c.status) for c in calls] == [
        ("price", {"item": "red lamp"}, ParseStatus.OK),
        ("buy", {"item": "pen", "count": 2}, ParseStatus.OK),
        ("done", {}, ParseStatus.OK),
    ]
    assert text[slice(*calls[0].chars)] == "<call>price(red lamp)</call>"
    for args in ({"item": "red lamp"}, {"item": "'quoted'"}, {"item": "12"}):
        rendered = f.render([("price", args)], TOOLS)
        assert f.parse(rendered, TOOLS)[0].args == args, rendered
    assert f.render([("buy", {"item": "pen", "count": 2})], TOOLS) == "<call>buy('pen', 2)</call>"
    # a sampled turn whose parentheses close early reads as raw text, never crashes the parse
    assert f.parse("<call>price(1)<(2)</call>", TOOLS)[0].args == {"item": "1)<(2"}


@pytest.mark.parametrize(
    "text, status",
    [
        ("<call>price(x)", ParseStatus.UNCLOSED),
        ("<call>no parentheses</call>", ParseStatus.MALFORMED),
        ("<call>steal(x)</call>", ParseStatus.UNKNOWN_TOOL),
        ("<call>buy(pen, 2)</call>", ParseStatus.INVALID_ARGS),  # pen is not a literal
        ("<call>buy('pen')</call>", ParseStatus.INVALID_ARGS),  # count missing
        ("<call>buy(**x)</call>", ParseStatus.INVALID_ARGS),
        ("<call>buy('pen', 1)<(2)</call>", ParseStatus.INVALID_ARGS),  # parses as a comparison, not a call
    ],
)
def test_tiny_format_statuses(text, status):
    (call,) = TinyFormat().parse(text, TOOLS)
    assert call.status == status and call.detail and call.raw


def test_an_unclosed_call_does_not_hide_the_next_one():
    calls = TinyFormat().parse("<call>price(a)<call>price(b)</call>", TOOLS)
    assert [c.status for c in calls] == [ParseStatus.UNCLOSED, ParseStatus.OK]
    assert calls[1].args == {"item": "b"}


def test_hermes_format_parses_parallel_calls_with_typed_failures():
    f = HermesFormat()
    text = (
        '<tool_call>\n{"name": "price", "arguments": {"item": "mug"}}\n</tool_call>\n'
        '<tool_call>{"name": "buy", "arguments": "{\\"item\\": \\"mug\\", \\"count\\": 2}"}</tool_call>'
        "<tool_call>{not json}</tool_call>"
        '<tool_call>{"arguments": {}}</tool_call>'
        '<tool_call>{"name": "rob", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "buy", "arguments": {"item": "mug"}}</tool_call>'
        '<tool_call>{"name": "done"'
    )
    statuses = [c.status for c in f.parse(text, TOOLS)]
    assert statuses == [
        ParseStatus.OK,
        ParseStatus.OK,
        ParseStatus.INVALID_JSON,
        ParseStatus.MALFORMED,
        ParseStatus.UNKNOWN_TOOL,
        ParseStatus.INVALID_ARGS,
        ParseStatus.UNCLOSED,
    ]
    assert f.parse(text, TOOLS)[1].args == {"item": "mug", "count": 2}
    rendered = f.render([("price", {"item": "a"}), ("done", {})], TOOLS)
    assert [c.args for c in f.parse(rendered, TOOLS)] == [{"item": "a"}, {}]


def test_stop_after_call_and_unknown_format():
    assert TinyFormat().stop == () and TinyFormat(stop_after_call=True).stop == ("</call>",)
    with pytest.raises(ConfigError, match="unknown tool format 'xml'; known: tiny, hermes"):
        get_format("xml")


# --- failure labels and the baseline --------------------------------------------------------------


def test_masked_samples_leave_the_group_mean_and_std():
    # Group 1: rewards 1, 0, 0 valid and a 5.0 from an episode whose sandbox broke (masked).
    #   mean = 1/3, unbiased std = sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    # Group 2: 0, 1 valid, the other two masked (data, drift): mean 1/2, std = sqrt(2 * 0.25 / 1) = sqrt(1/2)
    rewards = [1.0, 0.0, 0.0, 5.0, 0.0, 1.0, 1.0, 1.0]
    labels = [
        None,
        "answer.wrong",
        "answer.wrong",
        "infra.sandbox",
        "answer.none",
        None,
        "data.task_invalid",
        "tokenization.drift",
    ]
    adv = masked_group_advantages(rewards, labels, 4)
    s1, s2, eps = math.sqrt(1 / 3), math.sqrt(1 / 2), 1e-4
    expected = [
        (2 / 3) / (s1 + eps),
        (-1 / 3) / (s1 + eps),
        (-1 / 3) / (s1 + eps),
        0.0,
        -0.5 / (s2 + eps),
        0.5 / (s2 + eps),
        0.0,
        0.0,
    ]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # Left in, the broken sample would have moved every advantage of its group: mean 1.5, std sqrt(17/3),
    # so the one success would even get a negative advantage.
    from posttrain.advantages import group_advantages

    left_in = group_advantages(torch.tensor(rewards), 4)[0].item()
    assert left_in == pytest.approx((1 - 1.5) / (math.sqrt(17 / 3) + eps), abs=1e-6) and left_in < 0
    # Budget failures stay in by default, and a per-label override can mask them.
    assert not is_masked("budget.time") and is_masked("budget.time", {"budget.time": "mask"})


def test_masked_advantages_with_one_valid_sample_and_none_are_zero():
    adv = masked_group_advantages(
        [3.0, 1.0, 2.0, 2.0], [None, "infra.engine", "infra.engine", "infra.env"], 2
    )
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]
    none = masked_group_advantages([1.0, 0.0], [None, "infra.grader"], 2, scale="none")
    assert none.tolist() == [0.0, 0.0]


def test_primary_failure_precedence():
    assert primary_failure(["tool.error", "answer.wrong"], passed=False) == "answer.wrong"
    assert primary_failure(["tool.error"], passed=True) is None  # a recovered tool error is no failure
    assert primary_failure(["answer.wrong", "hack.attempt", "budget.turns"], passed=False) == "hack.attempt"
    assert primary_failure(["hack.attempt", "infra.sandbox"], passed=False) == "infra.sandbox"
    assert primary_failure(["tokenization.drift"], passed=True) == "tokenization.drift"
    assert set(primary_failure([label], passed=False) for label in LABELS) == set(LABELS)
    with pytest.raises(ValueError, match="unknown failure label 'oops'"):
        primary_failure(["oops"], passed=False)


# --- truncation -----------------------------------------------------------------------------------


def test_truncation_keeps_an_exact_fit_and_cuts_one_more_to_the_tail():
    tok = build_tokenizer()  # one token per character
    fits = "0123456789"
    assert truncate_tokens(tok, fits, 10) == (fits, False, 10, 10)
    out, cut, before, after = truncate_tokens(tok, fits + "X", 10)
    assert (out, cut, before, after) == (TRUNCATION_MARKER + "6789X", True, 11, 10)
    head = truncate_tokens(tok, fits + "X", 10, keep="head")[0]
    assert head == "01234" + TRUNCATION_MARKER


def test_truncation_with_bpe_never_exceeds_the_limit(bpe_chat):
    tok = bpe_chat
    text = "the result of the query is 42 rows; " * 20 + "final line: total 1234"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    for limit in (8, 9, 17, n - 1):
        out, cut, before, after = truncate_tokens(tok, text, limit)
        assert cut and before == n and after == len(tok(out, add_special_tokens=False)["input_ids"]) <= limit
        assert out.startswith(TRUNCATION_MARKER) and text.endswith(
            out[len(TRUNCATION_MARKER) :].lstrip()[-8:]
        )
    assert truncate_tokens(tok, text, n) == (text, False, n, n)


# --- the record -----------------------------------------------------------------------------------


def test_episode_record_round_trips_through_jsonl(tmp_path):
    from posttrain.agents.env import Grade, ToolCall, ToolResult

    ep = Episode(
        "calculator",
        "1",
        "t1",
        "abc",
        0,
        0,
        prompt_ids=[1, 2, 3],
        ids=[4, 5, 6, 7],
        mask=[True, True, False, False],
        logprobs=[-0.5, -0.25, 0.0, 0.0],
        stop="env_done",
        grade=Grade(1.0, True, {"correct": 1.0}, None, "ok"),
        reward=1.0,
    )
    call = ToolCall("calc", {"expr": "1+2"}, "<call>calc(1+2)</call>", ParseStatus.OK, "", (0, 22))
    ep.turns = [
        Turn("prompt", "p", 0, 3, messages=[{"role": "user", "content": "1+2"}]),
        Turn("assistant", "x", 3, 5, sampled=True, calls=[call], call_spans=[(3, 5)], state_key=[1, 2]),
        Turn(
            "observation",
            "y",
            5,
            7,
            results=[ToolResult("calc", "3", seconds=0.1, tokens=1, original_tokens=1)],
        ),
    ]
    path = tmp_path / "trajectories.jsonl"
    write_jsonl(path, [ep], step=3)
    assert json.loads(path.read_text())["step"] == 3
    (back,) = read_jsonl(path)
    assert back == ep
    ids, mask, logps = training_arrays(back)
    assert ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert mask.tolist() == [False, False, False, True, True, False, False]
    assert logps.tolist() == [0.0, 0.0, 0.0, -0.5, -0.25, 0.0, 0.0]
    back.masked = True
    assert not training_arrays(back)[1].any()  # a masked episode trains nothing
    path.write_text('{"env": "x", "bogus": 1}\n')
    with pytest.raises(ValueError, match="trajectories.jsonl:1: not an episode record"):
        read_jsonl(path)


# --- the sandbox interface ------------------------------------------------------------------------


def test_code_runner_gives_files_stdout_and_per_test_verdicts():
    from posttrain.agents.sandbox import SandboxRunner

    runner = SandboxRunner()
    r = runner.run(
        "print(open('data/a.txt').read())\nx = 3",
        files={"data/a.txt": "hi"},
        tests=["assert x == 3", "assert x == 4"],
    )
    assert (r.stdout, r.tests_passed, r.ok, r.timed_out) == ("hi\n", (True, False), False, False)
    printed = runner.run("print('2/2 passed')", tests=["assert f(1) == 2"])
    assert printed.tests_passed == (False,) and not printed.ok  # printing a verdict earns nothing
    with pytest.raises(ValueError, match="relative paths"):
        runner.run("pass", files={"/etc/x": "no"})


def test_agent_tools_run_in_the_one_sandbox_with_its_log(tmp_path):
    """The agents' runner is posttrain.sandbox itself: same backend, limits, verdicts, violations, log."""
    from posttrain import sandbox
    from posttrain.agents.envs.fix_bug import FixBugEnv
    from posttrain.agents.sandbox import SandboxRunner

    previous = dict(sandbox._state)
    try:
        sandbox.configure(log_dir=tmp_path)
        (task,) = FixBugEnv.tasks(1, seed=3)
        env = FixBugEnv(task, runner=SandboxRunner())
        # A fix that also walks frames to the harness: a violation, so every hidden test fails.
        env.files["solution.py"] = "import sys\nsys._getframe(0)\n" + task["fixed"]
        r = env.runner.run(env.files["solution.py"], tests=task["hidden"])
        assert not r.ok and not any(r.tests_passed)
        env.files["solution.py"] = task["fixed"]
        assert env.grade().passed
    finally:
        sandbox._state.update(previous)
    records = [json.loads(line) for line in (tmp_path / "sandbox.jsonl").read_text().splitlines()]
    assert [bool(r["violations"]) for r in records] == [True, False]
    assert {r["backend"] for r in records} == {sandbox.resolve()}
