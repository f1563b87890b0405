"""The OpenAI request bodies the server accepts, and what they become: chat-template messages, sampling
settings, stop strings. Every problem is an APIError carrying the HTTP status and OpenAI's error fields."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError
from ..runtime.sampling import BAN, SAMPLING_KEYS, SamplingParams
from ..runtime.settings import check_setting
from ..text.tool_calls import check_tools

MAX_TOP_LOGPROBS = 20  # OpenAI's cap (and vLLM's default max_logprobs)

ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, "invalid_value")


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields both endpoints share; unknown fields are accepted and ignored, as OpenAI's peers do."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None  # -1: random, as some clients send it
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's JSON) -> bias
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprob_count(self) -> int | None:
        """None: no log probabilities; k: the chosen token's and the k likeliest."""
        return None


class ChatRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # vLLM's: fps and max_frames of the video parts

    def video_sampling(self) -> tuple[float | None, int | None]:
        """(fps, max_frames) for every video of the request (None: the checkpoint's)."""
        kwargs = self.mm_processor_kwargs or {}
        for key in kwargs:
            if key not in ("fps", "max_frames", "do_sample_frames"):
                raise bad_request(
                    f"mm_processor_kwargs.{key} is not supported (fps, max_frames)", "mm_processor_kwargs"
                )
        fps, frames = kwargs.get("fps"), kwargs.get("max_frames")
        if kwargs.get("do_sample_frames", True) is not True:
            raise bad_request("mm_processor_kwargs.do_sample_frames must be true", "mm_processor_kwargs")
        if fps is not None and not (
            isinstance(fps, int | float) and not isinstance(fps, bool) and 0 < fps <= 1000
        ):
            raise bad_request("mm_processor_kwargs.fps must be a number above 0", "mm_processor_kwargs")
        if frames is not None and not (
            isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1
        ):
            raise bad_request(
                "mm_processor_kwargs.max_frames must be a whole number of 1 or more", "mm_processor_kwargs"
            )
        return (float(fps) if fps is not None else None), frames

    def logprob_count(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def reply_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def enable_thinking(self) -> bool:
        value = (self.chat_template_kwargs or {}).get("enable_thinking", True)
        if not isinstance(value, bool):
            raise bad_request(
                "chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs"
            )
        return value

    def template_variables(self) -> dict[str, Any]:
        """The other chat_template_kwargs, passed to the template as vLLM passes them (the arguments
        the server sets itself cannot be overridden this way)."""
        reserved = {"enable_thinking", "messages", "tools", "add_generation_prompt", "documents"}
        kwargs = self.chat_template_kwargs or {}
        for key in kwargs:
            if key in UNSETTABLE:
                raise bad_request(
                    f"chat_template_kwargs.{key} cannot be set: it names the template's own {key!r}",
                    "chat_template_kwargs",
                )
        return {k: v for k, v in kwargs.items() if k not in reserved}


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # the legacy API: the top k
    echo: bool = False  # the prompt's text before the completion's

    def logprob_count(self) -> int | None:
        if self.echo and self.logprobs is not None:
            raise bad_request(
                "echo with logprobs (log probabilities of the prompt's tokens) is not supported:"
                " send echo or logprobs",
                "echo",
            )
        return self.logprobs

    def reply_cap(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise bad_request("one prompt per request (a list of one string at most)", "prompt")
        return self.prompt[0]


# Names a request cannot pass to the template: render's own parameter, and the template's functions.
UNSETTABLE = frozenset(
    {"self", "namespace", "raise_exception", "strftime_now", "dict", "range", "lipsum", "cycler", "joiner"}
)


def sampling_params(req: SamplingFields, defaults: SamplingParams) -> SamplingParams:
    """The checkpoint's defaults (generation_config.json), overridden by every field the request sets,
    each checked against the ranges the CLI flags and /set use."""
    overrides = {k: getattr(req, k) for k in SAMPLING_KEYS if getattr(req, k) is not None}
    if overrides.get("seed") == -1:  # "random", as some UIs send it
        overrides["seed"] = None
    for key, value in overrides.items():
        try:
            check_setting(key, value)
        except InputError as e:
            raise bad_request(e.message, key) from None
    return replace(defaults, **overrides, logit_bias=logit_bias(req.logit_bias), logprobs=req.logprob_count())


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias (string token ids -> -100..100) as ids -> bias; the vocabulary bound is the
    sampler's (sampling.bias_vector)."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.strip().isdigit():
            raise bad_request(f"logit_bias: {key!r} is not a token id", "logit_bias")
        if not BAN <= value <= -BAN:
            raise bad_request(f"logit_bias: {value} for token {key} is outside -100..100", "logit_bias")
        out[int(key)] = float(value)
    return out


# ---- structured outputs ----------------------------------------------------------------------------


def answer_grammar(
    req: ChatRequest, tools: list[dict] | None, token_id: Callable[[str], int | None]
) -> str | None:
    """The grammar the answer must follow (constrain.py), or None: response_format json_object /
    json_schema, and tool_choice "required" or a named function (the calls of `tools`, the tools
    template_tools rendered). With tool_choice "auto" and a response format, the answer is JSON of it or
    tool calls. token_id: the tokenizer's, for the markup's special tokens."""
    from ..runtime.constrain import check_grammar, json_grammar, tool_grammar

    schema = response_schema(req.response_format)
    choice = req.tool_choice
    forced = choice == "required" or isinstance(choice, dict)
    if forced and not tools:
        raise bad_request('tool_choice "required" needs tools', "tool_choice")
    parallel = req.parallel_tool_calls is not False
    if forced:
        grammar, what = tool_grammar(tools, token_id, parallel), "tools"
    elif schema is False:
        return None
    elif tools:
        grammar, what = tool_grammar(tools, token_id, parallel, content_schema=schema), "response_format"
    else:
        grammar, what = json_grammar(schema), "response_format"
    try:
        check_grammar(grammar, what)
    except InputError as e:
        raise bad_request(e.message, what) from None
    return grammar


def response_schema(form: dict[str, Any] | None) -> dict | None | Literal[False]:
    """response_format -> the JSON schema to enforce (None: any JSON object), or False for free text."""
    from ..runtime.constrain import check_schema

    kind = (form or {}).get("type", "text")
    if kind == "text":
        return False
    if kind == "json_object":
        return None
    if kind != "json_schema":
        raise bad_request(
            f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
            "response_format",
        )
    spec = form.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise bad_request('response_format json_schema needs {"name", "schema"}', "response_format")
    try:
        return check_schema(spec["schema"], "response_format.json_schema.schema")
    except InputError as e:
        raise bad_request(e.message, "response_format") from None


# ---- messages --------------------------------------------------------------------------------------


def template_tools(req: ChatRequest) -> list[dict] | None:
    """The tools the template renders, as tool_choice selects them.

    tool_choice "none" renders no tools at all, so the model is never told it has any (the model cannot
    call what it was not shown, and nothing has to be dropped afterwards); a named function renders only
    that tool ("required" is taken as "auto": nothing constrains the sampler)."""
    choice, tools = req.tool_choice, req.tools or None  # [] as no tools: some clients always send the key
    if tools is not None:
        try:
            check_tools(tools)
        except InputError as e:
            raise bad_request(e.message, "tools") from None
    if choice in (None, "auto", "required"):
        return tools
    if choice == "none":
        return None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request(
            'tool_choice must be "auto", "none", "required" or {"type": "function", ...}', "tool_choice"
        )
    named = [t for t in tools or [] if t["function"].get("name") == name]
    if not named:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return named


def template_messages(
    messages: list[dict],
    to_file: Callable[..., str],
    video_sampling: tuple[float | None, int | None] = (None, None),
) -> tuple[list[dict], list[Any]]:
    """OpenAI messages → what the chat template takes, and the media in placeholder order (image paths,
    and Video parts sampled at video_sampling's (fps, max_frames)).

    Image parts become {"type": "image", "image": path}, the path being what to_file(url, n) makes of the
    n-th image's url (media.image_file: a data URL decoded, an allowed local file resolved); video_url
    parts become {"type": "video", "video": path} from to_file(url, n, "video"); assistant
    tool calls whose arguments are a JSON string are parsed to objects, as vLLM does, since Qwen's
    template iterates over them (anything but an object is refused)."""
    out, images = [], []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(
                f"messages[{i}] has an unknown role {role!r} (use one of {', '.join(ROLES)})", "messages"
            )
        m = dict(message)
        if role == "developer":
            m["role"] = "system"
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = [
                _content_part(part, f"messages[{i}]", to_file, images, video_sampling) for part in content
            ]
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of parts", "messages")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise bad_request(f"messages[{i}].tool_calls must be a list of tool calls", "messages")
        if calls:
            m["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(m)
    return out, images


def _content_part(
    part: Any,
    where: str,
    to_file: Callable[..., str],
    images: list[Any],
    video_sampling: tuple[float | None, int | None] = (None, None),
) -> dict:
    if not isinstance(part, dict):
        raise bad_request(f"{where}: a content part must be an object", "messages")
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        path = to_file(url, len(images))
        images.append(path)
        return {"type": "image", "image": path}
    if kind == "video_url":
        from ..runtime.video import Video

        url = part.get("video_url")
        url = url.get("url") if isinstance(url, dict) else url
        path = to_file(url, len(images), "video")
        images.append(Video(path, *video_sampling))
        return {"type": "video", "video": path}
    raise bad_request(
        f"{where}: content part type {kind!r} is not supported (text, image_url, video_url)", "messages"
    )


def _tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise bad_request(f"{where}: each tool call needs a function", "messages")
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise bad_request(f"{where}.function.arguments is not valid JSON", "messages") from None
    if not isinstance(arguments, dict):  # the template iterates over its items
        raise bad_request(f"{where}.function.arguments must be a JSON object", "messages")
    return {**call, "function": {**function, "arguments": arguments}}


def image_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="qwen35-lite-images-")


Finish = Literal["stop", "length", "tool_calls"]


def finish_reason(reason: str, stopped_by_string: bool, tool_calls: bool) -> Finish:
    """Generation's reasons in OpenAI's words: the context running out is `length`, like the cap."""
    if tool_calls:
        return "tool_calls"
    if stopped_by_string or reason in ("stop", "cancelled"):
        return "stop"
    return "length"
