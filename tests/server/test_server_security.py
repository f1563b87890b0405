"""What `serve` refuses, as a client (or an attacker) would hit it: local files named in image_url, a
foreign Host header, the schema without the key, malformed bodies, huge bodies and prompts; and what a
client that leaves, or a SIGTERM, does to a running generation.

The servers are real: uvicorn on 127.0.0.1 in a thread over one tiny engine, and one `qwen35-lite serve`
process for what needs its own memory and signals."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from test_server import CTX, KEY, MESSAGES, ThreadServer, chat, free_port, post

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.runtime.engine import Engine, EngineOptions
from qwen35_lite.runtime.generate import Finished, TokenEvent
from qwen35_lite.server import worker
from qwen35_lite.server.app import create_app
from qwen35_lite.server.guard import HostPolicy

REFUSED = "an image_url that is a local path was refused"


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    out = module_tmp("serve-security") / "tiny"
    write_checkpoint(out, SyntheticSpec(), dtype=torch.float32)
    return out


@pytest.fixture(scope="module")
def engine(ckpt) -> Engine:
    return Engine.load(str(ckpt), EngineOptions(device="cpu", ctx=CTX))


@pytest.fixture(scope="module")
def media(module_tmp) -> Path:
    """A directory clients may name files in (with a picture, a symlink out, and a subdirectory), and a
    secret picture beside it."""
    from PIL import Image

    root = module_tmp("media").resolve()
    allowed = root / "allowed"
    (allowed / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(allowed / "red.png")
    Image.new("RGB", (32, 32), "blue").save(root / "secret.png")
    (root / "secret.png").chmod(0o600)
    (allowed / "escape.png").symlink_to(root / "secret.png")
    (allowed / "inside.png").symlink_to(allowed / "red.png")
    os.mkfifo(allowed / "fifo.png")
    return allowed


@pytest.fixture(scope="module")
def server(engine):
    """The defaults: no local media, localhost names only, an API key."""
    s = ThreadServer(create_app(engine, "tiny", api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def media_server(engine, media):
    """--allowed-local-media-path MEDIA --allowed-hosts a.example,b.example --allowed-hosts c.example"""
    hosts = HostPolicy("127.0.0.1", ["a.example,b.example", "c.example"])
    s = ThreadServer(create_app(engine, "tiny", api_key=KEY, hosts=hosts, media_dir=media))
    yield s
    s.stop()


def image_message(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"model": "tiny", "messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]}


# ---- local files -----------------------------------------------------------------------------------


def test_local_paths_are_refused_by_default_with_one_message(server, media):
    secret = media.parent / "secret.png"
    urls = [
        str(secret),  # exists (an image, mode 0600)
        str(media.parent / "missing.png"),  # does not
        f"file://{secret}",
        f"file://{media.parent / 'missing.png'}",
        f"{media}/../secret.png",
        "/etc/passwd",
        "/proc/self/environ",
        str(media),  # a directory
        "red.png",
        "~/.bashrc",
    ]
    messages = set()
    for url in urls:
        r = post(server, image_message(url))
        assert r.status == 400, (url, r.body)
        messages.add(r.body["error"]["message"])
    (message,) = messages  # the same words whether the path exists or not: nothing learned
    assert REFUSED in message and "data URL" in message and str(media.parent) not in message
    assert chat(server.client(), n=2).choices[0].finish_reason == "length"


def test_allowed_local_media_path_reads_only_regular_files_inside_it(media_server, media):
    """A file inside (by path, file:// URL, relative path or a symlink that stays inside) passes the path
    check and reaches the model (a text-only checkpoint: the vision 400); escapes, missing files, a
    directory and a FIFO all get the refusal, in the same words."""
    for url in (str(media / "red.png"), f"file://{media / 'red.png'}", "red.png", str(media / "inside.png")):
        r = post(media_server, image_message(url))
        assert r.status == 400 and "vision" in r.body["error"]["message"], (url, r.body)
    refusals = set()
    for url in (
        str(media / "escape.png"),  # a symlink out of the directory
        f"{media}/../secret.png",
        "../secret.png",
        f"file://{media}/sub/../../secret.png",
        str(media / "missing.png"),
        str(media / "sub"),
        str(media / "fifo.png"),
        f"file://otherhost{media / 'red.png'}",
    ):
        r = post(media_server, image_message(url))
        assert r.status == 400, (url, r.body)
        refusals.add(r.body["error"]["message"])
    (message,) = refusals
    assert REFUSED in message and "--allowed-local-media-path" in message and str(media) not in message


def test_a_bad_data_url_is_named_by_its_place_not_the_servers_temp_path(server):
    garbage = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
    r = post(server, image_message(garbage))
    message = r.body["error"]["message"]
    assert r.status == 400 and "image 1" in message, r.body
    assert "qwen35-lite-images" not in message and "/tmp" not in message and "image0" not in message


# ---- Host header, schema ---------------------------------------------------------------------------


def get(server, path: str, host: str | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """A raw GET with the Host header as given (http.client sends ours otherwise)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        if key:
            conn.putheader("Authorization", f"Bearer {key}")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_a_foreign_host_header_is_refused_and_localhost_names_are_not(server):
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil"):
        status, body = get(server, "/v1/models", host)
        assert status == 400 and body["error"]["code"] == "host_not_allowed", (host, body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and "--allowed-hosts" in str(body)
    for host in (
        "localhost",
        f"LocalHost.:{port}",
        "127.0.0.1",
        f"127.0.0.1:{port}",
        "[::1]",
        f"[::1]:{port}",
    ):
        status, body = get(server, "/v1/models", host)
        assert status == 200 and body["data"][0]["id"] == "tiny", (host, body)


def test_allowed_hosts_adds_names_and_star_allows_any(media_server, engine):
    for host in ("a.example", "b.example:80", "C.example"):
        assert get(media_server, "/v1/models", host)[0] == 200, host
    assert get(media_server, "/v1/models", "d.example")[0] == 400
    anyhost = ThreadServer(create_app(engine, "tiny", hosts=HostPolicy("127.0.0.1", ["*"])))
    try:
        assert get(anyhost, "/v1/models", "whatever.example", key=None)[0] == 200
    finally:
        anyhost.stop()


def test_host_policy_of_the_bound_address():
    lan = HostPolicy("192.168.1.5")
    assert lan.allows("192.168.1.5:8000") and lan.allows("localhost") and not lan.allows("10.0.0.1")
    wildcard = HostPolicy("0.0.0.0")  # many addresses: any address is answered, never a foreign name
    assert wildcard.allows("10.0.0.1:8000") and wildcard.allows("[fe80::1]:8000")
    assert not wildcard.allows("evil.example:8000")


def test_the_schema_needs_the_key_and_docs_are_off(server):
    assert get(server, "/openapi.json", key=None)[0] == 401
    assert get(server, "/openapi.json", key="wrong")[0] == 401
    status, schema = get(server, "/openapi.json")
    assert status == 200 and "/v1/chat/completions" in schema["paths"]
    for path in ("/docs", "/redoc"):
        assert get(server, path, key=None)[0] == 404


# ---- malformed bodies --------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


def call(arguments) -> dict:
    return {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": arguments}}],
    }


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"tool_choice": {"function": "x"}, "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": ["auto"], "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": 1}}, "tools": TOOLS}, "tool_choice"),
        ({"chat_template_kwargs": {"self": 1}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"namespace": 1}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
        ({"messages": [5]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [5]}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]}, "image_url"),
        ({"messages": [{"role": "assistant", "tool_calls": 7}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": ["x"]}]}, "messages[0].tool_calls[0]"),
        ({"messages": [call("[1, 2]")]}, "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [call(None)]}, "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [call(5)]}, "messages[0].tool_calls[0].function.arguments"),
        ({"tools": [{"type": "function", "function": "x"}]}, "tools"),
        ({"tools": {"a": 1}}, "tools"),
        ({"stop": 5}, "stop"),
        ({"stop": [1, 2]}, "stop"),
        ({"stream_options": "x", "stream": True}, "stream_options"),
        ({"stream_options": {"include_usage": "maybe"}, "stream": True}, "stream_options.include_usage"),
        ({"stream": "sometimes"}, "stream"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"temperature": [1]}, "temperature"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_each_malformed_shape_is_a_400_naming_the_field(server, fields, named):
    r = post(server, {"model": "tiny", "messages": MESSAGES, "max_tokens": 1, **fields})
    assert r.status == 400, r.body
    error = r.body["error"]
    assert named in error["message"] and error["param"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt", [5, [1, 2], ["a", "b"], {"a": 1}, None])
def test_each_malformed_prompt_is_a_400_naming_it(server, prompt):
    r = post(server, {"model": "tiny", "prompt": prompt, "max_tokens": 1}, path="/completions")
    assert r.status == 400 and "prompt" in r.body["error"]["message"] and r.body["error"]["param"], r.body


# ---- a client that leaves a non-streamed request ---------------------------------------------------


@pytest.fixture
def flowing(monkeypatch):
    """Set once the worker's generation yields its first token; every Finished event is kept."""
    first, seen = threading.Event(), []
    real = worker.generate

    def spy(*args, **kwargs):
        for event in real(*args, **kwargs):
            if isinstance(event, TokenEvent):
                first.set()
            if isinstance(event, Finished):
                seen.append(event)
            yield event

    monkeypatch.setattr(worker, "generate", spy)
    return first, seen


def test_a_client_that_leaves_a_non_streamed_request_stops_it(server, flowing, caplog):
    first, finished = flowing
    budget = CTX - 64
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": budget, "temperature": 0})
    caplog.set_level(logging.INFO, logger="qwen35_lite.server")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", body, headers)
    assert first.wait(60)
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client leaves before any byte of the answer
    conn.close()
    nxt = chat(server.client(), n=2)  # served once the first generation stopped: it queued behind it
    assert nxt.choices[0].finish_reason == "length" and nxt.usage.completion_tokens == 2
    assert finished[0].reason == "cancelled" and len(finished[0].tokens) < budget
    lines = [r.getMessage() for r in caplog.records if r.name == "qwen35_lite.server"]
    left = [line for line in lines if "cancelled: client left" in line]
    assert len(left) == 1 and left[0].startswith("POST /v1/chat/completions")
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"


# ---- the process: body cap, a huge prompt, SIGTERM -------------------------------------------------


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) << 10
    return 0


class Peak:
    """The highest RssAnon of `pid`, sampled every few ms from outside while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self):
        self.base = rss_anon(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon(self.pid))
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def raw_post(
    port: int, path: str, body: bytes, timeout: float = 120, headers: dict | None = None
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_the_process_caps_bodies_counts_prompts_and_stops_on_sigterm_mid_generation(ckpt):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "qwen35_lite.cli", "serve", "--model", str(ckpt), "--port", str(port)]
    cmd += ["--device", "cpu", "--ctx", "4096", "--max-request-mb", "8"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90  # a hang guard, not a timing
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the server did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        huge = json.dumps({"model": "tiny", "prompt": "word " * (10 << 20), "max_tokens": 1}).encode()
        with Peak(proc.pid) as over:  # 50 MB: refused as it arrives, never held whole
            status, body = raw_post(port, "/v1/completions", huge)
        assert status == 413 and "--max-request-mb" in body["error"]["message"]
        assert over.growth < 24 << 20, over.growth  # the 8 MiB cap's worth, not the 50 MB body
        big = json.dumps({"model": "tiny", "prompt": "word " * (1 << 20), "max_tokens": 1}).encode()
        with Peak(proc.pid) as under:  # 5 MB, under the cap: counted in pieces, refused before tokenising
            status, body = raw_post(port, "/v1/completions", big)
        assert status == 400 and "context" in body["error"]["message"] and body["error"]["param"] == "prompt"
        assert under.growth < 256 << 20, under.growth  # tokenised whole: 686 MiB, in 8 s
        message = {"role": "user", "content": "word " * (1 << 20)}
        big = json.dumps({"model": "tiny", "messages": [message], "max_tokens": 1}).encode()
        with Peak(proc.pid) as chat_under:  # the same as a chat message: counted before it is rendered
            status, body = raw_post(port, "/v1/chat/completions", big)
        assert (
            status == 400 and "context" in body["error"]["message"] and body["error"]["param"] == "messages"
        )
        assert chat_under.growth < 256 << 20, chat_under.growth
        assert proc.poll() is None

        answer: dict = {}

        def ask() -> None:  # a long non-streamed generation, running when the signal comes
            body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4000}
            try:
                answer["status"] = raw_post(port, "/v1/completions", json.dumps(body).encode(), 60)[0]
            except OSError as e:
                answer["error"] = e

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        time.sleep(1.0)  # let it start generating (4000 tokens take far longer, even on a fast machine)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)  # a hang guard; that it stopped the generation is the 503 below
        asker.join(10)
        log = proc.stderr.read()
        assert "Traceback" not in log and "POST /v1/completions" in log, log
        assert "(cancelled: server stopping)" in log.splitlines()[-1], log
        assert answer.get("status") == 503, answer  # cancelled, not finished: "the server is shutting down"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_a_media_path_that_is_not_a_directory_before_loading(ckpt, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from qwen35_lite.cli import app as cli_app

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    monkeypatch.setattr("qwen35_lite.cli.serve.check_address", lambda host, port: None)
    for path in (tmp_path / "missing", ckpt / "config.json"):
        r = CliRunner().invoke(
            cli_app, ["serve", "--model", str(ckpt), "--allowed-local-media-path", str(path)]
        )
        assert r.exit_code == 1 and r.stderr.startswith("error: --allowed-local-media-path"), r.stderr
        assert "hint:" in r.stderr and "Traceback" not in r.stderr


def test_a_cancel_during_a_long_prefill_stops_it_at_the_next_layer(engine, monkeypatch):
    """The shutdown's cancel reaches a prefill (here a slow stand-in, 400 layers of 50 ms) at its next
    layer: the client gets 503 and the rest of the prefill never runs."""
    started, layers = threading.Event(), []

    def slow_prefill(model, cache, req, on_progress=None):
        for i in range(400):
            started.set()
            time.sleep(0.05)
            layers.append(i)
            on_progress(i + 1, 400)
        pytest.fail("the prefill ran to its end")

    monkeypatch.setattr(worker, "prefill", slow_prefill)
    s = ThreadServer(create_app(engine, "tiny"))
    try:
        answer = {}
        asker = threading.Thread(
            target=lambda: answer.update(r=post(s, {"model": "tiny", "messages": MESSAGES}))
        )
        asker.start()
        assert started.wait(30)
        s.app.state.worker.cancel_all()  # what SIGTERM does
        asker.join(30)
        assert answer["r"].status == 503 and "shutting down" in answer["r"].body["error"]["message"]
        assert len(layers) < 400
        late = post(s, {"model": "tiny", "messages": MESSAGES})  # no new work either
        assert late.status == 503 and "shutting down" in late.body["error"]["message"]
    finally:
        s.stop()


def test_the_serve_flags_reach_the_app(engine, ckpt, media, monkeypatch):
    from typer.testing import CliRunner

    from qwen35_lite.cli import app as cli_app
    from qwen35_lite.server import app as server_app

    apps = []
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: engine))
    monkeypatch.setattr(server_app, "run_server", lambda app, host, port: apps.append(app))
    monkeypatch.setattr("qwen35_lite.cli.serve.check_address", lambda host, port: None)
    flags = [
        "--allowed-hosts",
        "a.example",
        "--allowed-local-media-path",
        str(media),
        "--max-request-mb",
        "1",
    ]
    r = CliRunner().invoke(cli_app, ["serve", "--model", str(ckpt), *flags])
    assert r.exit_code == 0, r.stderr
    s = ThreadServer(apps[-1])
    try:
        assert get(s, "/v1/models", "a.example", key=None)[0] == 200
        assert get(s, "/v1/models", "b.example", key=None)[0] == 400
        r = post(s, image_message(str(media / "red.png")), key=None)
        assert r.status == 400 and "vision" in r.body["error"]["message"]  # past the path check
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
        r = post(s, big, key=None)
        assert r.status == 413 and "over 1 MiB" in r.body["error"]["message"]
    finally:
        s.stop()


@pytest.mark.parametrize(
    "body",
    [
        b"hello",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "tiny", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}",
    ],
    ids=["not-json", "not-utf8", "nested-100k-deep", "5000-digit-int"],
)
def test_a_body_that_does_not_parse_is_an_openai_400(server, body):
    status, answer = raw_post(
        server.port, "/v1/chat/completions", body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert status == 400 and "not valid JSON" in answer["error"]["message"], answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}


def test_an_unknown_path_is_an_openai_404(server):
    status, answer = get(server, "/v1/nothing")
    assert status == 404 and answer["error"]["type"] == "not_found_error", answer


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_a_megabytes_prompt_is_refused_for_the_context_before_it_is_rendered_or_tokenised(server, path):
    text = "word " * (1 << 20)  # 5 MB, under the body cap
    body = {"model": "tiny", "max_tokens": 1}
    body.update({"messages": [{"role": "user", "content": text}]} if "chat" in path else {"prompt": text})
    r = post(server, body, path=path)
    assert r.status == 400 and f"the context is {CTX}" in r.body["error"]["message"], r.body
    assert r.body["error"]["param"] == ("messages" if "chat" in path else "prompt")
