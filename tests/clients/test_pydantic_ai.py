"""pydantic-ai over OpenAIChatModel and OpenAIResponsesModel: a tool-calling agent, and structured output
by its default output tool and by NativeOutput (response_format / text.format)."""

from __future__ import annotations

import pytest
from clients_server import KEY, MODEL, served_fixture, server_fixture  # noqa: F401  (the fixtures served, server)
from common import ANSWER, CITY, QUESTION, STRUCTURED, CityWeather, get_weather

pydantic_ai = pytest.importorskip("pydantic_ai")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_tool_agent_and_structured_output(server, kind):
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.output import NativeOutput
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=server.url, api_key=KEY)
    model = (OpenAIChatModel if kind == "chat" else OpenAIResponsesModel)(MODEL, provider=provider)
    agent = pydantic_ai.Agent(model, tools=[get_weather], instructions="Answer briefly.")
    result = agent.run_sync(QUESTION)
    assert result.output == ANSWER
    assert any(part.part_kind == "tool-return" for message in result.all_messages() for part in message.parts)
    for output in (CityWeather, NativeOutput(CityWeather)):
        typed = pydantic_ai.Agent(model, output_type=output)
        assert typed.run_sync(STRUCTURED).output == CityWeather(**CITY)
