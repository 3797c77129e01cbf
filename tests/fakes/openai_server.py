"""A small OpenAI-compatible HTTP server for tests and benchmarks (starlette + uvicorn on 127.0.0.1).

Implements what the text stage and the VLM judge use: files (upload, content), fine-tuning jobs (create,
retrieve, events), completions and chat completions, moderations, and batches. Answers are deterministic:
a completion is derived from the caption in the prompt and the request's `seed`, in the paper's
format (`"{edit}\\n%%\\n{output}"`, the stop sequence stripped as the API does), malformed for a
deterministic fraction of captions (`malformed_rate`).

Vision chat (the VLM judge): a chat request whose user message holds `image_url` parts (base64 data
URLs) is answered by a scripted judge, `fake_judgment(instruction, key)`: the rubric's JSON with three
scores 0-10 derived from the instruction and the images (`key` = `judge_key(urls)`, the same digest the
judge records as `vlm_input_sha`), or, for a deterministic fraction `judge_malformed_rate`, an answer
that is not the rubric's JSON (prose, a missing field, a score out of range). Its usage counts 85 tokens
an image plus the text's words. Each vision request is logged with its `judge` key (`judged()` counts the
answered ones); latency, 429/500 storms and the API key apply as to every request.

Knobs (`Knobs`, changeable while serving): 429 with a `Retry-After` header and 500 at given rates on
every `/v1` endpoint, a latency range on generation requests, `answer_limit` (answer that many generation
requests, then hold the others until it is raised or set to None: a crash test's exact place; a held
request whose client goes away is logged with status 499 and never answered), fine-tuning jobs that spend
`job_polls_per_status` polls in `queued` and in `running` then succeed or fail with `job_error`,
batches that take `batch_polls` polls per status, per-request batch errors, words that moderation
flags, and an API key that requests must carry. Every request is logged (`requests`); a generation
request answered with HTTP 200 is an *answer* (`answered()` counts them per caption).

    with FakeOpenAIServer(Knobs(rate_429=0.3)) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.knobs.api_key)

Out of process: `python tests/fakes/openai_server.py --latency 0.3 0.8` prints `READY <base_url>`;
`GET /_fake/log`, `POST /_fake/knobs` and `POST /_fake/reset` control it.
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import email.policy
import hashlib
import itertools
import json
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

EDITS = [
    ("make it winter", "{c}, covered in snow"),
    ("turn it into an oil painting", "an oil painting of {c}"),
    ("add fireworks in the sky", "{c} with fireworks in the sky"),
    ("make it night time", "{c} at night"),
    ("make it look like a watercolor", "a watercolor of {c}"),
    ("add a rainbow", "{c} with a rainbow"),
]
CHAT_USER_PREFIX = "Caption: "
PROMPT_SUFFIX = "\n##\n"


@dataclass
class Knobs:
    api_key: str | None = None
    rate_429: float = 0.0
    rate_500: float = 0.0
    retry_after: float | None = 0.0
    latency: tuple[float, float] = (0.0, 0.0)
    malformed_rate: float = 0.0
    flag_words: tuple[str, ...] = ("FLAGGED",)
    refuse_words: tuple[str, ...] = ("REFUSED",)
    truncate_words: tuple[str, ...] = ("TRUNCATED",)  # answered with finish_reason "length"
    filter_words: tuple[str, ...] = ("FILTERED",)  # answered with finish_reason "content_filter"
    trickle_s: float = 0.0  # send each answer in 8 pieces this far apart (a slow server)
    cut_json_rate: float = 0.0  # answer with a JSON body cut in half
    job_polls_per_status: int = 1
    job_error: dict[str, Any] | None = None
    batch_polls: int = 1
    batch_error_rate: float = 0.0
    batch_fail: bool = False
    judge_malformed_rate: float = 0.0  # vision answers that are not the rubric's JSON
    judge_refuse_words: tuple[str, ...] = ("REFUSED",)  # in the instruction: the vision request is refused (400)
    answer_limit: int | None = None  # generation requests answered before the rest are held (None: no limit)
    seed: int = 0


def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from `parts`."""
    return int(hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12], 16) / 16 ** 12


