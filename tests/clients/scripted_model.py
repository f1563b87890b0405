"""The scripted model the client tests serve (QWEN35_LITE_TEST_SCRIPT=scripted_model:reply): random weights
never call a tool or write JSON, so the server speaks this reply instead, from the prompt's text alone.

- a tool-result turn, or a question with no `get_weather` among the tools: the framework's output tool (a
  tool that is not get_weather: pydantic-ai's final_result, langchain's function_calling schema) is called
  with arguments made from its schema; with no such tool, a question that says "as JSON" gets CITY_JSON
  and any other gets ANSWER;
- a question with get_weather among the tools and no result yet: a get_weather call for Paris."""

from __future__ import annotations

import json

ANSWER = "It is sunny in Paris."
CITY = {"city": "Paris", "temperature_c": 21}
CITY_JSON = json.dumps(CITY)
WEATHER_TOOL = "get_weather"


def reply(prompt: str) -> str:
    tools = _tools(prompt)
    turns = prompt.split("<|im_start|>")
    query = max(i for i, t in enumerate(turns) if t.startswith("user\n") and not _is_result(t))
    has_result = any(_is_result(t) for t in turns[query + 1 :])
    output_tools = [t for t in tools if t["name"] != WEATHER_TOOL]
    if output_tools and (has_result or not any(t["name"] == WEATHER_TOOL for t in tools)):
        tool = output_tools[0]
        return _call(tool["name"], _sample(tool.get("parameters") or {}, tool.get("parameters") or {}))
    if not has_result and any(t["name"] == WEATHER_TOOL for t in tools):
        return _call(WEATHER_TOOL, {"city": "Paris"})
    return CITY_JSON if "as JSON" in turns[query] else ANSWER


def _is_result(turn: str) -> bool:
    return turn.startswith("user\n<tool_response>")


def _tools(prompt: str) -> list[dict]:
    if "<tools>" not in prompt:
        return []
    block = prompt.split("<tools>", 1)[1].split("</tools>", 1)[0]
    tools = [json.loads(line) for line in block.splitlines() if line.strip()]
    return [t.get("function", t) for t in tools]


def _call(name: str, arguments: dict) -> str:
    params = "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
        for k, v in arguments.items()
    )
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def _sample(schema: dict, root: dict):
    """A value valid for `schema` (the subset frameworks send: objects, scalars, arrays, enums, refs)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _sample((root.get("$defs") or root.get("definitions") or {})[name], root)
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return _sample(options[0], root)
    kind = schema.get("type", "object")
    kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
    if kind == "object":
        props = schema.get("properties", {})
        return {k: CITY[k] if k in CITY else _sample(v, root) for k, v in props.items()}
    if kind == "array":
        return [_sample(schema.get("items", {}), root)]
    return {"string": "Paris", "integer": 21, "number": 21.0, "boolean": True}.get(kind)
