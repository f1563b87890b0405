"""A conversation over one model cache: each turn feeds only the new tokens, never the history again.

The cache already holds every earlier token, so a new turn feeds only: the ids sampled but not fed at the
end of the last reply, `<|im_end|>\\n` closing it, and the new user turn with the generation prompt.
When the history changes underneath (/system, /load), the next turn re-renders it whole on a fresh cache.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError
from ..text.tokenizer import StreamDecoder
from ..text.tool_calls import ToolCall, parse_tool_calls
from . import scripted
from .chat_file import read_save, write_atomic
from .constrain import answer_constraint
from .engine import Engine
from .generate import Finished, GenerationRequest, TokenEvent, context_hint, generate
from .sampling import REQUEST_ONLY, SamplingParams
from .settings import THINK_MODES  # noqa: F401  (chat_repl takes it from here)
from .video import Video


@dataclass
class ChatSettings:
    params: SamplingParams
    max_new_tokens: int
    think: str = "on"  # on | off (template enable_thinking=False) | hide (thinks, not shown)
    system: str | None = None
    raw: bool = False  # no chat template: the text is tokenised as is
    grammar: str | None = None  # the answer must follow it (constrain.py: --json-schema)


@dataclass
class Reply:
    text: str = ""  # the answer as generated (untrimmed); with tools, without the tool-call markup (trimmed)
    thinking: str = ""  # as generated
    tokens: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stats: dict = field(default_factory=dict)
    tool_calls: list[ToolCall] = field(default_factory=list)


class ChatSession:
    def __init__(self, engine: Engine, settings: ChatSettings, tools: list[dict] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.tools = tools  # OpenAI-style tools for the template's system turn; replies are parsed for calls
        self.messages: list[dict] = []
        self.cache = engine.model.make_cache()
        self.unfed: list[int] = []
        self.fresh = True  # the cache holds nothing: the next prompt is rendered whole
        self.last_reply: Reply | None = None
        self.unsent: list[dict] = []  # the end of the history, not yet fed: it goes before the next turn's

    # --- history -------------------------------------------------------------------------------------
    def clear(self) -> None:
        self.messages = []
        self.reset_cache()

    def set_system(self, text: str | None) -> None:
        self.settings.system = text or None
        self.reset_cache()

    def reset_cache(self) -> None:
        """Drop the model state; the next turn re-renders (and re-encodes the images of) the whole history."""
        self.cache = self.engine.model.make_cache()
        self.unfed, self.fresh, self.unsent = [], True, []

    def save(self, path: Path) -> None:
        """Write the conversation as JSON; an existing file is replaced whole or, on any failure, kept."""
        data = {"messages": self.messages, "settings": saved_settings(self.settings)}
        text = json.dumps(data, ensure_ascii=False, indent=2)
        try:
            write_atomic(Path(path), text)
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
            reason = getattr(e, "strerror", None) or str(e)
            raise InputError(
                f"cannot write {path}: {reason}", "pick a writable path (an existing file there is unchanged)"
            ) from e

    def load(self, path: Path) -> None:
        """Resume a conversation written by save(). The whole file is checked first: on any problem this
        raises InputError and the current conversation is unchanged."""
        path = Path(path)
        saved = read_save(path)
        if images := [p for m in saved.messages for p in message_images(m)]:
            # Else every later turn would fail on them: the model must see, and each image must decode
            # (through the same restricted open as --image; the next turn re-encodes them anyway).
            self.engine.check_vision()
            from .multimodal import check_videos, image_room, load_images, split_media  # PIL: with images

            pictures, videos = split_media(images)
            load_images(pictures, self.engine.image_config(), image_room(self.engine))
            check_videos(videos, self.engine.model_dir)  # metadata only: the next turn decodes them
        think = saved.settings.get("think", self.settings.think)
        system = saved.settings.get("system", self.settings.system)
        self._check_fits(saved.messages, system, think)
        self.settings.system, self.settings.think = system, think
        self.messages = saved.messages
        self.reset_cache()

    def _check_fits(self, messages: list[dict], system: str | None, think: str) -> None:
        """Refuse a history the context cannot hold, which would make every later turn fail."""
        history = [*([{"role": "system", "content": system}] if system else []), *messages]
        if not messages or self.settings.raw:
            return
        text = self.engine.template.render(
            history, add_generation_prompt=True, enable_thinking=think != "off", tools=self.tools
        )
        n = self.engine.tokenizer.tokens_over(text, self.engine.max_context)  # never a huge text whole
        if n is not None:
            raise InputError(
                f"the saved chat is at least {n} tokens, over the context of {self.engine.max_context}",
                "start the chat with a larger --ctx to resume it",
            )

    # --- prompts -------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], whole: bool) -> str:
        """whole: the conversation from its start, which alone carries the tools (in the system turn)."""
        return self.engine.template.render(
            messages,
            add_generation_prompt=True,
            enable_thinking=self.settings.think != "off",
            tools=self.tools if whole else None,
        )

    def prompt_ids(self, user_text: str, images: Sequence[Path | str] = ()) -> list[int]:
        """The ids to feed for this turn, given what the cache already holds (one <|image_pad|> per image)."""
        return self._prompt([user_message(user_text, images)])[0]

    def add_unsent(self, messages: list[dict]) -> None:
        """Put messages at the end of the history (tool results of a stopped turn); the next turn feeds them."""
        self.messages.extend(messages)
        if not self.fresh:
            self.unsent.extend(messages)

    def _prompt(self, new: list[dict]) -> tuple[list[int], list[str]]:
        """(ids, image paths in the order of their placeholders) for the part of the chat not yet fed."""
        tok = self.engine.tokenizer
        if self.settings.raw:
            if message_images(new[0]):
                raise InputError("images and videos need the chat template", "drop --raw to send them")
            return [*self.unfed, *self._encode(new[0]["content"])], []
        if self.fresh:
            system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
            history = [*system, *self.messages, *new]
            return self._encode(self._render(history, whole=True)), [
                p for m in history for p in message_images(m)
            ]
        closing = (
            [] if self.cache.token_ids[-1:] == [tok.token_id("<|im_end|>")] else tok.encode("<|im_end|>\n")
        )
        turn = [*self.unsent, *new]
        ids = [*self.unfed, *closing, *self._encode(self._render(turn, whole=False))]
        return ids, [p for m in turn for p in message_images(m)]

    def _encode(self, text: str) -> list[int]:
        """Tokenise this turn's text, refusing first (counted in pieces) a text the context cannot hold:
        tokenising megabytes whole would take more memory than the plan gives it."""
        eng = self.engine
        room = eng.max_context - self.cache.offset - len(self.unfed)
        if (n := eng.tokenizer.tokens_over(text, room)) is not None:
            raise InputError(
                f"the prompt needs at least {self.cache.offset + len(self.unfed) + n} tokens of context "
                f"({len(text.encode('utf-8', 'surrogatepass'))} bytes of text) "
                f"but the limit is {eng.max_context}",
                context_hint(
                    "shorten the prompt",
                    self.cache.offset,
                    eng.max_context,
                    eng.cfg.text.max_position_embeddings,
                ),
            )
        return eng.tokenizer.encode(text)

    # --- a turn --------------------------------------------------------------------------------------
    def send(
        self,
        user_text: str,
        cancel: threading.Event | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
        images: Sequence[Path | str | Video] = (),
        on_encode: Callable[[int, int], None] | None = None,
        on_decode: Callable[[int, int], None] | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> Iterator[TokenEvent | Finished]:
        """Stream one reply; the history is updated when the reply ends (even if cancelled).

        `images` (file paths, and Video parts for videos) go before the text in the user turn, as content
        parts, in order. A bad image or video or one too large for the context raises before anything is
        fed: the history and the cache are unchanged. on_encode(blocks done, total) follows the vision
        tower, on_decode(frames, total) a video's decoding; on_note(line) says what a clip became.
        """
        new = [user_message(user_text, images)]
        return self._turn(new, cancel, on_prefill, on_encode, on_decode, on_note)

    def send_tool_results(
        self,
        messages: list[dict],
        cancel: threading.Event | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
        on_encode: Callable[[int, int], None] | None = None,
    ) -> Iterator[TokenEvent | Finished]:
        """Stream the reply to `tool` messages (the results of the last reply's calls), as send() does."""
        return self._turn(messages, cancel, on_prefill, on_encode)

    def _turn(
        self,
        new: list[dict],
        cancel: threading.Event | None,
        on_prefill: Callable[[int, int], None] | None,
        on_encode: Callable[[int, int], None] | None,
        on_decode: Callable[[int, int], None] | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> Iterator[TokenEvent | Finished]:
        eng, s = self.engine, self.settings
        ids, paths = self._prompt(new)
        embeds = positions = None
        delta, video_stats = 0, {}
        if paths:
            from .multimodal import image_prompt  # PIL and the tower only for prompts with images

            mm = image_prompt(eng, ids, paths, self.cache, on_encode, on_decode, on_note)
            ids, embeds, positions, delta = mm.ids, mm.embeds, mm.positions, mm.rope_delta
            if mm.video_frames:
                video_stats = {"video_frames": mm.video_frames, "video_tokens": mm.video_tokens}
        think_open, think_close = eng.tokenizer.token_id("<think>"), eng.tokenizer.token_id("</think>")
        req = GenerationRequest(
            prompt_ids=ids,
            params=s.params,
            max_new_tokens=s.max_new_tokens,
            stop_ids=eng.defaults.stop_ids,
            think_ids=(think_open, think_close),
            start_in_thinking=_ends_in_thinking(ids, think_open, think_close),
            embeds=embeds,
            positions=positions,
            rope_delta=delta,
            max_context=eng.max_context,
            constraint=answer_constraint(eng, s.grammar),
            script=scripted.next_reply(eng.tokenizer),
        )
        reply = Reply(prompt_ids=ids)
        self.last_reply = reply
        for event in generate(
            eng.model,
            self.cache,
            req,
            StreamDecoder(eng.tokenizer),
            cancel=cancel,
            on_prefill=on_prefill,
            threads=eng.threads,
        ):
            if isinstance(event, TokenEvent):
                if event.thinking:
                    reply.thinking += event.text
                else:
                    reply.text += event.text
            else:
                event.stats.update(video_stats)
                reply.tokens, reply.finish_reason, reply.stats = event.tokens, event.reason, event.stats
                self._finish_turn(new, reply, event)
            yield event

    def _finish_turn(self, new: list[dict], reply: Reply, done: Finished) -> None:
        self.unfed, self.fresh, self.unsent = list(done.unfed), False, []
        # The history takes the reply trimmed, as the chat template renders a turn; reply.text stays the
        # answer exactly as generated (a leading space included), as the server's content is.
        self.messages.extend(new)
        assistant = {"role": "assistant", "content": reply.text.strip()}
        if thinking := reply.thinking.strip():
            assistant["reasoning_content"] = thinking
        if self.tools is not None:
            reply.text, reply.tool_calls = parse_tool_calls(reply.text, self.tools)
        if reply.tool_calls:  # as transformers takes a call: the template writes its markup back
            assistant["content"] = reply.text
            assistant["tool_calls"] = [history_call(c) for c in reply.tool_calls]
        self.messages.append(assistant)  # else markup and all: a re-render gives its tokens


def history_call(call: ToolCall) -> dict:
    """A call as the chat template (and an OpenAI history) takes it, the arguments as an object."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.loads(call.arguments)},
    }


def saved_settings(settings: ChatSettings) -> dict:
    """The settings a save keeps: the flags' (not a --json-schema grammar, nor a request's logit_bias or
    logprobs, which the file format does not hold)."""
    data = asdict(settings)
    data.pop("grammar")
    for key in REQUEST_ONLY:
        data["params"].pop(key)
    return data


def user_message(text: str, images: Sequence[Path | str | Video] = ()) -> dict:
    """A user turn: plain text, or image and video parts (each keeps its absolute path, for /save and
    re-rendering; a video its sampling too) followed by the text part, the layout Qwen's chat template and
    processor expect."""
    if not images:
        return {"role": "user", "content": text}
    parts = [_media_part(p) for p in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _media_part(p: Path | str | Video) -> dict:
    path = str(Path(p).expanduser().absolute())
    if not isinstance(p, Video):
        return {"type": "image", "image": path}
    part: dict = {"type": "video", "video": path}
    if p.fps is not None:
        part["fps"] = p.fps
    if p.max_frames is not None:
        part["max_frames"] = p.max_frames
    return part


def message_images(message: dict) -> list[str | Video]:
    """The media of a message in order: image paths, and Video for video parts (parts written by
    user_message, or by hand in a /save file)."""
    content = message.get("content")
    if not isinstance(content, list):
        return []
    found: list[str | Video] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "video" or "video" in part:
            found.append(_video_part(part))
        elif part.get("type") == "image" or "image" in part:
            path = part.get("image")
            if not isinstance(path, str) or not path:
                raise InputError("an image part in the chat has no file path", "give each image part a path")
            found.append(path)
    return found


def _video_part(part: dict) -> Video:
    path, fps, frames = part.get("video"), part.get("fps"), part.get("max_frames")
    if not isinstance(path, str) or not path:
        raise InputError("a video part in the chat has no file path", "give each video part a path")
    if fps is not None and not (isinstance(fps, int | float) and 0 < fps <= 1000):
        raise InputError("a video part's fps must be a number above 0", "fix or drop its fps")
    if frames is not None and not (isinstance(frames, int) and frames >= 1):
        raise InputError("a video part's max_frames must be a whole number of 1 or more", "fix or drop it")
    return Video(path, float(fps) if fps is not None else None, frames)


def _ends_in_thinking(ids: list[int], open_id: int | None, close_id: int | None) -> bool:
    """True when the prompt leaves a <think> block open (the template's generation prompt does)."""
    if open_id is None:
        return False
    last_open = max((i for i, t in enumerate(ids) if t == open_id), default=-1)
    last_close = max((i for i, t in enumerate(ids) if t == close_id), default=-1)
    return last_open > last_close
