"""The agent loop of one turn: a reply that ends in tool calls → each call approved (or not) and run on its
MCP server → the results go back as `tool` messages → the model continues, up to `max_rounds` times.

It never prints: it yields the generation's events (TokenEvent, Finished) and its own (CallStarted,
CallDone, TurnNote), and asks `approve(call)` before running anything that is not approved already.
Refused calls, tool errors, timeouts, crashed servers and results too large for the context all go back
to the model as error results; Ctrl+C (the `cancel` event) stops the running call and the turn, and the
calls left unanswered are kept in the history with a "stopped by the user" result, so the next message
continues a well-formed conversation.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, Qwen35Error
from .generate import Finished, TokenEvent
from .mcp import McpHub, McpTool, ToolCallCancelled, ToolOutput
from .session import ChatSession

DECISIONS = ("yes", "no", "always", "stop")
REPLY_ROOM = 256  # tokens of context kept free for the model's answer after the tool results
REFUSED = "Error: the user refused this tool call."
STOPPED = "Error: the user stopped this tool call."


@dataclass
class PlannedCall:
    id: str
    name: str  # as the model called it
    server: str
    tool: str  # the server's own name
    arguments: str  # the JSON object sent, exactly


@dataclass
class CallRecord:
    call: PlannedCall
    decision: str  # yes | always | auto (--yes, or approved with "always" before) | no | stop
    output: ToolOutput
    seconds: float = 0.0

    def as_json(self) -> dict:
        return {
            "id": self.call.id,
            "name": self.call.name,
            "server": self.call.server,
            "tool": self.call.tool,
            "arguments": self.call.arguments,
            "approved": self.decision in ("yes", "always", "auto"),
            "result": {
                "text": self.output.text,
                "images": [str(p) for p in self.output.images],
                "is_error": self.output.is_error,
            },
            "seconds": round(self.seconds, 3),
        }


@dataclass
class CallStarted:
    call: PlannedCall
    approved: bool  # already approved (--yes or "always"): it runs without asking


@dataclass
class CallDone:
    record: CallRecord


@dataclass
class TurnNote:
    text: str  # something the user should know (round limit, results cut to fit the context)


Event = TokenEvent | Finished | CallStarted | CallDone | TurnNote


@dataclass
class ToolLoop:
    session: ChatSession
    hub: McpHub
    approve: Callable[[PlannedCall], str]  # -> one of DECISIONS
    max_rounds: int = 8
    auto_approve: bool = False  # --yes
    always: set[str] = field(default_factory=set)  # tools approved for the rest of this chat
    transcript: list[CallRecord] = field(default_factory=list)

    def turn(
        self,
        text: str,
        images: Sequence[Path] = (),
        cancel: threading.Event | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
        on_encode: Callable[[int, int], None] | None = None,
    ) -> Iterator[Event]:
        """One user message and every tool round it leads to."""
        cancel = cancel or threading.Event()
        events = self.session.send(
            text, cancel=cancel, on_prefill=on_prefill, images=images, on_encode=on_encode
        )
        for round_ in range(self.max_rounds + 1):
            done = yield from _relay(events)
            calls = self.session.last_reply.tool_calls
            if done.reason != "stop" or not calls or not self.runs_all(calls):
                return
            planned = [self._plan(c) for c in calls]
            if round_ == self.max_rounds:
                note = f"tool round limit ({self.max_rounds}) reached: call not run (--max-tool-rounds)"
                self.session.add_unsent(
                    [tool_message(c, ToolOutput("Error: " + note, is_error=True)) for c in planned]
                )
                yield TurnNote(note.split(":")[0] + "; the calls were not run (--max-tool-rounds)")
                return
            records = yield from self._run_calls(planned, cancel)
            messages = self._fit([tool_message(r.call, r.output) for r in records])
            if cancel.is_set() or any(r.decision == "stop" for r in records):
                self.session.add_unsent(messages)
                yield TurnNote("turn stopped; the calls and their results are kept in the chat")
                return
            events = self._send_results(messages, cancel, on_prefill, on_encode)

    def runs_all(self, calls) -> bool:
        """The loop runs only calls MCP servers answer; a --tools tool (printed, not run) ends the turn."""
        tools = {t["function"]["name"] for t in self.session.tools or [] if isinstance(t, dict)}
        return all(self.hub.find(c.name) is not None or c.name not in tools for c in calls)

    def _plan(self, call) -> PlannedCall:
        tool = self.hub.find(call.name)
        return PlannedCall(
            call.id, call.name, tool.server if tool else "", tool.remote if tool else "", call.arguments
        )

    def _run_calls(self, planned: list[PlannedCall], cancel: threading.Event) -> Iterator[Event]:
        records: list[CallRecord] = []
        for call in planned:
            if cancel.is_set() or (records and records[-1].decision == "stop"):
                records.append(CallRecord(call, "stop", ToolOutput(STOPPED, is_error=True)))
                self.transcript.append(records[-1])
                continue
            tool = self.hub.find(call.name)
            approved = self.auto_approve or call.name in self.always
            yield CallStarted(call, approved and tool is not None)
            record = self._run_one(call, tool, approved, cancel)
            records.append(record)
            self.transcript.append(record)
            yield CallDone(record)
        return records

    def _run_one(
        self, call: PlannedCall, tool: McpTool | None, approved: bool, cancel: threading.Event
    ) -> CallRecord:
        if tool is None:
            known = ", ".join(t.name for t in self.hub.tools()) or "none"
            return CallRecord(
                call,
                "auto",
                ToolOutput(f"Error: no tool named {call.name!r} (tools: {known})", is_error=True),
            )
        decision = "auto" if approved else self.approve(call)
        if decision == "always":
            self.always.add(call.name)
        if decision in ("no", "stop") or cancel.is_set():
            text = REFUSED if decision == "no" else STOPPED
            return CallRecord(call, decision if decision == "no" else "stop", ToolOutput(text, is_error=True))
        start = time.monotonic()
        try:
            arguments = json.loads(call.arguments)
            output = self.hub.call(tool, arguments, cancel)
        except ToolCallCancelled:
            return CallRecord(call, "stop", ToolOutput(STOPPED, is_error=True), time.monotonic() - start)
        if output.is_error and not output.text.startswith("Error"):
            output.text = "Error: " + output.text
        return CallRecord(call, decision, self._viewable(output), time.monotonic() - start)

    def _viewable(self, output: ToolOutput) -> ToolOutput:
        """Keep the images the model can take: none without a vision tower, none that does not open as an
        image we read (checked from its header now, so a bad one never fails the next prompt)."""
        if not output.images:
            return output
        from .multimodal import check_images

        kept, notes = [], []
        try:
            self.session.engine.check_vision()
        except Qwen35Error:
            notes.append(f"{len(output.images)} image(s) dropped: this model has no vision tower")
            kept = []
        else:
            for path in output.images:
                try:
                    check_images([path])
                    kept.append(path)
                except InputError as e:
                    notes.append(f"an image was dropped: {e.message}")
        output.images = kept
        output.notes += notes
        output.text += "".join(f"\n[{n}]" for n in notes)
        return output

    def _fit(self, messages: list[dict]) -> list[dict]:
        """Cut tool texts so the results leave REPLY_ROOM tokens of context: each result gets an equal share
        of what is left (counted in tokens, like any prompt text); a cut result says so."""
        session, tok = self.session, self.session.engine.tokenizer
        room = session.engine.max_context - session.cache.offset - len(session.unfed) - REPLY_ROOM
        share = max(0, room // max(1, len(messages)) - 32)  # 32: the <tool_response> markup around each
        for m in messages:
            text = _text_of(m)
            if tok.tokens_over(text, share) is None:
                continue
            cut = _cut_to_tokens(tok, text, max(0, share - 40))
            note = f"\n[the output was cut to fit the context: {len(cut)} of {len(text)} characters]"
            _set_text(m, cut + note)
        return messages

    def _send_results(self, messages, cancel, on_prefill, on_encode) -> Iterator[Event]:
        """Feed the results; when they still do not fit (images), send them as errors instead."""
        try:
            events = self.session.send_tool_results(
                messages, cancel=cancel, on_prefill=on_prefill, on_encode=on_encode
            )
            first = next(events)
        except InputError as e:  # nothing was fed: the history and the cache are as they were
            yield TurnNote(f"the tool results do not fit: {e.message}; they go back to the model as errors")
            errors = [
                {**m, "content": f"Error: the result does not fit the context ({e.message})"}
                for m in messages
            ]
            events = self.session.send_tool_results(
                errors, cancel=cancel, on_prefill=on_prefill, on_encode=on_encode
            )
            first = next(events)
        yield first
        yield from events


def _relay(events: Iterator) -> Iterator[Event]:
    """Pass a reply's events on; return its Finished."""
    done = None
    for event in events:
        if isinstance(event, Finished):
            done = event
        yield event
    return done


def tool_message(call: PlannedCall, output: ToolOutput) -> dict:
    """A result as the chat template takes it: the text, or the image parts followed by the text."""
    message = {"role": "tool", "tool_call_id": call.id, "name": call.name}
    if output.images:
        parts = [{"type": "image", "image": str(p)} for p in output.images]
        message["content"] = [*parts, {"type": "text", "text": output.text}]
    else:
        message["content"] = output.text
    return message


def _text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def _set_text(message: dict, text: str) -> None:
    if isinstance(message["content"], str):
        message["content"] = text
    else:
        message["content"][-1]["text"] = text


def _cut_to_tokens(tok, text: str, tokens: int) -> str:
    """The longest start of `text` (found by halving) that takes at most `tokens` tokens."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tok.tokens_over(text[:mid], tokens) is None:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]
