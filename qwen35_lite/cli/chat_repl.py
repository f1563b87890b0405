"""The interactive chat: one command table, line input (readline on a terminal, plain lines from a pipe),
and the streaming of one reply with Ctrl+C stopping it (shared with `run`)."""

from __future__ import annotations

import functools
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, Qwen35Error
from ..runtime.generate import Finished, TokenEvent
from ..runtime.session import THINK_MODES, ChatSession
from ..runtime.settings import SETTINGS, check_setting, parse_setting  # noqa: F401  (check_setting: cli/options.py)
from .ui import UI, PrefillBar, ReplyPrinter, format_stats, plural

VIDEO_BAR_MIN_FRAMES = 64  # a clip decoding fewer frames is done before a bar would be seen

if TYPE_CHECKING:
    from .agent import Agent

# ---- settings (their table and checks are in settings.py) -----------------------------------------


def apply_setting(session: ChatSession, key: str, value: object) -> None:
    if key == "max_new_tokens":
        session.settings.max_new_tokens = value
    else:
        setattr(session.settings.params, key, value)


def current_settings(session: ChatSession) -> list[tuple[str, object]]:
    params = {f.name: getattr(session.settings.params, f.name) for f in fields(session.settings.params)}
    return [(k, session.settings.max_new_tokens if k == "max_new_tokens" else params[k]) for k in SETTINGS]


# ---- one reply ---------------------------------------------------------------------------------------


@contextmanager
def cancel_on_sigint(cancel: threading.Event, on_first: Callable[[], None] | None = None) -> Iterator[None]:
    """While a reply streams, Ctrl+C sets `cancel` (the reply ends cleanly after the current token) and
    calls `on_first` (a note that it was seen).

    A second Ctrl+C raises KeyboardInterrupt, for the case where one step (a long prefill chunk) is slow.
    Outside the main thread (no signals there) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        if on_first is not None:
            try:
                on_first()
            except RuntimeError:  # the signal came inside a write to the same stream: Python refuses the
                pass  # reentrant write, and the note is dropped (the reply still stops)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stream_reply(
    ui: UI,
    session: ChatSession,
    text: str,
    show_thinking: bool,
    printing: bool = True,
    images: Sequence[Path] = (),
    stdout_may_close: bool = False,
) -> Finished:
    """Send `text` (and `images`), print the reply as it streams, return the Finished event (with expert
    stats added). stdout_may_close: a closed stdout stops the printing only (chat), not the reply."""
    cancel = threading.Event()
    printer = ReplyPrinter(ui, show_thinking, stdout_may_close=stdout_may_close, tools=session.tools)
    prefill_bar, image_bar = ui.prefill_progress(), ui.image_progress()
    decode_bar = PrefillBar(ui, label="video frames", min_total=VIDEO_BAR_MIN_FRAMES)
    done: Finished | None = None
    try:
        with cancel_on_sigint(cancel, on_first=printer.stopping):
            events = session.send(
                text,
                cancel=cancel,
                on_prefill=prefill_bar,
                images=images,
                on_encode=image_bar,
                on_decode=decode_bar,
                on_note=ui.note,
            )
            for event in events:
                if isinstance(event, TokenEvent):
                    if printing:
                        printer.push(event.text, event.thinking)
                else:
                    done = event
    finally:
        decode_bar.close()
        image_bar.close()
        prefill_bar.close()
        if printing:
            printer.finish()
    experts = session.engine.expert_stats()
    if experts:
        done.stats["experts"] = experts
    return done


# ---- the command table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    name: str
    args: str
    help: str
    handler: Callable[[Repl, str], None]


def _help(repl: Repl, arg: str) -> None:
    rows = [(f"/{c.name} {c.args}".rstrip(), c.help) for c in COMMANDS.values()]
    rows.append(('"""', 'start a multi-line message; end it with a line ending in """'))
    rows.append(("Ctrl+C", "stop the reply; at the prompt, twice (or Ctrl+D) to leave"))
    repl.ui.help_table(rows)


def _clear(repl: Repl, arg: str) -> None:
    repl.session.clear()
    repl.pending_images.clear()
    if repl.agent is not None:
        repl.agent.loop.always.clear()  # "always" was for this chat
    repl.ui.note("conversation cleared")


def _image(repl: Repl, arg: str) -> None:
    if not arg:
        names = ", ".join(Path(p).name for p in repl.pending_images)
        repl.ui.note(f"images for the next message: {names}" if names else "no image attached")
        return
    if arg == "clear":
        repl.pending_images.clear()
        repl.ui.note("attached images dropped")
        return
    path = user_path(arg, "image")
    repl.session.engine.check_vision()  # a text-only checkpoint says so now, not at the next message
    repl.attach([path])


def _video(repl: Repl, arg: str) -> None:
    if not arg or arg == "clear":
        _image(repl, arg)  # one list of attachments, images and videos in order
        return
    from ..runtime.multimodal import plan_video
    from ..runtime.video import Video

    path = user_path(arg, "video")
    repl.session.engine.check_vision()
    video = Video(str(path), *repl.video_sampling)
    plan = plan_video(video, repl.video_config)  # metadata only: a bad file is reported now
    repl.pending_images.append(video)
    info = plan.info
    repl.ui.note(
        f"attached {path.name} ({info.width}x{info.height}, {info.duration:.1f} s; "
        f"{len(plan.indices)} frames, {plan.tokens} tokens) to the next message"
    )


def _system(repl: Repl, arg: str) -> None:
    if repl.session.settings.raw:
        raise InputError("/system has no effect in --raw mode (no chat template)", "restart without --raw")
    repl.session.set_system(arg or None)
    repl.ui.note("system prompt set" if arg else "system prompt removed")


def _think(repl: Repl, arg: str) -> None:
    if not arg:
        repl.ui.note(f"thinking is {repl.session.settings.think}")
        return
    if arg not in THINK_MODES:
        raise InputError(f"/think takes on, off or hide, not {arg!r}", "e.g. /think hide")
    repl.session.settings.think = arg
    repl.ui.note(f"thinking {arg}")


def _set(repl: Repl, arg: str) -> None:
    if not arg:
        repl.ui.key_values(current_settings(repl.session))
        return
    key, _, raw = arg.partition(" ")
    key = key.replace("-", "_")
    if not raw.strip():
        raise InputError("/set needs a key and a value", "e.g. /set temperature 0.7")
    value = parse_setting(key, raw.strip())
    apply_setting(repl.session, key, value)
    repl.ui.note(f"{key} = {value}")


def _stats(repl: Repl, arg: str) -> None:
    """The last reply's line and table (speeds, its hits and misses per tier, bytes per token, peak
    memory), then the expert cache's counters since load."""
    from .ui import cache_rows, reply_rows

    reply = getattr(repl.session, "last_reply", None)
    if reply is None or not reply.stats:
        repl.ui.note("no reply yet")
    else:
        repl.ui.note(format_stats(reply.stats, repl.session.engine.max_context, reply.finish_reason))
        repl.ui.table(reply_rows(reply.stats), title="last reply")
    experts = repl.session.engine.expert_stats()
    if rows := cache_rows(experts):
        repl.ui.table(rows, title="expert cache since load")


