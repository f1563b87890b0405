"""The FastAPI app: /v1/models, /v1/chat/completions, /v1/completions and /v1/responses over one Worker.

Handlers turn a request into prompt ids (the checkpoint's chat template, exactly as transformers renders
it), queue a Job, and turn its events into an OpenAI response: one JSON body, or server-sent events. The
library never prints: one log line per request goes to the `qwen35_lite.server` logger.

Longer than ~450 lines on purpose: the routes share one request -> job -> response path and one error
handling, which read best together; what a request may reach (guard.py, media.py), its schema
(protocol.py), its deltas (reply.py), the model's thread (worker.py), the per-request log line
(request_log.py) and the Responses API over the chat path (responses.py) are modules of their own."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Qwen35Error
from ..runtime.engine import Engine
from ..runtime.generate import Finished, TokenEvent
from .guard import Guard, HostPolicy
from .media import hide_paths, image_file
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    answer_grammar,
    bad_request,
    finish_reason,
    image_dir,
    sampling_params,
    template_messages,
    template_tools,
)
from .reply import Delta, ReplyText, TokenTexts, chat_logprobs, completion_logprobs, join_tool_calls
from .request_log import RequestLog, arrival, mark_logged, note_error
from .responses import Pipeline, register_responses
from .state_cache import PrefixCache
from .worker import Job, QueueFull, Script, Skipped, Started, Worker

log = logging.getLogger("qwen35_lite.server")
POLL_S = 0.25  # how often a waiting handler checks whether its client is still there
RETRY_AFTER_S = 5
MAX_BODY = 20 << 20  # request bytes: a data-URL image of ~15 MB, and far more text than a context holds


@dataclass
class Outcome:
    """What a finished job gave, for the response's usage and the log line."""

    started: Started | None = None
    finished: Finished | None = None
    completion_ids: list[int] = field(default_factory=list)
    reasoning_tokens: int = 0  # reply tokens inside the <think> block
    first_token_at: float | None = None  # perf_counter() when the first reply token reached the handler


