"""All terminal rendering: the answer on stdout, everything else (thinking, stats, progress, errors) on stderr.

stdout carries the answer text and nothing else, so `qwen35-lite run ... > answer.txt` captures only it.
Colour, progress bars and prompts appear only on a terminal: rich drops styles when its stream is not a TTY,
and the progress bars below are disabled there, so piped output never holds escape codes or spinners.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Container, Iterator
from contextlib import AbstractContextManager, contextmanager

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.spinner import Spinner
from rich.text import Text

from ..text.tool_calls import ContentDelta, StreamingToolParser

PREFILL_BAR_MIN_TOKENS = 1024  # shorter prompts prefill in a blink; a bar would only flicker


def _console(stderr: bool) -> Console:
    # soft_wrap: never insert line breaks into streamed text; highlight off: print text as the model wrote it
    return Console(stderr=stderr, highlight=False, soft_wrap=True, emoji=False)


class UI:
    """The two streams and everything printed on them. Create one per command, after sys.std* are final."""

    def __init__(self, quiet: bool = False) -> None:
        self.out = _console(stderr=False)
        self.err = _console(stderr=True)
        self.quiet = quiet
        self.stdout_closed = False  # the reader of stdout went away (`| head`); see drop_stdout

    # --- messages on stderr ------------------------------------------------------------------------
    def error(self, message: str, hint: str = "") -> None:
        self.err.print(Text.assemble(("error:", "bold red"), " ", message))
        if hint:
            self.err.print(Text.assemble(("hint:", "yellow"), " ", hint))

    def info(self, message: str) -> None:
        self.err.print(Text(message, style="dim"))

    def note(self, message: str) -> None:
        self.err.print(Text(message))

    # --- the answer and the thinking ---------------------------------------------------------------
    def answer(self, text: str) -> None:
        # Raw write, not console.print: the answer must reach stdout byte for byte (no markup, no wrapping).
        self.out.file.write(text)
        self.out.file.flush()

    def drop_stdout(self) -> None:
        """After a BrokenPipeError on stdout: send what is left of it to /dev/null, once, and say so.

        Python would otherwise retry the buffered text at every flush and at exit, each time a traceback.
        """
        if self.stdout_closed:
            return
        self.stdout_closed = True
        # With no real file behind stdout (an in-process test) this fails, and the writes are skipped instead.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        self.info("(stdout was closed: replies are kept in the conversation but no longer printed)")

    def thinking(self, text: str) -> None:
        if self.err.is_terminal:
            self.err.print(Text(text, style="dim"), end="")
        else:  # piped: the text as generated (console.print would turn tabs into spaces)
            self.err.file.write(text)
        self.err.file.flush()

    def json_line(self, obj: dict) -> None:
        self.out.file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.file.flush()

    # --- progress ----------------------------------------------------------------------------------
    def _progress(self, *columns) -> Progress:
        return Progress(*columns, console=self.err, transient=True, disable=not self.err.is_terminal)

    @contextmanager
    def _bar_per_stage(self, *columns) -> Iterator[Callable[[str, int, int], None]]:
        """Yield update(stage, done, total): one bar per stage, added the first time the stage reports."""
        bar = self._progress(TextColumn("{task.description}"), BarColumn(), *columns)
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        with bar:
            yield update

    def load_progress(self) -> AbstractContextManager[Callable[[str, int, int], None]]:
        """on_progress(stage, done_bytes, total_bytes) for Engine.load; a bar on a terminal only."""
        return self._bar_per_stage(DownloadColumn())

    @contextmanager
    def count_progress(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """Yield cb(done, total) drawing a counted bar (make-checkpoint layers)."""
        bar = self._progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        )
        task = bar.add_task(description, total=None)
        with bar:
            yield lambda done, total: bar.update(task, completed=done, total=total)

    def phase_progress(self) -> AbstractContextManager[Callable[[str, int, int], None]]:
        """cb(phase, done, total): one counted bar per phase (bench: prefill, then decode)."""
        return self._bar_per_stage(MofNCompleteColumn(), TimeRemainingColumn())

    def prefill_progress(self) -> PrefillBar:
        return PrefillBar(self)

    def image_progress(self) -> PrefillBar:
        """on_encode(blocks done, total) for the vision tower: an image can take a minute on a CPU."""
        return PrefillBar(self, label="image", min_total=1)

    # --- chat furniture ----------------------------------------------------------------------------
    def header(self, lines: list[str]) -> None:
        for line in lines:
            self.info(line)

    def help_table(self, rows: list[tuple[str, str]]) -> None:
        # Plain aligned rows, not a rich Table: a table wraps to 80 columns when piped, splitting the help.
        width = max(len(usage) for usage, _ in rows)
        for usage, text in rows:
            self.err.print(Text.assemble((f"{usage:<{width}}", "bold"), "  ", text))

    def key_values(self, pairs: list[tuple[str, object]]) -> None:
        width = max((len(k) for k, _ in pairs), default=0)
        for key, value in pairs:
            self.err.print(Text(f"{key:<{width}}  {value}"))

    def table(self, rows: list[tuple[str, str]], title: str = "", stdout: bool = False) -> None:
        """Aligned label/value rows under a bold title (plain rows: a rich Table wraps when piped)."""
        console = self.out if stdout else self.err
        if title:
            console.print(Text(title, style="bold"))
        width = max((len(label) for label, _ in rows), default=0)
        for label, value in rows:
            console.print(Text.assemble((f"{label:<{width}}", "dim" if not stdout else ""), "  ", str(value)))

    def stats_line(self, text: str) -> None:
        if not self.quiet:
            self.err.print(Text(text, style="dim"))


class PrefillBar:
    """on_progress(done, total) for long work before a reply (a prompt's prefill, an image's encode): a
    transient bar on a terminal, started only once it is worth showing."""

    def __init__(self, ui: UI, label: str = "prompt", min_total: int = PREFILL_BAR_MIN_TOKENS) -> None:
        self.ui, self.label, self.min_total = ui, label, min_total
        self.bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if total < self.min_total or done >= total or not self.ui.err.is_terminal:
                return
            self.bar = self.ui._progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn())
            self.task = self.bar.add_task(self.label, total=total)
            self.bar.start()
        self.bar.update(self.task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class ReplyPrinter:
    """Turns the TokenEvents of one reply into output: answer → stdout, thinking → stderr (dim, framed).

    Leading blank lines are dropped (the model writes "\\n\\n" after </think>); the streams are left at the
    start of a line when the reply ends, so the next prompt or stats line starts cleanly. Hidden thinking
    shows a transient "thinking… N tokens, S s" line on a terminal instead (minutes of silence otherwise).
    stdout_may_close: a closed stdout (`| head`) stops the printing, not the reply (the chat keeps it).
    tools: the answer goes through the tool-call parser: its content streams, markup that may be a call is
    held back, and each call is printed as a `tool call: NAME {arguments}` line once the reply ends.
    """

    def __init__(
        self,
        ui: UI,
        show_thinking: bool = True,
        stdout_may_close: bool = False,
        tools: list[dict] | None = None,
        handled: Container[str] = (),
    ) -> None:
        self.ui, self.show_thinking, self.stdout_may_close = ui, show_thinking, stdout_may_close
        self.handled = handled  # tools whose calls are shown (and run) elsewhere: MCP tools, cli/agent.py
        self.tool_parser = StreamingToolParser(tools) if tools is not None else None
        self.in_thinking = False
        self.thought = False  # something of the thinking was printed
        self.answered = False
        self.answer_tail = ""
        self.hidden: HiddenThinking | None = None

    def push(self, text: str, thinking: bool) -> None:
        if thinking:
            self._think(text)
            return
        self._close_thinking()
        if self.tool_parser is None:
            self._content(text)
            return
        for delta in self.tool_parser.feed(text):
            if isinstance(delta, ContentDelta):
                self._content(delta.text)

    def _content(self, text: str) -> None:
        if not self.answered:
            text = text.lstrip()
            if not text:
                return
            self.answered = True
        self._answer(text)
        self.answer_tail = text

    def _answer(self, text: str) -> None:
        if self.ui.stdout_closed:
            return
        try:
            self.ui.answer(text)
        except BrokenPipeError:
            if not self.stdout_may_close:
                raise
            self.ui.drop_stdout()

    def _think(self, text: str) -> None:
        if not self.show_thinking:
            if self.hidden is None and self.ui.err.is_terminal:
                self.hidden = HiddenThinking(self.ui)
            if self.hidden is not None:
                self.hidden.tick()
            return
        if not self.in_thinking:
            text = text.lstrip()
            if not text:
                return
            self.ui.err.print(Text("Thinking...", style="dim italic"))
            self.in_thinking = self.thought = True
        self.ui.thinking(text)

    def _close_thinking(self) -> None:
        if self.hidden is not None:
            self.hidden.close()
            self.hidden = None
        if self.in_thinking:
            self.ui.err.print()
            self.ui.err.print(Text("...done thinking.", style="dim italic"))
            self.ui.err.print()
            self.in_thinking = False

    def stopping(self) -> None:
        """Acknowledge a first Ctrl+C at once: the reply ends only after the current step (a long prefill
        chunk can take seconds)."""
        if self.in_thinking:
            self.ui.err.print()  # off the line the thinking is streaming on
        self.ui.info("stopping… (Ctrl+C again to abandon the reply at once)")

    def finish(self) -> None:
        if self.hidden is not None:
            self.hidden.close()
            self.hidden = None
        if self.in_thinking:  # cut off while still thinking
            self.ui.err.print()
            self.in_thinking = False
        if self.tool_parser is not None:
            for delta in self.tool_parser.finish():
                if isinstance(delta, ContentDelta):
                    self._content(delta.text)
        if self.answered and not self.answer_tail.endswith("\n"):
            self._answer("\n")
        for call in self.tool_parser.calls if self.tool_parser is not None else []:
            if call.name not in self.handled:
                self._answer(f"tool call: {call.name} {call.arguments}\n")


class HiddenThinking:
    """The transient stderr line shown while the model thinks unseen: a spinner, the thinking tokens so
    far and the seconds spent (re-rendered by rich a few times a second, so the time moves on its own)."""

    def __init__(self, ui: UI) -> None:
        self.tokens, self.started = 0, time.monotonic()
        line = Spinner("dots", text=self, style="dim")
        self.live = Live(
            line,
            console=ui.err,
            transient=True,
            refresh_per_second=4,
            redirect_stdout=False,  # the answer writes to stdout directly, never through the live display
            redirect_stderr=False,
        )
        self.live.start(refresh=True)

    def tick(self) -> None:
        self.tokens += 1

    def __rich__(self) -> Text:
        return Text(f"thinking… {self.tokens} tokens, {time.monotonic() - self.started:.0f} s", style="dim")

    def close(self) -> None:
        self.live.stop()


def human_bytes(n: int | None) -> str:
    """Binary units, as the budgets are given (GiB): small figures in KiB or B, never a rounded 0.0."""
    if n is None:
        return "?"
    for unit, size in (("PiB", 1 << 50), ("TiB", 1 << 40)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 10_000 * size else f"{n / size:.3e} {unit}"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 hit`, `2 hits`: the count and the word in the right number."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.0f}%"


FINISH_NOTES = {
    "length": "cut at the token limit",
    "context": "context full",
    "cancelled": "stopped",
}


def format_stats(stats: dict, max_context: int | None = None, finish_reason: str = "") -> str:
    """One line: load time (when given), prompt and decode speed, time to first token, context use, memory,
    expert caches."""
    parts = []
    if note := FINISH_NOTES.get(finish_reason):
        parts.append(f"[{note}]")
    if stats.get("load_s") is not None:
        parts.append(f"load {stats['load_s']:.1f} s")
    p, g = stats.get("prompt_tokens", 0), stats.get("generated_tokens", 0)
    prefill = stats.get("prefill_tok_s")
    parts.append(f"prompt {p} tok" + (f" @ {prefill:.1f} tok/s" if prefill else ""))
    decode = stats.get("decode_tok_s")
    parts.append(f"reply {g} tok" + (f" @ {decode:.1f} tok/s" if decode else ""))
    if stats.get("video_frames"):
        parts.append(f"video {stats['video_frames']} frames, {stats.get('video_tokens', 0)} tok")
    if stats.get("ttft_s") is not None:
        parts.append(f"ttft {stats['ttft_s']:.2f} s")
    if stats.get("context_tokens") is not None and max_context:
        parts.append(f"ctx {stats['context_tokens']}/{max_context}")
    parts.append(f"peak RSS {human_bytes(stats.get('peak_rss_bytes'))}")
    if "peak_gpu_bytes" in stats:
        parts.append(f"peak GPU {human_bytes(stats['peak_gpu_bytes'])}")
    if experts := format_experts(stats):
        parts.append(experts)
    return " · ".join(parts)


def format_experts(stats: dict) -> str:
    """This reply's expert traffic: hit rate per tier, bytes per decoded token (cumulative cache figures
    under stats["experts"] only when the reply's own are absent)."""
    e = (
        stats
        if any(k.endswith("_hit_rate") or k == "disk_bytes" for k in stats)
        else stats.get("experts") or {}
    )
    bits = []
    for tier in ("gpu", "ram"):
        if (rate := _pct(e.get(f"{tier}_hit_rate"))) is not None:
            bits.append(f"{tier} hit {rate}")
    if e.get("disk_bytes_per_token") is not None:
        bits.append(f"disk {human_bytes(e['disk_bytes_per_token'])}/tok")
    elif e.get("bytes_read"):
        bits.append(f"read {human_bytes(e['bytes_read'])}")
    if e.get("gpu_bytes_per_token") is not None:
        bits.append(f"to GPU {human_bytes(e['gpu_bytes_per_token'])}/tok")
    return "experts " + ", ".join(bits) if bits else ""