def _save(repl: Repl, arg: str) -> None:
    repl.session.save(user_path(arg, "save"))
    repl.ui.note(f"saved {plural(len(repl.session.messages), 'message')} to {arg}")


def _load(repl: Repl, arg: str) -> None:
    repl.session.load(user_path(arg, "load"))
    repl.ui.note(f"loaded {plural(len(repl.session.messages), 'message')} from {arg}")


def _tools(repl: Repl, arg: str) -> None:
    if repl.agent is None:
        names = [t["function"]["name"] for t in repl.session.tools or []]
        repl.ui.note("tools (printed, not run): " + ", ".join(names) if names else "no tools (see --mcp)")
        return
    for line in repl.agent.tool_rows():
        repl.ui.note(line)


def _mcp(repl: Repl, arg: str) -> None:
    if arg != "reload":
        raise InputError(
            f"/mcp takes reload, not {arg!r}" if arg else "/mcp needs reload", "e.g. /mcp reload"
        )
    if repl.agent is None:
        raise InputError("no MCP servers in this chat", "start the chat with --mcp FILE")
    repl.agent.reload(repl.session)


def _exit(repl: Repl, arg: str) -> None:
    repl.done = True


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("help", "", "list the commands", _help),
        Command("clear", "", "forget the conversation", _clear),
        Command("system", "[TEXT]", "set the system prompt (no text removes it)", _system),
        Command("think", "on|off|hide", "thinking on, off, or on but not shown", _think),
        Command(
            "image",
            "[PATH|clear]",
            "attach an image to the next message (a path typed in a message works too); alone: list",
            _image,
        ),
        Command(
            "video",
            "[PATH|clear]",
            "attach a video clip to the next message (sampled at --video-fps, --max-frames); alone: list",
            _video,
        ),
        Command("set", "[KEY VALUE]", "change a setting (" + ", ".join(SETTINGS) + "); alone: list", _set),
        Command("stats", "", "figures of the last reply and the expert caches", _stats),
        Command("tools", "", "the MCP servers, their tools and whether each call is asked for", _tools),
        Command("mcp", "reload", "restart the MCP servers (the --mcp file is read again)", _mcp),
        Command("save", "FILE", "write the conversation to a JSON file", _save),
        Command("load", "FILE", "resume a conversation written by /save", _load),
        Command("exit", "", "leave (Ctrl+D does too)", _exit),
    )
}
ALIASES = {"quit": "exit", "bye": "exit", "?": "help"}


