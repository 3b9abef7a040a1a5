"""The collect web app over HTTP: CSRF and login on every state change, what an annotator may see, model
output shown as text, the plain-form flow, and a load test against the real server on 127.0.0.1."""

import json
import statistics
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from collect_helpers import XSS, csrf_of, live_server, login, pairs, project  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from posttrain.collect.ingest import add_pairs  # noqa: E402
from posttrain.collect.web import create_app  # noqa: E402

JSON = {"accept": "application/json"}
STATE_CHANGING = {"/login", "/logout", "/next", "/submit", "/skip"}


@pytest.fixture
def app(tmp_path):
    store, tokens = project(tmp_path)
    add_pairs(
        store,
        [{"prompt": "xss?", "a": XSS, "b": "plain", "model_a": "good", "model_b": "bad", "priority": 9}],
    )
    add_pairs(store, pairs(2, prefix="gold", gold={"choice": "a"}))
    yield create_app(store), store, tokens
    store.close()


def client(app):
    return TestClient(app, base_url="http://127.0.0.1", follow_redirects=False)


def test_every_state_change_needs_a_session_and_its_csrf_token(app):
    app, store, tokens = app
    posts = {r.path for r in app.routes if "POST" in getattr(r, "methods", ())}
    assert posts == STATE_CHANGING  # a new POST route must be added to this test
    c = client(app)
    # login: the form's double-submit token is required, and the token must be known
    page = c.get("/login")
    good = csrf_of(page.text)
    assert c.post("/login", data={"token": tokens["ann"]}).status_code == 403
    assert c.post("/login", data={"token": tokens["ann"], "csrf": "x" + good}).status_code == 403
    assert c.post("/login", data={"token": "not-a-token", "csrf": good}).status_code == 401
    csrf = login(c, tokens["ann"])
    aid = c.post("/next", data={"csrf": csrf}, headers=JSON).json()["assignment"]["assignment_id"]
    bodies = {"/logout": {}, "/next": {}, "/submit": {"assignment_id": aid, "choice": "left"},
              "/skip": {"assignment_id": aid, "reason": "other"}}  # fmt: skip
    for path, body in bodies.items():
        assert c.post(path, data=body).status_code == 403, path
        assert c.post(path, data={**body, "csrf": csrf[:-1]}).status_code == 403, path
        assert c.post(path, data={**body, "csrf": ""}).status_code == 403, path
        other = client(app)  # no session at all
        assert other.post(path, data={**body, "csrf": csrf}).status_code == 401, path
        forged = client(app)
        forged.cookies.set("collect_session", "forged-session-id")
        assert forged.post(path, data={**body, "csrf": csrf}).status_code == 401, path
    # the refused requests changed nothing: no vote, no skip, still logged in, one lease
    db = store.read()
    assert db.execute("SELECT COUNT(*) FROM response").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM assignment WHERE status = 'pending'").fetchone()[0] == 1
    assert c.get("/api/me").status_code == 200
    assert c.post(
        "/submit", data={"csrf": csrf, "assignment_id": aid}, headers={"content-type": "application/json"}
    ).status_code in (403, 415)


