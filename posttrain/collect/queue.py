"""Who annotates what next: leases, caps, fewest votes first, gold and qualification.

The rule (survey §4.3, after OpenAssistant's task manager and Argilla's ``min_submitted``),
for annotator u, inside one write transaction so that two annotators never take the same
last slot of an item:

1. expire stale leases (``lease_minutes``, default 30): the slot goes back to the pool;
2. u's own pending lease, if any, is served again (a reload shows the same item); a client
   asking for more at once gets at most ``max_pending`` (default 8) pending leases;
3. if the project has a qualification set, u first answers every item of it; u then goes on
   only with gold accuracy >= ``qualification_accuracy`` (default 0.8) on that set;
4. with probability ``gold_rate`` (default 0.1), a hidden gold item u has not seen;
5. otherwise an open item u has no lease on, u did not write (no self-review), with fewer
   than ``required_votes`` submitted + in-flight votes, ordered by priority, then fewest
   votes, then age.

Left/right order is randomised per assignment and stored (``swapped``); the submitted
choice is un-swapped before it is stored, and ``left_pick`` keeps which side was clicked,
for the position-bias statistic. A vote is recorded at most once per (item, annotator): the
assignment is unique on that pair and a repeated submit reports ``duplicate``.
"""

from __future__ import annotations

import json
import random
import time

from posttrain.collect.store import FLAGS, Store
from posttrain.errors import PosttrainError

SIDES = ("left", "right", "tie", "both_bad")
SKIP_REASONS = ("cannot judge", "prompt unclear", "harmful content", "needs expertise", "other")


class QueueError(PosttrainError):
    """A submit or skip that cannot be taken; ``status`` is the HTTP status the web app answers."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _settings(store: Store) -> dict:
    c = store.config
    return {
        "lease": float(c.get("lease_minutes", 30)) * 60,
        "max_pending": int(c.get("max_pending", 8)),
        "gold_rate": float(c.get("gold_rate", 0.1)),
        "qualification_accuracy": float(c.get("qualification_accuracy", 0.8)),
    }


def expire(db, now: float) -> int:
    return db.execute(
        "UPDATE assignment SET status = 'expired' WHERE status = 'pending' AND expires_at <= ?", (now,)
    ).rowcount


def current(store: Store, annotator_id: int, *, now: float | None = None):
    """u's oldest live lease (row of assignment), or None."""
    return (
        store.read()
        .execute(
            "SELECT * FROM assignment WHERE annotator_id = ? AND status = 'pending' AND expires_at > ? "
            "ORDER BY id LIMIT 1",
            (annotator_id, time.time() if now is None else now),
        )
        .fetchone()
    )


def qualification_state(db, annotator_id: int, threshold: float) -> tuple[str, int | None]:
    """('none' | 'pending' | 'passed' | 'failed', next qualification item id or None)."""
    quals = [r["id"] for r in db.execute("SELECT id FROM item WHERE qualification = 1 ORDER BY id")]
    if not quals:
        return "none", None
    rows = db.execute(
        "SELECT a.item_id, r.choice, i.gold_json FROM assignment a JOIN response r ON r.assignment_id = a.id "
        "JOIN item i ON i.id = a.item_id WHERE a.annotator_id = ? AND i.qualification = 1",
        (annotator_id,),
    ).fetchall()
    done = {r["item_id"] for r in rows}
    todo = [q for q in quals if q not in done]
    if todo:
        return "pending", todo[0]
    correct = sum(r["choice"] == json.loads(r["gold_json"]).get("choice") for r in rows)
    return ("passed" if correct / len(rows) >= threshold else "failed"), None


def lease(
    store: Store,
    annotator_id: int,
    *,
    fresh: bool = False,
    rng: random.Random | None = None,
    now: float | None = None,
):
    """Lease the next item to u (see the module docstring); returns the assignment id or None.

    u's oldest pending lease comes back while there is one, unless ``fresh`` asks for another
    item besides it (a client working on several at once), which ``max_pending`` caps."""
    rng = rng or random.Random()
    now = time.time() if now is None else now
    s = _settings(store)
    with store.write() as db:
        expire(db, now)
        pending = db.execute(
            "SELECT id FROM assignment WHERE annotator_id = ? AND status = 'pending' ORDER BY id",
            (annotator_id,),
        ).fetchall()
        if pending and (not fresh or len(pending) >= s["max_pending"]):
            return pending[0]["id"]
        state, qual_item = qualification_state(db, annotator_id, s["qualification_accuracy"])
        if state == "failed":
            return None
        if state == "pending":
            if any(
                db.execute(
                    "SELECT 1 FROM assignment WHERE id = ? AND item_id = ?", (p["id"], qual_item)
                ).fetchone()
                for p in pending
            ):
                return pending[0]["id"]
            return _assign(db, qual_item, annotator_id, rng, now, s, policy="qualification")
        item = None
        if s["gold_rate"] > 0 and rng.random() < s["gold_rate"]:
            item = _pick(db, annotator_id, gold=True)
        item = item or _pick(db, annotator_id, gold=False)
        if item is None:
            return pending[0]["id"] if pending else None
        return _assign(db, item, annotator_id, rng, now, s)


