"""Chat templates: the checkpoint's own Jinja template (else our built-in Qwen3.5 one), rendered as transformers
renders them (`apply_chat_template`), so prompts match what the model was trained and evaluated with."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils

from ..errors import CheckpointError, InputError
from .template_sandbox import LimitedSandbox, TemplateLimitError, limited_filter

BUILTIN_TEMPLATE = Path(__file__).resolve().parents[1] / "assets" / "chat_template.jinja"
# transformers passes the tokenizer's special tokens to every template (some read `bos_token` / `eos_token`).
SPECIAL_TOKEN_KEYS = tuple(f"{name}_token" for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))
# transformers also accepts reasoning under these older names and copies it to `reasoning_content`/`thinking`.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
FIX_TEMPLATE_HINT = "fix or delete that template; without one the built-in Qwen3.5 template is used"
# What a render can raise that is the template's or the conversation's fault, not ours.
RENDER_FAILURES = (
    TemplateLimitError,
    RecursionError,
    MemoryError,
    ArithmeticError,
    jinja2.TemplateError,
    TypeError,
    ValueError,
    KeyError,
    AttributeError,
    IndexError,
)


class ChatTemplate:
    """A compiled chat template. `source` is "checkpoint" or "built-in"; `origin` names the file it came from."""

    def __init__(
        self, text: str, source: str, origin: str, special_tokens: dict[str, str] | None = None
    ) -> None:
        self.text, self.source, self.origin = text, source, origin
        self.special_tokens = dict(special_tokens or {})
        if not text.strip():
            raise CheckpointError(f"the chat template in {origin} is empty", FIX_TEMPLATE_HINT)
        try:
            self._env = _environment()
            self._template = self._env.from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(
                f"the chat template in {origin} does not compile: {exc.message} (line {exc.lineno})",
                FIX_TEMPLATE_HINT,
            ) from exc
        except (RecursionError, MemoryError, TemplateLimitError) as exc:
            raise CheckpointError(
                f"the chat template in {origin} does not compile: it is nested too deeply or too large",
                FIX_TEMPLATE_HINT,
            ) from exc

    @classmethod
    def from_dir(cls, model_dir: Path) -> ChatTemplate:
        """The checkpoint's template: chat_template.jinja, then chat_template.json (the processor's), then
        tokenizer_config.json's `chat_template`; the built-in Qwen3.5 template only when it has none."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        special = {key: _token_text(config[key]) for key in SPECIAL_TOKEN_KEYS if config.get(key)}
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(_read_text(jinja_file), "checkpoint", str(jinja_file), special)
        processor_file = model_dir / "chat_template.json"
        if isinstance(text := _read_json(processor_file).get("chat_template"), str):
            return cls(text, "checkpoint", str(processor_file), special)
        text = _pick_default(config.get("chat_template"), model_dir / "tokenizer_config.json")
        if text is not None:
            return cls(text, "checkpoint", str(model_dir / "tokenizer_config.json"), special)
        return cls(BUILTIN_TEMPLATE.read_text(encoding="utf-8"), "built-in", str(BUILTIN_TEMPLATE), special)

    @classmethod
    def builtin(cls) -> ChatTemplate:
        """Our Qwen3.5 template alone (tests, and raw directories with no tokenizer files)."""
        return cls(BUILTIN_TEMPLATE.read_text(encoding="utf-8"), "built-in", str(BUILTIN_TEMPLATE))

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: list | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`, exactly as transformers' apply_chat_template(tokenize=False) gives it.

        Like transformers: keys whose value is None are dropped (templates test presence, not None),
        `thinking` / `reasoning` are aliased to `reasoning_content`, everything is rebuilt from plain types
        before the sandbox sees it, and the special tokens are visible as variables (extra overrides them).
        """
        if not messages:
            raise InputError("no messages to render", "pass at least one message")
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise InputError(
                    f"a chat message must be a dict, got {type(message).__name__}", "use {'role', 'content'}"
                )
            chat.append(_alias_reasoning({k: v for k, v in _plain(message).items() if v is not None}))
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise InputError(
                "tools must be JSON-schema dicts", 'pass [{"type": "function", "function": {...}}]'
            )
        variables = {**self.special_tokens, **_plain(extra), "enable_thinking": enable_thinking}
        try:
            return self._env.render_bounded(  # the text of Template.render, under time and size bounds
                self._template,
                messages=chat,
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except InputError:
            raise
        except RENDER_FAILURES as exc:
            raise self._render_error(exc) from exc

    def _render_error(self, exc: BaseException) -> InputError:
        """The template's own fault (a bound, endless recursion, arithmetic), else one with these messages."""
        where = f"the chat template ({self.origin})"
        if isinstance(exc, TemplateLimitError):
            return InputError(f"{where} {exc}", FIX_TEMPLATE_HINT)
        if isinstance(exc, RecursionError | MemoryError):
            what = (
                "stack (endless recursion?)" if isinstance(exc, RecursionError) else "memory (a huge value?)"
            )
            return InputError(f"{where} ran out of {what}", FIX_TEMPLATE_HINT)
        if isinstance(exc, ArithmeticError):
            return InputError(f"{where} failed: {_short(exc)}", FIX_TEMPLATE_HINT)
        return InputError(
            f"{where} failed on these messages: {_short(exc)}",
            "check the roles and content format; the template may not support this conversation shape",
        )


def _raise_exception(message: str) -> None:
    raise InputError(f"the chat template rejected the conversation: {message}", "fix the messages as it says")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators=None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, ') into \u003c...; templates expect plain JSON, as transformers gives.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, as transformers' does (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 - Jinja's own signature trick
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _environment() -> LimitedSandbox:
    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = limited_filter(_tojson)
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        namespace=_Namespace,
        dict=lambda *args, **kwargs: dict(*args, **kwargs),
    )
    return env


def _plain(value: Any) -> Any:
    """Rebuild data from JSON-like types; other objects (images, arrays) become "<TypeName>" placeholders,
    because the sandbox cannot vouch for their methods. Templates only test media keys for presence."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # numpy scalars: np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {_short(exc)}", "download the file again") from exc
    return data if isinstance(data, dict) else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"the chat template in {path} is not UTF-8 text", FIX_TEMPLATE_HINT) from exc


def _short(exc: BaseException) -> str:
    """An exception's text cut to one short line (a template's error may quote a huge value)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, Mapping) else str(token)


def _pick_default(value: Any, path: Path) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"} of which we take "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise CheckpointError(
            f"{path} has several chat templates ({', '.join(map(str, named))}) but none named 'default'",
            "add a chat_template.jinja file to the checkpoint",
        )
    raise CheckpointError(f"{path}: chat_template must be a string or a list", "fix or remove that entry")