def test_annotators_see_only_their_own_work_and_never_gold_or_models(app):
    app, store, tokens = app
    ann, bob, boss = client(app), client(app), client(app)
    ca, cb, cboss = login(ann, tokens["ann"]), login(bob, tokens["bob"]), login(boss, tokens["boss"])
    mine = ann.post("/next", data={"csrf": ca}, headers=JSON).json()["assignment"]
    assert set(mine) == {"assignment_id", "kind", "status", "expires_at", "prompt", "responses"}
    aid = mine["assignment_id"]
    assert bob.get(f"/api/assignment/{aid}").status_code == 404
    assert bob.post("/submit", data={"csrf": cb, "assignment_id": aid, "choice": "left"}).status_code == 404
    assert bob.post("/skip", data={"csrf": cb, "assignment_id": aid, "reason": "x"}).status_code == 404
    assert ann.get(f"/api/assignment/{aid}").status_code == 200
    for path in ("/admin", "/api/report"):
        assert ann.get(path).status_code == 403
        assert boss.get(path).status_code == 200
    assert cboss
    # serve bob gold items only: the page and the JSON never say gold, nor the gold answer, nor model names
    with store.write() as db:
        db.execute("UPDATE meta SET value = json_set(value, '$.gold_rate', 1.0) WHERE key = 'config'")
    for _ in range(2):
        item = bob.post("/next", data={"csrf": cb}, headers=JSON).json()["assignment"]
        page = bob.get("/annotate").text
        for text in (page, json.dumps(item)):
            assert "gold" not in text.replace(item["prompt"][0]["content"], "") and 'choice": "a' not in text
            assert "good" not in text.replace(item["prompt"][0]["content"], "") and '"bad"' not in text
        bob.post("/submit", data={"csrf": cb, "assignment_id": item["assignment_id"], "choice": "tie"})


def test_model_output_is_shown_as_text_and_headers_are_strict(app):
    app, store, tokens = app
    c = client(app)
    csrf = login(c, tokens["ann"])
    c.post("/next", data={"csrf": csrf})
    r = c.get("/annotate")
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in r.text
    assert "<script>alert" not in r.text and "<b onmouseover" not in r.text
    assert r.text.count("<script") == 1  # the app's own script only
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
    fresh = client(app)
    page = fresh.get("/login")
    r = fresh.post("/login", data={"token": tokens["bob"], "csrf": csrf_of(page.text)})
    cookie = r.headers["set-cookie"].lower()
    assert "collect_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    assert tokens["bob"] not in cookie