def create_app(
    engine: Engine,
    model_id: str,
    api_key: str | None = None,
    capacity: int = 8,
    state_bytes: int = 2 << 30,
    hosts: HostPolicy | None = None,
    media_dir: Path | None = None,
    max_body: int = MAX_BODY,
    template_defaults: dict | None = None,
    cors_origins: list[str] | None = None,
    script: Script | None = None,
) -> FastAPI:
    """The server app for a loaded engine; `capacity`: requests waiting or running before 503.

    hosts: the Host headers answered (default: localhost names only); media_dir: the resolved directory
    whose files image_url may name (media.allowed_dir; None: no local file is read); max_body: bytes;
    template_defaults: chat_template_kwargs a request does not set (serve --no-think: enable_thinking
    false); cors_origins: browser origins answered with CORS headers (None: no CORS); script: tests only,
    a reply text per prompt text instead of the model's tokens (worker.Script)."""
    worker = Worker(engine, PrefixCache(state_bytes), capacity, script)
    template_defaults = dict(template_defaults or {})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()  # the thread ends after the job it is running, which the shutdown cancels

    # No /docs; the schema only behind the key (it is added below, as a route that checks it).
    app = FastAPI(title="qwen35-lite", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(Guard, hosts=hosts or HostPolicy("127.0.0.1"), max_body=max_body)
    if cors_origins:  # outside the Guard: a preflight carries no key, and a refusal still gets its headers
        app.add_middleware(
            CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"], max_age=600
        )
    app.add_middleware(RequestLog)  # outermost: it sees every request, the Guard's refusals included
    library_errors_as_json(app)

    async def authorize(request: Request) -> None:
        """Authorization: Bearer KEY, the scheme in any case (RFC 9110), the key compared in constant time."""
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if api_key and not (
            scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
        ):
            raise APIError(
                401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key"
            )

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        note_error(request, e.code or e.message)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return await api_error(request, bad_request("the body is not valid JSON"))
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return await api_error(
            request, bad_request(f"{where or 'body'}: {first.get('msg', 'malformed request')}", where or None)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (a body that does not parse, an unknown path or method) in OpenAI's
        shape, like every other error; an unknown path or method is named."""
        code = {400: "invalid_value", 404: "unknown_url", 405: "method_not_allowed"}.get(e.status_code)
        if e.status_code == 400:
            message = "the body is not valid JSON (or is nested too deeply)"
        elif e.status_code in (404, 405):
            message = (
                f"Invalid URL ({request.method} {request.url.path}): this server answers GET /v1/models,"
                " POST /v1/chat/completions, POST /v1/completions and POST /v1/responses"
            )
        else:
            message = str(e.detail)
        note_error(request, code or message)
        error = APIError(e.status_code, message, code=code)
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)

    @app.get("/openapi.json", dependencies=[Depends(authorize)], include_in_schema=False)
    async def openapi() -> dict:
        return app.openapi()

    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "qwen35-lite"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model_card(name: str) -> dict:
        check_model_id(name)
        return card

    def check_model_id(name: str) -> None:
        if name != model_id:
            raise APIError(
                404,
                f"the model {name!r} does not exist (this server runs {model_id!r})",
                "model",
                "model_not_found",
            )

    def check_model(req: SamplingFields) -> None:
        check_model_id(req.model)

    def encode(text: str, field: str) -> list[int]:
        """The prompt's ids, refused first (counted in pieces) when the context cannot hold it: a huge
        text is never tokenised whole."""
        if (n := engine.tokenizer.tokens_over(text, engine.max_context)) is not None:
            raise bad_request(
                f"the prompt is at least {n} tokens ({len(text.encode('utf-8', 'surrogatepass'))} bytes)"
                f" but the context is {engine.max_context}: shorten it, or start the server with a larger"
                " --ctx",
                field,
            )
        return engine.tokenizer.encode(text)

    def check_text_fits(messages: list[dict]) -> None:
        """Refuse, before rendering, messages whose text alone is over the context (the template only
        adds to it): rendering megabytes would end at the sandbox's size bound, with a vaguer line.
        Each piece is counted on its own; a piece's edges may merge with the template's text, so
        EDGE_SLACK tokens a piece are taken off. Below max_context characters nothing is counted here."""
        pieces = list(_texts(messages))
        limit, slack = engine.max_context, EDGE_SLACK * len(pieces)
        if sum(map(len, pieces)) <= limit:
            return
        total = 0
        for piece in pieces:
            if (n := engine.tokenizer.tokens_over(piece, limit + slack - total)) is not None:
                total += n
                break
            total += len(engine.tokenizer.encode(piece))
        if total - slack >= limit:
            raise bad_request(
                f"the messages hold at least {total - slack} tokens of text but the context is {limit}:"
                " shorten them, or start the server with a larger --ctx",
                "messages",
            )

    def render(messages: list[dict], tools: list[dict] | None, thinking: bool, variables: dict) -> str:
        """The prompt text; a template's refusal is the client's 400, its file named without the server's
        path."""
        try:
            return engine.template.render(
                messages, tools=tools, enable_thinking=thinking, add_generation_prompt=True, **variables
            )
        except Qwen35Error as e:
            origin = str(engine.template.origin)
            message = f"{e.message} ({e.hint})" if e.hint else e.message
            raise bad_request(message.replace(origin, Path(origin).name), "messages") from None

    def make_job(
        req: SamplingFields,
        ids: list[int],
        images: list[str],
        thinking_open: bool,
        grammar: str | None = None,
    ) -> Job:
        if not ids:
            raise bad_request("the prompt is empty", "prompt")
        if not images and len(ids) >= engine.max_context:
            raise bad_request(
                f"the prompt is {len(ids)} tokens but the context is {engine.max_context}: shorten it, or"
                " start the server with a larger --ctx",
                "messages",
            )
        cap = req.reply_cap() or engine.defaults.max_new_tokens
        params = sampling_params(req, engine.defaults.params)
        return Job(ids, params, cap, thinking_open, images, grammar)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: ChatRequest, request: Request):
        job, reply, images_dir = await prepare_chat(req)
        try:
            return await respond(request, req, job, reply, "chat", images_dir)
        except BaseException:
            images_dir.cleanup()
            raise

    async def prepare_chat(req: ChatRequest) -> tuple[Job, ReplyText, object]:
        """A chat request's job and reply parser, and the folder of its decoded images (the caller cleans
        it up once the job is done). Shared with /v1/responses, which is translated into a ChatRequest."""
        check_model(req)
        req.chat_template_kwargs = {**template_defaults, **(req.chat_template_kwargs or {})}
        tools = template_tools(req)
        grammar = answer_grammar(req, tools, engine.tokenizer.token_id)
        thinking = req.enable_thinking()
        images_dir = image_dir()
        try:
            folder = Path(images_dir.name)
            messages, images = template_messages(
                req.messages,
                lambda url, n, kind="image": image_file(url, folder, n, media_dir, kind),
                req.video_sampling(),
            )
            if images:  # an unreadable image is the client's 400, found before the request waits in line
                from ..runtime.multimodal import check_videos, load_images, split_media

                pictures, videos = split_media(images)
                try:
                    await run_in_threadpool(load_images, pictures)
                    await run_in_threadpool(check_videos, videos, engine.model_dir)  # metadata only
                except Qwen35Error as e:
                    raise hide_paths(e, images) from None
            await run_in_threadpool(check_text_fits, messages)
            text = await run_in_threadpool(render, messages, tools, thinking, req.template_variables())
            ids = await run_in_threadpool(encode, text, "messages")
            job = make_job(req, ids, images, _ends_in_thinking(ids, engine), grammar)
            return job, ReplyText(req.stop_strings(), tools), images_dir
        except BaseException:
            images_dir.cleanup()
            raise

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        ids = await run_in_threadpool(encode, req.prompt_text(), "prompt")
        job = make_job(req, ids, [], False)
        echo = req.prompt_text() if req.echo else ""
        return await respond(
            request,
            req,
            job,
            ReplyText(req.stop_strings(), None, separate_reasoning=False),
            "text",
            echo=echo,
        )

    async def respond(
        request: Request,
        req: SamplingFields,
        job: Job,
        reply: ReplyText,
        kind: str,
        cleanup=None,
        echo: str = "",
    ):
        launched = await launch(request, job, cleanup)
        if isinstance(launched, Response):
            return launched
        outcome, done = launched
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            body = stream(request, req, job, reply, kind, ident, outcome, done, echo)
            return StreamingResponse(body, media_type="text/event-stream")
        whole = Delta()

        def add(delta: Delta) -> None:
            whole.reasoning += delta.reasoning
            whole.content += delta.content
            whole.tool_calls += delta.tool_calls
            whole.logprobs += delta.logprobs

        if await collect(request, job, reply, outcome, done, add):
            return Response(status_code=499)  # nobody reads it: the client is gone
        reason = finish_reason(outcome.finished.reason, reply.stopped, bool(whole.tool_calls))
        logprobs = logprobs_body(req, kind, whole, len(echo))
        choice: dict = {"index": 0, "finish_reason": reason, "logprobs": logprobs}
        if kind == "chat":
            message = {"role": "assistant", "content": whole.content or (None if whole.tool_calls else "")}
            if whole.reasoning:
                message["reasoning_content"] = whole.reasoning
            if whole.tool_calls:
                message["tool_calls"] = join_tool_calls(whole.tool_calls)
            choice["message"] = message
        else:
            choice["text"] = echo + whole.content
        return {**envelope(ident, kind, False), "choices": [choice], "usage": usage(outcome)}

    async def launch(
        request: Request, job: Job, cleanup=None
    ) -> tuple[Outcome, Callable[[], None]] | Response:
        """Queue the job and wait for its prompt to be taken up: (its Outcome, the `done` that cancels it
        and cleans up), or a 499 when the client left first. 503 when the queue is full or the server
        stops."""
        try:
            worker.submit(job)
        except QueueFull:
            if worker.closing:
                raise shutting_down() from None
            raise APIError(
                503, "the server is busy: every place in the queue is taken", code="server_busy"
            ) from None
        outcome = Outcome()
        watcher = asyncio.create_task(watch_client(request, job))

        def done() -> None:
            job.cancel.set()
            watcher.cancel()
            if cleanup:
                cleanup.cleanup()

        try:
            first = await next_event(job)
            if isinstance(first, Exception):
                raise first
            outcome.started = first
        except ClientLeft:
            done()
            log_request(request, outcome, LEFT)
            return Response(status_code=499)  # nobody reads it: the client is gone
        except BaseException:
            done()
            if worker.closing:
                log_request(request, outcome, STOPPING)
            raise
        return outcome, done

    async def collect(
        request: Request, job: Job, reply: ReplyText, outcome: Outcome, done, sink: Callable[[Delta], None]
    ) -> bool:
        """Every Delta of a non-streamed reply to `sink`, then the log line; True when the client left
        (the caller answers 499)."""
        try:
            async for delta in deltas(job, reply, outcome):
                sink(delta)
        except ClientLeft:
            pass
        except APIError:
            if worker.closing:
                log_request(request, outcome, STOPPING)
            raise
        finally:
            done()
        log_request(request, outcome, LEFT if job.client_left else None)
        return job.client_left

    def stream(request, req, job, reply, kind, ident, outcome, done, echo="") -> AsyncIterator[str]:
        async def body() -> AsyncIterator[str]:
            if kind == "chat":
                yield sse(ident, kind, {"role": "assistant", "content": ""})
            elif echo:
                yield sse(ident, kind, {"text": echo})
            saw_calls, offset = False, len(echo)
            async for delta in deltas(job, reply, outcome):
                saw_calls = saw_calls or bool(delta.tool_calls)
                body = delta_body(delta) if kind == "chat" else {"text": delta.content}
                entries = logprobs_body(req, kind, delta, offset) if delta.logprobs else None
                yield sse(ident, kind, body, logprobs=entries)
                offset += len(delta.content)
            reason = finish_reason(outcome.finished.reason, reply.stopped, saw_calls)
            yield sse(ident, kind, {} if kind == "chat" else {"text": ""}, reason)
            if req.include_usage():
                yield data({**envelope(ident, kind, True), "choices": [], "usage": usage(outcome)})
            yield "data: [DONE]\n\n"

        # the 200 is sent: an error goes in the stream, as vLLM sends it
        return relay(request, job, outcome, done, body(), lambda e: data(error_body(e)) + "data: [DONE]\n\n")

    async def relay(
        request: Request, job: Job, outcome: Outcome, done, body: AsyncIterator[str], error: Callable
    ) -> AsyncIterator[str]:
        """A streamed reply's pieces; an error after the 200 becomes the stream's last piece (`error(e)`),
        and the log line is written however the stream ends."""
        failed = False
        try:
            async for piece in body:
                yield piece
        except ClientLeft:
            pass
        except Exception as e:
            failed = True
            yield error(e)
        finally:  # also when the client left and Starlette cancelled the response
            done()
            left = job.client_left or (outcome.finished is None and not failed)
            why = LEFT if left else STOPPING if failed and worker.closing else None
            log_request(request, outcome, why)

    async def deltas(job: Job, reply: ReplyText, outcome: Outcome) -> AsyncIterator[Delta]:
        """The reply's Deltas until the job finishes; a stop string cancels the rest of the generation.
        A generation cancelled by the server's shutdown is a 503, not a short reply."""
        while True:
            event = await next_event(job)
            if isinstance(event, Exception):
                raise event
            if isinstance(event, Finished):
                outcome.finished = event
                if event.reason == "cancelled" and worker.closing and not reply.stopped:
                    raise shutting_down()
                if tail := reply.finish():
                    yield tail
                return
            if isinstance(event, TokenEvent):
                if outcome.first_token_at is None:
                    outcome.first_token_at = time.perf_counter()
                if event.id >= 0:
                    outcome.completion_ids.append(event.id)
                    outcome.reasoning_tokens += event.thinking
                delta = reply.feed(event)
                if reply.stopped:
                    job.cancel.set()
                if delta:
                    yield delta

    def envelope(ident: str, kind: str, chunk: bool) -> dict:
        obj = ("chat.completion" if kind == "chat" else "text_completion") + (
            ".chunk" if chunk and kind == "chat" else ""
        )
        return {"id": ident, "object": obj, "created": int(time.time()), "model": model_id}

    def sse(
        ident: str, kind: str, delta: dict, reason: str | None = None, logprobs: dict | None = None
    ) -> str:
        choice = {"index": 0, "finish_reason": reason, "logprobs": logprobs}
        choice.update({"delta": delta} if kind == "chat" else delta)
        return data({**envelope(ident, kind, True), "choices": [choice]})

    def logprobs_body(req: SamplingFields, kind: str, delta: Delta, offset: int) -> dict | None:
        """The choice's `logprobs` for the tokens `delta` carries (None when not asked for); offset: where
        the completion's text starts in `text` (the echoed prompt's length)."""
        if req.logprob_count() is None:
            return None
        texts = TokenTexts(engine.tokenizer)
        if kind == "chat":
            return chat_logprobs(delta.logprobs, texts)
        return completion_logprobs(delta.logprobs, texts, offset)

    register_responses(
        app,
        Pipeline(
            model_id,
            authorize,
            prepare_chat,
            launch,
            collect,
            relay,
            deltas,
            worker.prefix,
            error_body,
            logprobs_body,
        ),
    )
    return app


def data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def delta_body(delta: Delta) -> dict:
    body: dict = {}
    if delta.reasoning:
        body["reasoning_content"] = delta.reasoning
    if delta.content:
        body["content"] = delta.content
    if delta.tool_calls:
        body["tool_calls"] = [
            {
                "index": d.index,
                **({"id": d.id, "type": "function"} if d.id else {}),
                "function": {**({"name": d.name} if d.name else {}), "arguments": d.arguments},
            }
            for d in delta.tool_calls
        ]
    return body


class ClientLeft(Exception):
    """The client disconnected and its job was cancelled: nothing is answered."""


async def watch_client(request: Request, job: Job) -> None:
    """Cancel the job (it stops at its next token) once its client has left; checked every POLL_S
    whether tokens are flowing or not, so a non-streamed request is stopped as soon as a streamed one."""
    while not job.cancel.is_set():
        if await request.is_disconnected():
            job.client_left = True
            job.cancel.set()
            return
        await asyncio.sleep(POLL_S)


async def next_event(job: Job):
    """The job's next event; ClientLeft once its client left and the worker has nothing more for it."""
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), POLL_S)
        except asyncio.TimeoutError:
            if job.client_left:
                raise ClientLeft from None
            continue
        if isinstance(event, Skipped):  # cancelled while it waited: its client left, or the server stops
            raise ClientLeft if job.client_left else shutting_down()
        return event


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="server_shutting_down")


