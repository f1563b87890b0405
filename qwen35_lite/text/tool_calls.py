"""Qwen3.5 tool calls in a reply: the XML-like markup the chat template asks for, parsed whole or as it streams.

The model writes, possibly after some text and several per turn:

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

Values are raw text, converted to the JSON type the tool's schema declares for that parameter (as vLLM's
qwen3_coder parser does); unknown tools and parameters keep strings. A block that is not a whole call (no
`</tool_call>`, no `<function=NAME>`, no `</function>`) stays in the content as written: never dropped,
never an error. Whole-reply and streaming parsing share one scanner, so they always agree.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InputError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"
# The body of one call: the function's name (one line, no markup) and everything up to its last </function>.
FUNCTION_BODY = re.compile(r"\s*<function=([^<>\n]+)>(.*)</function>\s*", re.DOTALL)
SPACE = re.compile(r"\s*")
STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")
TOOLS_HINT = 'give a JSON list of {"type": "function", "function": {"name", "description", "parameters"}}'


@dataclass
class ToolCall:
    id: str  # "call_" + 24 random hex digits
    name: str
    arguments: str  # a JSON object as a string


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    index: int  # 0, 1, ... in the order the calls appear
    id: str | None = None  # set on the first delta of a call
    name: str | None = None  # set on the first delta of a call
    arguments: str = ""  # a piece of the JSON arguments string; the pieces of one call join to it


def parse_tool_calls(text: str, tools: list[dict] | None) -> tuple[str, list[ToolCall]]:
    """A whole reply -> (content without the tool-call markup, stripped; the calls in order)."""
    parser = StreamingToolParser(tools)
    deltas = parser.feed(text) + parser.finish()
    return "".join(d.text for d in deltas if isinstance(d, ContentDelta)), parser.calls


class StreamingToolParser:
    """Text as generated -> content and call deltas. Text that may still open a call is held back.

    Content comes out stripped as a whole: leading whitespace is dropped and trailing whitespace waits until
    more content follows, so the content deltas of a reply join to exactly parse_tool_calls' content.
    """

    def __init__(self, tools: list[dict] | None) -> None:
        self._schemas = _parameter_schemas(tools)
        self._pending = ""  # text not yet decided: a possible (start of a) call
        self._close_from = 0  # where the held call's </tool_call> may start: each text is searched once
        self._space = ""  # whitespace after the content so far, sent only if more content follows
        self._started = False  # some content was sent
        self._calls: list[ToolCall] = []

    @property
    def calls(self) -> list[ToolCall]:
        """The complete calls seen so far."""
        return list(self._calls)

    def feed(self, text: str) -> list[ContentDelta | ToolCallDelta]:
        """Text as it is generated (any split, even inside a tag) -> deltas; markup that may still be a
        tool call is held back, so no half-parsed markup ever leaks into content."""
        self._pending += text
        return self._scan(final=False)

    def finish(self) -> list[ContentDelta | ToolCallDelta]:
        """End of the reply: flush what was held back (an unfinished call becomes content)."""
        return self._scan(final=True)

    def _scan(self, final: bool) -> list[ContentDelta | ToolCallDelta]:
        out: list[ContentDelta | ToolCallDelta] = []
        text = self._pending
        while True:
            start = text.find(CALL_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(text, CALL_OPEN)
                self._content(text[: len(text) - keep], out)
                text = text[len(text) - keep :]
                break
            self._content(text[:start], out)
            text = text[start:]
            decided = _call_extent(text, self._close_from)
            if decided is None:  # undecided until more text comes
                self._close_from = max(0, len(text) - len(CALL_CLOSE) + 1)
                if final:
                    self._content(text, out)
                    text, self._close_from = "", 0
                break
            self._close_from = 0
            call = self._call(text[len(CALL_OPEN) : decided - len(CALL_CLOSE)]) if decided else None
            if call is None:  # not a call: its opening tag is content, and the scan goes on after it
                end = len(CALL_OPEN)
                self._content(text[:end], out)
            else:
                end = decided
                out.append(ToolCallDelta(len(self._calls), call.id, call.name, call.arguments))
                self._calls.append(call)
            text = text[end:]
        self._pending = text
        return out

    def _content(self, text: str, out: list) -> None:
        """Send content, stripped as a whole: leading whitespace never, trailing only once more follows."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        body = text.rstrip()
        if not body:
            self._space += text
            return
        piece = self._space + body
        self._space = text[len(body) :]
        if out and isinstance(out[-1], ContentDelta):
            out[-1].text += piece
        else:
            out.append(ContentDelta(piece))

    def _call(self, body: str) -> ToolCall | None:
        """The call in the text between <tool_call> and </tool_call>, or None when it is not one."""
        match = FUNCTION_BODY.fullmatch(body)
        if match is None or not match.group(1).strip():
            return None
        name = match.group(1).strip()
        schema = self._schemas.get(name, {})
        arguments = {key: convert_value(value, schema.get(key)) for key, value in _parameters(match.group(2))}
        return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


