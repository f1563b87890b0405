"""MCP tools on the terminal: servers started with one line each, every call shown exactly as it will be
sent and asked for (y / n / a), results summed up in a line, the rounds of one message streamed; `/tools`
and `/mcp reload`. The loop itself is runtime/tool_loop.py, the clients runtime/mcp.py.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from ..runtime.generate import Finished, TokenEvent
from ..runtime.mcp import McpHub, ServerState, ToolOutput, printable
from ..runtime.mcp_config import ServerConfig, read_config
from ..runtime.session import ChatSession
from ..runtime.tool_loop import CallDone, CallRecord, CallStarted, PlannedCall, ToolLoop, TurnNote
from .chat_repl import cancel_on_sigint
from .options import AgentFlags
from .signals import default_sigint, stopped_by_sigterm
from .ui import UI, ReplyPrinter, format_stats, plural

ANSWERS = {"y": "yes", "yes": "yes", "n": "no", "no": "no", "": "no", "a": "always", "always": "always"}
PREVIEW_CHARS = 160


def read_servers(flags: AgentFlags, raw: bool) -> list[ServerConfig] | None:
    """The --mcp file, read and checked before the (slow) model load; None without --mcp."""
    import typer

    if flags.mcp is None:
        return None
    if raw:
        raise typer.BadParameter("tools need the chat template, which --raw turns off", param_hint="--mcp")
    return read_config(flags.mcp)


@dataclass
class Agent:
    """The MCP side of one chat or run: the servers, the loop over the session, the --tools beside them."""

    ui: UI
    flags: AgentFlags
    hub: McpHub
    loop: ToolLoop
    base_tools: list[dict] = field(default_factory=list)  # --tools: given to the template, printed, not run
    first_prompt_ids: list[int] = field(default_factory=list)  # the last message's first round's prompt

    @classmethod
    @contextlib.contextmanager
    def started(
        cls,
        ui: UI,
        flags: AgentFlags,
        configs: list[ServerConfig],
        session: ChatSession,
        approve: Callable[[PlannedCall], str],
    ) -> Iterator[Agent]:
        """Start the servers (one line each), give their tools to the session, and stop them all on the
        way out: a return, an error, Ctrl+C or SIGTERM."""
        base = list(session.tools or [])
        hub = McpHub(configs, flags.tool_timeout, reserved_names=tuple(_names(base)))
        with stopped_by_sigterm(), hub:
            agent = cls(
                ui, flags, hub, ToolLoop(session, hub, approve, flags.max_tool_rounds, flags.yes), base
            )
            hub.start(on_server=agent.server_line)
            session.tools = base + hub.openai_tools()
            yield agent

    # --- servers ------------------------------------------------------------------------------------
    def server_line(self, state: ServerState) -> None:
        name = printable(state.config.name)
        if state.status == "ready":
            self.ui.info(f"mcp: {name} ready, {plural(len(state.tools), 'tool')}")
        else:
            self.ui.error(
                f"MCP server {name} did not start: {printable(state.error)}",
                "the chat goes on without its tools; fix the config, then /mcp reload",
            )

    def reload(self, session: ChatSession) -> None:
        """Stop every server, read the --mcp file again and start its servers; a changed tool list is given
        to the template, and the history is read again with it at the next message."""
        configs = read_config(self.flags.mcp)  # a broken file: the error, and the servers as they were
        before = session.tools
        self.hub.reload(configs, on_server=self.server_line)
        self.loop.always.clear()  # a name may now be another server's tool
        session.tools = self.base_tools + self.hub.openai_tools()
        if session.tools != before:
            session.reset_cache()
            self.ui.info("the tool list changed: the conversation is read again with it at the next message")

    def tool_rows(self) -> list[str]:
        """/tools: each server and its state, each tool with its approval."""
        lines = []
        for state in self.hub.servers.values():
            cfg = state.config
            status = state.status + (f": {state.error}" if state.error else "")
            lines.append(f"{cfg.name} ({cfg.transport}: {cfg.where}): {status}")
            for tool in state.tools:
                ask = (
                    "auto (--yes)" if self.flags.yes else "always" if tool.name in self.loop.always else "ask"
                )
                about = (tool.description or "").strip().split("\n")[0][:80]
                lines.append(f"  {tool.name}  [{ask}]  {about}")
        if not self.hub.servers:
            lines.append("no MCP servers in the --mcp file")
        if self.base_tools:
            lines.append("--tools (printed, not run): " + ", ".join(_names(self.base_tools)))
        return [printable(line) for line in lines]

    # --- a turn -------------------------------------------------------------------------------------
    def stream(
        self,
        text: str,
        images: Sequence[Path] = (),
        show_thinking: bool = True,
        printing: bool = True,
        stdout_may_close: bool = False,
        round_stats: bool = True,
    ) -> Finished:
        """One message and its tool rounds: each reply streamed as stream_reply does, each call and result
        in a line. Returns the last reply's Finished (with the expert stats)."""
        ui, session = self.ui, self.loop.session
        cancel = threading.Event()
        bars = ui.prefill_progress(), ui.image_progress()
        state: dict = {"printer": None, "done": None}

        def printer() -> ReplyPrinter:
            if state["printer"] is None:
                state["printer"] = ReplyPrinter(
                    ui, show_thinking, stdout_may_close, tools=session.tools, handled=self._handled()
                )
            return state["printer"]

        def stopping() -> None:
            (state["printer"] or _Stopping(ui)).stopping()

        try:
            with cancel_on_sigint(cancel, on_first=stopping):
                for event in self.loop.turn(text, images, cancel, on_prefill=bars[0], on_encode=bars[1]):
                    if isinstance(event, TokenEvent):
                        if printing:
                            printer().push(event.text, event.thinking)
                    elif isinstance(event, Finished):
                        if state["done"] is None:  # the message's own prompt, for run --json
                            self.first_prompt_ids = session.last_reply.prompt_ids
                        self._end_round(event, printer() if printing else None, round_stats)
                        state["printer"], state["done"] = None, event
                    elif isinstance(event, CallStarted):
                        self.call_line(event.call, event.approved)
                    elif isinstance(event, CallDone):
                        self.result_line(event.record)
                    elif isinstance(event, TurnNote):
                        ui.info(f"({event.text})")
        finally:
            for bar in bars:
                bar.close()
            if state["printer"] is not None and printing:
                state["printer"].finish()
        return state["done"]

    def _end_round(self, done: Finished, printer: ReplyPrinter | None, round_stats: bool) -> None:
        if printer is not None:
            if not self.loop.runs_all(self.loop.session.last_reply.tool_calls):
                printer.handled = ()  # a --tools call ends the turn: every call is printed, none is run
            printer.finish()
        if experts := self.loop.session.engine.expert_stats():
            done.stats["experts"] = experts
        if round_stats:
            self.ui.stats_line(format_stats(done.stats, self.loop.session.engine.max_context, done.reason))

    def _handled(self) -> _AllBut:
        """The calls the loop shows and answers: every one but those of --tools (printed as before)."""
        return _AllBut(_names(self.base_tools))

    def call_line(self, call: PlannedCall, approved: bool) -> None:
        """The call exactly as it will be sent: server, the server's tool name, the JSON arguments."""
        where = f"{call.server} · {call.tool}" if call.server else call.name
        self.ui.err.print(
            Text.assemble(
                ("tool call ", "bold cyan"), (printable(where), "bold"), " ", printable(call.arguments)
            )
        )

    def result_line(self, record: CallRecord) -> None:
        out, decision = record.output, record.decision
        if decision == "no":
            self.ui.info("  refused: the model is told so")
        elif decision == "stop":
            self.ui.info("  stopped")
        elif out.is_error:
            self.ui.err.print(Text.assemble(("  tool error ", "red"), _preview(out.text)))
        else:
            self.ui.info(f"  {_summary(out)} in {record.seconds:.1f} s: {_preview(out.text)}")


