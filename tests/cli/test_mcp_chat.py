"""`chat --mcp` end to end, through a pseudo-terminal, with the SDK-written test server over stdio and the
model's replies scripted (runtime/scripted.py: random weights never call tools): a call approved, one
refused, one approved for good ("a"), one timed out, one stopped by Ctrl+C while it runs, a server crashing
mid-call; /tools and /mcp reload; /save, then a new chat that /loads it and continues; SIGTERM; no server process left.
`run --mcp --yes --json` prints the transcript.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_hardening_chat import ROOT, Terminal

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.runtime import scripted

SERVER = Path(__file__).resolve().parent / "mcp_test_server.py"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
PARTIAL = re.compile(r"\x1b(\[[0-9;?]*)?$")


def call(name: str, **args) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


class PlainTerminal(Terminal):
    """Patterns are matched in order, each after the last match, on the text without colours and \\r."""

    mark = 0

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        end = time.monotonic() + timeout
        while True:
            if m := re.search(pattern, self.plain[self.mark :]):
                self.mark += m.end()
                return m
            if time.monotonic() > end or not self.pump(0.1):
                raise AssertionError(
                    f"{pattern!r} never appeared; the terminal showed: {self.plain[-3000:]!r}"
                )

    def pump(self, seconds: float) -> bool:
        """Read what the terminal shows within `seconds`; False once the chat has closed it."""
        ready, _, _ = select.select([self.master], [], [], seconds)
        if ready:
            try:
                self.seen += os.read(self.master, 65536).decode(errors="replace")
            except OSError:
                return False
        return True

    @property
    def plain(self) -> str:
        """Only grows: an escape sequence still arriving is left out until it is whole."""
        partial = PARTIAL.search(self.seen)
        return ANSI.sub("", self.seen[: partial.start()] if partial else self.seen)

    def line(self, text: str) -> None:
        self.send(text + "\n")


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    out = module_tmp("mcpchat") / "tiny"
    write_checkpoint(out, SyntheticSpec(), dtype=torch.float32)
    return out


def servers_file(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "calls.log"
    cfg = tmp_path / "servers.json"
    entry = {"command": sys.executable, "args": [str(SERVER)], "env": {"MCP_TEST_LOG": str(log)}}
    cfg.write_text(json.dumps({"mcpServers": {"t": entry}}))
    return cfg, log


def live_servers(log: Path) -> list[int]:
    """Test servers still running for this test (their env names its log file)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(SERVER) in " ".join(p.info["cmdline"] or []) and p.environ().get("MCP_TEST_LOG") == str(
                log
            ):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def gone(log: Path, timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while live_servers(log):
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_the_agent_loop_on_a_terminal(ckpt, tmp_path, monkeypatch):
    cfg, log = servers_file(tmp_path)
    replies = [
        call("echo", text="hello"),
        "fine",
        call("add", a=1, b=2) + "\n" + call("echo", text="b"),
        "ok",
        call("hang"),
        "late",
        call("hang"),
        call("crash"),
        "gone",
    ]
    (tmp_path / "script.json").write_text(json.dumps(replies))
    monkeypatch.setenv(scripted.ENV, str(tmp_path / "script.json"))
    saved = tmp_path / "agent.json"
    args = ["chat", "-m", ckpt, "--no-think", "-n", "100", "-t", "0", "--mcp", cfg, "--tool-timeout", "3"]
    term = PlainTerminal(args)
    try:
        term.wait_for(r"mcp: t ready, 8 tools")
        term.wait_for(">>> ")
        term.line("one")
        term.wait_for(
            r'tool call t · echo \{"text": "hello"\}\s+run it\? \[y\]es / \[n\]o / \[a\]lways this tool: '
        )
        term.line("y")
        term.wait_for(r"5 characters in [\d.]+ s: hello")
        term.wait_for(r"fine")
        term.wait_for(">>> ")

        term.line("two")
        term.wait_for(r'tool call t · add \{"a": 1, "b": 2\}\s+run it\?')
        term.line("n")
        term.wait_for("refused: the model is told so")
        term.wait_for(r'tool call t · echo \{"text": "b"\}\s+run it\?')
        term.line("a")
        term.wait_for(r"1 character in [\d.]+ s: b")
        term.wait_for(">>> ")

        term.line("three")
        term.wait_for(r"tool call t · hang \{\}\s+run it\?")
        term.line("y")
        term.wait_for(r"tool error Error: the call timed out after 3 s \(--tool-timeout\)")
        term.wait_for(r"late")
        term.wait_for(">>> ")

        term.line("four")
        term.wait_for(r"tool call t · hang \{\}\s+run it\?")
        term.line("y")
        time.sleep(1)
        term.p.send_signal(signal.SIGINT)
        term.wait_for(r"stopping…")
        term.wait_for(r"\(turn stopped; the calls and their results are kept in the chat\)")
        term.wait_for(">>> ")

        term.line("five")
        term.wait_for(r"tool call t · crash \{\}\s+run it\?")
        term.line("y")
        term.wait_for(r"tool error Error: the MCP server 't' stopped during the call")
        term.wait_for(r"gone")
        term.wait_for(">>> ")
        term.line("/tools")
        term.wait_for(r"t \(stdio: .*\): crashed: the server stopped during a call")
        term.wait_for(r"  echo  \[always\]")
        term.line("/mcp reload")  # the crashed server starts again; "always" was for the old one
        term.wait_for(r"mcp: t ready, 8 tools")
        term.line("/tools")
        term.wait_for(r"t \(stdio: .*\): ready")
        term.wait_for(r"  echo  \[ask\]")
        term.line(f"/save {saved}")
        term.wait_for(r"saved \d+ messages")
        term.line("/exit")
        assert term.p.wait(timeout=60) == 0
        assert "Traceback" not in term.plain
    finally:
        term.close()
    assert gone(log)
    calls = [json.loads(line)["tool"] for line in log.read_text().splitlines()]
    assert calls == ["echo", "echo", "hang", "hang", "crash"]  # add was refused: never sent
    messages = json.loads(saved.read_text())["messages"]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    assert results[:3] == ["hello", "Error: the user refused this tool call.", "b"]
    assert results[4] == "Error: the user stopped this tool call."
    assert sum(len(m.get("tool_calls", [])) for m in messages) == 6 == len(results)

    # A new chat resumes the saved one and continues; SIGTERM stops it and its server.
    (tmp_path / "script.json").write_text(json.dumps(["resumed fine"]))
    term = PlainTerminal(args)
    try:
        term.wait_for(">>> ")
        term.line(f"/load {saved}")
        term.wait_for(rf"loaded {len(messages)} messages")
        term.line("six")
        term.wait_for("resumed fine")
        term.wait_for(">>> ")
        assert live_servers(log)
        term.p.send_signal(signal.SIGTERM)
        assert term.p.wait(timeout=60) == 143
        assert "Traceback" not in term.plain and "error" not in term.plain
    finally:
        term.close()
    assert gone(log)


@pytest.mark.slow
def test_run_prints_the_transcript_in_its_json(ckpt, tmp_path):
    cfg, log = servers_file(tmp_path)
    (tmp_path / "script.json").write_text(json.dumps([call("add", a=2, b=40), "It is 42."]))
    env = {**os.environ, scripted.ENV: str(tmp_path / "script.json")}
    p = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "run", "-m", ckpt, "--no-think", "-n", "60", "-t", "0"]
        + ["--mcp", str(cfg), "--yes", "--json", "what is 2 + 40?"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["text"] == "It is 42." and out["rounds"] == 2
    assert len(out["prompt_ids"]) > 300  # the prompt's, with its 8 tools (not the last round's)
    (record,) = out["transcript"]
    assert (record["server"], record["tool"], record["arguments"]) == ("t", "add", '{"a": 2, "b": 40}')
    assert record["approved"] and record["result"] == {"text": "42", "images": [], "is_error": False}
    assert gone(log)


# ---- quick: no model, no server ------------------------------------------------------------------------


def test_approval_answers():
    from qwen35_lite.cli.agent import ask_approval
    from qwen35_lite.cli.ui import UI

    def approve_with(*lines):
        answers = iter(lines)
        return ask_approval(UI(), lambda prompt: next(answers))(None)

    assert approve_with("y") == "yes" and approve_with(" YES ") == "yes"
    assert approve_with("maybe", "a") == "always"  # asked again until the answer is one of them
    assert approve_with("") == "no" and approve_with("n") == "no"  # Enter alone refuses
    assert approve_with(None) == "stop"  # end of input


@pytest.mark.parametrize(
    "body, extra, words",
    [
        ("{not json", [], ["not JSON"]),
        ('{"mcpServers": {"a": {"url": "ftp://x"}}}', [], ["http:// or https://"]),
        ('{"mcpServers": {}}', ["--raw"], ["--mcp", "--raw"]),
    ],
)
def test_a_bad_mcp_file_is_refused_before_the_model_loads(tmp_path, body, extra, words):
    from typer.testing import CliRunner

    from qwen35_lite.cli import app

    cfg = tmp_path / "servers.json"
    cfg.write_text(body)
    r = CliRunner().invoke(app, ["run", "-m", str(tmp_path / "no-model"), "--mcp", str(cfg), *extra, "hi"])
    assert r.exit_code in (1, 2) and "Traceback" not in r.stderr
    assert all(w in r.stderr for w in words), r.stderr
    assert "no-model" not in r.stderr  # the model was never looked for
