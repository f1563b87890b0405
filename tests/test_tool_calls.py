"""Tool calls in Qwen3.5 replies: one table of model outputs, each parsed whole and streamed (a character at a
time and in random splits) to the same content and calls; typed values per the schema; malformed markup kept
as content; a round trip through our chat template; the --tools file check."""

from __future__ import annotations

import json
import random

import pytest

from qwen35_lite.chat_template import ChatTemplate
from qwen35_lite.errors import InputError
from qwen35_lite.tool_calls import (
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