def test_plain_form_flow_records_and_exports(app, tmp_path):
    from posttrain.collect.export import export

    app, store, tokens = app
    c = client(app)
    csrf = login(c, tokens["ann"])
    assert c.get("/annotate").status_code == 200 and "Next item" in c.get("/annotate").text
    r = c.post("/next", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/annotate"
    for k in range(4):
        page = c.get("/annotate").text
        aid = int(page.split('name="assignment_id" value="')[1].split('"')[0])
        form = {"csrf": csrf_of(page), "assignment_id": aid, "choice": "left", "strength": "2",
                "rubric_left_helpfulness": "5", "rubric_right_helpfulness": "2", "critique": "left is right",
                "flags": ["pii", "unsafe"] if k == 0 else []}  # fmt: skip
        if k == 1:
            form["edit_left"] = "an improved answer"
        r = c.post("/submit", data=form)
        assert r.status_code == 303, r.text
        assert c.post("/submit", data=form, headers=JSON).json()["status"] == "duplicate"
    page = c.get("/annotate").text
    aid = int(page.split('name="assignment_id" value="')[1].split('"')[0])
    assert c.post("/skip", data={"csrf": csrf, "assignment_id": aid, "reason": ""}).status_code == 400
    assert (
        c.post("/skip", data={"csrf": csrf, "assignment_id": aid, "reason": "prompt unclear"}).status_code
        == 303
    )
    assert c.post("/submit", data={"csrf": csrf, "assignment_id": aid, "choice": "left"}).status_code == 409
    rows = (
        store.read()
        .execute("SELECT r.*, a.swapped FROM response r JOIN assignment a ON a.id = r.assignment_id")
        .fetchall()
    )
    assert len(rows) == 4
    for row in rows:  # "left" was clicked: stored as a if not swapped, b if swapped
        assert (
            row["choice"] == ("b" if row["swapped"] else "a")
            and row["left_pick"] == 1
            and row["strength"] == 2
        )
    boss = client(app)
    login(boss, tokens["boss"])
    report = boss.get("/api/report").json()
    assert report["status"]["votes"] == 4 and report["leaderboard"]["n_battles"] == 4
    assert {r["model"] for r in report["leaderboard"]["rows"]} == {"good", "bad"}
    assert isinstance(report["alerts"], list) and "Leaderboard" in boss.get("/admin").text
    out = export(store, "redteam", tmp_path / "rt" / "redteam.jsonl")
    line = json.loads((tmp_path / "rt" / "redteam.jsonl").read_text().splitlines()[0])
    assert out["rows"] == 1 and line["flags"] == {"pii": 1, "unsafe": 1}
    sft = export(store, "sft", tmp_path / "sft" / "sft.jsonl")
    assert sft["rows"] == 1
    row = json.loads((tmp_path / "sft" / "sft.jsonl").read_text())
    assert row["messages"][-1] == {"role": "assistant", "content": "an improved answer"}
    assert row["meta"]["editor"] != "ann" and len(row["meta"]["editor"]) == 16


def test_load_20_annotators_x_50_votes_against_the_real_server(tmp_path, record_property):
    import httpx

    config = {
        "name": "load",
        "required_votes": 10,
        "gold_rate": 0.0,
        "rubric": {"scale": [1, 5], "dimensions": []},
    }
    store, _ = project(tmp_path, n=0, config=config)
    add_pairs(store, pairs(120))
    tokens = [store.add_annotator(f"u{i:02d}") for i in range(20)]
    latencies, outcomes, errors = [], [], []
    lock = threading.Lock()

    def annotate(token, k):
        try:
            with httpx.Client(base_url=base, timeout=60) as c:
                csrf = login(c, token)
                item = c.post("/next", data={"csrf": csrf}, headers=JSON).json()["assignment"]
                for n in range(50):
                    assert item is not None, f"annotator {k} ran out of items after {n}"
                    body = {
                        "csrf": csrf,
                        "assignment_id": item["assignment_id"],
                        "choice": ("left", "right", "tie")[(k + n) % 3],
                    }
                    t = time.perf_counter()
                    r = c.post("/submit", data=body, headers=JSON)
                    dt = time.perf_counter() - t
                    assert r.status_code == 200, r.text
                    got = r.json()
                    if n % 10 == 0:  # a double click: the same vote again must not count twice
                        again = c.post("/submit", data=body, headers=JSON).json()
                        with lock:
                            outcomes.append(again["status"])
                    with lock:
                        latencies.append(dt)
                        outcomes.append(got["status"])
                    item = got["assignment"]
        except BaseException as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(repr(e))

    with live_server(store) as base:
        threads = [threading.Thread(target=annotate, args=(t, k)) for k, t in enumerate(tokens)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        wall = time.perf_counter() - start
    assert not errors, errors[:3]
    db = store.read()
    n = db.execute("SELECT COUNT(*) FROM response").fetchone()[0]
    distinct = db.execute(
        "SELECT COUNT(DISTINCT a.item_id || ':' || a.annotator_id) FROM response r JOIN assignment a ON a.id = r.assignment_id"
    ).fetchone()[0]
    per_annotator = {
        r[0]
        for r in db.execute(
            "SELECT COUNT(*) FROM assignment WHERE status = 'submitted' GROUP BY annotator_id"
        )
    }
    over = db.execute(
        "SELECT COUNT(*) FROM item i WHERE (SELECT COUNT(*) FROM assignment a WHERE a.item_id = i.id AND a.status = 'submitted') > i.required_votes"
    ).fetchone()[0]
    assert outcomes.count("recorded") == 1000 and outcomes.count("duplicate") == 100
    assert n == distinct == 1000 and per_annotator == {50} and over == 0
    lat = sorted(latencies)
    p50, p95 = statistics.median(lat), lat[int(0.95 * len(lat)) - 1]
    record_property("load", {"votes": n, "p50_ms": 1000 * p50, "p95_ms": 1000 * p95, "wall_s": wall})
    print(
        f"\nload: {n} votes, 0 lost, 0 duplicated; p50 {1000 * p50:.1f} ms, p95 {1000 * p95:.1f} ms, {wall:.1f} s"
    )
    assert p95 < 5.0