def fake_completion(caption: str, seed: int | None, malformed_rate: float = 0.0) -> str:
    """The fake model's answer for `caption` (also what tests compare against)."""
    u = _unit("answer", caption, seed)
    edit, template = EDITS[int(u * 1e6) % len(EDITS)]
    output = template.format(c=caption.rstrip(".!? "))
    if _unit("malformed", caption, seed) < malformed_rate:
        kind = int(u * 1e6) % 3
        return [f"{edit} {output}", f"{edit}\n%%\n", f"{edit}\n%%\n{caption}"][kind]
    return f"{edit}\n%%\n{output}"


def image_urls(body: dict[str, Any]) -> list[str]:
    """The image URLs of a chat request's messages, in order ([] for a text request)."""
    urls = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list):
            urls += [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]
    return urls


def judge_key(urls: list[str]) -> str:
    """A vision request's key: the digest of its image URLs (the judge's `vlm_input_sha`)."""
    return hashlib.sha256("\n".join(urls).encode("ascii")).hexdigest()[:16]


def vision_text(body: dict[str, Any]) -> str:
    """The text parts of a vision request's user message."""
    user = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
    return "\n".join(p.get("text", "") for p in user if p.get("type") == "text")


def instruction_of(body: dict[str, Any]) -> str:
    for line in vision_text(body).splitlines():
        if line.startswith("Edit instruction: "):
            return line.removeprefix("Edit instruction: ")
    return ""


def fake_judgment(instruction: str, key: str, malformed_rate: float = 0.0) -> str:
    """The scripted judge's answer for a pair (also what tests compare against)."""
    scores = [int(_unit(name, instruction, key) * 11) for name in ("instruction", "preservation", "quality")]
    if _unit("judge-malformed", instruction, key) < malformed_rate:
        kind = int(_unit("judge-malformed-kind", key) * 3)
        return ["The edit looks fine to me, I would give it a 7.",
                json.dumps({"instruction_followed": scores[0], "preservation": scores[1], "reasoning": "no quality"}),
                json.dumps({"instruction_followed": 11, "preservation": scores[1], "quality": scores[2],
                            "reasoning": "out of range"})][kind]
    return json.dumps({"instruction_followed": scores[0], "preservation": scores[1], "quality": scores[2],
                       "reasoning": f"fake judge on {key}"})


def caption_of(body: dict[str, Any]) -> str | None:
    if "messages" in body:
        if image_urls(body):
            return None  # a vision request: no caption
        user = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
        return user.removeprefix(CHAT_USER_PREFIX)
    return str(body.get("prompt", "")).removesuffix(PROMPT_SUFFIX)


def render_words(body: dict[str, Any]) -> list[str]:
    """The words of a chat request's text (system and user), for the fake's token usage."""
    words = []
    for message in body.get("messages") or []:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or []]
        words += " ".join(parts).split()
    return words


class FakeState:
    def __init__(self, knobs: Knobs | None = None):
        self.lock = threading.Lock()
        self.knobs = knobs or Knobs()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.rng = random.Random(self.knobs.seed)
            self.ids = itertools.count(1)
            self.requests: list[dict[str, Any]] = []
            self.files: dict[str, dict[str, Any]] = {}
            self.jobs: dict[str, dict[str, Any]] = {}
            self.job_polls: Counter[str] = Counter()
            self.job_events: dict[str, list[dict[str, Any]]] = {}
            self.batches: dict[str, dict[str, Any]] = {}
            self.batch_polls: Counter[str] = Counter()
            self.passed_gate = 0  # generation requests let through `answer_limit`
            self.held = 0  # generation requests waiting at `answer_limit` now

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self.ids):06d}"

    def log(self, path: str, status: int, caption: str | None = None, **extra: Any) -> None:
        with self.lock:
            self.requests.append({"path": path, "status": status, "caption": caption, "t": time.time(), **extra})

    def answered(self) -> Counter[str]:
        """Captions answered with HTTP 200 (online and in batches), with how often."""
        with self.lock:
            return Counter(r["caption"] for r in self.requests if r["caption"] is not None and r["status"] == 200)

    def judged(self) -> Counter[str]:
        """Vision requests (by `judge_key`) answered with HTTP 200 (online and in batches), with how often."""
        with self.lock:
            return Counter(r["judge"] for r in self.requests if r.get("judge") and r["status"] == 200)

    def count(self, path: str, status: int | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r["path"] == path and (status is None or r["status"] == status))


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "param": None, "code": code}}, status, headers)