def _call_extent(text: str, close_from: int = 0) -> int | None:
    """For text starting with <tool_call>: the length of the call block through its </tool_call>; 0 when
    the tag opens no call (no <function= after it); None when more text is needed to tell.
    close_from: no </tool_call> starts before it (a streamed call is not searched again from its start)."""
    start = SPACE.match(text, len(CALL_OPEN)).end()
    head = text[start : start + len(FUNCTION_OPEN)]
    if len(head) < len(FUNCTION_OPEN):
        return None if FUNCTION_OPEN.startswith(head) else 0
    if head != FUNCTION_OPEN:
        return 0
    close = text.find(CALL_CLOSE, max(len(CALL_OPEN), close_from))
    return None if close < 0 else close + len(CALL_CLOSE)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is the start of `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _parameters(body: str) -> list[tuple[str, str]]:
    """(name, raw value) of each <parameter=NAME>VALUE</parameter>; a value missing its closing tag ends at
    the next <parameter= or at the end of the function, as vLLM reads it."""
    found, pos = [], 0
    while (start := body.find(PARAM_OPEN, pos)) >= 0:
        name_end = body.find(">", start)
        if name_end < 0:
            break
        name = body[start + len(PARAM_OPEN) : name_end].strip()
        close = body.find(PARAM_CLOSE, name_end)
        following = body.find(PARAM_OPEN, name_end)
        if close >= 0 and (following < 0 or close < following):
            value, pos = body[name_end + 1 : close], close + len(PARAM_CLOSE)
        elif following >= 0:
            value, pos = body[name_end + 1 : following], following
        else:
            value, pos = body[name_end + 1 :], len(body)
        found.append((name, _strip_one_newline(value)))
    return found


def _strip_one_newline(value: str) -> str:
    # The template writes "<parameter=X>\n" + value + "\n</parameter>": exactly one newline each side.
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def convert_value(raw: str, schema: object) -> object:
    """A parameter's raw text as the JSON type its schema declares; the text itself when there is no schema
    for it, the schema says string, or the text does not read as the declared type."""
    types = _declared_types(schema)
    if not types or any(t in STRING_TYPES for t in types):
        return raw
    text = raw.strip()
    if text.lower() == "null":
        return None
    for kind in types:
        value = _as_type(text, kind)
        if value is not _NOT_THIS_TYPE:
            return value
    return raw


_NOT_THIS_TYPE = object()


def _as_type(text: str, kind: str) -> object:
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            return int(text)
        except ValueError:
            return _NOT_THIS_TYPE
    if kind.startswith(("num", "float", "double")):
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return _NOT_THIS_TYPE
        return number if math.isfinite(number) else _NOT_THIS_TYPE  # JSON has no NaN or Infinity
    if kind in ("boolean", "bool", "binary"):
        return {"true": True, "false": False}.get(text.lower(), _NOT_THIS_TYPE)
    if kind == "null":
        return _NOT_THIS_TYPE  # "null" itself was taken before
    return _as_json(text)  # object, array, and types we do not know: JSON if it reads as JSON


def _as_json(text: str) -> object:
    """JSON, else a Python literal of dicts and lists (models write {'a': 1} too), else not this type."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        value = ast.literal_eval(text)
        json.dumps(value)  # only what JSON can hold: no tuples as keys, sets, bytes
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_THIS_TYPE
    return value if isinstance(value, dict | list) else _NOT_THIS_TYPE


def _declared_types(schema: object) -> list[str]:
    """The schema's type names, lower case: "type" as a string or a list (["integer", "null"])."""
    if not isinstance(schema, Mapping):
        return []
    declared = schema.get("type")
    names = declared if isinstance(declared, list) else [declared]
    return [n.strip().lower() for n in names if isinstance(n, str)]


def _parameter_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """Tool name -> its parameters' schemas, from OpenAI-style tools ({"type": "function", "function":
    {...}}) or bare function dicts; entries of any other shape are skipped, never an error."""
    schemas: dict[str, dict] = {}
    for tool in tools or []:
        if not isinstance(tool, Mapping):
            continue
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        schemas[function["name"]] = dict(properties) if isinstance(properties, Mapping) else {}
    return schemas


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def check_tools(tools: object, where: str = "the tools") -> list[dict]:
    """OpenAI-style tools, checked: a non-empty list of {"type": "function", "function": {"name", ...}}
    with a string name, an optional string description and an optional object of parameters."""
    if not isinstance(tools, list):
        raise InputError(f"{where} must be a JSON list of tools, not {_kind(tools)}", TOOLS_HINT)
    if not tools:
        raise InputError(f"{where} holds no tools", TOOLS_HINT)
    for i, tool in enumerate(tools, 1):
        what = f"{where}: tool {i}"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise InputError(f'{what} is not an object with "type": "function"', TOOLS_HINT)
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InputError(f'{what} has no "function" object', TOOLS_HINT)
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f'{what} has no "name"', TOOLS_HINT)
        if not isinstance(function.get("description", ""), str):
            raise InputError(f'{what} ({name}): "description" must be a string', TOOLS_HINT)
        if not isinstance(function.get("parameters", {}), Mapping):
            raise InputError(f'{what} ({name}): "parameters" must be a JSON schema object', TOOLS_HINT)
    return tools


def _kind(value: object) -> str:
    names = {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)
