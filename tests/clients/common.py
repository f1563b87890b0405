"""What every client test asks: the weather tool, the structured output's type, and the questions."""

from __future__ import annotations

from pydantic import BaseModel
from scripted_model import ANSWER, CITY

QUESTION = "What is the weather in Paris?"
STRUCTURED = "Report the weather in Paris as JSON."


class CityWeather(BaseModel):
    city: str
    temperature_c: int


def get_weather(city: str) -> str:
    """Current weather for a city."""
    return f"sunny, 21°C in {city}"


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "the city"}},
    "required": ["city"],
}
CHAT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": WEATHER_SCHEMA,
    },
}
RESPONSES_TOOL = {"type": "function", **CHAT_TOOL["function"]}

__all__ = [
    "ANSWER",
    "CITY",
    "QUESTION",
    "STRUCTURED",
    "CityWeather",
    "get_weather",
    "CHAT_TOOL",
    "RESPONSES_TOOL",
]