_FREE = (
    "i.status = 'open' AND (i.author_id IS NULL OR i.author_id != :u) "
    "AND NOT EXISTS (SELECT 1 FROM assignment x WHERE x.item_id = i.id AND x.annotator_id = :u "
    "AND x.status != 'expired')"
)


def _pick(db, annotator_id: int, *, gold: bool) -> int | None:
    if gold:
        sql = f"SELECT i.id FROM item i WHERE i.is_gold = 1 AND i.qualification = 0 AND {_FREE} ORDER BY random()"
    else:
        sql = (
            "SELECT i.id, (SELECT COUNT(*) FROM assignment y WHERE y.item_id = i.id "
            "AND y.status IN ('pending', 'submitted')) AS taken FROM item i "
            f"WHERE i.is_gold = 0 AND {_FREE} AND taken < i.required_votes "
            "ORDER BY i.priority DESC, taken ASC, i.created_at ASC, i.id ASC"
        )
    row = db.execute(sql + " LIMIT 1", {"u": annotator_id}).fetchone()
    return None if row is None else row["id"]


def _assign(db, item_id, annotator_id, rng, now, s, policy=None) -> int:
    swapped = int(rng.random() < 0.5)
    old = db.execute(
        "SELECT id FROM assignment WHERE item_id = ? AND annotator_id = ?", (item_id, annotator_id)
    ).fetchone()
    if old:  # an expired lease of u's own on this item: take it up again
        db.execute(
            "UPDATE assignment SET status = 'pending', swapped = ?, issued_at = ?, expires_at = ? WHERE id = ?",
            (swapped, now, now + s["lease"], old["id"]),
        )
        return old["id"]
    return db.execute(
        "INSERT INTO assignment (item_id, annotator_id, swapped, issued_at, expires_at, status) "
        "VALUES (?, ?, ?, ?, ?, 'pending')",
        (item_id, annotator_id, swapped, now, now + s["lease"]),
    ).lastrowid


def own_assignment(db, annotator_id: int, assignment_id) -> dict:
    """u's assignment joined with its item; another annotator's id is 'not found', never 'forbidden',
    so ids of others' work are not confirmed to exist."""
    try:
        aid = int(assignment_id)
    except (TypeError, ValueError):
        raise QueueError(f"assignment id must be a number (got {assignment_id!r})") from None
    row = db.execute(
        "SELECT a.*, i.kind, i.is_gold, i.required_votes, i.status AS item_status, i.gen_a, i.gen_b "
        "FROM assignment a JOIN item i ON i.id = a.item_id WHERE a.id = ? AND a.annotator_id = ?",
        (aid, annotator_id),
    ).fetchone()
    if row is None:
        raise QueueError(f"no assignment {aid} of yours", 404)
    return dict(row)


def _side(a: dict, side: str) -> str:
    """'left'/'right' as shown -> 'a'/'b' as stored."""
    left, right = ("b", "a") if a["swapped"] else ("a", "b")
    return {"left": left, "right": right}[side]


def _check_live(db, a: dict, now: float) -> None:
    if a["status"] == "skipped":
        raise QueueError("this item was skipped", 409)
    if a["status"] == "pending" and a["expires_at"] > now:
        return
    # an expired lease still counts if the item has room for this vote
    taken = db.execute(
        "SELECT COUNT(*) FROM assignment WHERE item_id = ? AND id != ? AND status IN ('pending', 'submitted') "
        "AND (status = 'submitted' OR expires_at > ?)",
        (a["item_id"], a["id"], now),
    ).fetchone()[0]
    if not a["is_gold"] and taken >= a["required_votes"]:
        raise QueueError("the lease on this item expired and others have voted on it since", 409)


def parse_vote(a: dict, form: dict, rubric: list[str], scale: tuple[int, int], originals: dict) -> dict:
    """The stored response from a submitted form (fields as the annotate page names them);
    ``originals`` maps 'a'/'b' to the texts shown, so that an unchanged edit box is no edit."""
    vote: dict = {"choice": None, "strength": None, "left_pick": None}
    side = (form.get("choice") or "").strip()
    if a["kind"] == "pair":
        if side not in SIDES:
            raise QueueError(f"choice must be one of {', '.join(SIDES)} (got {side!r})")
        vote["choice"] = _side(a, side) if side in ("left", "right") else side
        vote["left_pick"] = {"left": 1, "right": 0}.get(side)
        strength = (form.get("strength") or "1").strip()
        if side in ("left", "right"):
            if strength not in ("1", "2"):
                raise QueueError(f"strength must be 1 (better) or 2 (much better) (got {strength!r})")
            vote["strength"] = int(strength)
    sides = ("left", "right") if a["kind"] == "pair" else ("left",)
    scores: dict[str, dict[str, int]] = {}
    for s in sides:
        for dim in rubric:
            raw = (form.get(f"rubric_{s}_{dim}") or "").strip()
            if not raw:
                continue
            if not raw.isdigit() or not scale[0] <= int(raw) <= scale[1]:
                raise QueueError(
                    f"rubric {dim} ({s}) must be a whole number {scale[0]}-{scale[1]} (got {raw!r})"
                )
            scores.setdefault(_side(a, s) if a["kind"] == "pair" else "a", {})[dim] = int(raw)
    edits = {}
    for s in sides:
        text = (form.get(f"edit_{s}") or "").replace("\r\n", "\n")
        stored = _side(a, s) if a["kind"] == "pair" else "a"
        if text.strip() and text.strip() != originals[stored].strip():
            edits[stored] = text
    flags = form.get("flags") or []
    flags = [flags] if isinstance(flags, str) else list(flags)
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise QueueError(f"unknown flag(s) {', '.join(unknown)}; known: {', '.join(FLAGS)}")
    if a["kind"] == "single" and not (scores or edits or flags):
        raise QueueError("rate the answer, edit it or flag it before submitting")
    duration = (form.get("duration_ms") or "").strip()
    vote.update(
        rubric=scores,
        edits=edits,
        flags=sorted(set(flags)),
        critique=(form.get("critique") or "").strip()[:20000],
        duration_ms=int(duration) if duration.isdigit() else None,
    )
    return vote


