"""posttrain.collect without the web app: the store, the queue rule, agreement and the leaderboard.

Agreement numbers are checked against textbook tables (Krippendorff 2011's 4-coder example; a 2x2
kappa table worked by hand; Wilson's interval for 8/10 by hand) and the ``krippendorff`` package.
The leaderboard is checked against the closed form for two models and on synthetic battles drawn
from known strengths (order recovered, intervals cover the truth near their nominal 95%)."""

import math
import random
import sqlite3

import numpy as np
import pytest

from posttrain.collect import agreement as agr
from posttrain.collect import queue
from posttrain.collect.ingest import add_pairs, add_prompts
from posttrain.collect.leaderboard import Battle, leaderboard
from posttrain.collect.store import SCHEMA_VERSION, Store
from posttrain.errors import ConfigError, DataError
from posttrain.eval.metrics import cohen_kappa, krippendorff_alpha, wilson_interval

CONFIG = {
    "required_votes": 2,
    "gold_rate": 0.0,
    "rubric": {"scale": [1, 5], "dimensions": [{"name": "helpful"}, {"name": "correct"}]},
}


def pairs(n, **extra):
    return [
        {"prompt": f"question {i}?", "a": f"A{i}", "b": f"B{i}", "model_a": "ma", "model_b": "mb", **extra}
        for i in range(n)
    ]


@pytest.fixture
def store(tmp_path):
    s = Store.create(tmp_path / "p.sqlite", dict(CONFIG))
    yield s
    s.close()


def ids(store, *names):
    return [
        store.read().execute("SELECT id FROM annotator WHERE name = ?", (n,)).fetchone()[0] for n in names
    ]


# ------------------------------------------------------------------------------------------- store


def test_schema_versioned_wal_and_event_log_append_only(store, tmp_path):
    db = store.read()
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    token = store.add_annotator("ann")
    assert len(token) >= 40 and token not in (tmp_path / "p.sqlite").read_bytes().decode("latin-1")
    assert store.annotator_by_token(token)["name"] == "ann" and store.annotator_by_token(token + "x") is None
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        with store.write() as w:
            w.execute("DELETE FROM event")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        with store.write() as w:
            w.execute("UPDATE event SET action = 'x'")
    actions = [r["action"] for r in db.execute("SELECT action FROM event ORDER BY id")]
    assert actions == ["init", "grant"]
    with pytest.raises(ConfigError, match="exists already"):
        Store.create(tmp_path / "p.sqlite", {})
    with pytest.raises(ConfigError, match="no project database"):
        Store(tmp_path / "nope.sqlite")


def test_a_name_full_of_sql_is_stored_as_text(store):
    name = "x'); DROP TABLE annotator; --"
    store.add_annotator(name)
    assert store.read().execute("SELECT name FROM annotator").fetchone()[0] == name


