"""The report's mask view in a real browser (Debian's chromium through chromium-driver and Selenium):
episodes of `calculator` run by the episode runner (the golden script, one wrong call, one episode whose
mask a deliberate bug corrupts) written to trajectories.jsonl over two steps, the report opened headless.
What the page shows is checked as painted: sampled turns green with exactly the sampled text, environment
turns grey, the calls' parse statuses, the labels over steps, and the corrupted turn outlined red under a
red warning that counts it."""

import json
from collections import Counter

import pytest

pytest.importorskip("selenium.webdriver")
from browser import browser, needs_chromium  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from test_report import make_run  # noqa: E402

from posttrain.agents.envs.calculator import CalculatorEnv  # noqa: E402
from posttrain.agents.policies import Call, ScriptedPolicy  # noqa: E402
from posttrain.agents.runner import Budgets, EpisodeRunner  # noqa: E402
from posttrain.report import write_report  # noqa: E402
from posttrain.tasks.tiny import build_tokenizer  # noqa: E402

pytestmark = needs_chromium
GREEN, RED = "rgb(218, 251, 225)", "rgb(207, 34, 46)"  # the report's CSS: #dafbe1, #cf222e


def wrong_call(task):
    """A call of a tool that does not exist (parse status unknown_tool), then the right answer."""
    yield [Call("nosuch", {"expr": task["expr"]})]
    yield [Call("answer", {"value": task["answer"]})]


def episodes():
    tok = build_tokenizer()
    tasks = CalculatorEnv.tasks(2, split="train", seed=0)
    runner = EpisodeRunner(tok, "tiny", budgets=Budgets(max_turns=3))
    good = runner.run(ScriptedPolicy(tok, "tiny", CalculatorEnv.golden), CalculatorEnv, tasks)
    bad = runner.run(ScriptedPolicy(tok, "tiny", wrong_call), CalculatorEnv, tasks[:1])
    return good + bad


def test_mask_view_paints_sampled_green_environment_grey_and_a_mask_bug_red(tmp_path):
    run = make_run(tmp_path / "agent")
    eps = episodes()
    good, corrupt = eps[0], eps[2]  # the golden episode and the one with the unknown tool
    assert good.grade.passed and len([t for t in good.turns if t.sampled]) >= 2
    # the bug: the first tool result's tokens trained, as if the runner had forgotten to mask them
    obs = next(t for t in corrupt.turns if t.role == "observation" and t.end > t.start)
    P = len(corrupt.prompt_ids)
    corrupt.mask[obs.start - P : obs.end - P] = [True] * (obs.end - obs.start)
    good.reward, corrupt.reward = 2.0, -1.0  # the best and the worst of the step: the two shown
    lines = []
    for step in (1, 2):
        for e in eps:
            lines.append({"step": step, "reward": e.reward, **e.to_json()})
    (run / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    page = write_report(run)

    driver = browser()
    try:
        driver.get(page.resolve().as_uri())
        shown = driver.find_elements(By.CSS_SELECTOR, "div.episode")
        assert len(shown) == 2

        def style(el, prop):
            return driver.execute_script(f"return getComputedStyle(arguments[0]).{prop}", el)

        best = shown[0]
        sampled = best.find_elements(By.CSS_SELECTOR, "pre.sampled")
        texts = [t.text for t in good.turns if t.sampled]
        assert [el.text.split("  [")[0] for el in sampled] == texts  # exactly the sampled text, in order
        assert all(style(el, "backgroundColor") == GREEN for el in sampled)
        env = best.find_elements(By.CSS_SELECTOR, "pre.env")
        assert len(env) == 1 + sum(t.role == "observation" for t in good.turns)  # the opening + results
        assert all(style(el, "backgroundColor") != GREEN for el in env)
        assert "calc: ok" in sampled[0].text  # the call and its parse status

        worst = shown[1]
        red = worst.find_elements(By.CSS_SELECTOR, "pre.mismatch")
        assert len(red) == 1 and red[0].get_attribute("data-role") == "observation"
        assert style(red[0], "outlineColor") == RED and style(red[0], "backgroundColor") == GREEN
        assert "nosuch: unknown_tool" in worst.find_element(By.CSS_SELECTOR, "pre.sampled").text
        warning = driver.find_element(By.CSS_SELECTOR, "p.mismatch")
        assert warning.text.startswith("1 turn(s)") and style(warning, "color") == RED

        table = driver.find_element(By.CSS_SELECTOR, "table.over-steps")
        head = [th.text for th in table.find_elements(By.CSS_SELECTOR, "th")]
        assert head == ["kind", "label", "1", "2"]
        rows = {
            tuple(td.text for td in tr.find_elements(By.TAG_NAME, "td"))
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")
        }
        want = Counter(("failure", e.failure or "none (passed)") for e in eps)
        want.update(("stop", e.stop) for e in eps)
        assert rows == {(*k, str(v), str(v)) for k, v in want.items()}  # the same episodes at steps 1 and 2
    finally:
        driver.quit()
