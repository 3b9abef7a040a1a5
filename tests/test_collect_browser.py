"""The annotation app in a real browser (Debian's chromium through chromium-driver and Selenium): log in
through the link, vote with the keyboard, rate, edit, flag, reload mid-item, see a response holding
<script> and HTML shown as text; the votes appear in the exports. A second browser with JavaScript off
votes through the plain forms."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("selenium.webdriver")
from browser import browser, needs_chromium  # noqa: E402
from collect_helpers import XSS, live_server, project  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from posttrain.collect.ingest import add_pairs  # noqa: E402

pytestmark = needs_chromium


def keys(driver, text):
    ActionChains(driver).send_keys(text).perform()


def assignment_id(driver) -> int:
    return int(driver.find_element(By.ID, "vote").get_attribute("data-assignment"))


def wait_for_new_item(driver, old: int) -> int:
    wait = WebDriverWait(driver, 10, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: d.find_elements(By.ID, "vote") and assignment_id(d) != old)
    return assignment_id(driver)


@pytest.fixture
def app(tmp_path):
    store, tokens = project(tmp_path, n=6)
    add_pairs(
        store,
        [
            {
                "prompt": "Render this?",
                "a": XSS,
                "b": "plain text",
                "model_a": "good",
                "model_b": "bad",
                "priority": 9,
            }
        ],
    )
    with live_server(store) as base:
        yield base, store, tokens
    store.close()


def test_keyboard_voting_rating_editing_flagging_reload_and_escaping(app, tmp_path):
    from posttrain.collect.export import export

    base, store, tokens = app
    driver = browser()
    try:
        driver.get(f"{base}/login?token={tokens['ann']}")
        driver.find_element(By.ID, "login-button").click()
        WebDriverWait(driver, 10).until(EC.presence_of_element_located((By.ID, "next")))
        assert tokens["ann"] not in driver.current_url
        keys(driver, "n")  # start
        WebDriverWait(driver, 10).until(EC.presence_of_element_located((By.ID, "vote")))
        first = assignment_id(driver)
        # the highest-priority item holds <script> and HTML: shown as text, nothing ran
        shown = (
            driver.find_element(By.ID, "response-left").text
            + driver.find_element(By.ID, "response-right").text
        )
        assert '<script>alert("pwned")</script>' in shown and '<b onmouseover="x()">bold</b>' in shown
        assert not driver.find_elements(By.CSS_SELECTOR, ".response b")
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018
        # keyboard: 5 = right much better; rate with the mouse; edit the left answer; flag PII
        keys(driver, "5")
        assert driver.find_element(By.CSS_SELECTOR, 'input[name="choice"][value="right"]').is_selected()
        assert driver.find_element(By.CSS_SELECTOR, 'input[name="strength"][value="2"]').is_selected()
        driver.find_element(By.CSS_SELECTOR, 'input[name="rubric_right_helpfulness"][value="4"]').click()
        driver.find_element(By.CSS_SELECTOR, "#left details summary").click()
        box = driver.find_element(By.ID, "edit-left")
        box.clear()
        box.send_keys("An improved answer, typed in the browser.")
        driver.find_element(By.CSS_SELECTOR, 'input[name="flags"][value="pii"]').click()
        # reload mid-item: the same item comes back with the draft
        driver.refresh()
        WebDriverWait(driver, 10).until(EC.presence_of_element_located((By.ID, "vote")))
        assert assignment_id(driver) == first
        assert driver.find_element(By.CSS_SELECTOR, 'input[name="choice"][value="right"]').is_selected()
        assert (
            driver.find_element(By.ID, "edit-left").get_attribute("value")
            == "An improved answer, typed in the browser."
        )
        assert driver.find_element(By.CSS_SELECTOR, 'input[name="flags"][value="pii"]').is_selected()
        assert store.read().execute("SELECT COUNT(*) FROM response").fetchone()[0] == 0
        driver.find_element(
            By.CSS_SELECTOR, 'input[name="flags"][value="pii"]'
        ).click()  # focus off the textarea
        driver.find_element(By.CSS_SELECTOR, 'input[name="flags"][value="pii"]').click()
        keys(driver, "\ue007")  # Enter submits
        current = wait_for_new_item(driver, first)
        for key in ("f", "j", "t", "x"):
            keys(driver, key + "\ue007")
            current = wait_for_new_item(driver, current)
    finally:
        driver.quit()

    rows = (
        store.read()
        .execute(
            "SELECT r.*, a.swapped, a.item_id FROM response r JOIN assignment a ON a.id = r.assignment_id ORDER BY r.id"
        )
        .fetchall()
    )
    assert len(rows) == 5
    top = rows[0]
    assert top["item_id"] == 7 and top["strength"] == 2 and top["left_pick"] == 0
    assert top["choice"] == ("a" if top["swapped"] else "b")  # "right" un-swapped
    assert json.loads(top["flags_json"]) == ["pii"] and json.loads(top["rubric_json"])
    edited_side = "b" if top["swapped"] else "a"
    assert json.loads(top["edits_json"]) == {edited_side: "An improved answer, typed in the browser."}
    assert top["duration_ms"] and top["duration_ms"] > 0
    assert [r["choice"] in ("a", "b") for r in rows[1:3]] == [True, True]
    assert [r["choice"] for r in rows[3:]] == ["tie", "both_bad"]
    assert [r["left_pick"] for r in rows[1:3]] == [1, 0]
    sft = export(store, "sft", tmp_path / "sft" / "data.jsonl")
    assert sft["rows"] == 1 and "typed in the browser" in (tmp_path / "sft" / "data.jsonl").read_text()
    dpo = export(store, "dpo", tmp_path / "dpo" / "data.jsonl")
    assert dpo["rows"] == 4  # three decisive votes and the edit; the tie and both-bad give no pair
    assert export(store, "redteam", tmp_path / "rt" / "data.jsonl")["rows"] == 1


def test_without_javascript_the_plain_forms_record_votes(app):
    base, store, tokens = app
    driver = browser(javascript=False)
    try:
        driver.get(f"{base}/login?token={tokens['bob']}")

        def click_and_wait(element_id):
            old = driver.find_element(By.TAG_NAME, "main")
            driver.find_element(By.ID, element_id).click()
            WebDriverWait(driver, 10).until(EC.staleness_of(old))

        click_and_wait("login-button")
        click_and_wait("next-button")
        for _ in range(2):
            driver.find_element(By.CSS_SELECTOR, 'input[name="choice"][value="left"]').click()
            click_and_wait("submit")
        click_and_wait("skip-button")
        assert driver.find_elements(By.ID, "vote")
    finally:
        driver.quit()
    statuses = [r[0] for r in store.read().execute("SELECT status FROM assignment ORDER BY id")]
    assert statuses[:3] == ["submitted", "submitted", "skipped"]
    assert store.read().execute("SELECT COUNT(*) FROM response WHERE duration_ms IS NULL").fetchone()[0] == 2
