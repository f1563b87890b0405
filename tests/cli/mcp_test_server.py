"""An MCP server for the tests, written with the official SDK (`MCPServer`, mcp 2.x): text and image results,
an erroring tool, a hanging tool, one that crashes the process, one that writes junk on the protocol stream.

    python mcp_test_server.py                 # stdio
    python mcp_test_server.py --http PORT     # streamable HTTP on 127.0.0.1:PORT/mcp
    python mcp_test_server.py --raw           # JSON-RPC by hand over stdio: `broken` answers a malformed result

Each call is appended to the file named by MCP_TEST_LOG (when set), one JSON line `{"tool", "arguments",
"env"}` (env: MCP_TEST_SECRET as the server sees it), so a test can check what was sent and to whom.
"""

from __future__ import annotations

import io
import json
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image

server = MCPServer("qwen35-lite-test")


def _log(tool: str, arguments: dict) -> None:
    if path := os.environ.get("MCP_TEST_LOG"):
        with open(path, "a", encoding="utf-8") as f:
            line = {"tool": tool, "arguments": arguments, "env": os.environ.get("MCP_TEST_SECRET")}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


@server.tool()
def echo(text: str) -> str:
    """Return the text as it came."""
    _log("echo", {"text": text})
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    _log("add", {"a": a, "b": b})
    return a + b


@server.tool()
def picture(color: str = "red", size: int = 64) -> list:
    """A square of one colour, as a PNG image, with a caption."""
    from PIL import Image as PILImage

    _log("picture", {"color": color, "size": size})
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), color).save(buffer, format="PNG")
    return [f"a {color} square", Image(data=buffer.getvalue(), format="png")]


@server.tool()
def fail(message: str = "it broke") -> str:
    """Always fails with the message."""
    _log("fail", {"message": message})
    raise ToolError(message)


@server.tool()
async def hang() -> str:
    """Never answers."""
    import anyio

    _log("hang", {})
    await anyio.sleep(3600)
    return "late"


@server.tool()
def crash() -> str:
    """Exits the server process in the middle of the call."""
    _log("crash", {})
    os._exit(3)


@server.tool()
def big(chars: int = 1_000_000) -> str:
    """A huge text result."""
    _log("big", {"chars": chars})
    return "".join(f"line {i}: " + "x" * 50 + "\n" for i in range(chars // 60 + 1))[:chars]


@server.tool()
def junk() -> str:
    """Writes a line that is not JSON-RPC on the protocol stream, then answers normally."""
    _log("junk", {})
    sys.stdout.write("this is not json\n")
    sys.stdout.flush()
    return "after junk"


def raw() -> None:
    """A server written without the SDK, whose `broken` tool answers a result the protocol does not allow
    (a text part without its text) and whose `fine` tool answers properly."""
    tools = [{"name": n, "inputSchema": {"type": "object", "properties": {}}} for n in ("broken", "fine")]
    for line in sys.stdin:
        message = json.loads(line)
        if "id" not in message:
            continue  # a notification
        method, params = message["method"], message.get("params") or {}
        if method == "initialize":
            result = {
                "protocolVersion": params.get("protocolVersion"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "raw", "version": "0"},
            }
        elif method == "tools/list":
            result = {"tools": tools}
        elif method == "tools/call" and params.get("name") == "broken":
            result = {"content": [{"type": "text"}], "isError": "maybe"}
        elif method == "tools/call":
            result = {"content": [{"type": "text", "text": "fine"}]}
        else:
            result = {}
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}) + "\n")
        sys.stdout.flush()


def main() -> None:
    if sys.argv[1:] == ["--raw"]:
        raw()
    elif len(sys.argv) == 3 and sys.argv[1] == "--http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        if os.environ.get("MCP_TEST_FAIL_START"):
            sys.stderr.write("test server: refusing to start (MCP_TEST_FAIL_START)\n")
            sys.exit(2)
        server.run("stdio")


if __name__ == "__main__":
    main()
