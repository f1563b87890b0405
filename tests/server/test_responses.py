"""`POST /v1/responses` and the server's defaults, end to end on a tiny random checkpoint, spoken to with the
official `openai` client (`client.responses.create`) and raw HTTP for the error shapes.

The oracles: the equivalent Chat Completions request (its prompt ids, its reply), transformers'
apply_chat_template for the ids, and the non-streamed response for what the streamed events add up to."""

from __future__ import annotations

import http.client
import json
import logging

import pytest
from test_server import CALL_MARKUP, KEY, NO_THINK, SYSTEM, TOOLS, ThreadServer, chat, ckpt, engine  # noqa: F401

from qwen35_lite.server.app import create_app

openai = pytest.importorskip("openai")

FLAT_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]
QUESTION = "What is the weather in Paris?"
NO_THINKING = {"effort": "none"}


def script(prompt: str) -> str:
    """The scripted model: calls get_weather when it has the tool and no result yet, else answers."""
    if "<tools>" in prompt and "<tool_response>" not in prompt:
        return "Let me check.\n" + CALL_MARKUP
    return "It is sunny in Paris."


@pytest.fixture(scope="module")
def server(engine):  # noqa: F811
    s = ThreadServer(create_app(engine, "tiny", api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def scripted(engine):  # noqa: F811
    s = ThreadServer(create_app(engine, "tiny", api_key=KEY, script=script))
    yield s
    s.stop()


def prompt_ids(server, monkeypatch) -> list[list[int]]:
    """The prompt ids of every job the server queues from now on."""
    seen, worker = [], server.app.state.worker
    real = worker.submit

    def spy(job):
        seen.append(list(job.prompt_ids))
        return real(job)

    monkeypatch.setattr(worker, "submit", spy)
    return seen


def call(port: int, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    """A raw request: (status, headers, parsed body or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        base = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, data, {**base, **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = raw
        return r.status, {k.lower(): v for k, v in r.getheaders()}, answer
    finally:
        conn.close()


AUTH = {"Authorization": f"Bearer {KEY}"}

# ---- the request is the chat request ----------------------------------------------------------------

RESPONSES_INPUT = [
    {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "Look."}],
    },
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21°C"},
]
CHAT_MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTION},
    {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "Look.",
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


@pytest.mark.slow
def test_a_responses_request_has_the_chat_requests_prompt_ids(server, ckpt, monkeypatch):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    seen = prompt_ids(server, monkeypatch)
    client = server.client()
    r = client.responses.create(
        model="tiny",
        instructions=SYSTEM,
        input=RESPONSES_INPUT,
        tools=FLAT_TOOLS,
        reasoning=NO_THINKING,
        max_output_tokens=1,
        temperature=0,
    )
    chat(client, n=1, messages=CHAT_MESSAGES, tools=TOOLS, extra_body=NO_THINK)
    assert len(seen) == 2 and seen[0] == seen[1]
    parsed = json.loads(json.dumps(CHAT_MESSAGES))
    parsed[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    ids = transformers.AutoTokenizer.from_pretrained(ckpt).apply_chat_template(
        parsed,
        tools=TOOLS,
        add_generation_prompt=True,
        enable_thinking=False,
        tokenize=True,
        return_dict=False,
    )
    assert seen[0] == list(ids)
    assert r.usage.input_tokens == len(ids)


def test_a_string_input_with_thinking_off_is_the_chat_reply(server, monkeypatch):
    seen = prompt_ids(server, monkeypatch)
    client = server.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    expected = chat(client, messages=messages, extra_body=NO_THINK)
    r = client.responses.create(
        model="tiny",
        instructions=SYSTEM,
        input=QUESTION,
        reasoning=NO_THINKING,
        max_output_tokens=8,
        temperature=0,
    )
    assert seen[0] == seen[1]
    assert r.output_text == expected.choices[0].message.content != ""
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 8 and r.usage.input_tokens == expected.usage.prompt_tokens
    assert r.usage.input_tokens_details.cached_tokens == r.usage.input_tokens - 1  # the chat request's state
    assert [item.type for item in r.output] == ["message"]


def test_top_logprobs_are_the_chat_replys_streamed_or_not(server):
    """output_text.logprobs carry what Chat Completions returns for the same request (the same fp32
    logits), in the final response and, summed over its delta events, in the stream."""
    client = server.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    expected = chat(client, messages=messages, extra_body=NO_THINK, logprobs=True, top_logprobs=2)
    want = [
        (e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in expected.choices[0].logprobs.content
    ]
    body = dict(
        model="tiny",
        instructions=SYSTEM,
        input=QUESTION,
        reasoning=NO_THINKING,
        max_output_tokens=8,
        temperature=0,
        top_logprobs=2,
    )
    r = client.responses.create(**body)
    part = r.output[-1].content[0]
    got = [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in part.logprobs]
    assert len(want) == 8 and [(t, round(lp, 4), top) for t, lp, top in got] == [
        (t, round(lp, 4), top) for t, lp, top in want
    ]
    streamed = [
        e.token
        for ev in client.responses.create(**body, stream=True)
        if ev.type == "response.output_text.delta"
        for e in ev.logprobs
    ]
    assert streamed == [t for t, _, _ in want]


# ---- streaming --------------------------------------------------------------------------------------


def rebuild(events) -> list[dict]:
    """Output items as the stream's deltas build them (checked against the done events on the way)."""
    items: dict[int, dict] = {}
    for e in events:
        if e.type == "response.output_item.added":
            items[e.output_index] = {"type": e.item.type, "text": "", "arguments": "", "name": None}
        elif e.type in ("response.output_text.delta", "response.reasoning_text.delta"):
            items[e.output_index]["text"] += e.delta
        elif e.type == "response.function_call_arguments.delta":
            items[e.output_index]["arguments"] += e.delta
        elif e.type == "response.output_item.done":
            item = items[e.output_index]
            if e.item.type == "function_call":
                assert e.item.arguments == item["arguments"]
                item["name"] = e.item.name
            else:
                assert e.item.content[0].text == item["text"]
    return [items[i] for i in sorted(items)]


def flat(output) -> list[dict]:
    """A response's output items in rebuild's shape."""
    out = []
    for item in output:
        if item.type == "function_call":
            out.append({"type": item.type, "text": "", "arguments": item.arguments, "name": item.name})
        else:
            out.append({"type": item.type, "text": item.content[0].text, "arguments": "", "name": None})
    return out


@pytest.mark.parametrize("which", ["thinking", "tool_call"])
def test_streamed_events_add_up_to_the_response(server, scripted, which):
    s = server if which == "thinking" else scripted
    body = {"model": "tiny", "input": QUESTION, "temperature": 0}
    if which == "thinking":
        body.update(max_output_tokens=6)
    else:
        body.update(tools=FLAT_TOOLS, reasoning=NO_THINKING)
    whole = s.client().responses.create(**body)
    events = list(s.client().responses.create(**body, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    last = events[-1]
    assert last.type == ("response.incomplete" if which == "thinking" else "response.completed")
    assert rebuild(events) == flat(last.response.output) == flat(whole.output)
    assert last.response.usage.output_tokens == whole.usage.output_tokens
    if which == "thinking":  # random weights never close <think>: reasoning only, and an empty message
        assert [i.type for i in whole.output] == ["reasoning", "message"] and whole.output[1].content[
            0
        ].text == ""
        assert whole.usage.output_tokens_details.reasoning_tokens == 6
    else:
        assert [i.type for i in whole.output] == ["message", "function_call"]
        assert whole.output_text == "Let me check."
        call = whole.output[1]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
        kinds = [e.type for e in events]
        assert "response.function_call_arguments.done" in kinds and "response.output_text.done" in kinds


def test_a_tool_loop_through_responses(scripted):
    client = scripted.client()
    first = client.responses.create(model="tiny", input=QUESTION, tools=FLAT_TOOLS, reasoning=NO_THINKING)
    (call,) = [i for i in first.output if i.type == "function_call"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    items = [{"role": "user", "content": QUESTION}, *[i.model_dump() for i in first.output], result]
    second = client.responses.create(model="tiny", input=items, tools=FLAT_TOOLS, reasoning=NO_THINKING)
    assert second.output_text == "It is sunny in Paris." and second.status == "completed"
    follow = client.responses.create(
        model="tiny", previous_response_id=first.id, input=[result], tools=FLAT_TOOLS, reasoning=NO_THINKING
    )
    assert follow.output_text == second.output_text
    assert follow.usage.input_tokens == second.usage.input_tokens
    # resumed from the first request's kept state (the scripted reply keeps the prompt's)
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1


# ---- previous_response_id ----------------------------------------------------------------------------


def test_previous_response_id_continues_its_conversation_and_a_missing_one_is_a_400(server, engine):  # noqa: F811
    client = server.client()
    body = {"model": "tiny", "reasoning": NO_THINKING, "max_output_tokens": 4, "temperature": 0}
    first = client.responses.create(input="Hello there.", **body)
    second = client.responses.create(input="And then?", previous_response_id=first.id, **body)
    assert second.previous_response_id == first.id
    whole = [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    assert (
        second.usage.input_tokens
        == chat(client, n=1, messages=whole, extra_body=NO_THINK).usage.prompt_tokens
    )
    status, _, answer = call(
        server.port,
        "POST",
        "/v1/responses",
        {**body, "input": "x", "previous_response_id": "resp_nope"},
        AUTH,
    )
    assert status == 400 and answer["error"]["param"] == "previous_response_id"
    assert (
        answer["error"]["code"] == "previous_response_not_found"
        and "whole conversation" in answer["error"]["message"]
    )


def test_a_response_whose_state_left_the_cache_is_a_400(engine):  # noqa: F811
    s = ThreadServer(create_app(engine, "tiny", api_key=KEY, state_bytes=1))  # no state fits
    try:
        body = {"model": "tiny", "reasoning": NO_THINKING, "max_output_tokens": 2}
        first = s.client().responses.create(input="Hello there.", **body)
        status, _, answer = call(
            s.port, "POST", "/v1/responses", {**body, "input": "more", "previous_response_id": first.id}, AUTH
        )
        assert status == 400 and first.id in answer["error"]["message"], answer
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    finally:
        s.stop()


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]: item type 'item_reference'"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]: tool type 'web_search'"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format type 'yaml'"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
        ({"input": []}, "input is empty"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ],
)
def test_a_malformed_responses_request_is_a_400_naming_the_field(server, fields, words):
    status, _, answer = call(server.port, "POST", "/v1/responses", {"model": "tiny", **fields}, AUTH)
    assert status == 400 and words in answer["error"]["message"], answer


# ---- 404s, key, CORS, defaults, the log ----------------------------------------------------------------


def test_unknown_routes_and_models_are_named_404s_with_a_log_line(server, caplog):
    caplog.set_level(logging.INFO, logger="qwen35_lite.server")
    for method, path, body, named in [
        ("GET", "/v1/nothing", None, "GET /v1/nothing"),
        ("POST", "/v1/embeddings", {"model": "tiny"}, "POST /v1/embeddings"),
        ("GET", "/v1/models/other", None, "'other'"),
        ("POST", "/v1/responses", {"model": "other", "input": "hi"}, "'other'"),
    ]:
        status, _, answer = call(server.port, method, path, body, AUTH)
        assert status == 404 and named in answer["error"]["message"], answer
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert any(path in r.getMessage() and " 404" in r.getMessage() for r in caplog.records), path
    assert call(server.port, "GET", "/v1/models/tiny", None, AUTH)[2]["id"] == "tiny"


def test_the_bearer_scheme_is_case_insensitive(server):
    for header, status in [
        (f"bearer {KEY}", 200),
        (f"BEARER  {KEY}", 200),
        (f"Basic {KEY}", 401),
        ("bearer x", 401),
    ]:
        assert call(server.port, "GET", "/v1/models", None, {"Authorization": header})[0] == status, header


def test_cors_is_off_by_default_and_a_preflight_works_when_set(server, engine):  # noqa: F811
    preflight = {
        "Origin": "http://ui.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = call(server.port, "OPTIONS", "/v1/chat/completions", None, preflight)
    assert status == 405 and "access-control-allow-origin" not in headers
    s = ThreadServer(create_app(engine, "tiny", api_key=KEY, cors_origins=["http://ui.example"]))
    try:
        status, headers, _ = call(s.port, "OPTIONS", "/v1/chat/completions", None, preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "http://ui.example"
        assert "authorization" in headers["access-control-allow-headers"].lower()
        status, headers, _ = call(s.port, "GET", "/v1/models", None, {**AUTH, "Origin": "http://ui.example"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://ui.example"
        status, headers, _ = call(
            s.port, "OPTIONS", "/v1/models", None, {**preflight, "Origin": "http://evil.example"}
        )
        assert status == 400 and "access-control-allow-origin" not in headers
    finally:
        s.stop()


def test_no_think_is_the_default_a_request_can_override(engine, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="qwen35_lite.server")
    s = ThreadServer(create_app(engine, "tiny", api_key=KEY, template_defaults={"enable_thinking": False}))
    try:
        client = s.client()
        off = chat(client, n=4).choices[0].message
        assert off.content and not getattr(off, "reasoning_content", None)
        on = (
            chat(client, n=4, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
            .choices[0]
            .message
        )
        assert on.reasoning_content and not on.content
        r = client.responses.create(model="tiny", input="Hi", max_output_tokens=4)
        assert [i.type for i in r.output] == ["message"] and r.output_text
        r = client.responses.create(
            model="tiny", input="Hi", max_output_tokens=4, reasoning={"effort": "high"}
        )
        assert [i.type for i in r.output] == ["reasoning", "message"]
    finally:
        s.stop()
    lines = [r.getMessage() for r in caplog.records if "TTFT" in r.getMessage()]
    assert len(lines) == 4 and all("TTFT -" not in line for line in lines)


def test_the_serve_flags_for_thinking_and_cors_reach_the_app(engine, ckpt, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from qwen35_lite.cli import app as cli_app
    from qwen35_lite.runtime.engine import Engine
    from qwen35_lite.server import app as server_app

    apps = []
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: engine))
    monkeypatch.setattr(server_app, "run_server", lambda app, host, port: apps.append(app))
    monkeypatch.setattr("qwen35_lite.cli.serve.check_address", lambda host, port: None)
    r = CliRunner().invoke(
        cli_app,
        ["serve", "--model", str(ckpt), "--no-think", "--cors-origins", "http://a.example,http://b.example"],
    )
    assert r.exit_code == 0, r.stderr
    s = ThreadServer(apps[-1])
    try:
        message = chat(s.client(key="unused"), n=3).choices[0].message
        assert message.content and not getattr(message, "reasoning_content", None)
        headers = call(s.port, "GET", "/v1/models", None, {"Origin": "http://b.example"})[1]
        assert headers["access-control-allow-origin"] == "http://b.example"
    finally:
        s.stop()
    r = CliRunner().invoke(cli_app, ["serve", "--model", str(ckpt), "--chat-template-kwargs", "[1]"])
    assert r.exit_code != 0 and "JSON object" in r.stderr


def test_an_input_image_reaches_the_image_path(server, tmp_path):
    """An input_image data URL is decoded and checked like a chat image_url (this checkpoint has no vision
    tower, so a good image is refused for that, past the decoding)."""
    import base64

    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    parts = [{"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]
    body = {"model": "tiny", "input": [{"role": "user", "content": parts}]}
    status, _, answer = call(server.port, "POST", "/v1/responses", body, AUTH)
    assert status == 400 and "vision" in answer["error"]["message"], answer
    parts[1]["image_url"] = "/etc/passwd"
    status, _, answer = call(server.port, "POST", "/v1/responses", body, AUTH)
    assert status == 400 and "local path was refused" in answer["error"]["message"], answer
    assert answer["error"]["param"] == "input"  # the Responses field, not the chat request's
