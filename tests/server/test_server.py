"""`qwen35-lite serve` end to end: a real uvicorn server on 127.0.0.1 (a thread, or a process for SIGTERM),
spoken to with the official `openai` client, on one tiny random fp32 checkpoint with the real tokenizer.

The oracles: `qwen35-lite run` for the text of a reply, transformers' apply_chat_template for the prompt
length, and a cold server for the tokens of a reply resumed from a kept model state.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import uvicorn
from typer.testing import CliRunner

from qwen35_lite.cli import app as cli_app
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.runtime.engine import Engine, EngineOptions
from qwen35_lite.runtime.generate import Finished, TokenEvent
from qwen35_lite.server import app as server_app
from qwen35_lite.server import worker
from qwen35_lite.server.app import create_app

openai = pytest.importorskip("openai")

KEY = "sk-test"
CTX = 512
SYSTEM = "Be brief."
PROMPT = "Name three colours."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    out = module_tmp("serve") / "tiny"
    write_checkpoint(out, SyntheticSpec(), dtype=torch.float32)
    return out


@pytest.fixture(scope="module")
def engine(ckpt) -> Engine:
    return Engine.load(str(ckpt), EngineOptions(device="cpu", ctx=CTX))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving `app` on a free port in a daemon thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(engine):
    s = ThreadServer(create_app(engine, "tiny", api_key=KEY))
    yield s
    s.stop()


@pytest.fixture
def finished(monkeypatch) -> list:
    """Every Finished event the worker's generations end with (their reason and tokens)."""
    seen = []
    real = worker.generate

    def spy(*args, **kwargs):
        for event in real(*args, **kwargs):
            if isinstance(event, Finished):
                seen.append(event)
            yield event

    monkeypatch.setattr(worker, "generate", spy)
    return seen


def run_cli(engine, monkeypatch, *args) -> dict:
    """`qwen35-lite run --json` in-process, on the engine the server holds (same weights, no second load)."""
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: engine))
    r = CliRunner().invoke(cli_app, ["run", "--model", "tiny", "--json", "--temperature", "0", *args])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def chat(client, n: int = 8, **kwargs):
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": n, **kwargs}
    return client.chat.completions.create(**body)


# ---- the reply is run's reply ----------------------------------------------------------------------