def usage(outcome: Outcome) -> dict:
    prompt = outcome.started.prompt_tokens if outcome.started else 0
    completion = len(outcome.finished.tokens) if outcome.finished else len(outcome.completion_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": outcome.started.cached_tokens if outcome.started else 0},
    }


LEFT, STOPPING = "cancelled: client left", "cancelled: server stopping"


def log_request(request: Request, outcome: Outcome, why: str | None = None) -> None:
    """The generation's line (request_log writes the others); `why` (LEFT, STOPPING) overrides the
    generation's own reason. TTFT and the total run from the request's arrival: waiting in line, rendering
    and the prefill count."""
    stats = outcome.finished.stats if outcome.finished else {}
    u = usage(outcome)
    arrived = arrival(request)
    ttft = None if outcome.first_token_at is None else outcome.first_token_at - arrived
    mark_logged(request)
    log.info(
        "%s %s · prompt %d tok (%d cached) · reply %d tok (%s) · %s tok/s · TTFT %s s · %.2f s",
        request.method,
        request.url.path,
        u["prompt_tokens"],
        u["prompt_tokens_details"]["cached_tokens"],
        u["completion_tokens"],
        why or (outcome.finished.reason if outcome.finished else "no reply"),
        "-" if stats.get("decode_tok_s") is None else stats["decode_tok_s"],
        "-" if ttft is None else f"{ttft:.3f}",
        time.perf_counter() - arrived,
    )


