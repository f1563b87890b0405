"""MCP clients (runtime/mcp.py) against the SDK-written test server (tests/cli/mcp_test_server.py), over stdio
and streamable HTTP: tools listed and converted, text and image results, errors, a hanging call stopped by
its timeout and by Ctrl+C, a crash mid-call, huge and junk output, a server's env kept to that server, a
failed start in one line, and no child process left once the hub is closed.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from PIL import Image

from qwen35_lite.errors import InputError
from qwen35_lite.runtime.mcp import MAX_TOOL_CHARS, McpHub, ToolCallCancelled, printable
from qwen35_lite.runtime.mcp_config import ServerConfig, parse_config, read_config

SERVER = Path(__file__).resolve().parents[1] / "cli" / "mcp_test_server.py"


def stdio(name: str, tmp_path: Path, **env: str) -> ServerConfig:
    env = {"MCP_TEST_LOG": str(tmp_path / f"{name}.log"), **env}
    return ServerConfig(name, command=sys.executable, args=(str(SERVER),), env=env)


def logged(tmp_path: Path, name: str) -> list[dict]:
    path = tmp_path / f"{name}.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def server_pids() -> set[int]:
    """Our child processes running the test server (the SDK starts them in sessions of their own)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if str(SERVER) in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            pass
    return found


# ---- the config file ---------------------------------------------------------------------------------


def test_config_reads_stdio_and_http_servers_and_skips_disabled(tmp_path):
    path = tmp_path / "servers.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "files": {"command": "npx", "args": ["-y", "x"], "env": {"K": "v"}, "autoApprove": []},
                    "web": {"url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "Bearer t"}},
                    "off": {"command": "nope", "disabled": True},
                }
            }
        )
    )
    files, web = read_config(path)
    assert (files.name, files.command, files.args, files.env, files.transport) == (
        "files",
        "npx",
        ("-y", "x"),
        {"K": "v"},
        "stdio",
    )
    assert (web.url, web.headers, web.transport) == (
        "http://127.0.0.1:9/mcp",
        {"Authorization": "Bearer t"},
        "http",
    )
    assert [c.name for c in parse_config({"servers": {"a": {"command": "x"}}})] == ["a"]  # VS Code's key


@pytest.mark.parametrize(
    "data, words",
    [
        ([], "JSON object"),
        ({"other": {}}, '"mcpServers"'),
        ({"mcpServers": {"a b": {"command": "x"}}}, "letters, digits"),
        ({"mcpServers": {"a": 5}}, "not an object"),
        ({"mcpServers": {"a": {}}}, 'neither "command" nor "url"'),
        ({"mcpServers": {"a": {"command": "x", "args": "y"}}}, "args must be a list"),
        ({"mcpServers": {"a": {"command": "x", "env": {"K": 1}}}}, "env must be an object of strings"),
        ({"mcpServers": {"a": {"url": "file:///etc/passwd"}}}, "http:// or https://"),
        ({"mcpServers": {"a": {"url": "http://x", "type": "sse"}}}, "not supported"),
    ],
)
def test_config_problems_are_one_input_error(data, words):
    with pytest.raises(InputError) as info:
        parse_config(data, "f.json")
    assert words in info.value.message and info.value.hint


