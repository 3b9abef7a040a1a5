"""The project database: one SQLite file in WAL mode, one writer, a versioned schema.

Every write goes through :meth:`Store.write`, which holds one lock around one connection and
runs the block as a ``BEGIN IMMEDIATE`` transaction, so concurrent annotators queue for the
writer instead of failing with "database is locked" (Label Studio's SQLite failure, survey
§1.2); readers use their own per-thread connections, which WAL lets run beside the writer.
SQL is always parameterised (``?`` placeholders), never built from values.

The schema version lives in ``PRAGMA user_version``; :data:`MIGRATIONS` are forward-only
steps, applied in order when a file of an older version is opened. The ``event`` table is
append-only: triggers refuse UPDATE and DELETE, so the log of grants, exports and deletions
cannot be rewritten through SQL.

Tokens (login links) are 32 random bytes; only their SHA-256 is stored. Annotator ids in
exports are salted hashes (the salt is a per-project secret in ``meta``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from posttrain.errors import ConfigError

ROLES = ("admin", "reviewer", "annotator")
CHOICES = ("a", "b", "tie", "both_bad")
FLAGS = ("unsafe", "pii", "over_refusal", "broken", "identity_leak")

_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE annotator (
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
  role TEXT NOT NULL CHECK (role IN ('admin', 'reviewer', 'annotator')),
  token_hash TEXT NOT NULL UNIQUE, disabled INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL) STRICT;
CREATE TABLE session (
  id_hash TEXT PRIMARY KEY, annotator_id INTEGER NOT NULL REFERENCES annotator(id),
  csrf TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL) STRICT;
CREATE TABLE prompt (
  id INTEGER PRIMARY KEY, messages_json TEXT NOT NULL, content_sha256 TEXT NOT NULL UNIQUE,
  source TEXT, author_id INTEGER REFERENCES annotator(id), meta_json TEXT NOT NULL DEFAULT '{}',
  created_at REAL NOT NULL) STRICT;
CREATE TABLE model (
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, path TEXT, revision TEXT,
  meta_json TEXT NOT NULL DEFAULT '{}') STRICT;
CREATE TABLE generation (
  id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompt(id),
  model_id INTEGER NOT NULL REFERENCES model(id), text TEXT NOT NULL,
  gen_config_json TEXT NOT NULL DEFAULT '{}', seed INTEGER, created_at REAL NOT NULL) STRICT;
CREATE TABLE item (
  id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('pair', 'single')),
  prompt_id INTEGER NOT NULL REFERENCES prompt(id),
  gen_a INTEGER NOT NULL REFERENCES generation(id), gen_b INTEGER REFERENCES generation(id),
  is_gold INTEGER NOT NULL DEFAULT 0, qualification INTEGER NOT NULL DEFAULT 0, gold_json TEXT,
  author_id INTEGER REFERENCES annotator(id), sampling_policy TEXT NOT NULL DEFAULT 'uniform',
  priority INTEGER NOT NULL DEFAULT 0, required_votes INTEGER NOT NULL,
  status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'complete', 'retired')),
  meta_json TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL) STRICT;
CREATE TABLE assignment (
  id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES item(id),
  annotator_id INTEGER NOT NULL REFERENCES annotator(id), swapped INTEGER NOT NULL,
  issued_at REAL NOT NULL, expires_at REAL NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('pending', 'submitted', 'skipped', 'expired')),
  skip_reason TEXT, UNIQUE (item_id, annotator_id)) STRICT;
CREATE TABLE response (
  id INTEGER PRIMARY KEY, assignment_id INTEGER NOT NULL UNIQUE REFERENCES assignment(id),
  choice TEXT CHECK (choice IN ('a', 'b', 'tie', 'both_bad')), strength INTEGER,
  left_pick INTEGER, rubric_json TEXT NOT NULL DEFAULT '{}', critique TEXT NOT NULL DEFAULT '',
  edits_json TEXT NOT NULL DEFAULT '{}', flags_json TEXT NOT NULL DEFAULT '[]',
  duration_ms INTEGER, created_at REAL NOT NULL) STRICT;
CREATE TABLE event (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
  payload_json TEXT NOT NULL DEFAULT '{}') STRICT;
CREATE TRIGGER event_no_update BEFORE UPDATE ON event BEGIN SELECT RAISE(ABORT, 'event log is append-only'); END;
CREATE TRIGGER event_no_delete BEFORE DELETE ON event BEGIN SELECT RAISE(ABORT, 'event log is append-only'); END;
CREATE TABLE export (
  id INTEGER PRIMARY KEY, format TEXT NOT NULL, filters_json TEXT NOT NULL, path TEXT NOT NULL,
  sha256 TEXT NOT NULL, n_rows INTEGER NOT NULL, created_at REAL NOT NULL) STRICT;
CREATE INDEX assignment_by_annotator ON assignment (annotator_id, status);
CREATE INDEX assignment_by_item ON assignment (item_id, status);
CREATE INDEX item_open ON item (status, is_gold, priority);
"""

