"""One reply's text as OpenAI deltas: reasoning apart from content, stop strings cut (and never streamed
in part), tool-call markup turned into tool-call deltas by the streaming parser."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.generate import TokenEvent
from ..text.tool_calls import ContentDelta, StreamingToolParser, ToolCallDelta, new_call_id


class StopStrings:
    """Cuts the text at the first stop string; holds back a tail that could still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else text
        buf = self.held + text
        cut = min((i for s in self.stops if (i := buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.hit, self.held = True, ""
            return buf[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ReplyText:
    """Feed TokenEvents, get Deltas; `finish()` drains what was held back. `stopped` once a stop string hit."""

    def __init__(self, stops: list[str], tools: list[dict] | None, separate_reasoning: bool = True) -> None:
        self.stop = StopStrings(stops)
        self.parser = StreamingToolParser(tools) if tools else None
        self.separate_reasoning = separate_reasoning
        self.call_ids: dict[int, str] = {}

    @property
    def stopped(self) -> bool:
        return self.stop.hit

    def feed(self, event: TokenEvent) -> Delta:
        if event.thinking and self.separate_reasoning:
            return Delta(reasoning="" if self.stop.hit else event.text)
        return self._answer(self.stop.feed(event.text))

    def finish(self) -> Delta:
        delta = self._answer(self.stop.flush())
        if self.parser:
            delta = _merge(delta, self._parsed(self.parser.finish()))
        return delta

    def _answer(self, text: str) -> Delta:
        if self.parser is None:
            return Delta(content=text)
        return self._parsed(self.parser.feed(text)) if text else Delta()

    def _parsed(self, parts: list) -> Delta:
        delta = Delta()
        for part in parts:
            if isinstance(part, ContentDelta):
                delta.content += part.text
            else:
                if part.index not in self.call_ids:  # every call gets an id in its first delta
                    self.call_ids[part.index] = part.id or new_call_id()
                    part.id = self.call_ids[part.index]
                delta.tool_calls.append(part)
        return delta


def _merge(a: Delta, b: Delta) -> Delta:
    return Delta(a.reasoning + b.reasoning, a.content + b.content, a.tool_calls + b.tool_calls)


def join_tool_calls(deltas: list[ToolCallDelta]) -> list[dict]:
    """Tool-call deltas → the `tool_calls` of a whole message."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(
            d.index, {"id": d.id, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        call["id"] = call["id"] or d.id
        call["function"]["name"] += d.name or ""
        call["function"]["arguments"] += d.arguments
    return [calls[i] for i in sorted(calls)]
