"""The annotation web app (FastAPI; ``pip install 'posttrain[collect]'``).

Pages are rendered on the server (Jinja2, autoescape on: a model's output is untrusted text and is
never inserted as HTML) and every action is a plain ``<form method=post>`` answered with a redirect
(POST-redirect-GET), so a page whose script failed to load still records every vote; the script only
adds keyboard shortcuts, the time spent per item and a draft kept across a reload.

Security:

- login by a per-annotator token link (``/login?token=...``); the token is stored hashed. The link opens
  a page whose form posts the token, so no GET changes state; a session cookie (HttpOnly, SameSite=Lax,
  random id stored hashed) follows;
- CSRF: every POST must carry the session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``),
  compared in constant time; the login form carries a double-submit token of its own cookie;
- roles: annotators see only their own assignments (another's id answers 404); ``/admin`` and the JSON
  status, agreement and leaderboard are for reviewers and admins; nobody's page shows gold answers or
  model names of an item being judged;
- headers: a Content-Security-Policy allowing only this origin's script and style, no framing,
  no referrer (the login URL holds the token), nosniff.

Only url-encoded form bodies are read (what a browser's form sends), so the app needs no multipart
parser.
"""

import hmac
import secrets
import time
from pathlib import Path
from urllib.parse import parse_qs

from posttrain.collect import queue
from posttrain.collect.store import FLAGS, Store

HERE = Path(__file__).parent
SESSION, LOGIN = "collect_session", "collect_login"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
MAX_BODY = 1 << 20


