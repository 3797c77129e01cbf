"""`editforge review`: a local page to look at a run's pairs and label them with the keyboard.

    editforge review --preset world                        # http://127.0.0.1:8765/
    editforge review --preset paper --host 0.0.0.0 --token "$EDITFORGE_REVIEW_TOKEN"
    editforge review --preset world --export label-studio --out review-tasks.json

The page (Starlette, served by uvicorn; `flows/review_static/`) shows the review sample of the config's
render version (:mod:`tasks.filter.review`: kept pairs and a stratified sample of the others, rejected
ones near each threshold first): before | after | instruction, the captions and every score against its
threshold; keys 1-4 (or g, w, b, u) label a pair good edit / wrong edit / broken image / unsure and move
on, the next pairs' images already loaded. Each label is checked (:func:`tasks.filter.labels.check_label`)
and appended under `review/<render hash>/labels.parquet/` (:class:`tasks.filter.labels.LabelStore`), on
local disk or an object store alike.

Safe by default: it binds 127.0.0.1 (and answers only requests addressed to a loopback name); bound
anywhere else it needs a token (given, `EDITFORGE_REVIEW_TOKEN`, or made up and printed once), sent as
`?token=` once (then a cookie) or an `X-Review-Token` header. It serves the page's own files and the
images of the pairs in the review sample, looked up by (partition, sample key, which) in a table built at
start — no path from a request ever reaches the filesystem — and no access log (URLs may hold the token).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import secrets
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

import typer

from flows.options import Debug, Overrides, Preset, load_or_exit, parse_partitions, reported

STATIC = Path(__file__).resolve().parent / "review_static"
STATIC_FILES = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
COOKIE = "editforge_review"
TOKEN_ENV = "EDITFORGE_REVIEW_TOKEN"
MAX_BODY = 4096
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _finite(value: Any) -> Any:
    """JSON-safe: NaN and inf become null, numpy scalars plain Python."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


SCORE_COLUMNS = ("clip_sim_dir", "clip_sim_image", "clip_sim_0", "clip_sim_1", "dino_similarity", "ssim",
                 "vlm_score", "vlm_instruction", "vlm_preservation", "vlm_quality")


def _status(row) -> str:
    if row.filter_kept:
        return "kept"
    if row.filter_reason is None or (isinstance(row.filter_reason, float) and math.isnan(row.filter_reason)):
        return "passed, not in top-k"
    return f"rejected: {row.filter_reason}"


@dataclass
class ReviewState:
    """What the server serves: the queue (as JSON items), the pairs' image URLs, the label store, the guard."""

    cfg: Any
    render_hash: str
    queue: Any  # pandas DataFrame (tasks.filter.review.review_queue)
    store: Any  # tasks.filter.labels.LabelStore
    token: str | None = None
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
    reviewer_hint: str = ""
    notes: list[str] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)
    known: dict[tuple[int, str], dict] = field(default_factory=dict)
    images: dict[tuple[int, str, str], str] = field(default_factory=dict)
    cache: OrderedDict = field(default_factory=OrderedDict)
    cache_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        from tasks.common import layout, storage
        from tasks.filter.review import threshold_table

        self.thresholds = threshold_table(self.cfg)
        for row in self.queue.itertuples(index=False):
            pid, key = int(row.partition), str(row.sample_key)
            folder = layout.partition_dir(self.cfg.output_root, "render", self.render_hash, pid)
            for which in ("input", "edited"):
                self.images[(pid, key, which)] = storage.url_join(folder, layout.image_name(key, which))
            self.known[(pid, key)] = {"render_hash": self.render_hash, "caption_id": str(row.caption_id),
                                      "pair_sha256": row.pair_sha256, "stratum": row.stratum, "weight": row.weight}
            scores = {c: _finite(getattr(row, c, None)) for c in SCORE_COLUMNS if c in self.queue.columns}
            self.items.append({
                "partition": pid, "sample_key": key, "caption_id": str(row.caption_id), "pair_sha256": row.pair_sha256,
                "input": row.input, "edit": row.edit, "output": row.output, "stratum": row.stratum,
                "weight": _finite(row.weight), "status": _status(row),
                "scores": {k: v for k, v in scores.items() if v is not None},
                "params": {k: _finite(getattr(row, k, None)) for k in ("seed", "p2p_p", "cfg_scale")},
                "before": f"/img/{pid}/{key}/input", "after": f"/img/{pid}/{key}/edited",
            })

    def image(self, partition: int, key: str, which: str) -> bytes | None:
        """The bytes of one of the queue's images (None: not one of them), a few hundred kept in memory."""
        url = self.images.get((partition, key, which))
        if url is None:
            return None
        with self.cache_lock:
            if url in self.cache:
                self.cache.move_to_end(url)
                return self.cache[url]
        from tasks.common import storage

        data = storage.read_bytes(url)
        with self.cache_lock:
            self.cache[url] = data
            while len(self.cache) > 512:
                self.cache.popitem(last=False)
        return data

    def mine(self, reviewer: str) -> dict:
        """The labels of the review so far: the reviewer's newest per pair (those still matching the pair's
        images) and how many pairs each reviewer labelled."""
        from tasks.filter.labels import latest

        labels = latest(self.store.read())
        current = [self.known.get((int(p), k), {}).get("pair_sha256") == h
                   for p, k, h in zip(labels["partition"], labels["sample_key"], labels["pair_sha256"])]
        labels = labels[current] if len(labels) else labels
        own = labels[labels["reviewer"] == reviewer]
        return {"reviewer": reviewer,
                "labels": {f"{p}/{k}": lab for p, k, lab in zip(own["partition"], own["sample_key"], own["label"])},
                "by_reviewer": {str(r): int(n) for r, n in labels["reviewer"].value_counts().items()},
                "pairs": len(self.items)}


