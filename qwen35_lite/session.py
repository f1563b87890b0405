"""A conversation over one model cache: each turn feeds only the new tokens, never the history again.

The cache already holds every earlier token, so a new turn feeds only: the ids sampled but not fed at the
end of the last reply, `<|im_end|>\\n` closing it, and the new user turn with the generation prompt.
When the history changes underneath (/system, /load), the next turn re-renders it whole on a fresh cache.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .engine import Engine
from .errors import InputError
from .generate import Finished, GenerationRequest, TokenEvent, generate
from .sampling import SamplingParams
from .tokenizer import StreamDecoder

THINK_MODES = ("on", "off", "hide")


@dataclass
class ChatSettings:
    params: SamplingParams
    max_new_tokens: int
    think: str = "on"  # on | off (template enable_thinking=False) | hide (thinks, not shown)
    system: str | None = None
    raw: bool = False  # no chat template: the text is tokenised as is


@dataclass
class Reply:
    text: str = ""
    thinking: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stats: dict = field(default_factory=dict)


class ChatSession:
    def __init__(self, engine: Engine, settings: ChatSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.messages: list[dict] = []
        self.cache = engine.model.make_cache()
        self.unfed: list[int] = []
        self.fresh = True  # the cache holds nothing: the next prompt is rendered whole

    # --- history -------------------------------------------------------------------------------------
    def clear(self) -> None:
        self.messages = []
        self._reset_cache()

    def set_system(self, text: str | None) -> None:
        self.settings.system = text or None
        self._reset_cache()

    def _reset_cache(self) -> None:
        self.cache = self.engine.model.make_cache()
        self.unfed, self.fresh = [], True

    def save(self, path: Path) -> None:
        data = {"messages": self.messages, "settings": asdict(self.settings)}
        try:
            Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=2))
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror}", "pick a writable path") from e

    def load(self, path: Path) -> None:
        try:
            data = json.loads(Path(path).read_text())
            messages = list(data["messages"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot load a chat from {path}", "pass a file written by /save") from e
        s = data.get("settings", {})
        self.settings.system = s.get("system", self.settings.system)
        self.settings.think = s.get("think", self.settings.think)
        self.messages = messages
        self._reset_cache()

    # --- prompts -------------------------------------------------------------------------------------
    def _render(self, messages: list[dict]) -> str:
        return self.engine.template.render(
            messages, add_generation_prompt=True, enable_thinking=self.settings.think != "off"
        )

    def prompt_ids(self, user_text: str) -> list[int]:
        """The ids to feed for this turn, given what the cache already holds."""
        tok = self.engine.tokenizer
        if self.settings.raw:
            return [*self.unfed, *tok.encode(user_text)]
        user = {"role": "user", "content": user_text}
        if self.fresh:
            system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
            return tok.encode(self._render([*system, *self.messages, user]))
        closing = (
            [] if self.cache.token_ids[-1:] == [tok.token_id("<|im_end|>")] else tok.encode("<|im_end|>\n")
        )
        return [*self.unfed, *closing, *tok.encode(self._render([user]))]

    # --- a turn --------------------------------------------------------------------------------------
    def send(
        self,
        user_text: str,
        cancel: threading.Event | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
    ) -> Iterator[TokenEvent | Finished]:
        """Stream one reply; the history is updated when the reply ends (even if cancelled)."""
        eng, s = self.engine, self.settings
        ids = self.prompt_ids(user_text)
        think_open, think_close = eng.tokenizer.token_id("<think>"), eng.tokenizer.token_id("</think>")
        req = GenerationRequest(
            prompt_ids=ids,
            params=s.params,
            max_new_tokens=s.max_new_tokens,
            stop_ids=eng.defaults.stop_ids,
            think_ids=(think_open, think_close),
            start_in_thinking=_ends_in_thinking(ids, think_open, think_close),
            max_context=eng.max_context,
        )
        reply = Reply(prompt_ids=ids)
        self.last_reply = reply
        for event in generate(
            eng.model, self.cache, req, StreamDecoder(eng.tokenizer), cancel=cancel, on_prefill=on_prefill
        ):
            if isinstance(event, TokenEvent):
                if event.thinking:
                    reply.thinking += event.text
                else:
                    reply.text += event.text
            else:
                reply.tokens, reply.finish_reason, reply.stats = event.tokens, event.reason, event.stats
                self._finish_turn(user_text, reply, event)
            yield event

    def _finish_turn(self, user_text: str, reply: Reply, done: Finished) -> None:
        self.unfed, self.fresh = list(done.unfed), False
        reply.thinking, reply.text = reply.thinking.strip(), reply.text.strip()
        self.messages.append({"role": "user", "content": user_text})
        assistant = {"role": "assistant", "content": reply.text}
        if reply.thinking:
            assistant["reasoning_content"] = reply.thinking
        self.messages.append(assistant)


def _ends_in_thinking(ids: list[int], open_id: int | None, close_id: int | None) -> bool:
    """True when the prompt leaves a <think> block open (the template's generation prompt does)."""
    if open_id is None:
        return False
    last_open = max((i for i, t in enumerate(ids) if t == open_id), default=-1)
    last_close = max((i for i, t in enumerate(ids) if t == close_id), default=-1)
    return last_open > last_close