MIGRATIONS: list[str] = [_V1]
"""Forward-only schema steps; ``PRAGMA user_version`` = how many have been applied."""
SCHEMA_VERSION = len(MIGRATIONS)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def content_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Store:
    """One project database. Thread-safe: writes are serialised, reads are per thread.

    ``Store.create(path, config)`` makes a new project; ``Store(path)`` opens one (migrating an
    older schema forward).
    """

    def __init__(self, path: str | Path, *, _create: bool = False):
        self.path = Path(path)
        if not _create and not self.path.is_file():
            raise ConfigError(f"collect: no project database at {self.path} (create it with 'collect init')")
        self._lock = threading.RLock()
        self._local = threading.local()
        self._writer = self._connect()
        self._migrate()

    @classmethod
    def create(cls, path: str | Path, config: dict) -> Store:
        path = Path(path)
        if path.exists():
            raise ConfigError(f"collect init: {path} exists already")
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, _create=True)
        with store.write() as db:
            for key, value in (("config", json.dumps(config)), ("salt", secrets.token_hex(16))):
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            store.log(db, "cli", "init", {"config": config})
        return store

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        for pragma in ("journal_mode=WAL", "busy_timeout=30000", "foreign_keys=ON", "synchronous=NORMAL"):
            db.execute(f"PRAGMA {pragma}")  # constant strings, no values
        return db

    def _migrate(self) -> None:
        with self._lock:
            version = self._writer.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"collect: {self.path} has schema version {version}, newer than this posttrain's "
                    f"{SCHEMA_VERSION}; upgrade posttrain"
                )
            for v in range(version, SCHEMA_VERSION):
                self._writer.executescript(
                    "BEGIN;" + MIGRATIONS[v] + f"PRAGMA user_version = {v + 1}; COMMIT;"
                )

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """The one writer, inside a transaction (committed on success, rolled back on error)."""
        with self._lock:
            db = self._writer
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def read(self) -> sqlite3.Connection:
        """This thread's read connection (autocommit: each statement sees the latest commit)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def close(self) -> None:
        self._writer.close()

    def backup(self, dest: str | Path) -> Path:
        """A consistent snapshot of the database (sqlite's online backup)."""
        dest = Path(dest)
        target = sqlite3.connect(dest)
        with self._lock:
            self._writer.backup(target)
        target.close()
        return dest

    # ------------------------------------------------------------------ small helpers

    @staticmethod
    def log(db: sqlite3.Connection, actor: str, action: str, payload: dict | None = None) -> None:
        """Append to the event log (inside the caller's write transaction)."""
        db.execute(
            "INSERT INTO event (ts, actor, action, payload_json) VALUES (?, ?, ?, ?)",
            (time.time(), actor, action, json.dumps(payload or {})),
        )

    def meta(self, key: str):
        row = self.read().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["value"]

    @property
    def config(self) -> dict:
        return json.loads(self.meta("config") or "{}")

    def annotator_hash(self, annotator_id: int) -> str:
        """The salted id an export shows instead of an annotator's name."""
        salt = self.meta("salt") or ""
        return hashlib.sha256(f"{salt}:{annotator_id}".encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ annotators and sessions

    def add_annotator(self, name: str, role: str = "annotator", *, actor: str = "cli") -> str:
        """Create an annotator; returns the login token (shown once, stored only as a hash)."""
        if role not in ROLES:
            raise ConfigError(f"collect: role must be one of {', '.join(ROLES)} (got {role!r})")
        token = new_token()
        with self.write() as db:
            if db.execute("SELECT 1 FROM annotator WHERE name = ?", (name,)).fetchone():
                raise ConfigError(f"collect: annotator {name!r} exists already")
            db.execute(
                "INSERT INTO annotator (name, role, token_hash, created_at) VALUES (?, ?, ?, ?)",
                (name, role, hash_token(token), time.time()),
            )
            self.log(db, actor, "grant", {"annotator": name, "role": role})
        return token

    def annotator_by_token(self, token: str):
        return (
            self.read()
            .execute("SELECT * FROM annotator WHERE token_hash = ? AND disabled = 0", (hash_token(token),))
            .fetchone()
        )

    def open_session(self, annotator_id: int, *, hours: float = 12.0) -> tuple[str, str]:
        """A new login session: returns (session id for the cookie, its CSRF token)."""
        sid, csrf = new_token(), new_token()
        now = time.time()
        with self.write() as db:
            db.execute(
                "INSERT INTO session (id_hash, annotator_id, csrf, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (hash_token(sid), annotator_id, csrf, now, now + hours * 3600),
            )
            self.log(db, f"annotator:{annotator_id}", "login", {})
        return sid, csrf

    def session(self, sid: str):
        """(annotator row, csrf) of a live session, or None."""
        row = (
            self.read()
            .execute(
                "SELECT a.*, s.csrf AS csrf FROM session s JOIN annotator a ON a.id = s.annotator_id "
                "WHERE s.id_hash = ? AND s.expires_at > ? AND a.disabled = 0",
                (hash_token(sid), time.time()),
            )
            .fetchone()
        )
        return row

    def close_session(self, sid: str) -> None:
        with self.write() as db:
            db.execute("DELETE FROM session WHERE id_hash = ?", (hash_token(sid),))

    def revoke(self, name: str, *, actor: str = "cli") -> None:
        """Disable an annotator: their token and sessions stop working, their leases go back to the pool.
        Their votes stay (exports can leave them out with ``exclude_annotators``)."""
        with self.write() as db:
            row = db.execute("SELECT id FROM annotator WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ConfigError(f"collect: no annotator named {name!r}")
            db.execute("UPDATE annotator SET disabled = 1 WHERE id = ?", (row["id"],))
            db.execute("DELETE FROM session WHERE annotator_id = ?", (row["id"],))
            db.execute(
                "UPDATE assignment SET status = 'expired' WHERE annotator_id = ? AND status = 'pending'",
                (row["id"],),
            )
            self.log(db, actor, "revoke", {"annotator": name})

    def retire_item(self, item_id: int, reason: str, *, actor: str = "cli") -> None:
        """Take an item out of the queue and out of every export (a broken or leaked item); logged."""
        with self.write() as db:
            if db.execute("UPDATE item SET status = 'retired' WHERE id = ?", (item_id,)).rowcount == 0:
                raise ConfigError(f"collect: no item {item_id}")
            db.execute(
                "UPDATE assignment SET status = 'expired' WHERE item_id = ? AND status = 'pending'",
                (item_id,),
            )
            self.log(db, actor, "retire", {"item": item_id, "reason": reason})

    # ------------------------------------------------------------------ content

    def add_prompt(
        self, db, messages: list[dict], *, source: str, author_id=None, meta=None
    ) -> tuple[int, bool]:
        """(prompt id, whether it is new); prompts are deduplicated by content hash."""
        digest = content_hash(messages)
        row = db.execute("SELECT id FROM prompt WHERE content_sha256 = ?", (digest,)).fetchone()
        if row:
            return row["id"], False
        cur = db.execute(
            "INSERT INTO prompt (messages_json, content_sha256, source, author_id, meta_json, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (json.dumps(messages), digest, source, author_id, json.dumps(meta or {}), time.time()),
        )
        return cur.lastrowid, True

    def model_id(self, db, name: str, *, path=None, revision=None, meta=None) -> int:
        row = db.execute("SELECT id FROM model WHERE name = ?", (name,)).fetchone()
        if row:
            return row["id"]
        return db.execute(
            "INSERT INTO model (name, path, revision, meta_json) VALUES (?, ?, ?, ?)",
            (name, path, revision, json.dumps(meta or {})),
        ).lastrowid

    def add_generation(
        self, db, prompt_id: int, model_id: int, text: str, *, gen_config=None, seed=None
    ) -> int:
        return db.execute(
            "INSERT INTO generation (prompt_id, model_id, text, gen_config_json, seed, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (prompt_id, model_id, text, json.dumps(gen_config or {}), seed, time.time()),
        ).lastrowid

    def add_item(
        self,
        db,
        prompt_id: int,
        gen_a: int,
        gen_b: int | None = None,
        *,
        gold: dict | None = None,
        qualification: bool = False,
        author_id: int | None = None,
        required_votes: int | None = None,
        priority: int = 0,
        sampling_policy: str = "uniform",
        meta: dict | None = None,
    ) -> int:
        if qualification and gold is None:
            raise ConfigError("collect: a qualification item needs a gold answer")
        if gold is not None and gold.get("choice") not in (None, *CHOICES):
            raise ConfigError(f"collect: gold choice must be one of {', '.join(CHOICES)} (got {gold!r})")
        votes = required_votes or int(self.config.get("required_votes", 3))
        return db.execute(
            "INSERT INTO item (kind, prompt_id, gen_a, gen_b, is_gold, qualification, gold_json, author_id, "
            "sampling_policy, priority, required_votes, meta_json, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "pair" if gen_b is not None else "single", prompt_id, gen_a, gen_b, int(gold is not None),
                int(qualification), json.dumps(gold) if gold is not None else None, author_id,
                sampling_policy, priority, votes, json.dumps(meta or {}), time.time(),
            ),
        ).lastrowid  # fmt: skip