def submit(store: Store, annotator_id: int, assignment_id, form: dict, *, now: float | None = None) -> str:
    """Record u's vote on an assignment; 'recorded', or 'duplicate' when it was recorded before."""
    now = time.time() if now is None else now
    c = store.config
    rubric = [d["name"] for d in c.get("rubric", {}).get("dimensions", [])]
    scale = tuple(c.get("rubric", {}).get("scale", (1, 5)))
    with store.write() as db:
        a = own_assignment(db, annotator_id, assignment_id)
        if a["status"] == "submitted":
            return "duplicate"
        _check_live(db, a, now)
        originals = {
            side: db.execute("SELECT text FROM generation WHERE id = ?", (a[f"gen_{side}"],)).fetchone()[0]
            for side in ("a", "b")
            if a[f"gen_{side}"] is not None
        }
        vote = parse_vote(a, form, rubric, scale, originals)
        db.execute(
            "INSERT INTO response (assignment_id, choice, strength, left_pick, rubric_json, critique, edits_json, "
            "flags_json, duration_ms, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                a["id"], vote["choice"], vote["strength"], vote["left_pick"], json.dumps(vote["rubric"]),
                vote["critique"], json.dumps(vote["edits"]), json.dumps(vote["flags"]), vote["duration_ms"], now,
            ),
        )  # fmt: skip
        db.execute("UPDATE assignment SET status = 'submitted' WHERE id = ?", (a["id"],))
        if not a["is_gold"]:
            votes = db.execute(
                "SELECT COUNT(*) FROM assignment WHERE item_id = ? AND status = 'submitted'", (a["item_id"],)
            ).fetchone()[0]
            if votes >= a["required_votes"]:
                db.execute(
                    "UPDATE item SET status = 'complete' WHERE id = ? AND status = 'open'", (a["item_id"],)
                )
    return "recorded"


def skip(store: Store, annotator_id: int, assignment_id, reason: str) -> None:
    """u passes on an item, with a reason; it is not offered to u again, and counts as no vote."""
    reason = (reason or "").strip()
    if not reason:
        raise QueueError(f"say why you skip (e.g. {', '.join(SKIP_REASONS)})")
    with store.write() as db:
        a = own_assignment(db, annotator_id, assignment_id)
        if a["status"] == "submitted":
            raise QueueError("this item was already submitted", 409)
        db.execute(
            "UPDATE assignment SET status = 'skipped', skip_reason = ? WHERE id = ?", (reason[:500], a["id"])
        )


def view(store: Store, annotator_id: int, assignment_id) -> dict:
    """What the annotate page shows: prompt, left and right texts. Never the gold answer, the model
    names or whether the item is gold."""
    db = store.read()
    a = own_assignment(db, annotator_id, assignment_id)
    item = db.execute("SELECT prompt_id FROM item WHERE id = ?", (a["item_id"],)).fetchone()
    prompt = json.loads(
        db.execute("SELECT messages_json FROM prompt WHERE id = ?", (item["prompt_id"],)).fetchone()[0]
    )

    def text(gen_id):
        return db.execute("SELECT text FROM generation WHERE id = ?", (gen_id,)).fetchone()["text"]

    ids = [a["gen_a"], a["gen_b"]] if a["kind"] == "pair" else [a["gen_a"]]
    if a["swapped"] and len(ids) == 2:
        ids.reverse()
    shown = {
        "assignment_id": a["id"],
        "kind": a["kind"],
        "status": a["status"],
        "expires_at": a["expires_at"],
        "prompt": prompt,
        "responses": [text(g) for g in ids],
    }
    if store.config.get("show_suggestions"):  # a judge's pre-label, off by default (anchoring)
        meta = json.loads(
            db.execute("SELECT meta_json FROM item WHERE id = ?", (a["item_id"],)).fetchone()[0]
        )
        if meta.get("suggestion") is not None:
            shown["suggestion"] = meta["suggestion"]
    return shown
