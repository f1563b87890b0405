"""openai-agents with its default model (the Responses API) and with Chat Completions: a tool-calling
agent, streamed and not, and a structured output."""

from __future__ import annotations

import asyncio

import pytest
from clients_server import KEY, MODEL, served_fixture, server_fixture  # noqa: F401  (the fixtures served, server)
from common import ANSWER, CITY, QUESTION, STRUCTURED, CityWeather, get_weather

agents = pytest.importorskip("agents")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_tool_agent_and_structured_output(server, api):
    from openai import AsyncOpenAI

    async def check() -> None:  # one event loop: the async client belongs to the loop it first ran on
        agents.set_tracing_disabled(True)
        agents.set_default_openai_client(AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0), False)
        agents.set_default_openai_api(api)
        weather = agents.function_tool(get_weather)
        agent = agents.Agent(name="weather", instructions="Answer briefly.", model=MODEL, tools=[weather])
        result = await agents.Runner.run(agent, QUESTION)
        assert result.final_output == ANSWER
        assert any(item.type == "tool_call_output_item" for item in result.new_items)
        run = agents.Runner.run_streamed(agent, QUESTION)
        async for _ in run.stream_events():
            pass
        assert run.final_output == ANSWER
        typed = agents.Agent(name="report", model=MODEL, output_type=CityWeather)
        assert (await agents.Runner.run(typed, STRUCTURED)).final_output == CityWeather(**CITY)

    try:
        asyncio.run(check())
    finally:
        agents.set_default_openai_api("responses")