def _num(x: float | None, unit: str, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f} {unit}"


def reply_rows(stats: dict) -> list[tuple[str, str]]:
    """One reply (or a bench run) as table rows: speeds, expert traffic per tier, peak memory."""
    rows = [("load", _num(stats["load_s"], "s"))] if stats.get("load_s") is not None else []
    rows += [
        ("prompt", f"{stats.get('prompt_tokens', 0)} tok, {_num(stats.get('prefill_tok_s'), 'tok/s', 1)}"),
        ("reply", f"{stats.get('generated_tokens', 0)} tok, {_num(stats.get('decode_tok_s'), 'tok/s', 1)}"),
        ("time to first token", _num(stats.get("ttft_s"), "s")),
    ]
    for tier, label in (("gpu", "GPU"), ("ram", "RAM")):
        if f"{tier}_hits" in stats:
            h, m = stats[f"{tier}_hits"], stats[f"{tier}_misses"]
            rate = _pct(stats.get(f"{tier}_hit_rate"))
            rows.append(
                (f"{label} tier hits / misses", f"{h} / {m}" + (f" (hit rate {rate})" if rate else ""))
            )
    if "disk_bytes" in stats:
        per = stats.get("disk_bytes_per_token")
        rows.append(
            ("read from disk", f"{human_bytes(stats['disk_bytes'])}, {human_bytes(per)} per decoded token")
        )
    if "gpu_bytes" in stats:
        per = stats.get("gpu_bytes_per_token")
        rows.append(
            ("copied to the GPU", f"{human_bytes(stats['gpu_bytes'])}, {human_bytes(per)} per decoded token")
        )
    rows.append(("peak RAM (RSS)", human_bytes(stats.get("peak_rss_bytes"))))
    if "peak_gpu_bytes" in stats:
        rows.append(("peak GPU memory", human_bytes(stats["peak_gpu_bytes"])))
    return rows