# ---- the loop ------------------------------------------------------------------------------------


class Repl:
    def __init__(self, ui: UI, session: ChatSession, agent: Agent | None = None) -> None:
        self.ui, self.session, self.agent = ui, session, agent
        self.done = False
        self.pending_images: list = []  # attached with /image and /video, sent with the next message
        self.video_sampling: tuple[float | None, int | None] = (None, None)  # --video-fps, --max-frames
        self.tty = sys.stdin.isatty()
        if self.tty:
            try:
                import readline  # noqa: F401  (importing it gives input() line editing and history)
            except ImportError:
                pass

    def run(self) -> None:
        interrupts = 0
        while not self.done:
            try:
                text = self.read_message()
                if text is None:
                    break
                interrupts = 0
                self.handle(text)
            except KeyboardInterrupt:  # at the prompt (during a reply, Ctrl+C only stops the reply)
                interrupts += 1
                if interrupts >= 2:
                    break
                self.ui.err.print()
                self.ui.info("(Ctrl+C again or Ctrl+D to leave; /help for commands)")
        if self.tty:
            self.ui.err.print()

    def handle(self, text: str) -> None:
        if not text.strip():
            return
        try:
            if text.startswith("/") and not _starts_with_image_path(text):
                self.command(text)
            else:
                self.reply(text)
        except Qwen35Error as e:
            self.ui.error(e.message, e.hint)

    def command(self, text: str) -> None:
        # The name starts right at the slash: "/ save x" is no command (as in ollama), never /save.
        name, _, arg = text[1:].rstrip().partition(" ")
        cmd = COMMANDS.get(ALIASES.get(name, name))
        if cmd is None:
            shown = name.split()[0] if name[:1].strip() else ""  # "/ save": the command is "/"
            self.ui.note(f"Unknown command '/{shown}'. Type /help for help")
            return
        try:
            cmd.handler(self, arg.strip())
        except Qwen35Error:
            raise
        except Exception as e:  # our bug, not the user's: one line, and the chat goes on
            self.ui.error(
                f"/{cmd.name} failed: {type(e).__name__}: {e}",
                "the conversation is kept; please report this with the command you typed",
            )

    @functools.cached_property
    def video_config(self):
        from ..model.vision.video import VideoProcessorConfig

        return VideoProcessorConfig.from_dir(self.session.engine.model_dir)

    @functools.cached_property
    def can_see(self) -> bool:
        try:
            self.session.engine.check_vision()
        except Qwen35Error:
            return False
        return True

    def attach(self, paths: list[Path], later: bool = True) -> None:
        """Queue images for the next message; a bad file is reported now (and none of `paths` is queued)."""
        from ..runtime.multimodal import load_images

        for path, image in zip(paths, load_images(paths)):
            self.pending_images.append(path)
            when = " to the next message" if later else ""
            self.ui.note(f"attached {path.name} ({image.width}x{image.height}){when}")

    def reply(self, text: str) -> None:
        if self.can_see:  # a text-only model takes a typed path as text
            text, found = split_image_paths(text)
            self.attach(found, later=not text.strip())
        if not text.strip():
            return  # only image paths were typed: they wait for the message
        images, self.pending_images = self.pending_images, []  # spent by this message, sent or not
        show = self.session.settings.think == "on"
        fed = self.session.cache.offset
        try:
            if self.agent is not None:  # the tool rounds print their own stats lines
                self.agent.stream(text, images, show_thinking=show, stdout_may_close=True)
                return
            done = stream_reply(
                self.ui, self.session, text, show_thinking=show, images=images, stdout_may_close=True
            )
        except (Exception, KeyboardInterrupt) as e:
            if self.session.cache.offset != fed:
                # The cache holds part of a turn the history does not: rebuild it from the history on the
                # next turn (this message is dropped, nothing earlier is).
                self.session.set_system(self.session.settings.system)
            if isinstance(e, Qwen35Error):
                self.ui.error(e.message, e.hint)
            elif isinstance(e, KeyboardInterrupt):  # a second Ctrl+C inside one slow step
                self.ui.info("(reply abandoned)")
            else:  # our bug, not the user's: show it, but keep the conversation
                self.ui.err.print(traceback.format_exc(), markup=False)
            return
        self.ui.stats_line(format_stats(done.stats, self.session.engine.max_context, done.reason))

    # --- input --------------------------------------------------------------------------------------
    def read_line(self, prompt: str) -> str | None:
        """One line without its newline, or None at end of input."""
        if self.tty:
            try:
                if self.ui.out.is_terminal:
                    return input(prompt)
                self.ui.err.print(prompt, end="")  # keep piped stdout free of prompts
                return input()
            except EOFError:
                return None
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    def read_message(self) -> str | None:
        """A message: one line, or the lines between \"\"\" markers (the markers themselves removed)."""
        line = self.read_line(">>> ")
        if line is None or not line.startswith('"""'):
            return line
        first = line[3:]
        if first.endswith('"""'):  # """one line"""
            return first[:-3]
        lines = [first] if first else []
        while True:
            more = self.read_line("... ")
            if more is None:  # end of input inside a block: send what was typed
                return "\n".join(lines) if lines else None
            if more.endswith('"""'):
                lines.append(more[:-3])
                return "\n".join(lines).rstrip("\n")
            lines.append(more)


