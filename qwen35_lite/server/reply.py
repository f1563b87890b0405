"""One reply's text as OpenAI deltas: reasoning apart from content, stop strings cut (and never streamed
in part), tool-call markup turned into tool-call deltas by the streaming parser, and each answer token's
log probabilities (when asked for) in OpenAI's shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.generate import TokenEvent
from ..text.tokenizer import Tokenizer
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
class TokenLogprob:
    """One answer token: its id and log probability, and the likeliest (id, logprob) pairs."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the answer tokens this delta carries

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls or self.logprobs)


class ReplyText:
    """Feed TokenEvents, get Deltas; `finish()` drains what was held back. `stopped` once a stop string hit.

    Log probabilities (events that carry them) are kept for the answer's tokens (not the reasoning's,
    not after a stop string) and ride on the next delta with content or calls, so the entries of a
    stream's chunks join to those of the whole reply."""

    def __init__(self, stops: list[str], tools: list[dict] | None, separate_reasoning: bool = True) -> None:
        self.stop = StopStrings(stops)
        self.parser = StreamingToolParser(tools) if tools else None
        self.separate_reasoning = separate_reasoning
        self.call_ids: dict[int, str] = {}
        self.pending: list[TokenLogprob] = []

    @property
    def stopped(self) -> bool:
        return self.stop.hit

    def feed(self, event: TokenEvent) -> Delta:
        if event.thinking and self.separate_reasoning:
            return Delta(reasoning="" if self.stop.hit else event.text)
        if event.logprobs is not None and event.id >= 0 and not self.stop.hit:
            self.pending.append(TokenLogprob(event.id, event.logprobs.logprob, event.logprobs.top))
        return self._carry(self._answer(self.stop.feed(event.text)))

    def finish(self) -> Delta:
        delta = self._answer(self.stop.flush())
        if self.parser:
            delta = _merge(delta, self._parsed(self.parser.finish()))
        delta.logprobs, self.pending = delta.logprobs + self.pending, []
        return delta

    def _carry(self, delta: Delta) -> Delta:
        if self.pending and (delta.content or delta.tool_calls):
            delta.logprobs, self.pending = self.pending, []
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
    return Delta(
        a.reasoning + b.reasoning, a.content + b.content, a.tool_calls + b.tool_calls, a.logprobs + b.logprobs
    )


# ---- log probabilities in OpenAI's shapes ------------------------------------------------------------


class TokenTexts:
    """Each id's bytes and text (the bytes decoded, U+FFFD for a piece of a character), as OpenAI reports a
    token; the tokenizer builds the table once (shared with a response format's grammar)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def bytes(self, token: int) -> bytes:
        return self.tokenizer.bytes_of(token)

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", "replace")


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict:
    """Chat Completions' `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""

    def one(token: int, logprob: float) -> dict:
        return {"token": texts.text(token), "logprob": logprob, "bytes": list(texts.bytes(token))}

    content = [{**one(e.id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], texts: TokenTexts, offset: int = 0) -> dict:
    """The legacy Completions `logprobs`: parallel lists of tokens, their log probabilities, the top ones
    (token text -> logprob) and each token's character offset in the returned text (from `offset`)."""
    tokens = [texts.text(e.id) for e in entries]
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{texts.text(i): lp for i, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


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
