"""litellm's OpenAI-compatible provider: a tool loop and a structured output over Chat Completions, and a
call through its Responses bridge."""

from __future__ import annotations

import json

import pytest
from clients_server import KEY, MODEL, served_fixture, server_fixture  # noqa: F401  (the fixtures served, server)
from common import ANSWER, CHAT_TOOL, CITY, QUESTION, STRUCTURED, CityWeather, get_weather

litellm = pytest.importorskip("litellm")
pytestmark = pytest.mark.slow


def test_tool_loop_and_structured_output(server):
    common = {"model": f"openai/{MODEL}", "api_base": server.url, "api_key": KEY, "num_retries": 0}
    messages = [{"role": "user", "content": QUESTION}]
    first = litellm.completion(messages=messages, tools=[CHAT_TOOL], **common)
    (call,) = first.choices[0].message.tool_calls
    result = get_weather(**json.loads(call.function.arguments))
    messages += [first.choices[0].message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": call.id, "content": result}]
    final = litellm.completion(messages=messages, tools=[CHAT_TOOL], **common)
    assert final.choices[0].message.content == ANSWER
    typed = litellm.completion(
        messages=[{"role": "user", "content": STRUCTURED}], response_format=CityWeather, **common
    )
    assert CityWeather.model_validate_json(typed.choices[0].message.content) == CityWeather(**CITY)
    answered = litellm.responses(
        input=QUESTION, tools=[{"type": "function", **CHAT_TOOL["function"]}], **common
    )
    assert any(getattr(item, "type", None) == "function_call" for item in answered.output)
