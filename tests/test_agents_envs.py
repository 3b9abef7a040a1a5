"""The bundled environments: every golden trajectory scores 1 and every hack probe 0 with its label
(through the runner, with the tiny tokenizer and with a BPE ChatML one), held-out keys never leak
into training tasks, and each environment's guards hold; plus the ``posttrain env`` commands."""

from __future__ import annotations

import ast
import math

import pytest

from posttrain.agents.check import check_env
from posttrain.agents.envs import BUNDLED, get_env
from posttrain.agents.envs.calculator import UnsafeExpression, evaluate
from posttrain.agents.envs.guess import GuessEnv
from posttrain.agents.envs.sql import SqlEnv
from posttrain.agents.policies import Call, ScriptedPolicy
from posttrain.agents.runner import EpisodeRunner
from posttrain.cli import main
from posttrain.errors import ConfigError
from posttrain.tasks.tiny import build_tokenizer

TOK = build_tokenizer()


@pytest.mark.parametrize("name", list(BUNDLED))
def test_golden_trajectories_score_one_and_hack_probes_zero_with_their_label(name):
    rows = check_env(name, n=2)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    probes = {r.script for r in rows} - {"split", "golden"}
    assert len(probes) >= 3 and "forged_observation" in probes
    assert sum(r.script == "golden" for r in rows) == 4  # 2 train + 2 held-out tasks


@pytest.mark.parametrize("name", ["calculator", "sql"])
def test_golden_and_probes_hold_with_a_bpe_chat_template_and_hermes_calls(name, bpe_chat):
    rows = check_env(name, n=1, tokenizer=bpe_chat, tool_format="hermes")
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


@pytest.mark.parametrize("name", list(BUNDLED))
def test_held_out_keys_never_appear_in_training_tasks_and_tasks_are_reproducible(name):
    cls = get_env(name)
    train = cls.tasks(60, split="train", seed=1)
    held = cls.tasks(15, split="held_out", seed=1)
    assert not {tuple(t["key"]) for t in train} & {tuple(t["key"]) for t in held}
    assert cls.tasks(5, split="train", seed=1) == train[:5]
    assert cls.tasks(5, split="train", seed=2) != train[:5]
    with pytest.raises(ConfigError, match="split must be"):
        cls.tasks(1, split="test")


def test_calculator_evaluates_arithmetic_and_refuses_code():
    assert evaluate("1234+5678") == 6912 and evaluate("(2+3)*-4") == -20 and evaluate("7/2") == 3.5
    for code in ("__import__('os').getcwd()", "(1).__class__", "[1][0]", "(lambda: 1)()"):
        with pytest.raises(UnsafeExpression):
            evaluate(code)
    for bad in ("a + 1", "9**9**9", "1 +", "'x' * 3"):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_sql_attach_creates_no_file_and_runaway_queries_stop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = SqlEnv.tasks(1, split="train")[0]
    runaway = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"

    def script(task):
        yield [Call("sql", {"query": "ATTACH DATABASE 'loot.db' AS loot"})]
        yield [Call("sql", {"query": runaway})]
        yield [Call("sql", {"query": "SELECT 1; SELECT 2"})]
        yield [Call("answer", {"value": task["answer"]})]

    (ep,) = EpisodeRunner(TOK).run(ScriptedPolicy(TOK, "tiny", script), SqlEnv, [task])
    results = [t.results[0] for t in ep.turns if t.results]
    assert [r.status for r in results[:3]] == ["error"] * 3
    assert "not authorized" in results[0].content and "interrupted" in results[1].content
    assert list(tmp_path.iterdir()) == []
    assert (ep.failure, ep.reward) == ("hack.attempt", 0.0)


def test_guess_golden_is_binary_search_within_the_bound_and_records_state_keys():
    n = 15
    tasks = [{"id": str(t), "n": n, "target": t} for t in range(1, n + 1)]
    eps = EpisodeRunner(TOK).run(ScriptedPolicy(TOK, "tiny", GuessEnv.golden), GuessEnv, tasks)
    assert all(e.reward == 1.0 for e in eps)
    guesses = [e.grade.components["guesses"] for e in eps]
    assert max(guesses) == math.ceil(math.log2(n + 1)) == 4 and min(guesses) == 1
    first = [t.state_key for t in eps[0].turns if t.sampled]
    assert first[:3] == [[1, 15], [1, 7], [1, 3]]  # the interval the feedback leaves, before each guess


def test_fix_bug_grader_runs_hidden_tests_not_the_visible_ones():
    from posttrain.agents.envs.fix_bug import FixBugEnv

    task = FixBugEnv.tasks(1, split="train")[0]
    env = FixBugEnv(task)
    env.replace("solution.py", task["bug"]["old"], task["bug"]["new"])
    assert env.run_tests().startswith("2/2 passed") and env.grade().passed
    # A "solution" that looks up the visible tests' answers passes run_tests, and fails the grade.
    table = {}
    for line in task["visible"]:  # assert fn(ARGS) == EXPECTED
        test = ast.parse(line).body[0].test
        args = tuple(ast.literal_eval(a) for a in test.left.args)
        table[repr(args)] = ast.literal_eval(test.comparators[0])
    env.files["solution.py"] = f"def {task['fn']}(*args):\n    return {table!r}.get(repr(args))\n"
    assert env.run_tests().startswith("2/2 passed")
    grade = env.grade()
    assert not grade.passed and grade.failure == "answer.wrong" and grade.components["tests_passed_frac"] < 1


class BrokenGuess(GuessEnv):
    """A grader regression: the golden policy no longer succeeds."""

    @staticmethod
    def golden(task):
        yield [Call("guess", {"n": 0})]


def test_env_cli_lists_checks_and_fails_on_a_broken_environment(capsys):
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUNDLED) and "tools: calc, answer" in out
    assert main(["env", "check", "guess", "--n", "1"]) == 0
    assert "guess: 6/6 checks passed" in capsys.readouterr().out
    assert main(["env", "check", f"{__name__}:BrokenGuess", "--n", "1"]) == 1
    assert "FAIL golden" in capsys.readouterr().out
    assert main(["env", "check", "nope"]) == 2
    assert "unknown environment 'nope'" in capsys.readouterr().err


def test_sql_says_how_many_distinct_tasks_it_has_instead_of_looping_forever():
    from posttrain.agents.envs.sql import SqlEnv, capacity, max_tasks

    # kinds come in turn, so the scarcest kind bounds n: 10 held-out lookups allow 3 * 10 + 0 tasks
    assert capacity("held_out")["lookup"] == 10 and max_tasks("held_out") == 30
    assert len({tuple(t["key"]) for t in SqlEnv.tasks(30, split="held_out")}) == 30
    with pytest.raises(ConfigError, match="at most 30 held_out tasks; asked for 31"):
        SqlEnv.tasks(31, split="held_out")
    assert len(SqlEnv.tasks(max_tasks("train"), split="train")) == max_tasks("train") == 258
