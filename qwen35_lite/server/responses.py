"""`POST /v1/responses`: OpenAI's Responses API, served by the chat path.

A request is translated into the ChatRequest it is equivalent to (responses_protocol.py) and run as one:
same prompt ids, same job, same reply parser. Only the answer's shape is this module's: output items
(reasoning, message, function_call) built from the reply's Deltas by one `Output`, which also yields the
stream's events, so the streamed events always add up to the non-streamed response.

`previous_response_id` (stateless otherwise, as vLLM): a stored response keeps its conversation as items
for as long as the state cache keeps the model state it ended in; the next request is that conversation
plus its own input, so its prompt resumes from that state. Once the state is evicted the id is refused with
a 400 that says to send the whole conversation."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from .protocol import APIError, finish_reason
from .reply import Delta
from .responses_protocol import ResponsesRequest, chat_request
from .state_cache import PrefixCache

RENAMED = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text"}
KEEP = 256  # stored responses at most (each also needs its state still in the state cache to be served)


@dataclass
class Pipeline:
    """What the Responses route borrows from the app's chat path (app.py builds it)."""

    model_id: str
    authorize: Callable
    prepare: Callable  # async (ChatRequest) -> (Job, ReplyText, images folder)
    launch: Callable  # async (Request, Job, cleanup) -> (Outcome, done) | Response
    collect: Callable  # async (Request, Job, ReplyText, Outcome, done, sink) -> client left
    relay: Callable  # (Request, Job, Outcome, done, pieces, error) -> the streamed pieces, logged
    deltas: Callable  # (Job, ReplyText, Outcome) -> AsyncIterator[Delta]
    prefix: PrefixCache
    error_body: Callable[[Exception], dict]
    logprobs: Callable  # (ChatRequest, kind, Delta, offset) -> the chat `logprobs` body, or None


@dataclass
class Stored:
    items: list[dict]  # the conversation: every earlier input item and output item, in order
    state: tuple[str, tuple[int, ...]] | None  # the PrefixCache name of the state it ended in


class ResponseStore:
    """Responses by id, for previous_response_id; one is served only while its state is kept."""

    def __init__(self, prefix: PrefixCache) -> None:
        self.prefix = prefix
        self._kept: dict[str, Stored] = {}

    def put(self, ident: str, stored: Stored) -> None:
        self._kept = {k: v for k, v in self._kept.items() if self._alive(v)}  # drop what is no longer served
        while len(self._kept) >= KEEP:
            self._kept.pop(next(iter(self._kept)))
        self._kept[ident] = stored

    def history(self, ident: str) -> list[dict]:
        stored = self._kept.get(ident)
        if stored is None or not self._alive(stored):
            self._kept.pop(ident, None)
            raise APIError(
                400,
                f"previous_response_id {ident!r} is not held by this server (it keeps a response only while"
                " its model state is in the state cache, and not across restarts): send the whole"
                " conversation as input instead",
                "previous_response_id",
                "previous_response_not_found",
            )
        return stored.items

    def _alive(self, stored: Stored) -> bool:
        return stored.state is not None and self.prefix.holds(stored.state[1], stored.state[0])


def register_responses(app: FastAPI, pipe: Pipeline) -> None:
    """Add POST /v1/responses to `app`."""
    store = ResponseStore(pipe.prefix)

    @app.post("/v1/responses", dependencies=[Depends(pipe.authorize)])
    async def responses(req: ResponsesRequest, request: Request):
        history = store.history(req.previous_response_id) if req.previous_response_id else []
        chat = chat_request(req, history)
        try:
            job, reply, images_dir = await pipe.prepare(chat)
        except APIError as e:  # named by the Responses field
            e.param = RENAMED.get(e.param, e.param)
            raise
        try:
            launched = await pipe.launch(request, job, images_dir)
        except BaseException:
            images_dir.cleanup()
            raise
        if isinstance(launched, Response):
            return launched
        outcome, done = launched
        shape = None
        if chat.logprob_count() is not None:  # output_text.logprobs: Chat Completions' content entries

            def shape(entries: list) -> list[dict]:
                return pipe.logprobs(chat, "chat", Delta(logprobs=entries), 0)["content"]

        output = Output(skeleton(req, pipe.model_id, job.params), shape)

        def finish() -> dict:
            reason = finish_reason(outcome.finished.reason, reply.stopped, output.saw_calls)
            body = output.close(reason, usage(outcome))
            if req.store:
                items = [*history, *req.input_items(), *body["output"]]
                store.put(body["id"], Stored(items, job.kept))
            return body

        if req.stream:

            async def pieces() -> AsyncIterator[str]:
                for event in output.begin():
                    yield sse(event)
                async for delta in pipe.deltas(job, reply, outcome):
                    for event in output.feed(delta):
                        yield sse(event)
                finish()
                for event in output.events:
                    yield sse(event)

            def error(e: Exception) -> str:
                body = pipe.error_body(e)["error"]
                return sse({"type": "error", "sequence_number": output.next_seq(), **body})

            stream = pipe.relay(request, job, outcome, done, pieces(), error)
            return StreamingResponse(stream, media_type="text/event-stream")
        if await pipe.collect(request, job, reply, outcome, done, output.feed):
            return Response(status_code=499)
        return finish()


def skeleton(req: ResponsesRequest, model_id: str, params) -> dict[str, Any]:
    """The response object before any output: the request's settings as served."""
    fmt = (req.text or {}).get("format") or {"type": "text"}
    return {
        "id": "resp_" + uuid.uuid4().hex,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model_id,
        "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
        "store": req.store,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "text": {"format": fmt},
        "tool_choice": req.tool_choice or "auto",
        "tools": req.tools or [],
        "truncation": "disabled",
        "usage": None,
        "metadata": req.metadata or {},
    }


