"""Tool calls in Qwen3.5 replies: one table of model outputs, each parsed whole and streamed (a character at a
time and in random splits) to the same content and calls; typed values per the schema; malformed markup kept
as content; a round trip through our chat template; the --tools file check."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qwen35_lite.cli import app
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.errors import InputError
from qwen35_lite.runtime import session as session_module
from qwen35_lite.runtime.engine import Engine
from qwen35_lite.runtime.generate import Finished, TokenEvent
from qwen35_lite.runtime.session import ChatSession
from qwen35_lite.text.chat_template import ChatTemplate
from qwen35_lite.text.tokenizer import Tokenizer
from qwen35_lite.text.tool_calls import (
    ContentDelta,
    StreamingToolParser,
    ToolCallDelta,
    check_tools,
    parse_tool_calls,
)


def tool(name: str, **properties: dict) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} tool",
            "parameters": {"type": "object", "properties": properties},
        },
    }


TOOLS = [
    tool("get_weather", city={"type": "string"}, days={"type": "integer"}),
    tool(
        "typed",
        count={"type": "integer"},
        ratio={"type": "number"},
        whole={"type": "number"},
        flag={"type": "boolean"},
        off={"type": "boolean"},
        options={"type": "object"},
        items={"type": "array"},
        maybe={"type": ["integer", "null"]},
        text={"type": "string"},
    ),
    tool("write_file", path={"type": "string"}, content={"type": "string"}),
]


def call(name: str, *params: tuple[str, str]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


WEATHER = call("get_weather", ("city", "Paris"), ("days", "3"))
# (model output, expected content, expected [(name, arguments)], well formed: no markup in the content)
CASES = {
    "one call": (WEATHER, "", [("get_weather", {"city": "Paris", "days": 3})], True),
    "several calls": (
        WEATHER + "\n" + call("get_weather", ("city", "Oslo")) + "\n" + call("list_all"),
        "",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Oslo"}), ("list_all", {})],
        True,
    ),
    "text before a call": (
        "Let me check the weather.\n\n" + WEATHER,
        "Let me check the weather.",
        [("get_weather", {"city": "Paris", "days": 3})],
        True,
    ),
    "text between and after": (
        "First Paris.\n" + WEATHER + "\nThen done. <tool <tool_ca",
        "First Paris.\n\nThen done. <tool <tool_ca",
        [("get_weather", {"city": "Paris", "days": 3})],
        True,
    ),
    "multi-line string values": (
        call("write_file", ("path", "a.py"), ("content", "def f():\n    return 1\n\n")),
        "",
        [("write_file", {"path": "a.py", "content": "def f():\n    return 1\n\n"})],
        True,
    ),
    "typed values per the schema": (
        call(
            "typed",
            ("count", "42"),
            ("ratio", "0.5"),
            ("whole", "7"),
            ("flag", "true"),
            ("off", "False"),
            ("options", '{"unit": "C", "deep": [1, {"x": null}]}'),
            ("items", '["a", 2]'),
            ("maybe", "null"),
            ("text", "123"),
        ),
        "",
        [
            (
                "typed",
                {
                    "count": 42,
                    "ratio": 0.5,
                    "whole": 7,
                    "flag": True,
                    "off": False,
                    "options": {"unit": "C", "deep": [1, {"x": None}]},
                    "items": ["a", 2],
                    "maybe": None,
                    "text": "123",
                },
            )
        ],
        True,
    ),
    "values that do not read as their type stay text": (
        call("typed", ("count", "many"), ("flag", "yes"), ("options", "{not json"), ("ratio", "nan")),
        "",
        [("typed", {"count": "many", "flag": "yes", "options": "{not json", "ratio": "nan"})],
        True,
    ),
    "python-style object": (
        call("typed", ("options", "{'a': 1}")),
        "",
        [("typed", {"options": {"a": 1}})],
        True,
    ),
    "parameter missing from the schema, unknown tool": (
        call("get_weather", ("city", "Rome"), ("units", "5")) + call("nope", ("n", "5")),
        "",
        [("get_weather", {"city": "Rome", "units": "5"}), ("nope", {"n": "5"})],
        True,
    ),
    "parameter without its closing tag": (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n<parameter=days>\n2\n</function>\n</tool_call>",
        "",
        [("get_weather", {"city": "Lima", "days": 2})],
        True,
    ),
    "no closing tag": (
        "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n",
        "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
        [],
        False,
    ),
    "a missing <function=": (
        "<tool_call>\n<parameter=city>\nParis\n</parameter>\n</tool_call> ok",
        "<tool_call>\n<parameter=city>\nParis\n</parameter>\n</tool_call> ok",
        [],
        False,
    ),
    "a missing </function>, then a good call": (
        "<tool_call>\n<function=get_weather>\n</tool_call>\n" + WEATHER,
        "<tool_call>\n<function=get_weather>\n</tool_call>",
        [("get_weather", {"city": "Paris", "days": 3})],
        False,
    ),
    "a cut-off tag at the end": ("Hello <tool_call>\n<func", "Hello <tool_call>\n<func", [], False),
    "no calls at all": ("  Just an answer.\n\n", "Just an answer.", [], True),
}

MARKUP = ("<tool_call>", "<function=", "<parameter=", "</parameter>", "</function>", "</tool_call>")


def named(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def stream(text: str, pieces: list[int]) -> tuple[list, StreamingToolParser]:
    parser, deltas, at = StreamingToolParser(TOOLS), [], 0
    for size in pieces:
        deltas += parser.feed(text[at : at + size])
        at += size
    deltas += parser.feed(text[at:]) + parser.finish()
    return deltas, parser


def random_splits(text: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    sizes, left = [], len(text)
    while left > 0:
        sizes.append(min(left, rng.randint(1, 12)))
        left -= sizes[-1]
    return sizes


@pytest.mark.parametrize("case", CASES)
def test_whole_reply(case):
    text, content, calls, _ = CASES[case]
    got_content, got_calls = parse_tool_calls(text, TOOLS)
    assert got_content == content
    assert named(got_calls) == calls
    for c in got_calls:
        assert c.id.startswith("call_") and len(c.id) == 29 and c.id[5:].isalnum()
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("split", ["chars", "random"])
def test_streaming_matches_the_whole_reply(case, split):
    text, content, calls, well_formed = CASES[case]
    seeds = [None] if split == "chars" else range(20)
    for seed in seeds:
        pieces = [1] * len(text) if seed is None else random_splits(text, seed)
        deltas, parser = stream(text, pieces)
        texts = [d.text for d in deltas if isinstance(d, ContentDelta)]
        assert "".join(texts) == content
        assert named(parser.calls) == calls
        if well_formed:
            assert not any(tag in t for t in texts for tag in MARKUP), texts
        # each call: one delta with its id and name first, argument pieces joining to its arguments
        call_deltas = [d for d in deltas if isinstance(d, ToolCallDelta)]
        for i, c in enumerate(parser.calls):
            mine = [d for d in call_deltas if d.index == i]
            assert (mine[0].id, mine[0].name) == (c.id, c.name)
            assert "".join(d.arguments for d in mine) == c.arguments
        assert {d.index for d in call_deltas} == set(range(len(calls)))


def test_content_streams_before_the_call_closes_and_markup_is_held():
    parser = StreamingToolParser(TOOLS)
    first = parser.feed("Checking now. <tool_")
    assert first == [ContentDelta("Checking now.")]
    assert parser.feed("call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n") == []
    assert parser.calls == []
    done = parser.feed("</function>\n</tool_call>")
    assert [type(d) for d in done] == [ToolCallDelta] and done[0].name == "get_weather"
    assert parser.finish() == []


def test_a_cut_off_call_becomes_content_at_finish():
    parser = StreamingToolParser(TOOLS)
    assert parser.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nPa") == []
    assert parser.finish() == [ContentDelta("<tool_call>\n<function=get_weather>\n<parameter=city>\nPa")]
    assert parser.calls == []


def test_round_trip_through_the_chat_template():
    calls = [
        {
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "São Paulo", "days": 5}},
        },
        {
            "type": "function",
            "function": {
                "name": "typed",
                "arguments": {
                    "count": 3,
                    "ratio": 2.25,
                    "flag": False,
                    "options": {"a": [1, 2], "b": "x"},
                    "items": [],
                    "maybe": None,
                    "text": "two\nlines",
                },
            },
        },
    ]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Looking it up.", "tool_calls": calls},
    ]
    rendered = ChatTemplate.builtin().render(messages, add_generation_prompt=False, tools=TOOLS)
    assert "<tools>" in rendered and '"name": "get_weather"' in rendered
    reply = rendered.split("<|im_start|>assistant\n")[-1].split("</think>")[-1].removesuffix("<|im_end|>\n")
    content, parsed = parse_tool_calls(reply, TOOLS)
    assert content == "Looking it up."
    assert named(parsed) == [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_no_tools_keeps_every_value_as_text():
    _, calls = parse_tool_calls(WEATHER, None)
    assert named(calls) == [("get_weather", {"city": "Paris", "days": "3"})]


@pytest.mark.parametrize(
    "tools, words",
    [
        ({"name": "x"}, "list"),
        ([], "no tools"),
        ([{"name": "x"}], '"type": "function"'),
        ([{"type": "function"}], '"function"'),
        ([{"type": "function", "function": {"name": ""}}], '"name"'),
        ([{"type": "function", "function": {"name": "x", "parameters": []}}], "parameters"),
        ([{"type": "function", "function": {"name": "x", "description": 3}}], "description"),
    ],
)
def test_check_tools_refuses_what_is_not_openai_tools(tools, words):
    with pytest.raises(InputError) as e:
        check_tools(tools, "tools.json")
    assert words in e.value.message and "tools.json" in e.value.message and e.value.hint


def test_check_tools_accepts_openai_tools():
    assert check_tools(TOOLS) is TOOLS


# ---- --tools on run and chat (a tiny random checkpoint: it never writes a real call) ----------------


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    out = module_tmp("tools") / "tiny"
    write_checkpoint(out, SyntheticSpec(), dtype=torch.float32)
    return out


@pytest.fixture(scope="module")
def tools_file(module_tmp) -> Path:
    path = module_tmp("tools") / "tools.json"
    path.write_text(json.dumps(TOOLS[:1]), encoding="utf-8")
    return path


_ENGINES: dict = {}


@pytest.fixture
def one_load(monkeypatch):
    """Each (checkpoint, options) loads once for this file: the tokenizer alone takes a second to parse."""
    load = Engine.load.__func__

    def cached(cls, model, opts=None, provider_factory=None, on_progress=None):
        key = (str(model), repr(opts))
        if key not in _ENGINES:
            _ENGINES[key] = load(cls, model, opts, provider_factory, on_progress)
        return _ENGINES[key]

    monkeypatch.setattr(Engine, "load", classmethod(cached))


def cli(*args, input: str | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def fake_reply(monkeypatch, pieces: list[str]) -> None:
    """The model 'writes' these pieces of answer (after a little thinking), then stops."""

    def generate(model, cache, request, decoder, cancel=None, on_prefill=None, threads=None):
        yield TokenEvent(1, "hmm", thinking=True)
        for piece in pieces:
            yield TokenEvent(2, piece, thinking=False)
        yield Finished("stop", stats={"prompt_tokens": len(request.prompt_ids)}, unfed=[], tokens=[1, 2])

    monkeypatch.setattr(session_module, "generate", generate)


@pytest.mark.slow
def test_run_json_renders_the_tools_into_the_prompt(ckpt, tools_file, one_load):
    r = cli("run", "-m", ckpt, "--json", "--no-think", "-t", "0", "-n", "4", "--tools", tools_file, "Hi")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tool_calls"] == []
    template, tok = ChatTemplate.from_dir(ckpt), Tokenizer.from_dir(ckpt)
    messages = [{"role": "user", "content": "Hi"}]
    with_tools = template.render(messages, enable_thinking=False, tools=TOOLS[:1])
    assert "<tools>" in with_tools and out["prompt_ids"] == tok.encode(with_tools)
    plain = cli("run", "-m", ckpt, "--json", "--no-think", "-t", "0", "-n", "4", "Hi")
    assert json.loads(plain.stdout)["prompt_ids"] == tok.encode(
        template.render(messages, enable_thinking=False)
    )


REPLY_WITH_CALL = [
    "Let me ",
    "check.\n\n<tool",
    "_call>\n<function=get_weather>\n<parameter=city>\nParis",
    "\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
]


def test_run_prints_the_content_then_the_calls(ckpt, tools_file, one_load, monkeypatch):
    fake_reply(monkeypatch, REPLY_WITH_CALL)
    r = cli("run", "-m", ckpt, "--tools", tools_file, "--quiet", "Weather?")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == 'Let me check.\ntool call: get_weather {"city": "Paris", "days": 2}\n'
    out = json.loads(cli("run", "-m", ckpt, "--tools", tools_file, "--json", "Weather?").stdout)
    assert out["text"] == "Let me check."
    [call] = out["tool_calls"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris", "days": 2}
    assert call["id"].startswith("call_")
    # without --tools the reply is printed as the model wrote it
    assert cli("run", "-m", ckpt, "--quiet", "Weather?").stdout == "".join(REPLY_WITH_CALL).strip() + "\n"


def test_chat_renders_the_tools_once_and_prints_calls(ckpt, tools_file, one_load, monkeypatch):
    fake_reply(monkeypatch, REPLY_WITH_CALL)
    prompts = []
    send = ChatSession.send

    def spy(self, text, *args, **kwargs):
        prompts.append(self.prompt_ids(text))
        return send(self, text, *args, **kwargs)

    monkeypatch.setattr(ChatSession, "send", spy)
    r = cli("chat", "-m", ckpt, "--tools", tools_file, "--quiet", input="Weather?\nAnd tomorrow?\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count('tool call: get_weather {"city": "Paris", "days": 2}\n') == 2
    assert "<tool_call>" not in r.stdout
    tok = Tokenizer.from_dir(ckpt)
    first, second = (tok.decode(p) for p in prompts)
    assert "<tools>" in first and "get_weather" in first
    assert "<tools>" not in second and second.startswith("<|im_end|>\n<|im_start|>user\nAnd tomorrow?")


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "no such file"),
        ("[{]", "is not JSON"),
        ('{"type": "function"}', "JSON list"),
        ('[{"type": "function", "function": {"description": "x"}}]', 'tool 1 has no "name"'),
    ],
)
def test_a_bad_tools_file_is_one_error_line_before_loading(tmp_path, content, words, monkeypatch):
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    monkeypatch.setattr(Engine, "load", None)  # never reached
    r = cli("run", "-m", tmp_path, "--tools", path, "Hi")
    assert r.exit_code == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert words in lines[0] and "Traceback" not in r.stderr


def test_tools_with_raw_is_a_usage_error(tmp_path, tools_file):
    r = cli("run", "-m", tmp_path, "--raw", "--tools", tools_file, "Hi")
    assert r.exit_code == 2 and "--tools" in r.stderr