def cache_rows(counters: dict) -> list[tuple[str, str]]:
    """The expert cache since load (TieredExperts.stats): slots, hits and misses per tier, traffic, prefetch."""
    rows = []
    for tier, label in (("gpu", "GPU"), ("ram", "RAM")):
        if f"{tier}_slots_per_layer" in counters:
            h, m = counters[f"{tier}_hits"], counters[f"{tier}_misses"]
            rate = _pct(counters.get(f"{tier}_hit_rate"))
            slots = plural(counters[f"{tier}_slots_per_layer"], "slot")
            text = f"{slots} per layer, {plural(h, 'hit')} / {plural(m, 'miss', 'misses')}"
            rows.append((f"{label} tier", text + (f" ({rate})" if rate else "")))
    if "bytes_read" in counters:
        rows.append(
            (
                "read from disk",
                f"{human_bytes(counters['bytes_read'])}"
                + (f" ({plural(counters['experts_read'], 'expert')})" if "experts_read" in counters else ""),
            )
        )
    if "bytes_to_gpu" in counters:
        rows.append(("copied to the GPU", human_bytes(counters["bytes_to_gpu"])))
    if counters.get("prefetch_hinted"):
        recall = _pct(counters.get("prefetch_recall"))
        rows.append(
            (
                "prefetch",
                f"{counters['prefetch_hinted']} hinted, {counters['prefetch_read']} read,"
                f" {counters['prefetch_used']} used" + (f", recall {recall}" if recall else ""),
            )
        )
    return rows