def test_a_result_becomes_text_images_and_notes(tmp_path):
    """Text parts joined, an image kept as a file named by its content, a bad image and an audio part
    dropped with a note that the model reads too, an over-long text cut."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    parts = [
        SimpleNamespace(type="text", text="first"),
        SimpleNamespace(type="image", data=png, mime_type="image/png"),
        SimpleNamespace(type="image", data="%%%not base64", mime_type="image/png"),
        SimpleNamespace(type="audio", data="", mime_type="audio/wav"),
        SimpleNamespace(type="text", text="second"),
    ]
    hub = McpHub([], image_dir=tmp_path)
    out = hub.convert(SimpleNamespace(content=parts, is_error=False, structured_content=None))
    assert out.text.startswith("first\nsecond\n[") and not out.is_error
    assert len(out.images) == 1 and Image.open(out.images[0]).size == (4, 4)
    assert out.images[0].parent == tmp_path and out.images[0].suffix == ".png"
    assert "not base64" in out.text and "audio" in out.text and len(out.notes) == 2
    long = hub.convert(
        SimpleNamespace(content=[SimpleNamespace(type="text", text="x" * (MAX_TOOL_CHARS + 5))])
    )
    assert long.text.startswith("x" * MAX_TOOL_CHARS) and f"cut to {MAX_TOOL_CHARS}" in long.text
    assert hub.convert(SimpleNamespace(content=[], structured_content={"a": 1})).text == '{"a": 1}'


def test_printable_escapes_what_could_hide_text_on_a_terminal():
    assert printable('{"p": "a\x1b[2Kb\u202ec\u2028d é"}') == '{"p": "a\\u001b[2Kb\\u202ec\\u2028d é"}'


# ---- a real server over stdio --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(module_tmp):
    tmp = module_tmp("mcp")
    configs = [stdio("a", tmp, MCP_TEST_SECRET="for-a"), stdio("b", tmp)]
    hub = McpHub(configs, timeout=20, image_dir=tmp / "images", reserved_names=("add",))
    hub.start()
    hub.tmp = tmp
    yield hub
    hub.close()


@pytest.mark.slow
def test_tools_are_listed_converted_and_prefixed_where_names_clash(hub):
    assert [s.status for s in hub.servers.values()] == ["ready", "ready"]
    names = {t.name for t in hub.tools()}
    assert {"a_echo", "b_echo", "a_add", "b_add"} <= names  # both servers have them (add: --tools too)
    echo = hub.find("a_echo")
    assert (echo.server, echo.remote) == ("a", "echo")
    function = echo.openai()["function"]
    assert (
        function["parameters"] == echo.schema
        and function["parameters"]["properties"]["text"]["type"] == "string"
    )
    assert function["description"] == "Return the text as it came."


@pytest.mark.slow
def test_calls_give_text_images_and_errors_and_env_stays_with_its_server(hub):
    out = hub.call(hub.find("a_echo"), {"text": "héllo"})
    assert (out.text, out.is_error) == ("héllo", False)
    out = hub.call(hub.find("b_add"), {"a": 2, "b": 40})
    assert out.text == "42"
    out = hub.call(hub.find("a_picture"), {"color": "blue", "size": 8})
    assert out.text == "a blue square" and Image.open(out.images[0]).getpixel((0, 0)) == (0, 0, 255)
    out = hub.call(hub.find("a_fail"), {"message": "disk on fire"})
    assert out.is_error and "disk on fire" in out.text
    out = hub.call(hub.find("a_big"), {"chars": MAX_TOOL_CHARS + 1000})
    assert len(out.text) < MAX_TOOL_CHARS + 200 and "cut to" in out.text
    assert hub.call(hub.find("a_junk"), {}).text == "after junk"  # a non-JSON line on the stream: no harm
    assert [e["env"] for e in logged(hub.tmp, "a")] == ["for-a"] * 5
    assert [e["env"] for e in logged(hub.tmp, "b")] == [None]  # a's secret never reached b


@pytest.mark.slow
def test_a_hanging_call_ends_at_its_timeout_and_at_ctrl_c(hub):
    out = hub.call(hub.find("a_hang"), {}, timeout=0.5)
    assert out.is_error and "timed out after 0.5 s" in out.text
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(ToolCallCancelled):
        hub.call(hub.find("a_hang"), {}, cancel=cancel, timeout=30)
    assert hub.call(hub.find("a_echo"), {"text": "still here"}).text == "still here"


@pytest.mark.slow
def test_a_crash_mid_call_is_an_error_and_the_rest_goes_on(tmp_path):
    before = server_pids()  # the module's hub has its own
    with McpHub([stdio("c", tmp_path), stdio("d", tmp_path)], timeout=20, image_dir=tmp_path) as hub:
        hub.start()
        pids = server_pids() - before
        assert len(pids) == 2
        out = hub.call(hub.find("c_crash"), {})
        assert out.is_error and "stopped during the call" in out.text
        assert hub.servers["c"].status == "crashed"
        again = hub.call(hub.find("c_echo"), {"text": "x"})
        assert again.is_error and "cannot run this call" in again.text
        assert hub.call(hub.find("d_echo"), {"text": "x"}).text == "x"
    assert not server_pids() & pids


@pytest.mark.slow
def test_failed_starts_are_one_line_each_and_leave_nothing_running(tmp_path):
    configs = [
        ServerConfig("missing", command=str(tmp_path / "no-such-program")),
        stdio("refuses", tmp_path, MCP_TEST_FAIL_START="1"),
        ServerConfig("web", url="http://127.0.0.1:9/mcp"),  # nothing listens on port 9
    ]
    seen, before = [], server_pids()
    with McpHub(configs, timeout=10, image_dir=tmp_path) as hub:
        hub.start(on_server=seen.append)
        assert [s.status for s in seen] == ["failed"] * 3
        assert "no-such-program" in seen[0].error
        assert "refusing to start (MCP_TEST_FAIL_START)" in seen[1].error  # its stderr's last line
        assert all("\n" not in s.error for s in seen) and hub.tools() == []
    assert server_pids() == before


@pytest.mark.slow
def test_a_malformed_result_is_an_error_and_the_server_goes_on(tmp_path):
    raw = ServerConfig("raw", command=sys.executable, args=(str(SERVER), "--raw"))
    with McpHub([raw], timeout=20, image_dir=tmp_path) as hub:
        hub.start()
        assert hub.servers["raw"].status == "ready", hub.servers["raw"].error
        out = hub.call(hub.find("broken"), {})
        assert out.is_error and "does not follow the MCP protocol" in out.text and "\n" not in out.text
        assert hub.call(hub.find("fine"), {}).text == "fine"
        assert hub.servers["raw"].status == "ready"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_streamable_http_server(tmp_path):
    port = _free_port()
    env = {"MCP_TEST_LOG": str(tmp_path / "h.log")}
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--http", str(port)], env={**__import__("os").environ, **env}
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        with McpHub(
            [ServerConfig("h", url=f"http://127.0.0.1:{port}/mcp")], timeout=20, image_dir=tmp_path
        ) as hub:
            hub.start()
            assert hub.servers["h"].status == "ready", hub.servers["h"].error
            assert hub.call(hub.find("echo"), {"text": "over http"}).text == "over http"
            assert hub.call(hub.find("picture"), {"size": 4}).images
            assert "timed out" in hub.call(hub.find("hang"), {}, timeout=0.5).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- saves of agent chats (runtime/chat_file.py) ---------------------------------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}


@pytest.mark.parametrize(
    "message, words",
    [
        ({"role": "assistant", "content": "", "tool_calls": "x"}, "tool_calls is a string"),
        ({"role": "assistant", "content": "", "tool_calls": [{"type": "code"}]}, '{"type": "function"}'),
        (
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]},
            "has no name",
        ),
        (
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "a", "arguments": "{}"}}],
            },
            "arguments are a string",
        ),
        ({"role": "tool", "content": 5}, "content is a number"),
        ({"role": "tool", "content": "x", "tool_call_id": 3}, "tool_call_id that is not text"),
        ({"role": "tool", "content": "x", "extra": 1}, "'extra'"),
        ({"role": "user", "content": "x", "tool_calls": []}, "'tool_calls'"),
    ],
)
def test_a_save_with_malformed_calls_or_results_is_refused(message, words):
    from qwen35_lite.runtime.chat_file import NotASave, parse_save

    with pytest.raises(NotASave) as info:
        parse_save({"messages": [{"role": "user", "content": "hi"}, message]})
    assert words in str(info.value)


def test_a_save_with_calls_and_results_reads_back(tmp_path):
    from qwen35_lite.runtime.chat_file import parse_save

    pic = tmp_path / "p.png"
    Image.new("RGB", (4, 4)).save(pic)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [CALL]},
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "name": "add",
            "content": [{"type": "image", "image": str(pic)}, {"type": "text", "text": "1"}],
        },  # fmt: skip
    ]
    assert parse_save({"messages": messages}).messages == messages
