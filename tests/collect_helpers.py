"""Shared by the collect web tests: a project with pairs, logging in through the login form, a live server."""

from __future__ import annotations

import re
import socket
import threading
import time
from contextlib import contextmanager

from posttrain.collect.ingest import add_pairs
from posttrain.collect.store import Store

CONFIG = {
    "name": "demo",
    "required_votes": 2,
    "gold_rate": 0.0,
    "guidelines_version": "v1",
    "rubric": {
        "scale": [1, 5],
        "dimensions": [
            {"name": "helpfulness", "description": "5: fully answers"},
            {"name": "correctness", "description": "5: no errors"},
        ],
    },
}
XSS = '<script>alert("pwned")</script><b onmouseover="x()">bold</b>'


def pairs(n, prefix="q", **extra):
    return [
        {"prompt": f"{prefix} {i}: what is {i} + {i}?", "a": f"{2 * i}", "b": f"{2 * i + 1}, I think",
         "model_a": "good", "model_b": "bad", **extra}
        for i in range(n)
    ]  # fmt: skip


def project(tmp_path, n=6, config=None, **extra) -> tuple[Store, dict]:
    store = Store.create(tmp_path / "demo.sqlite", dict(config or CONFIG))
    tokens = {
        name: store.add_annotator(name, role)
        for name, role in (("ann", "annotator"), ("bob", "annotator"), ("boss", "admin"))
    }
    add_pairs(store, pairs(n, **extra))
    return store, tokens


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def login(client, token: str) -> str:
    """Log in through the login page's form; returns the session's CSRF token."""
    page = client.get(f"/login?token={token}")
    r = client.post(
        "/login", data={"token": token, "csrf": csrf_of(page.text)}, headers={"accept": "application/json"}
    )
    assert r.status_code == 200, r.text
    return r.json()["csrf"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(store: Store):
    """The app under uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    from posttrain.collect.web import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
