"""langchain-openai's ChatOpenAI over Chat Completions and over the Responses API (use_responses_api):
a tool loop and structured outputs (json_schema and function_calling)."""

from __future__ import annotations

import pytest
from clients_server import KEY, MODEL, served_fixture, server_fixture  # noqa: F401  (the fixtures served, server)
from common import ANSWER, CITY, QUESTION, STRUCTURED, CityWeather, get_weather

langchain_openai = pytest.importorskip("langchain_openai")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
def test_tool_loop_and_structured_output(server, responses):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=server.url, api_key=KEY, max_retries=0, use_responses_api=responses
    )
    weather = tool(get_weather)
    bound = llm.bind_tools([weather])
    messages = [HumanMessage(QUESTION)]
    first = bound.invoke(messages)
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    messages += [first, ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])]
    assert bound.invoke(messages).text == ANSWER
    assert "".join(chunk.text for chunk in bound.stream(messages)) == ANSWER
    for method in ("json_schema", "function_calling"):
        typed = llm.with_structured_output(CityWeather, method=method)
        assert typed.invoke(STRUCTURED) == CityWeather(**CITY), method