EDGE_SLACK = 2  # tokens a message's text may lose where it meets the template's text


def _texts(messages: list[dict]) -> Iterator[str]:
    """The text of every message: string contents, text parts, reasoning."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (p["text"] for p in content if p.get("type") == "text")
        if isinstance(m.get("reasoning_content"), str):
            yield m["reasoning_content"]


def _ends_in_thinking(ids: list[int], engine: Engine) -> bool:
    """True when the prompt leaves a <think> block open (the template's generation prompt does)."""
    open_id, close_id = engine.tokenizer.token_id("<think>"), engine.tokenizer.token_id("</think>")
    if open_id is None:
        return False
    last_open = max((i for i, t in enumerate(ids) if t == open_id), default=-1)
    last_close = max((i for i, t in enumerate(ids) if t == close_id), default=-1)
    return last_open > last_close


def error_body(e: Exception) -> dict:
    """Any error as OpenAI's JSON: ours as they are, a user's error from the library (an unreadable image,
    a text-only checkpoint given one) as a 400, anything else as a 500 whose traceback goes to the log."""
    if isinstance(e, APIError):
        return e.body()
    if isinstance(e, Qwen35Error):
        return bad_request(f"{e.message} ({e.hint})" if e.hint else e.message).body()
    log.error("request failed", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").body()


def library_errors_as_json(app: FastAPI) -> None:
    @app.exception_handler(Qwen35Error)
    async def user_error(request: Request, e: Qwen35Error) -> JSONResponse:
        return JSONResponse(error_body(e), status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(e), status_code=500)


GRACE_S = 5  # seconds a stopping server waits for its requests (their generations are cancelled first)


def run_server(app: FastAPI, host: str, port: int) -> None:
    """uvicorn over `app` until Ctrl+C or SIGTERM. The signal cancels the running and waiting generations
    before uvicorn waits for their requests, so the server stops within seconds, not after a reply."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.worker.cancel_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_S)
    Server(config).run()