def build_app(state: ReviewState):
    """The Starlette app (routes below), wrapped in :class:`Guard`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from tasks.filter.labels import REVIEWER_RE, LabelError, check_label

    page = (STATIC / "index.html").read_text(encoding="utf-8")
    static = {name: (STATIC / name).read_bytes() for name in STATIC_FILES}

    def no_store(response: Response) -> Response:
        response.headers["cache-control"] = "no-store"
        return response

    async def index(request: Request) -> Response:
        return no_store(HTMLResponse(page))

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(static[name], media_type=STATIC_FILES[name], headers={"cache-control": "no-cache"})

    async def queue(request: Request) -> Response:
        return no_store(JSONResponse({
            "run": state.cfg.name, "render_hash": state.render_hash, "output_root": state.cfg.output_root,
            "thresholds": state.thresholds, "reviewer_hint": state.reviewer_hint, "notes": state.notes,
            "labels": ["good", "wrong", "broken", "unsure"], "items": state.items}))

    def labels_get(request: Request) -> Response:  # sync: reading the store blocks, it runs in a thread
        reviewer = request.query_params.get("reviewer", "")
        if not REVIEWER_RE.match(reviewer):
            return no_store(JSONResponse({"error": "reviewer: 1-40 letters, digits, '.', '_' or '-'"}, 400))
        return no_store(JSONResponse(state.mine(reviewer)))

    async def labels_post(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return no_store(JSONResponse({"error": "send the label as application/json"}, 415))
        too_big = no_store(JSONResponse({"error": f"a label is at most {MAX_BODY} bytes"}, 413))
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            return too_big
        body = b""
        async for piece in request.stream():  # never more than MAX_BODY + one piece in memory
            body += piece
            if len(body) > MAX_BODY:
                return too_big
        try:
            payload = json.loads(body)
            row = check_label(payload, state.known)
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, LabelError
            message = str(err) if isinstance(err, LabelError) else f"not JSON: {err}"
            return no_store(JSONResponse({"error": message}, 400))
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(state.store.append, [row])
        return no_store(JSONResponse({"ok": True, "sample_key": row["sample_key"], "label": row["label"]}))

    def image(request: Request) -> Response:
        given = request.path_params["partition"]
        partition = int(given) if given.isdigit() and given == str(int(given)) else -1  # one spelling only
        data = state.image(partition, request.path_params["key"], request.path_params["which"])
        if data is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=86400"})

    return Guard(Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", static_file, methods=["GET"]),
        Route("/api/queue", queue, methods=["GET"]),
        Route("/api/labels", labels_get, methods=["GET"]),
        Route("/api/labels", labels_post, methods=["POST"]),
        Route("/img/{partition}/{key}/{which}", image, methods=["GET"]),
    ]), state)


class Guard:
    """ASGI wrapper: the Host check (loopback names when bound to loopback), the token when one is set
    (a ``?token=`` on the page sets the cookie and redirects to the bare URL), the same-origin check of
    POSTs, and security headers on every response."""

    def __init__(self, app, state: ReviewState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        if self.state.allowed_hosts is not None and hostname not in self.state.allowed_hosts:
            return await _plain(send, 421, "this review server answers only on its loopback address")
        if scope["method"] == "POST":
            origin = headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1] != host:
                return await _plain(send, 403, "cross-origin request refused")
        if self.state.token:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            sent = (query.get("token") or [None])[0]
            name = f"{COOKIE}_{(scope.get('server') or ('', 0))[1]}"  # cookies ignore ports: one per server
            cookie = SimpleCookie(headers.get("cookie", ""))
            held = cookie[name].value if name in cookie else headers.get("x-review-token")
            if sent is not None and _same(sent, self.state.token) and scope["path"] == "/":
                return await _redirect_with_cookie(send, name, self.state.token)
            if held is None or not _same(held, self.state.token):
                return await _plain(send, 401, "a token is needed: open the URL `editforge review` printed "
                                               "(with ?token=...) or send X-Review-Token")

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


async def _plain(send, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": text.encode()})


async def _redirect_with_cookie(send, name: str, token: str) -> None:
    cookie = f"{name}={token}; Path=/; HttpOnly; SameSite=Strict".encode()
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", b"/"), (b"set-cookie", cookie), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": b""})


def prepare(cfg, partitions: list[int] | None = None, *, token: str | None = None, host: str = "127.0.0.1",
            reviewer_hint: str = "", writer: str | None = None) -> ReviewState:
    """Read the run and build the server's state (the queue, the images it may serve, the label store)."""
    from tasks import registry
    from tasks.common import layout
    from tasks.filter.labels import LabelStore
    from tasks.filter.review import queue_for

    render_hash = registry.stage_hash(cfg, "render")
    queue, samples = queue_for(cfg, partitions)
    notes = []
    unstored = int((~samples["image_stored"].astype(bool)).sum())
    if unstored:
        notes.append(f"{unstored} of {len(samples)} rendered pairs have no images stored (render.save_images="
                     f"{cfg.render.save_images}) and cannot be shown; render with render.save_images=all to "
                     "review the rejected ones")
    store = LabelStore(layout.labels_dir(cfg.output_root, render_hash), writer=writer)
    return ReviewState(cfg=cfg, render_hash=render_hash, queue=queue, store=store, token=token,
                       allowed_hosts=LOOPBACK_NAMES if is_loopback(host) else None, reviewer_hint=reviewer_hint,
                       notes=notes)


