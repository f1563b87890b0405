"""The Responses API request (`POST /v1/responses`) and its translation into the Chat Completions request
the chat path serves, so everything that path does (the template, images, tools, tool_choice, structured
outputs, sampling, the state cache) applies to both alike.

Input items become chat messages as vLLM translates them: a message's input_text/output_text parts become
text parts and input_image parts image_url parts; a function_call joins the assistant message before it
(or starts one) as a tool call; a function_call_output is a tool message; a reasoning item's text is the
next assistant message's reasoning_content. Tools are Responses' flat `{"type": "function", "name", ...}`,
tool_choice `{"type": "function", "name"}`, text.format becomes response_format and reasoning.effort
turns thinking on or off."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .protocol import ChatRequest, bad_request

# Sampling fields the chat request takes as they are (extensions over OpenAI's Responses API, as vLLM's).
PASSED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "logit_bias",
    "top_logprobs",
)
# reasoning.effort values that turn thinking off (Qwen3.5 thinks or does not: there are no degrees).
NO_THINKING = ("none", "minimal")


class ResponsesRequest(BaseModel):
    """The fields served; unknown ones (store options, truncation, include, ...) are accepted and
    ignored, as for the chat endpoints."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def input_items(self) -> list[dict[str, Any]]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return list(self.input)

    def thinking(self) -> bool | None:
        """reasoning.effort as thinking on/off; None when the request does not say (the server decides)."""
        effort = (self.reasoning or {}).get("effort")
        if effort is None:
            return None
        if not isinstance(effort, str):
            raise bad_request("reasoning.effort must be a string", "reasoning")
        return effort not in NO_THINKING


def chat_request(req: ResponsesRequest, history: list[dict[str, Any]]) -> ChatRequest:
    """The ChatRequest equivalent to `req`, after the items of `history` (a previous response's
    conversation). Problems are 400s naming the Responses field."""
    messages = chat_messages([*history, *req.input_items()])
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    if not messages:
        raise bad_request("input is empty", "input")
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "stream": req.stream,
        "max_completion_tokens": req.max_output_tokens,
    }
    if req.tools:
        body["tools"] = [chat_tool(t, i) for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"] = chat_tool_choice(req.tool_choice)
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if (fmt := response_format(req.text)) is not None:
        body["response_format"] = fmt
    extras = {**(req.model_extra or {}), "temperature": req.temperature, "top_p": req.top_p}
    body.update({k: extras[k] for k in PASSED if extras.get(k) is not None})
    if body.get("top_logprobs") is not None:
        body["logprobs"] = True
    kwargs = dict(req.chat_template_kwargs or {})
    if (thinking := req.thinking()) is not None:
        kwargs.setdefault("enable_thinking", thinking)  # chat_template_kwargs, more specific, wins
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    try:
        return ChatRequest(**body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        where = {"messages": "input", "max_completion_tokens": "max_output_tokens"}.get(where, where)
        raise bad_request(f"{where}: {first.get('msg', 'malformed')}", where.split(".")[0]) from None


def chat_messages(items: list[Any]) -> list[dict[str, Any]]:
    """Responses input items (and output items sent back) -> chat messages."""
    out: list[dict[str, Any]] = []
    reasoning: str | None = None  # a reasoning item's text, for the next assistant message
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", "input")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "reasoning":
            reasoning = _reasoning_text(item)
        elif kind == "message":
            message = _message(item, where)
            if message["role"] == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            out.append(message)
        elif kind == "function_call":
            call = _function_call(item, where)
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant" or reasoning is not None:
                last = {"role": "assistant", "content": ""}
                if reasoning is not None:
                    last["reasoning_content"], reasoning = reasoning, None
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _output(item, where)})
        else:
            raise bad_request(
                f"{where}: item type {kind!r} is not supported (message, function_call,"
                " function_call_output, reasoning)",
                "input",
            )
    return out


def _message(item: dict, where: str) -> dict[str, Any]:
    role, content = item.get("role"), item.get("content")
    if isinstance(content, list):
        content = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    elif content is not None and not isinstance(content, str):
        raise bad_request(f"{where}.content must be a string or a list of parts", "input")
    return {"role": role, "content": content}


def _part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be an object", "input")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal", ""))}
    if kind == "input_image":
        url = part.get("image_url")
        if not url:
            raise bad_request(
                f"{where}: input_image needs an image_url (a data URL; file_id is not served)", "input"
            )
        return {"type": "image_url", "image_url": {"url": url}}
    raise bad_request(
        f"{where}: content part type {kind!r} is not supported (input_text, output_text, input_image)",
        "input",
    )


def _function_call(item: dict, where: str) -> dict[str, Any]:
    name, arguments = item.get("name"), item.get("arguments", "")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise bad_request(
            f"{where}: a function_call needs a name and its arguments as a JSON string", "input"
        )
    call_id = item.get("call_id") or item.get("id")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _output(item: dict, where: str) -> str | list[dict[str, Any]]:
    output = item.get("output", "")
    if isinstance(output, list):
        return [_part(p, f"{where}.output[{j}]") for j, p in enumerate(output)]
    if not isinstance(output, str):
        raise bad_request(f"{where}.output must be a string or a list of parts", "input")
    return output


def _reasoning_text(item: dict) -> str:
    parts = item.get("content") or item.get("summary") or []
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


def chat_tool(tool: Any, i: int) -> dict[str, Any]:
    """Responses' flat function tool -> the chat shape `{"type": "function", "function": {...}}`."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise bad_request(f"tools[{i}]: tool type {kind!r} is not supported (function only)", "tools")
    if "function" in tool:  # already the chat shape: some clients send it here too
        return tool
    function = {
        k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None
    }
    return {"type": "function", "function": function}


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """ "auto" / "none" / "required" as they are; `{"type": "function", "name"}` -> the chat shape."""
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if isinstance(choice.get("function"), dict):
        return choice
    raise bad_request(
        'tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}', "tool_choice"
    )


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """text.format -> the chat response_format (None for plain text)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise bad_request(f"text.format type {kind!r} is not supported (text, json_object, json_schema)", "text")