def create_app(store: Store):
    """The FastAPI app serving one project."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.concurrency import run_in_threadpool

    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
    config = store.config
    rubric = config.get("rubric", {})
    app = FastAPI(title="posttrain collect", docs_url=None, redoc_url=None, openapi_url=None)

    class Refused(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    def secure(response: Response) -> Response:
        response.headers.update(HEADERS)
        return response

    def page(name: str, http_status: int = 200, **values) -> Response:
        html = env.get_template(name).render(project=config.get("name", "collect"), **values)
        return secure(HTMLResponse(html, status_code=http_status))

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused):
        if wants_json(request) or request.url.path.startswith("/api/"):
            return secure(JSONResponse({"error": exc.message}, status_code=exc.status))
        return page("error.html", exc.status, message=exc.message, status=exc.status, user=None)

    def session(request: Request):
        sid = request.cookies.get(SESSION)
        row = store.session(sid) if sid else None
        if row is None:
            raise Refused(401, "not logged in: open your login link")
        return row

    def staff(user) -> None:
        if user["role"] not in ("admin", "reviewer"):
            raise Refused(403, "reviewers and admins only")

    async def form(request: Request) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        body = await request.body()
        if not body:
            return {}
        if kind != "application/x-www-form-urlencoded":
            raise Refused(415, "send a url-encoded form (application/x-www-form-urlencoded)")
        if len(body) > MAX_BODY:
            raise Refused(413, "form too large")
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: (v if k == "flags" else v[-1]) for k, v in fields.items()}

    def check_csrf(request: Request, fields: dict, expected: str | None) -> None:
        given = fields.get("csrf") or request.headers.get("x-csrf-token") or ""
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            raise Refused(403, "missing or wrong CSRF token: reload the page and try again")

    async def posted(request: Request):
        """(user, form) of a state-changing request, after the session and CSRF checks."""
        user = await run_in_threadpool(session, request)
        fields = await form(request)
        check_csrf(request, fields, user["csrf"])
        return user, fields

    def done(request: Request, payload: dict, to: str = "/annotate") -> Response:
        if wants_json(request):
            return secure(JSONResponse(payload))
        return secure(RedirectResponse(to, status_code=303))

    # ------------------------------------------------------------------ login

    @app.get("/")
    def root(request: Request):
        return secure(RedirectResponse("/annotate", status_code=303))

    @app.get("/login")
    def login_page(request: Request, token: str = ""):
        nonce = secrets.token_urlsafe(24)
        response = page("login.html", token=token, csrf=nonce, user=None)
        response.set_cookie(LOGIN, nonce, httponly=True, samesite="strict", max_age=3600)
        return response

    @app.post("/login")
    async def login(request: Request):
        fields = await form(request)
        check_csrf(request, fields, request.cookies.get(LOGIN))
        user = await run_in_threadpool(store.annotator_by_token, fields.get("token") or "")
        if user is None:
            raise Refused(401, "unknown or disabled token")
        sid, csrf = await run_in_threadpool(store.open_session, user["id"])
        response = done(request, {"csrf": csrf, "annotator": user["name"], "role": user["role"]})
        response.set_cookie(SESSION, sid, httponly=True, samesite="lax", max_age=12 * 3600)
        response.delete_cookie(LOGIN)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        await posted(request)
        await run_in_threadpool(store.close_session, request.cookies.get(SESSION))
        response = done(request, {"status": "logged out"}, to="/login")
        response.delete_cookie(SESSION)
        return response

    # ------------------------------------------------------------------ annotation

    @app.get("/annotate")
    def annotate(request: Request):
        user = session(request)
        current = queue.current(store, user["id"])
        if current is None:
            return page("start.html", user=user, csrf=user["csrf"], stats=my_stats(user["id"]))
        item = queue.view(store, user["id"], current["id"])
        return page(
            "annotate.html", user=user, csrf=user["csrf"], item=item, rubric=rubric, flags=FLAGS,
            reasons=queue.SKIP_REASONS, scale=list(range(rubric.get("scale", [1, 5])[0], rubric.get("scale", [1, 5])[1] + 1)),
            guidelines=config.get("guidelines", ""), stats=my_stats(user["id"]),
        )  # fmt: skip

    def my_stats(annotator_id: int) -> dict:
        row = (
            store.read()
            .execute(
                "SELECT SUM(status = 'submitted') AS done, SUM(status = 'skipped') AS skipped FROM assignment "
                "WHERE annotator_id = ?",
                (annotator_id,),
            )
            .fetchone()
        )
        return {"done": row["done"] or 0, "skipped": row["skipped"] or 0}

    def lease_next(user) -> int | None:
        return queue.lease(store, user["id"])

    def payload(user, aid) -> dict:
        return {"assignment": queue.view(store, user["id"], aid) if aid else None}

    @app.post("/next")
    async def next_item(request: Request):
        user, _ = await posted(request)
        aid = await run_in_threadpool(lease_next, user)
        return done(request, await run_in_threadpool(payload, user, aid))

    def _submit(user, fields):
        try:
            status = queue.submit(store, user["id"], fields.get("assignment_id"), fields)
        except queue.QueueError as e:
            raise Refused(e.status, str(e)) from None
        aid = lease_next(user)
        return {"status": status, **payload(user, aid)}

    @app.post("/submit")
    async def submit(request: Request):
        user, fields = await posted(request)
        return done(request, await run_in_threadpool(_submit, user, fields))

    def _skip(user, fields):
        try:
            queue.skip(store, user["id"], fields.get("assignment_id"), fields.get("reason", ""))
        except queue.QueueError as e:
            raise Refused(e.status, str(e)) from None
        return {"status": "skipped", **payload(user, lease_next(user))}

    @app.post("/skip")
    async def skip(request: Request):
        user, fields = await posted(request)
        return done(request, await run_in_threadpool(_skip, user, fields))

    @app.get("/api/assignment/{assignment_id}")
    def assignment(request: Request, assignment_id: str):
        user = session(request)
        try:
            return secure(JSONResponse(queue.view(store, user["id"], assignment_id)))
        except queue.QueueError as e:
            raise Refused(e.status, str(e)) from None

    @app.get("/api/me")
    def me(request: Request):
        user = session(request)
        current = queue.current(store, user["id"])
        return secure(
            JSONResponse(
                {"annotator": user["name"], "role": user["role"], "csrf": user["csrf"], **my_stats(user["id"]),
                 "assignment": queue.view(store, user["id"], current["id"]) if current else None}
            )
        )  # fmt: skip

    # ------------------------------------------------------------------ reviewers and admins

    def report() -> dict:
        from posttrain.collect.agreement import agreement, health_alerts
        from posttrain.collect.export import battles, project_status
        from posttrain.collect.leaderboard import leaderboard

        b = battles(store)
        agreed = agreement(store)
        return {
            "status": project_status(store),
            "agreement": agreed,
            "alerts": [{"rule": a.rule, "message": a.message} for a in health_alerts(store, agreed)],
            "leaderboard": leaderboard(b, rounds=100).to_dict() if b else None,
        }

    @app.get("/admin")
    def admin(request: Request):
        user = session(request)
        staff(user)
        return page("admin.html", user=user, csrf=user["csrf"], r=report())

    @app.get("/api/report")
    def api_report(request: Request):
        staff(session(request))
        from posttrain.collect.export import jsonable

        return secure(JSONResponse(jsonable(report())))

    @app.get("/static/{name}")
    def static(name: str):
        path = HERE / "static" / name
        if name not in ("app.js", "style.css") or not path.is_file():
            raise Refused(404, "not found")
        response = FileResponse(path, media_type="text/javascript" if name.endswith(".js") else "text/css")
        return secure(response)

    app.state.started = time.time()
    return app


def serve(
    store_path: str | Path, *, host: str = "127.0.0.1", port: int = 8765, log_level: str = "warning"
) -> None:
    """Run the app with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - the extra is missing
        from posttrain.errors import ConfigError

        raise ConfigError("collect serve needs the web extra: pip install 'posttrain[collect]'") from e
    store = Store(store_path)
    uvicorn.run(create_app(store), host=host, port=port, log_level=log_level)