class ReviewServer:
    """The app served by uvicorn in a background thread (tests, screenshots); ``url`` once started."""

    def __init__(self, state: ReviewState, host: str = "127.0.0.1", port: int = 0):
        self.state, self.host, self.port = state, host, port
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> ReviewServer:
        import uvicorn

        config = uvicorn.Config(build_app(self.state), host=self.host, port=self.port, log_level="warning",
                                access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="editforge-review", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the review server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ReviewServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def review_command(
    preset: Preset = "demo",
    overrides: Overrides = None,
    host: Annotated[str, typer.Option(help="address to bind; anything but loopback needs a token")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: any free one)")] = 8765,
    token: Annotated[str | None, typer.Option(help=f"the token the page needs (default: ${TOKEN_ENV}; bound "
                                                   "beyond loopback without one, a new one is printed)")] = None,
    reviewer: Annotated[str, typer.Option(help="the reviewer name the page suggests (default: $USER)")] = "",
    partitions: Annotated[str | None, typer.Option(help="render partitions to sample, e.g. 0,3,10-19 (default: up "
                                                        "to review.max_partitions spread over the run)")] = None,
    export: Annotated[str | None, typer.Option(help="write the review sample for another tool instead of serving "
                                                    "it: label-studio")] = None,
    out: Annotated[Path | None, typer.Option(help="--export: the tasks file to write (its labeling config "
                                                  "beside it, .xml)")] = None,
    import_labels: Annotated[Path | None, typer.Option("--import-label-studio", help="store the labels of a Label "
                                                       "Studio JSON export (of --export's tasks) as --reviewer's")] = None,
    debug: Debug = False,
) -> None:
    """Look at a run's pairs and label them (good edit / wrong edit / broken image / unsure) in a browser."""
    cfg = load_or_exit(preset, overrides)
    ids = parse_partitions(partitions)
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)
    from tasks.filter.labels import REVIEWER_RE

    reviewer = reviewer or os.environ.get("USER", "") or "reviewer"
    if not REVIEWER_RE.match(reviewer):
        typer.echo(f"error: --reviewer {reviewer!r}: 1-40 letters, digits, '.', '_' or '-'", err=True)
        raise typer.Exit(2)
    if export is not None and export != "label-studio":
        typer.echo(f"error: --export {export!r}: the one format is label-studio", err=True)
        raise typer.Exit(2)
    if export is not None and out is None:
        typer.echo("error: --export needs --out FILE.json", err=True)
        raise typer.Exit(2)
    with reported(debug):
        state = prepare(cfg, ids, token=token, host=host, reviewer_hint=reviewer)
        if export is not None:
            from flows.review_export import write_label_studio

            written = write_label_studio(state, out)
            typer.echo(f"wrote {written['tasks']} ({len(state.items)} tasks) and {written['config']} (the labeling "
                       f"config); see docs/review.md to serve the images to Label Studio")
            return
        if import_labels is not None:
            from flows.review_export import import_label_studio

            stored = import_label_studio(state, import_labels, reviewer)
            typer.echo(f"stored {stored} labels of {reviewer} under {state.store.folder}")
            return
    counts = state.queue["stratum"].value_counts().sort_index()
    typer.echo(f"review: {len(state.items)} pairs of render {state.render_hash} ("
               + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"); labels go to {state.store.folder}")
    for note in state.notes:
        typer.echo(f"note: {note}")
    import uvicorn

    from flows.local_cluster import free_port

    port = port or free_port()
    shown = "[::1]" if host == "::1" else host
    url = f"http://{shown}:{port}/"
    typer.echo(f"open {url}" + (f"?token={token}" if token else "") + "  (Ctrl-C stops it)", err=bool(token))
    uvicorn.run(build_app(state), host=host, port=port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    from flows.options import run_command

    sys.exit(run_command(review_command, sys.argv[1:], "python -m flows.review", __doc__))
