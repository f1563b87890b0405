"""The official openai client: Chat Completions and Responses, tool loops and structured outputs, streamed
and not."""

from __future__ import annotations

import json

import pytest
from clients_server import KEY, MODEL, served_fixture, server_fixture  # noqa: F401  (the fixtures served, server)
from common import ANSWER, CHAT_TOOL, CITY, QUESTION, RESPONSES_TOOL, STRUCTURED, CityWeather, get_weather

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow


def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def test_chat_tool_loop_and_structured_output(server):
    c = client(server)
    messages = [{"role": "user", "content": QUESTION}]
    first = c.chat.completions.create(model=MODEL, messages=messages, tools=[CHAT_TOOL])
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    result = get_weather(**json.loads(call.function.arguments))
    messages += [first.choices[0].message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": call.id, "content": result}]
    final = c.chat.completions.create(model=MODEL, messages=messages, tools=[CHAT_TOOL])
    assert final.choices[0].message.content == ANSWER
    streamed = c.chat.completions.create(model=MODEL, messages=messages, tools=[CHAT_TOOL], stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == ANSWER
    parsed = c.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": STRUCTURED}], response_format=CityWeather
    )
    assert parsed.choices[0].message.parsed == CityWeather(**CITY)


def test_responses_tool_loop_and_structured_output(server):
    c = client(server)
    first = c.responses.create(model=MODEL, input=QUESTION, tools=[RESPONSES_TOOL])
    (call,) = [item for item in first.output if item.type == "function_call"]
    result = {
        "type": "function_call_output",
        "call_id": call.call_id,
        "output": get_weather(**json.loads(call.arguments)),
    }
    final = c.responses.create(
        model=MODEL, previous_response_id=first.id, input=[result], tools=[RESPONSES_TOOL]
    )
    assert final.output_text == ANSWER
    items = [{"role": "user", "content": QUESTION}, *first.output, result]
    with c.responses.stream(model=MODEL, input=items, tools=[RESPONSES_TOOL]) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        assert text == ANSWER == stream.get_final_response().output_text
    parsed = c.responses.parse(model=MODEL, input=STRUCTURED, text_format=CityWeather)
    assert parsed.output_parsed == CityWeather(**CITY)