def build_app(state: FakeState) -> Starlette:
    async def guarded(request: Request, handler) -> Response:
        k = state.knobs
        path = request.url.path
        if k.api_key is not None and request.headers.get("authorization") != f"Bearer {k.api_key}":
            state.log(path, 401)
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        with state.lock:
            roll = state.rng.random()
        if roll < k.rate_429:
            state.log(path, 429)
            headers = {"retry-after": str(k.retry_after)} if k.retry_after is not None else None
            return _error(429, "Rate limit reached (fake).", "rate_limit_exceeded", headers)
        if roll < k.rate_429 + k.rate_500:
            state.log(path, 500)
            return _error(500, "The server had an error (fake).", "server_error")
        return await handler(request)

    def route(path: str, handler, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            return await guarded(request, handler)
        return Route(path, endpoint, methods=methods)

    async def gate(request: Request) -> bool:
        """Wait while `answer_limit` generation requests have been let through; False: the client went away
        (checked before the limit, so that a request abandoned while held is never answered later)."""
        held = False
        try:
            while True:
                if held and await request.is_disconnected():
                    state.log(request.url.path, 499, None, held=True)
                    return False
                with state.lock:
                    limit = state.knobs.answer_limit
                    if limit is None or state.passed_gate < limit:
                        state.passed_gate += 1
                        return True
                    if not held:
                        held, state.held = True, state.held + 1
                await asyncio.sleep(0.02)
        finally:
            if held:
                with state.lock:
                    state.held -= 1

    async def generation(request: Request) -> Response:
        body = await request.json()
        if not await gate(request):
            return Response(status_code=499)
        lo, hi = state.knobs.latency
        if hi > 0:
            await asyncio.sleep(random.uniform(lo, hi))
        caption = caption_of(body)
        urls = image_urls(body)
        if urls:
            key = judge_key(urls)
            if any(w in instruction_of(body) for w in state.knobs.judge_refuse_words):
                state.log(request.url.path, 400, None, refused_judge=key)
                return _error(400, "This request was refused (fake content policy).", "content_policy_violation")
        elif any(w in caption for w in state.knobs.refuse_words):
            state.log(request.url.path, 400, None, refused=caption)
            return _error(400, "This request was refused (fake content policy).", "content_policy_violation")
        with state.lock:
            cut = state.rng.random() < state.knobs.cut_json_rate
        extra = {"judge": judge_key(urls), "images": len(urls)} if urls else {}
        state.log(request.url.path, 200 if not cut else 299, caption, seed=body.get("seed"), **extra)
        data = json.dumps(_answer(request.url.path, body)).encode()
        if cut:
            return Response(data[: len(data) // 2], media_type="application/json")
        if state.knobs.trickle_s > 0:
            async def pieces():
                step = -(-len(data) // 8)
                for i in range(0, len(data), step):
                    yield data[i: i + step]
                    await asyncio.sleep(state.knobs.trickle_s)
            return StreamingResponse(pieces(), media_type="application/json")
        return Response(data, media_type="application/json")

    def _answer(path: str, body: dict[str, Any]) -> dict[str, Any]:
        urls = image_urls(body)
        if urls:
            text = fake_judgment(instruction_of(body), judge_key(urls), state.knobs.judge_malformed_rate)
            prompt_words = len(render_words(body))
            usage = {"prompt_tokens": 85 * len(urls) + prompt_words, "completion_tokens": len(text.split()),
                     "total_tokens": 85 * len(urls) + prompt_words + len(text.split())}
            return {"id": state.new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model"), "usage": usage, "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        caption = caption_of(body)
        text = fake_completion(caption, body.get("seed"), state.knobs.malformed_rate)
        finish = ("length" if any(w in caption for w in state.knobs.truncate_words) else
                  "content_filter" if any(w in caption for w in state.knobs.filter_words) else "stop")
        usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
        if path.endswith("chat/completions"):
            return {"id": state.new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model"), "usage": usage, "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}
        return {"id": state.new_id("cmpl-"), "object": "text_completion", "created": int(time.time()),
                "model": body.get("model"), "usage": usage,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    async def moderations(request: Request) -> Response:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        results = []
        for text in inputs:
            flagged = any(w in text for w in state.knobs.flag_words)
            results.append({"flagged": flagged, "categories": {"violence": flagged},
                            "category_scores": {"violence": 0.99 if flagged else 0.01}})
        state.log("/v1/moderations", 200, None, n=len(inputs))
        return JSONResponse({"id": state.new_id("modr-"), "model": body.get("model"), "results": results})

    async def upload_file(request: Request) -> Response:
        raw = await request.body()
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
        data = parts["file"].get_payload(decode=True)
        purpose = parts["purpose"].get_payload(decode=True).decode()
        obj = {"id": state.new_id("file-"), "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": parts["file"].get_filename(), "purpose": purpose, "status": "processed"}
        with state.lock:
            state.files[obj["id"]] = {**obj, "data": data}
        state.log("/v1/files", 200)
        return JSONResponse(obj)

    async def file_content(request: Request) -> Response:
        item = state.files.get(request.path_params["file_id"])
        if item is None:
            return _error(404, "No such file.", "not_found")
        state.log("/v1/files/content", 200)
        return Response(item["data"], media_type="application/octet-stream")

    async def create_job(request: Request) -> Response:
        body = await request.json()
        if body.get("training_file") not in state.files:
            return _error(400, f"invalid training_file: {body.get('training_file')}", "invalid_request_error")
        job_id = state.new_id("ftjob-")
        job = {"id": job_id, "object": "fine_tuning.job", "model": body["model"], "created_at": int(time.time()),
               "finished_at": None, "fine_tuned_model": None, "organization_id": "org-fake", "result_files": [],
               "status": "validating_files", "training_file": body["training_file"],
               "validation_file": body.get("validation_file"), "trained_tokens": None, "error": None,
               "seed": body.get("seed"), "suffix": body.get("suffix"),
               "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}}
        with state.lock:
            state.jobs[job_id] = job
            state.job_events[job_id] = [_event(job_id, "Created fine-tuning job")]
        state.log("/v1/fine_tuning/jobs", 200)
        return JSONResponse(job)

    def _event(job_id: str, message: str) -> dict[str, Any]:
        return {"id": state.new_id("ftevent-"), "object": "fine_tuning.job.event", "created_at": int(time.time()),
                "level": "info", "message": message, "type": "message"}

    async def get_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        with state.lock:
            job = state.jobs.get(job_id)
            if job is None:
                return _error(404, f"no fine-tuning job {job_id}", "not_found")
            if job["status"] not in ("succeeded", "failed", "cancelled"):
                state.job_polls[job_id] += 1
                n, k = state.job_polls[job_id], max(1, state.knobs.job_polls_per_status)
                status = "queued" if n <= k else "running" if n <= 2 * k else "done"
                if status == "running":
                    job["trained_tokens"] = (n - k) * 1000
                    state.job_events[job_id].append(_event(job_id, f"Step {n - k}/{k}: training loss={1 / (n - k):.3f}"))
                if status == "done":
                    job["finished_at"] = int(time.time())
                    if state.knobs.job_error:
                        job["status"], job["error"] = "failed", {"param": None, **state.knobs.job_error}
                        state.job_events[job_id].append(_event(job_id, "Fine-tuning job failed"))
                    else:
                        job["status"] = "succeeded"
                        job["fine_tuned_model"] = f"ft:{job['model']}:fake-org:{job['suffix'] or 'x'}:{job_id[-6:]}"
                        job["result_files"] = [state.new_id("file-")]
                        state.job_events[job_id].append(_event(job_id, "The job has successfully completed"))
                elif status != job["status"]:
                    job["status"] = status
            snapshot = dict(job)
        state.log("/v1/fine_tuning/jobs/get", 200)
        return JSONResponse(snapshot)

    async def job_events(request: Request) -> Response:
        events = state.job_events.get(request.path_params["job_id"])
        if events is None:
            return _error(404, "no such job", "not_found")
        return JSONResponse({"object": "list", "data": list(reversed(events))[:20], "has_more": False})

    async def create_batch(request: Request) -> Response:
        body = await request.json()
        item = state.files.get(body.get("input_file_id"))
        if item is None:
            return _error(400, "invalid input_file_id", "invalid_request_error")
        lines = [json.loads(x) for x in item["data"].decode().splitlines() if x.strip()]
        batch = {"id": state.new_id("batch_"), "object": "batch", "endpoint": body["endpoint"], "errors": None,
                 "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                 "status": "validating", "output_file_id": None, "error_file_id": None,
                 "created_at": int(time.time()), "metadata": body.get("metadata"),
                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        with state.lock:
            state.batches[batch["id"]] = {**batch, "_lines": lines}
        state.log("/v1/batches", 200)
        return JSONResponse(batch)

    async def get_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        batch = state.batches.get(batch_id)
        if batch is None:
            return _error(404, "no such batch", "not_found")
        with state.lock:
            state.batch_polls[batch_id] += 1
            n, k = state.batch_polls[batch_id], max(1, state.knobs.batch_polls)
        if batch["status"] not in ("completed", "failed"):
            if n <= k:
                batch["status"] = "validating"
            elif n <= 2 * k:
                batch["status"] = "in_progress"
            elif state.knobs.batch_fail:
                batch["status"] = "failed"
                batch["errors"] = {"object": "list", "data": [
                    {"code": "invalid_request", "message": "line 1: unknown model (fake)", "line": 1, "param": "model"}]}
            else:
                _complete_batch(batch)
        state.log("/v1/batches/get", 200)
        return JSONResponse({k2: v for k2, v in batch.items() if not k2.startswith("_")})

    def _complete_batch(batch: dict[str, Any]) -> None:
        out, err = [], []
        for line in batch["_lines"]:
            cid, body = line["custom_id"], line["body"]
            if _unit("batch-error", cid, state.knobs.seed) < state.knobs.batch_error_rate:
                err.append({"id": state.new_id("batch_req_"), "custom_id": cid, "response": None,
                            "error": {"code": "server_error", "message": "fake batch request error"}})
                continue
            urls = image_urls(body)
            extra = {"judge": judge_key(urls), "images": len(urls)} if urls else {}
            state.log(f"batch:{line['url']}", 200, caption_of(body), seed=body.get("seed"), **extra)
            out.append({"id": state.new_id("batch_req_"), "custom_id": cid, "error": None,
                        "response": {"status_code": 200, "request_id": state.new_id("req_"),
                                     "body": _answer(line["url"], body)}})
        for key, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = state.new_id("file-")
                data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
                with state.lock:
                    state.files[fid] = {"id": fid, "purpose": "batch_output", "data": data}
                batch[key] = fid
        batch["status"] = "completed"
        batch["request_counts"] = {"total": len(batch["_lines"]), "completed": len(out), "failed": len(err)}

    async def control_log(request: Request) -> Response:
        with state.lock:
            return JSONResponse({"requests": list(state.requests)})

    async def control_knobs(request: Request) -> Response:
        updates = await request.json()
        names = {f.name for f in fields(Knobs)}
        for key, value in updates.items():
            if key not in names:
                return _error(400, f"unknown knob {key}", "invalid_request_error")
            setattr(state.knobs, key, tuple(value) if isinstance(value, list) else value)
        return JSONResponse(asdict(state.knobs))

    async def control_reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        route("/v1/completions", generation, ["POST"]),
        route("/v1/chat/completions", generation, ["POST"]),
        route("/v1/moderations", moderations, ["POST"]),
        route("/v1/files", upload_file, ["POST"]),
        route("/v1/files/{file_id}/content", file_content, ["GET"]),
        route("/v1/fine_tuning/jobs", create_job, ["POST"]),
        route("/v1/fine_tuning/jobs/{job_id}", get_job, ["GET"]),
        route("/v1/fine_tuning/jobs/{job_id}/events", job_events, ["GET"]),
        route("/v1/batches", create_batch, ["POST"]),
        route("/v1/batches/{batch_id}", get_batch, ["GET"]),
        Route("/_fake/log", control_log, methods=["GET"]),
        Route("/_fake/knobs", control_knobs, methods=["POST"]),
        Route("/_fake/reset", control_reset, methods=["POST"]),
    ])


@dataclass
class FakeOpenAIServer:
    """The fake served by uvicorn in a background thread on 127.0.0.1 (a free port)."""

    knobs: Knobs = field(default_factory=Knobs)
    port: int = 0

    def __post_init__(self) -> None:
        self.state = FakeState(self.knobs)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def fresh(self, api_key: str) -> FakeOpenAIServer:
        """This server as a new test wants it: default knobs (``api_key`` required) and an empty log."""
        for name, value in vars(Knobs(api_key=api_key)).items():
            setattr(self.knobs, name, value)
        self.state.reset()
        return self

    def start(self) -> Self:
        config = uvicorn.Config(build_app(self.state), host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, nargs=2, default=(0.0, 0.0), metavar=("LO", "HI"))
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    server = FakeOpenAIServer(Knobs(latency=tuple(args.latency), api_key=args.api_key), port=args.port).start()
    print(f"READY {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