# ---- image paths typed in a message (as ollama does) -----------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
_PATH_WORD = re.compile(r"""'[^']+'|"[^"]+"|(?:\\ |\S)+""")  # a quoted path, or a word with "\ " escapes


def _unquote(word: str) -> str:
    if len(word) > 1 and word[0] == word[-1] and word[0] in "'\"":
        return word[1:-1]
    return word.replace("\\ ", " ")


def user_path(arg: str, command: str) -> Path:
    """The file a command's argument names (quotes removed, ~ expanded), or an InputError saying why not."""
    if not arg:
        raise InputError(
            f"/{command} needs a file name",
            f"e.g. /{command} " + {"image": "cat.png", "video": "clip.mp4"}.get(command, "chat.json"),
        )
    name = _unquote(arg)
    if "\0" in name:
        raise InputError("a file name cannot hold a NUL byte", f"type the path after /{command} again")
    try:
        return Path(name).expanduser()
    except RuntimeError:  # ~user with no such user (or no home directory)
        user = name.split("/", 1)[0]
        raise InputError(
            f"cannot expand {user}: no such user's home directory", "write the path in full"
        ) from None


def _image_file(word: str) -> Path | None:
    """The existing file `word` names when its suffix is an image's, else None."""
    if not word.lower().endswith(IMAGE_SUFFIXES):
        return None
    try:
        path = Path(word).expanduser()
        return path if path.is_file() else None
    except (OSError, ValueError, RuntimeError):  # a name too long, a NUL byte, an unknown ~user: not a path
        return None


def _starts_with_image_path(text: str) -> bool:
    """True for a message opening with an absolute image path ("/home/me/cat.png what is it?"): no command."""
    first = _PATH_WORD.match(text)
    return first is not None and _image_file(_unquote(first.group(0))) is not None


def split_image_paths(text: str) -> tuple[str, list[Path]]:
    """(text without them, paths): every word naming an existing image file (by its suffix), in order."""
    found: list[Path] = []

    def take(match: re.Match) -> str:
        path = _image_file(_unquote(match.group(0)))
        if path is None:
            return match.group(0)
        found.append(path)
        return "\0"  # a mark, so only the spaces around removed paths are collapsed

    rest = _PATH_WORD.sub(take, text)
    return (re.sub(r"[ \t]*\0[ \t]*", " ", rest).strip() if found else text), found