def test_chat_completion_equals_run_streamed_or_not(server, engine, monkeypatch):
    answer = run_cli(engine, monkeypatch, "--no-think", "-n", "8", "--system", SYSTEM, PROMPT)
    assert answer["text"] and not answer["thinking"]
    r = chat(server.client(), extra_body=NO_THINK)
    assert r.choices[0].message.content == answer["text"]
    assert r.choices[0].finish_reason == answer["finish_reason"] == "length"
    assert r.usage.prompt_tokens == len(answer["prompt_ids"]) and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # the server's first request
    chunks = list(
        chat(server.client(), stream=True, stream_options={"include_usage": True}, extra_body=NO_THINK)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1  # a resend


def test_reasoning_is_apart_from_content(server, engine, monkeypatch):
    """With thinking on, a random model never closes <think>: all of it is reasoning, none is content."""
    answer = run_cli(engine, monkeypatch, "-n", "8", "--system", SYSTEM, PROMPT)
    r = chat(server.client())
    message = r.choices[0].message
    assert message.content == ""
    assert message.reasoning_content == answer["thinking"] != ""
    chunks = list(chat(server.client(), stream=True))
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert streamed == message.reasoning_content
    assert not any(c.choices[0].delta.content for c in chunks)


@pytest.mark.slow
def test_prompt_tokens_are_transformers_apply_chat_template_length(server, ckpt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21°C"},
    ]
    for messages in (MESSAGES, history):
        r = chat(server.client(), n=1, tools=TOOLS, messages=messages, extra_body=NO_THINK)
        parsed = copy.deepcopy(messages)  # what vLLM does too: arguments as an object for the template
        for m in parsed:
            for call in m.get("tool_calls", []):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        ids = hf.apply_chat_template(
            parsed,
            tools=TOOLS,
            add_generation_prompt=True,
            enable_thinking=False,
            tokenize=True,
            return_dict=False,
        )
        assert r.usage.prompt_tokens == len(ids)


def test_stop_string_cuts_the_reply(server):
    full = chat(server.client(), extra_body=NO_THINK).choices[0].message.content
    stop = full[3:5]
    r = chat(server.client(), stop=[stop], extra_body=NO_THINK)
    assert r.choices[0].message.content == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = chat(server.client(), stop=stop, stream=True, extra_body=NO_THINK)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_raw_completion_and_models(server, engine):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="The sky is", max_tokens=5, temperature=0)
    tokens = engine.tokenizer.encode("The sky is")
    assert r.usage.prompt_tokens == len(tokens) and r.usage.completion_tokens == 5
    streamed = client.completions.create(
        model="tiny", prompt="The sky is", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


# ---- errors: OpenAI's JSON, and the server keeps serving --------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict
    body: dict


def post(server, body: dict, key: str | None = KEY, path: str = "/chat/completions") -> Answer:
    """A raw POST (the openai client hides the bodies of errors behind exceptions)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server.url + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return Answer(r.status, dict(r.headers), json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read()))


BAD_CALL = {
    "role": "assistant",
    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}],
}


@pytest.mark.parametrize(
    "body, key, status, words",
    [
        ({"model": "tiny"}, KEY, 400, "messages"),
        ({"model": "tiny", "messages": "hi"}, KEY, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, KEY, 400, "unknown role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi " * 600}]}, KEY, 400, "context"),
        ({"model": "tiny", "messages": MESSAGES, "temperature": -1}, KEY, 400, "temperature"),
        ({"model": "tiny", "messages": MESSAGES, "n": 2}, KEY, 400, "n"),
        (
            {
                "model": "tiny",
                "messages": MESSAGES,
                "tools": TOOLS,
                "tool_choice": {"function": {"name": "x"}},
            },
            KEY,
            400,
            "not among the tools",
        ),
        (
            {"model": "tiny", "messages": [*MESSAGES, BAD_CALL]},
            KEY,
            400,
            "not valid JSON",
        ),
        ({"model": "tiny", "messages": MESSAGES, "tools": [{"type": "x"}]}, KEY, 400, '"type": "function"'),
        ({"model": "nope", "messages": MESSAGES}, KEY, 404, "nope"),
        ({"model": "tiny", "messages": MESSAGES}, None, 401, "API key"),
        ({"model": "tiny", "messages": MESSAGES}, "wrong", 401, "API key"),
    ],
)
def test_errors_are_openai_json_and_the_server_keeps_serving(server, body, key, status, words):
    r = post(server, body, key)
    assert r.status == status, r.body
    error = r.body["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert chat(server.client(), n=2).choices[0].finish_reason == "length"


def test_unreadable_or_remote_images_are_400(server, tmp_path):
    garbage = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
    for url in (garbage, str(tmp_path / "missing.png"), "https://example.com/cat.png"):
        part = {"type": "image_url", "image_url": {"url": url}}
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]
        r = post(server, {"model": "tiny", "messages": messages})
        assert r.status == 400, r.body
        assert r.body["error"]["message"]
    assert chat(server.client(), n=2).choices[0].finish_reason == "length"


# ---- one model, several clients --------------------------------------------------------------------


def test_two_concurrent_clients_both_complete(server):
    results = {}

    def ask(name: str) -> None:
        results[name] = chat(server.client(), n=6, extra_body=NO_THINK)

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["a"].choices[0].message.content == results["b"].choices[0].message.content
    assert results["a"].usage.completion_tokens == results["b"].usage.completion_tokens == 6


def test_a_client_that_leaves_stops_its_generation(server, finished):
    budget = CTX - 64
    with server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=budget, temperature=0, stream=True
    ) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    deadline = time.time() + 10
    while not finished and time.time() < deadline:
        time.sleep(0.05)
    assert finished and finished[-1].reason == "cancelled"
    assert len(finished[-1].tokens) < budget
    assert chat(server.client(), n=2).choices[0].finish_reason == "length"


def test_full_queue_is_503_with_retry_after(engine):
    s = ThreadServer(create_app(engine, "tiny", capacity=1))
    try:
        with s.client(key="none").chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=CTX - 64, temperature=0, stream=True
        ) as running:
            next(iter(running))  # the first chunk: it is running
            busy = post(s, {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}, key=None)
        assert busy.status == 503 and busy.headers["retry-after"]
        assert busy.body["error"]["type"] == "server_error"
    finally:
        s.stop()


# ---- state reuse -----------------------------------------------------------------------------------


def test_resend_and_next_turn_reuse_state_and_give_a_cold_servers_tokens(engine):
    cold = ThreadServer(create_app(engine, "tiny", state_bytes=0))  # keeps no state
    try:
        first = chat(cold.client(), n=6, extra_body=NO_THINK)
        turn = [
            *MESSAGES,
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "tool", "content": "sunny, 21°C"},
        ]
        cold_next = chat(cold.client(), n=6, messages=turn, extra_body=NO_THINK)
    finally:
        cold.stop()
    warm = ThreadServer(create_app(engine, "tiny"))
    try:
        a = chat(warm.client(), n=6, extra_body=NO_THINK)
        again = chat(warm.client(), n=6, extra_body=NO_THINK)
        following = chat(warm.client(), n=6, messages=turn, extra_body=NO_THINK)
    finally:
        warm.stop()
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == a.usage.prompt_tokens - 1
    assert following.usage.prompt_tokens_details.cached_tokens > a.usage.prompt_tokens  # the reply was kept
    assert (
        a.choices[0].message.content == again.choices[0].message.content == first.choices[0].message.content
    )
    assert following.choices[0].message.content == cold_next.choices[0].message.content


# ---- the real process ------------------------------------------------------------------------------


def test_sigterm_stops_the_server_within_seconds(ckpt):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [
        sys.executable,
        "-m",
        "qwen35_lite.cli",
        "serve",
        "--model",
        str(ckpt),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--ctx",
        str(CTX),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the server did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log = proc.stderr.read()
        assert "Traceback" not in log and f"serving tiny on http://127.0.0.1:{port}/v1" in log
        assert "POST /v1/completions · prompt 1 tok (0 cached) · reply 2 tok (length)" in log
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- tool calls ------------------------------------------------------------------------------------

CALL_MARKUP = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
)


@pytest.fixture
def scripted(monkeypatch):
    """The worker's generation replaced by a reply that says a word and then calls the tool."""
    pieces = ["Let me check.", "<tool_call>", "\n<function=get_weather>\n", "<parameter=city>\nParis\n"]
    pieces += ["</parameter>\n</function>\n", "</tool_call>"]
    assert "".join(pieces[1:]) == CALL_MARKUP

    def fake(model, cache, req, decoder, cancel=None, threads=None):
        for i, text in enumerate(pieces):
            yield TokenEvent(i, text, False)
        yield Finished("stop", {}, [], list(range(len(pieces) + 1)))

    monkeypatch.setattr(worker, "generate", fake)


def test_tool_calls_parsed_with_ids_and_streamed_without_markup(server, scripted):
    r = chat(server.client(), tools=TOOLS, extra_body=NO_THINK)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content.strip() == "Let me check."
    (call,) = choice.message.tool_calls
    assert (
        call.id
        and call.function.name == "get_weather"
        and json.loads(call.function.arguments) == {"city": "Paris"}
    )
    chunks = list(chat(server.client(), tools=TOOLS, stream=True, extra_body=NO_THINK))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "<tool_call>" not in content and "<function" not in content
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_shows_the_model_no_tools(server, scripted):
    r = chat(server.client(), tools=TOOLS, tool_choice="none", extra_body=NO_THINK)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
    with_tools = chat(server.client(), n=1, tools=TOOLS, extra_body=NO_THINK)
    assert r.usage.prompt_tokens < with_tools.usage.prompt_tokens  # the tool schema was not rendered


def test_a_good_image_on_a_text_only_checkpoint_is_400(server, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    part = {"type": "image_url", "image_url": {"url": url}}
    r = post(server, {"model": "tiny", "messages": [{"role": "user", "content": [part]}]})
    assert r.status == 400 and "vision" in r.body["error"]["message"]
    assert chat(server.client(), n=2).choices[0].finish_reason == "length"


# ---- the command ------------------------------------------------------------------------------------


def test_serve_command_binds_loopback_by_default_and_warns_elsewhere_without_a_key(engine, ckpt, monkeypatch):
    calls = []
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: engine))
    monkeypatch.setattr(server_app, "run_server", lambda app, host, port: calls.append((app, host, port)))
    monkeypatch.setattr("qwen35_lite.cli.serve.check_address", lambda host, port: None)  # 8000 may be taken
    r = CliRunner().invoke(cli_app, ["serve", "--model", str(ckpt)])
    assert r.exit_code == 0, r.stderr
    assert calls[-1][1:] == ("127.0.0.1", 8000) and "warning" not in r.stderr
    assert f"serving {ckpt.name} on http://127.0.0.1:8000/v1" in r.stderr  # a directory: its name is the id
    r = CliRunner().invoke(cli_app, ["serve", "--model", str(ckpt), "--host", "0.0.0.0", "--port", "9"])
    assert r.exit_code == 0 and calls[-1][1:] == ("0.0.0.0", 9)
    assert "warning: listening on 0.0.0.0 without --api-key" in r.stderr
    r = CliRunner().invoke(cli_app, ["serve", "--model", str(ckpt), "--host", "0.0.0.0", "--api-key", "k"])
    assert r.exit_code == 0 and "warning" not in r.stderr