def _summary(out: ToolOutput) -> str:
    bits = [plural(len(out.text), "character")]
    if out.images:
        bits.append(plural(len(out.images), "image"))
    return ", ".join(bits)


def _preview(text: str) -> str:
    line = " ".join(text.split())
    return printable(line if len(line) <= PREVIEW_CHARS else line[: PREVIEW_CHARS - 1] + "…")


def _names(tools: list[dict]) -> list[str]:
    return [
        t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]


class _AllBut:
    def __init__(self, names: list[str]) -> None:
        self.names = set(names)

    def __contains__(self, name: object) -> bool:
        return name not in self.names


class _Stopping:
    """Ctrl+C while no reply streams (a tool call runs): the same note."""

    def __init__(self, ui: UI) -> None:
        self.ui = ui

    def stopping(self) -> None:
        self.ui.info("stopping… (Ctrl+C again to abandon the turn at once)")


# ---- approval --------------------------------------------------------------------------------------


def ask_approval(ui: UI, read_line: Callable[[str], str | None]) -> Callable[[PlannedCall], str]:
    """approve(call) for the loop: y (run it), n (refuse: the model is told), a (always this tool in this
    chat); Enter alone refuses. Ctrl+C or the end of input stops the turn."""

    def approve(call: PlannedCall) -> str:
        with default_sigint():
            while True:
                try:
                    answer = read_line("  run it? [y]es / [n]o / [a]lways this tool: ")
                except KeyboardInterrupt:
                    ui.err.print()
                    return "stop"
                if answer is None:
                    return "stop"
                if (decision := ANSWERS.get(answer.strip().lower())) is not None:
                    return decision
                ui.info("  answer y, n or a")

    return approve


def refuse_all(ui: UI) -> Callable[[PlannedCall], str]:
    """approve(call) where nobody can answer (`run` without a terminal): every call refused, said once."""
    said = []

    def approve(call: PlannedCall) -> str:
        if not said:
            ui.info("  (not run: pass --yes to run tool calls without asking)")
            said.append(True)
        return "no"

    return approve


def terminal_line(ui: UI) -> Callable[[str], str | None]:
    """read_line for `run`: the prompt on stderr, the answer from the terminal."""

    def read_line(prompt: str) -> str | None:
        ui.err.print(prompt, end="", markup=False)
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    return read_line