def test_prompts_deduplicated_and_bad_rows_named(store, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "other"}\n')
    assert add_prompts(store, f) == {"added": 2, "duplicates": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: needs a 'messages' or a 'prompt'"):
        add_prompts(store, bad)
    badpairs = tmp_path / "pairs.jsonl"
    badpairs.write_text('{"prompt": "p", "a": "x", "b": "", "model_a": "m", "model_b": "n"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'b'"):
        add_pairs(store, badpairs)


# ------------------------------------------------------------------------------------------- queue


def test_fewest_votes_first_no_double_lease_and_required_votes(store):
    add_pairs(store, pairs(3))
    u, v, w = ids(store, *[(store.add_annotator(n), n)[1] for n in "uvw"])
    rng = random.Random(0)
    first = [
        store.read()
        .execute("SELECT item_id FROM assignment WHERE id = ?", (queue.lease(store, x, rng=rng),))
        .fetchone()[0]
        for x in (u, v, w)
    ]
    assert sorted(first) == [1, 2, 3]  # each takes a different item: fewest votes first
    assert queue.lease(store, u, rng=rng) == 1  # u's pending lease is served again (reload)
    for x in (u, v, w):
        a = queue.current(store, x)
        assert queue.submit(store, x, a["id"], {"choice": "left", "strength": "2"}) == "recorded"
        assert queue.submit(store, x, a["id"], {"choice": "left"}) == "duplicate"
    # then everyone takes what is left until nothing is: nobody gets an item twice, each reaches 2 votes
    for _ in range(3):
        for x in (u, v, w):
            if (aid := queue.lease(store, x, rng=rng)) is not None:
                queue.submit(store, x, aid, {"choice": "tie"})
    assert queue.lease(store, u, rng=rng) is None
    status = [r[0] for r in store.read().execute("SELECT status FROM item ORDER BY id")]
    assert status == ["complete"] * 3
    n = store.read().execute("SELECT COUNT(*) FROM response").fetchone()[0]
    assert n == 6


def test_swap_is_undone_and_left_picks_recorded(store):
    add_pairs(store, pairs(40, required_votes=1))
    (u,) = ids(store, (store.add_annotator("u"), "u")[1])
    rng = random.Random(1)
    swaps = []
    while (aid := queue.lease(store, u, rng=rng)) is not None:
        a = queue.view(store, u, aid)
        swapped = store.read().execute("SELECT swapped FROM assignment WHERE id = ?", (aid,)).fetchone()[0]
        swaps.append(swapped)
        assert a["responses"][0].startswith("B" if swapped else "A")
        # this annotator always clicks the side showing the A answer
        queue.submit(store, u, aid, {"choice": "right" if swapped else "left"})
    assert 5 < sum(swaps) < 35
    rows = store.read().execute("SELECT choice, left_pick FROM response").fetchall()
    assert {r["choice"] for r in rows} == {"a"}
    assert sum(r["left_pick"] for r in rows) == 40 - sum(swaps)


def test_lease_expiry_cap_self_review_and_skip(store):
    names = ["author", "u", "v"]
    for n in names:
        store.add_annotator(n)
    author, u, v = ids(store, *names)
    add_pairs(store, pairs(1, author="author", required_votes=1) + pairs(12)[1:])
    rng = random.Random(0)
    assert queue.lease(store, author, rng=rng) is not None
    assert (
        store.read().execute("SELECT item_id FROM assignment WHERE annotator_id = ?", (author,)).fetchone()[0]
        != 1
    )
    a = queue.lease(store, u, rng=rng, now=1000.0)
    assert store.read().execute("SELECT item_id FROM assignment WHERE id = ?", (a,)).fetchone()[0] == 1
    # v cannot take item 1 while u's lease runs (1 vote required), and can after it expires
    lease_s = 30 * 60
    b = queue.lease(store, v, rng=rng, now=1001.0)
    assert store.read().execute("SELECT item_id FROM assignment WHERE id = ?", (b,)).fetchone()[0] != 1
    queue.skip(store, v, b, "prompt unclear")
    c = queue.lease(store, v, rng=rng, now=1000.0 + lease_s + 1)
    assert store.read().execute("SELECT item_id FROM assignment WHERE id = ?", (c,)).fetchone()[0] == 1
    queue.submit(store, v, c, {"choice": "right"}, now=1000.0 + lease_s + 2)
    with pytest.raises(queue.QueueError, match="expired") as e:
        queue.submit(store, u, a, {"choice": "left"}, now=1000.0 + lease_s + 3)
    assert e.value.status == 409
    with pytest.raises(queue.QueueError, match="say why"):
        queue.skip(store, v, c, " ")
    with pytest.raises(queue.QueueError) as e:
        queue.submit(store, u, c, {"choice": "left"})  # v's assignment
    assert e.value.status == 404
    # the pending cap: fresh leases pile up only to max_pending
    with store.write() as db:
        db.execute("UPDATE meta SET value = json_set(value, '$.max_pending', 3) WHERE key = 'config'")
    got = {queue.lease(store, u, fresh=True, rng=rng, now=2e9) for _ in range(6)}
    pending = (
        store.read()
        .execute("SELECT COUNT(*) FROM assignment WHERE annotator_id = ? AND status = 'pending'", (u,))
        .fetchone()[0]
    )
    assert pending == 3 and len(got) == 3
    with pytest.raises(queue.QueueError, match="choice must be one of"):
        queue.submit(store, u, min(got), {"choice": "A"}, now=2e9)


def test_qualification_then_hidden_gold_and_views_never_show_gold(store):
    with store.write() as db:
        db.execute("UPDATE meta SET value = json_set(value, '$.gold_rate', 0.5) WHERE key = 'config'")
    add_pairs(store, pairs(2, gold={"choice": "a"}, qualification=True))
    add_pairs(store, [dict(p, prompt="gold " + p["prompt"]) for p in pairs(4, gold={"choice": "b"})])
    add_pairs(store, [dict(p, prompt="reg " + p["prompt"]) for p in pairs(10)])
    good, bad = ids(store, *[(store.add_annotator(n), n)[1] for n in ("good", "bad")])
    rng = random.Random(3)
    for who, side in ((good, "a"), (bad, "b")):
        for _ in range(2):
            aid = queue.lease(store, who, rng=rng)
            v = queue.view(store, who, aid)
            assert "gold" not in str(v) and "is_gold" not in v and "model" not in str(v)
            swapped = (
                store.read().execute("SELECT swapped FROM assignment WHERE id = ?", (aid,)).fetchone()[0]
            )
            shown = "left" if (side == "a") != bool(swapped) else "right"
            queue.submit(store, who, aid, {"choice": shown})
    assert queue.lease(store, bad, rng=rng) is None  # failed qualification: no more work
    golds = 0
    for _ in range(8):
        aid = queue.lease(store, good, rng=rng)
        golds += (
            store.read()
            .execute(
                "SELECT i.is_gold FROM assignment a JOIN item i ON i.id = a.item_id WHERE a.id = ?", (aid,)
            )
            .fetchone()[0]
        )
        queue.submit(store, good, aid, {"choice": "tie"})
    assert 1 <= golds <= 4


# ------------------------------------------------------------------------------------------- agreement

KRIPPENDORFF_2011 = [  # coders A-D x units 1-12; None = missing (Krippendorff 2011, p. 3)
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def test_alpha_matches_krippendorffs_worked_example_and_the_package():
    units = [list(col) for col in zip(*KRIPPENDORFF_2011)]
    # the published values: nominal .743, ordinal .815, interval .849
    assert krippendorff_alpha(units, level="nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, level="ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, level="interval") == pytest.approx(0.849, abs=5e-4)
    krippendorff = pytest.importorskip("krippendorff")
    rng = np.random.default_rng(0)
    for level in ("nominal", "ordinal", "interval"):
        for _ in range(5):
            data = rng.integers(1, 6, size=(4, 30)).astype(float)
            data[rng.random(data.shape) < 0.3] = np.nan
            mine = krippendorff_alpha([list(c) for c in data.T], level=level)
            assert mine == pytest.approx(
                krippendorff.alpha(reliability_data=data, level_of_measurement=level), abs=1e-9
            )


def test_alpha_edge_cases():
    assert krippendorff_alpha([[1, 1], [2, 2]]) == 1.0
    assert math.isnan(krippendorff_alpha([[1, 1], [1, 1]]))  # no variation: undefined
    assert math.isnan(krippendorff_alpha([[1], [2]]))  # nothing pairable


def test_kappa_by_hand_and_wilson_by_hand():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o 0.7, p_e 0.5, kappa 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    low, high = wilson_interval(8, 10)  # by hand: centre 0.71674, half-width 0.22658
    assert (low, high) == (pytest.approx(0.49016, abs=1e-5), pytest.approx(0.94332, abs=1e-5))
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_project_agreement_reliability_and_alerts(store, tmp_path):
    add_pairs(store, pairs(30, required_votes=3))
    add_pairs(store, [dict(p, prompt="g" + p["prompt"]) for p in pairs(10, gold={"choice": "a"})])
    names = ["x", "y", "z"]
    who = ids(store, *[(store.add_annotator(n), n)[1] for n in names])
    rng = random.Random(0)
    truth = {i: rng.choice("ab") for i in range(1, 41)}
    with store.write() as db:  # write votes directly: x and y follow the truth, z always clicks left
        for item in range(1, 41):
            for name, uid in zip(names, who):
                swapped = rng.random() < 0.5
                aid = db.execute(
                    "INSERT INTO assignment (item_id, annotator_id, swapped, issued_at, expires_at, status) VALUES (?, ?, ?, 0, 0, 'submitted')",
                    (item, uid, int(swapped)),
                ).lastrowid
                gold = "a" if item > 30 else truth[item]
                choice = gold if name != "z" else ("b" if swapped else "a")
                left = int((choice == "a") != swapped)
                db.execute(
                    "INSERT INTO response (assignment_id, choice, strength, left_pick, rubric_json, duration_ms, created_at) VALUES (?, ?, 1, ?, ?, 4000, 0)",
                    (aid, choice, left, '{"a": {"helpful": ' + str(4 if choice == "a" else 2) + "}}"),
                )
    report = agr.agreement(store, min_shared=20)
    assert report["annotators"]["z"]["left_share"] == 1.0
    assert report["annotators"]["x"]["gold_accuracy"] == 1.0 and report["annotators"]["x"][
        "weight"
    ] == pytest.approx(11 / 12)
    assert report["annotators"]["x"]["median_seconds"] == 4.0
    kappa = {(p["a"], p["b"]): p["kappa"] for p in report["pairs"]}
    assert kappa[("x", "y")] == pytest.approx(1.0) and abs(kappa[("x", "z")]) < 0.5
    assert 0 < report["questions"]["choice"]["alpha"] < 1
    assert report["questions"]["choice"]["items"] == 30
    alerts = agr.health_alerts(store, report, alerts_path=tmp_path / "alerts.jsonl")
    assert {a.rule for a in alerts} >= {"position_bias/z"}
    assert "low_reliability/x" not in {a.rule for a in alerts}
    assert (tmp_path / "alerts.jsonl").read_text().count("position_bias/z") == 1


# ------------------------------------------------------------------------------------------- leaderboard


def test_two_models_match_the_closed_form():
    # MLE of a two-model BT: p = points / n, rating gap = 400 log10(p / (1 - p)); ties and both-bad are half
    battles = (
        [Battle("a", "b", "a")] * 30
        + [Battle("a", "b", "b")] * 10
        + [Battle("a", "b", "tie")] * 6
        + [Battle("a", "b", "both_bad")] * 4
    )
    board = leaderboard(battles, rounds=50)
    p = (30 + 5) / 50
    gap = board.rows[0]["rating"] - board.rows[1]["rating"]
    assert gap == pytest.approx(400 * math.log10(p / (1 - p)), abs=0.5)
    assert board.rows[0]["rating"] + board.rows[1]["rating"] == pytest.approx(2000, abs=1e-6)
    assert board.win_rate[0][1] == pytest.approx(p) and board.battles[0][1] == 50
    assert board.rows[0]["both_bad"] == 4 and board.rows[0]["ties"] == 6


def test_ties_and_both_bad_never_nan():
    for battles in (
        [Battle("a", "b", "both_bad")] * 5,
        [Battle("a", "b", "tie"), Battle("b", "c", "both_bad")],
        [Battle("a", "b", "a")] * 3,
    ):
        board = leaderboard(battles, rounds=20)
        for row in board.rows:
            assert all(math.isfinite(row[k]) for k in ("rating", "low", "high")), row
        assert all(x is None or math.isfinite(x) for r in board.win_rate for x in r)
    assert leaderboard([Battle("a", "b", "both_bad")] * 5, rounds=10).rows[0]["rating"] == pytest.approx(1000)
    assert leaderboard([Battle("a", "c", "a")], rounds=5).win_rate[0][0] is None


def _synthetic(theta, n, rng, tie=0.1):
    names = list(theta)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        p = 1 / (1 + 10 ** (theta[names[b]] - theta[names[a]]))
        u = rng.random()
        out.append(
            Battle(
                names[a],
                names[b],
                "tie" if u < tie else ("a" if u < tie + (1 - tie) * p else "b"),
                100 + 50 * a,
                100 + 50 * b,
            )
        )
    return out


THETA = {"m0": -0.3, "m1": -0.1, "m2": 0.0, "m3": 0.15, "m4": 0.35}


def _coverage(trials, rounds, n, seed=0):
    centred = {k: v - np.mean(list(THETA.values())) for k, v in THETA.items()}
    rng = np.random.default_rng(seed)
    covered = total = 0
    for trial in range(trials):
        board = leaderboard(_synthetic(THETA, n, rng), rounds=rounds, seed=trial)
        for r in board.rows:
            covered += r["low"] <= 1000 + 400 * centred[r["model"]] <= r["high"]
            total += 1
    return covered / total


def test_recovers_order_and_intervals_shrink_and_cover():
    rng = np.random.default_rng(0)
    board = leaderboard(_synthetic(THETA, 3000, rng), rounds=50)
    assert [r["model"] for r in board.rows] == ["m4", "m3", "m2", "m1", "m0"]
    small = leaderboard(_synthetic(THETA, 200, rng), rounds=50)
    big = leaderboard(_synthetic(THETA, 4000, rng), rounds=50)
    width = lambda b: np.mean([r["high"] - r["low"] for r in b.rows])  # noqa: E731
    assert width(big) < width(small) / 2


def test_intervals_cover_truth_near_nominal():
    # 300 intervals at a nominal 95%: binomial sd ~1.3%; measured 0.93 (60 trials, 200 rounds, seed 0)
    coverage = _coverage(60, 200, 600)
    assert 0.90 <= coverage <= 0.99, coverage


def test_length_control_removes_a_pure_length_preference():
    # equal strengths; "verbose" writes the long answer 80% of the time and the longer answer wins 80% of
    # the time: plain BT puts verbose far above terse, length control puts them together
    rng = np.random.default_rng(1)
    battles = []
    for _ in range(2000):
        long_v = rng.random() < 0.8
        lv, lt = (400, 100) if long_v else (100, 400)
        verbose_wins = (rng.random() < 0.8) == long_v
        b = Battle("verbose", "terse", "a" if verbose_wins else "b", lv, lt)
        if rng.random() < 0.5:  # show them in both orders
            b = Battle("terse", "verbose", {"a": "b", "b": "a"}[b.winner], lt, lv)
        battles.append(b)
    plain = {r["model"]: r["rating"] for r in leaderboard(battles, rounds=20).rows}
    controlled = leaderboard(battles, rounds=20, length_control=True)
    lc = {r["model"]: r["rating"] for r in controlled.rows}
    assert plain["verbose"] - plain["terse"] > 100
    assert controlled.length_coef > 0.5
    assert abs(lc["verbose"] - lc["terse"]) < abs(plain["verbose"] - plain["terse"]) / 3


def test_revoke_and_retire_are_logged_and_take_effect(store):
    from posttrain.collect.export import build_rows

    add_pairs(store, pairs(3, required_votes=1))
    token = store.add_annotator("gone")
    (uid,) = ids(store, "gone")
    sid, _ = store.open_session(uid)
    aid = queue.lease(store, uid)
    queue.submit(store, uid, aid, {"choice": "left"})
    queue.lease(store, uid)
    store.revoke("gone")
    assert store.annotator_by_token(token) is None and store.session(sid) is None
    assert queue.current(store, uid) is None  # the lease went back to the pool
    store.retire_item(1, "prompt leaked an eval item")
    rows, removed = build_rows(store, "dpo")
    assert not rows and ("retired items", 1) in removed
    with pytest.raises(ConfigError, match="no item 99"):
        store.retire_item(99, "x")
    (v,) = ids(store, (store.add_annotator("v"), "v")[1])
    leased = {
        store.read()
        .execute("SELECT item_id FROM assignment WHERE id = ?", (queue.lease(store, v, fresh=True),))
        .fetchone()[0]
        for _ in range(3)
    }
    assert 1 not in leased
    events = [
        (r["action"], r["payload_json"])
        for r in store.read().execute("SELECT action, payload_json FROM event")
    ]
    assert ("revoke", '{"annotator": "gone"}') in events and any(
        a == "retire" and "leaked" in p for a, p in events
    )


def test_suggestions_are_shown_only_when_switched_on(store):
    add_pairs(store, pairs(1))
    with store.write() as db:
        db.execute("UPDATE item SET meta_json = ?", ('{"suggestion": {"verdict": "A"}}',))
    (u,) = ids(store, (store.add_annotator("u"), "u")[1])
    aid = queue.lease(store, u)
    assert "suggestion" not in queue.view(store, u, aid)
    with store.write() as db:
        db.execute(
            "UPDATE meta SET value = json_set(value, '$.show_suggestions', json('true')) WHERE key = 'config'"
        )
    assert queue.view(store, u, aid)["suggestion"] == {"verdict": "A"}