def test_serve_refuses_a_port_in_use_before_loading(ckpt, monkeypatch):
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(cli_app, ["serve", "--model", str(ckpt), "--port", str(port)])
    assert r.exit_code == 1
    assert (
        r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
        and "hint: pick another --port" in r.stderr
    )


# ---- images ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_image_as_a_data_url_or_a_path_gives_runs_answer(tmp_path, monkeypatch):
    from vision_helpers import build_tiny_vlm, make_image

    vlm = Engine.load(str(build_tiny_vlm(tmp_path / "vlm")), EngineOptions(device="cpu", dtype="float32"))
    picture = tmp_path / "a.png"
    make_image(100, 70).save(picture)
    answer = run_cli(vlm, monkeypatch, "--no-think", "-n", "6", "--image", str(picture), PROMPT)
    assert answer["text"] and answer["prompt_ids"].count(248056) > 1  # <|image_pad|> expanded
    data_url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    s = ThreadServer(create_app(vlm, "vlm", media_dir=tmp_path.resolve()))  # --allowed-local-media-path
    try:
        for url in (data_url, str(picture), f"file://{picture}"):
            parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
            r = s.client().chat.completions.create(
                model="vlm",
                messages=[{"role": "user", "content": parts}],
                temperature=0,
                max_tokens=6,
                extra_body=NO_THINK,
            )
            assert r.choices[0].message.content == answer["text"]
            assert r.usage.prompt_tokens == len(answer["prompt_ids"])  # image tokens included
            cached = r.usage.prompt_tokens_details.cached_tokens  # the same picture each time: a resend
            assert cached == (0 if url == data_url else r.usage.prompt_tokens - 1)
        other = tmp_path / "b.png"
        make_image(100, 70, seed=5).save(
            other
        )  # the same size, so the same ids: only the key tells them apart
        parts = [{"type": "image_url", "image_url": {"url": str(other)}}, {"type": "text", "text": PROMPT}]
        r = s.client().chat.completions.create(
            model="vlm", messages=[{"role": "user", "content": parts}], max_tokens=1, extra_body=NO_THINK
        )
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        s.stop()


def test_a_failure_in_generation_is_json_and_the_server_keeps_serving(server, monkeypatch):
    def broken(model, cache, req, decoder, cancel=None, threads=None):
        yield TokenEvent(1, "Hi", False)
        raise RuntimeError("boom")

    monkeypatch.setattr(worker, "generate", broken)
    r = post(server, {"model": "tiny", "messages": MESSAGES})
    assert (
        r.status == 500 and r.body["error"]["type"] == "server_error" and "boom" in r.body["error"]["message"]
    )
    with pytest.raises(openai.APIError, match="boom"):
        list(chat(server.client(), stream=True))  # the 200 was sent: the error arrives as an event
    monkeypatch.undo()
    assert chat(server.client(), n=2).choices[0].finish_reason == "length"