def usage(outcome) -> dict[str, Any]:
    started, finished = outcome.started, outcome.finished
    prompt = started.prompt_tokens if started else 0
    reply = len(finished.tokens) if finished else len(outcome.completion_ids)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": started.cached_tokens if started else 0},
        "output_tokens": reply,
        "output_tokens_details": {"reasoning_tokens": outcome.reasoning_tokens},
        "total_tokens": prompt + reply,
    }


def sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


@dataclass
class Output:
    """A response's output items, built from Deltas in the order they come (reasoning, message text,
    function calls), and the stream events that build them, numbered in `sequence_number`.

    `feed` returns the events of one Delta. A message's trailing whitespace is held until more text
    follows: before a function call it is dropped (the model writes a newline before `<tool_call>`), so
    whitespace alone never opens a message; at the end of the reply it is the message's."""

    response: dict
    shape_logprobs: Callable[[list], list[dict]] | None = None  # TokenLogprobs -> output_text entries
    events: list[dict] = field(default_factory=list)
    saw_calls: bool = False
    _seq: int = 0
    _open: dict | None = None  # the item being written
    _call_index: dict[int, dict] = field(default_factory=dict)  # tool-call delta index -> its item
    _held: str = ""  # whitespace not yet given to a message
    _held_logprobs: list[dict] = field(default_factory=list)  # entries of answer tokens not yet sent

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq - 1

    def _emit(self, kind: str, **fields: Any) -> None:
        self.events.append({"type": kind, "sequence_number": self.next_seq(), **fields})

    def begin(self) -> list[dict]:
        self._emit("response.created", response=_copy(self.response))
        self._emit("response.in_progress", response=_copy(self.response))
        return self._drain()

    def feed(self, delta: Delta) -> list[dict]:
        if delta.reasoning:
            self._text("reasoning", delta.reasoning)
        if delta.logprobs and self.shape_logprobs is not None:
            self._held_logprobs += self.shape_logprobs(delta.logprobs)
        if delta.content:
            self._content(delta.content)
        for call in delta.tool_calls:
            self._call(call)
        return self._drain()

    def close(self, reason: str, usage: dict) -> dict:
        """The finished response; its closing events are left in `events`."""
        held, self._held = self._held, ""
        if held and self._open is not None and self._open["type"] == "message":
            self._text("message", held)
        elif not any(i["type"] in ("message", "function_call") for i in self.response["output"]):
            self._text("message", held)  # a reply with no text and no call still has its message
        self._close_open()
        if reason == "length":
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            self.response["status"] = "completed"
        self.response["usage"] = usage
        self._emit(
            "response.completed" if reason != "length" else "response.incomplete",
            response=_copy(self.response),
        )
        return self.response

    def _drain(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def _content(self, text: str) -> None:
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        if body:
            self._text("message", body)

    def _text(self, kind: str, text: str) -> None:
        """Append text to the open reasoning or message item, opening one first if needed."""
        if self._open is None or self._open["type"] != kind:
            self._close_open()
            self._start(kind)
        if not text:
            return
        item = self._open
        part = item["content"][0]
        part["text"] += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {}
        if kind == "message":  # the entries of the tokens this text came from
            extra["logprobs"], self._held_logprobs = self._held_logprobs, []
            part["logprobs"] += extra["logprobs"]
        self._emit(name, item_id=item["id"], output_index=self._index(), content_index=0, delta=text, **extra)

    def _start(self, kind: str) -> None:
        if kind == "reasoning":
            item = {
                "id": "rs_" + uuid.uuid4().hex,
                "type": "reasoning",
                "summary": [],
                "status": "in_progress",
            }
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant"}
            item["status"] = "in_progress"
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.response["output"].append(item)
        self._open = item
        self._emit(
            "response.output_item.added", output_index=self._index(), item={**_copy(item), "content": []}
        )
        item["content"] = [part]
        self._emit(
            "response.content_part.added",
            item_id=item["id"],
            output_index=self._index(),
            content_index=0,
            part=_copy(part),
        )

    def _call(self, delta) -> None:
        self.saw_calls = True
        self._held = ""
        item = self._call_index.get(delta.index)
        if item is None:
            self._close_open()
            item = {
                "id": "fc_" + uuid.uuid4().hex,
                "type": "function_call",
                "call_id": delta.id,
                "name": delta.name or "",
                "arguments": "",
                "status": "in_progress",
            }
            self._call_index[delta.index] = item
            self.response["output"].append(item)
            self._open = item
            self._emit("response.output_item.added", output_index=self._index(), item=_copy(item))
        elif delta.name:
            item["name"] += delta.name
        if delta.arguments:
            item["arguments"] += delta.arguments
            self._emit(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=self._index(item),
                delta=delta.arguments,
            )

    def _close_open(self) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = self._index(item)
        item["status"] = "completed"
        if item["type"] == "function_call":
            self._emit(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        else:
            part = item["content"][0]
            done = (
                "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            )
            extra = {"logprobs": []} if item["type"] == "message" else {}
            self._emit(
                done, item_id=item["id"], output_index=index, content_index=0, text=part["text"], **extra
            )
            self._emit(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=_copy(part),
            )
        self._emit("response.output_item.done", output_index=index, item=_copy(item))

    def _index(self, item: dict | None = None) -> int:
        item = item if item is not None else self._open
        return next(i for i, x in enumerate(self.response["output"]) if x is item)


def _copy(obj: dict) -> dict:
    return json.loads(json.dumps(obj))
