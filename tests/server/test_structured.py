"""Structured outputs and log probabilities through `serve` (issue 19 items 2 and 3), with the official
`openai` client on a tiny random checkpoint: response_format and tool_choice are enforced by a grammar,
logprobs are the log-softmax of the logits `run --json` computes, logit_bias bans, frequency_penalty
penalises, echo echoes, seed -1 is random, and without any of them the tokens are unchanged."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch
from test_server import KEY, MESSAGES, NO_THINK, PROMPT, SYSTEM, TOOLS, ThreadServer, run_cli

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.runtime.engine import Engine, EngineOptions
from qwen35_lite.server.app import create_app

openai = pytest.importorskip("openai")

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["answer", "n"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
WEATHER = TOOLS[0]["function"]["parameters"]
BOUNDED_TOOLS = [  # a bounded city: random weights would otherwise write a city for ever
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["utc", "local"]}},
                "required": ["zone"],
            },
        },
    },
]


@pytest.fixture(scope="module")
def engine(module_tmp) -> Engine:
    out = module_tmp("structured") / "tiny"
    write_checkpoint(out, SyntheticSpec(), dtype=torch.float32)
    return Engine.load(str(out), EngineOptions(device="cpu", ctx=512))


@pytest.fixture(scope="module")
def client(engine):
    s = ThreadServer(create_app(engine, "tiny", api_key=KEY))
    yield s.client()
    s.stop()


def chat(client, n: int = 6, **kwargs):
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": n, **kwargs}
    return client.chat.completions.create(**body)


def refused(call, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert words in e.value.body["message"], e.value.body


# ---- structured outputs -----------------------------------------------------------------------------


@pytest.mark.slow
def test_json_schema_replies_parse_and_validate_with_thinking_off(client):
    for seed in range(4):
        r = chat(client, n=40, temperature=1.0, seed=seed, response_format=FORMAT, extra_body=NO_THINK)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


@pytest.mark.slow
def test_json_object_and_a_streamed_json_schema(client):
    bias = {"6061": 20}  # "{}": random weights would write keys for ever; a bias lets the object close
    r = chat(client, n=40, response_format={"type": "json_object"}, logit_bias=bias, extra_body=NO_THINK)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    chunks = list(
        chat(client, n=40, seed=3, temperature=1.0, response_format=FORMAT, stream=True, extra_body=NO_THINK)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_choice_required_or_named_always_calls_an_allowed_tool(client, choice):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED_TOOLS}
    for seed in range(3):
        r = chat(
            client,
            n=80,
            temperature=1.0,
            seed=seed,
            tools=BOUNDED_TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            extra_body=NO_THINK,
        )
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
        call = message.tool_calls[0].function
        if isinstance(choice, dict):
            assert call.name == "get_time"
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


@pytest.mark.slow
def test_a_streamed_required_call_joins_to_a_valid_call(client):
    chunks = list(
        chat(
            client,
            n=80,
            temperature=1.0,
            seed=5,
            tools=BOUNDED_TOOLS,
            tool_choice="required",
            stream=True,
            parallel_tool_calls=False,
            extra_body=NO_THINK,
        )
    )
    calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert calls and calls[0].id and calls[0].function.name in ("get_weather", "get_time")
    arguments = json.loads("".join(d.function.arguments or "" for d in calls))
    name = calls[0].function.name
    jsonschema.validate(
        arguments, next(t for t in BOUNDED_TOOLS if t["function"]["name"] == name)["function"]["parameters"]
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_with_thinking_on_the_grammar_waits_for_the_think_block(client):
    """A random model never closes <think>: the reasoning is free text and the answer never starts."""
    r = chat(client, n=6, response_format=FORMAT)
    assert r.choices[0].message.content == "" and r.choices[0].message.reasoning_content


def test_what_cannot_be_enforced_is_a_400(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}
    refused(lambda: chat(client, response_format=bad), "cannot be enforced")
    refused(lambda: chat(client, response_format={"type": "json_schema"}), "json_schema needs")
    refused(lambda: chat(client, response_format={"type": "xml"}), "not supported")
    refused(lambda: chat(client, tool_choice="required"), "needs tools")


# ---- log probabilities and the sampler's request fields ------------------------------------------


def oracle_logprobs(engine, prompt_ids: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """log_softmax of the fp32 logits the model computes before each of `tokens` (what run sees)."""
    model = engine.model
    cache = model.make_cache()
    logits = model.forward(cache, torch.tensor(prompt_ids))[-1].float()
    out = []
    for token in tokens:
        out.append(torch.log_softmax(logits, -1))
        logits = model.forward(cache, torch.tensor([token]))[-1].float()
    return out


def test_logprobs_are_the_log_softmax_of_runs_logits_top_k_ordered(client, engine, monkeypatch):
    answer = run_cli(engine, monkeypatch, "--no-think", "-n", "5", "--system", SYSTEM, PROMPT)
    want = oracle_logprobs(engine, answer["prompt_ids"], answer["tokens"])
    r = chat(client, n=5, logprobs=True, top_logprobs=3, extra_body=NO_THINK)
    assert r.choices[0].message.content == answer["text"]  # logprobs change nothing
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5 and "".join(e.token for e in entries) == answer["text"]
    for entry, token, lp in zip(entries, answer["tokens"], want):
        assert math.isclose(entry.logprob, float(lp[token]), abs_tol=1e-4)
        assert bytes(entry.bytes) == engine.tokenizer.token_bytes(token + 1)[0][token]
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(tops, lp.topk(3).values.tolist()))
    chunks = list(chat(client, n=5, logprobs=True, top_logprobs=3, stream=True, extra_body=NO_THINK))
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completions_logprobs_and_echo(client):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    plain = client.completions.create(**body)
    r = client.completions.create(**body, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == plain.choices[0].text and "".join(lp.tokens) == plain.choices[0].text
    assert len(lp.token_logprobs) == 4 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    echoed = client.completions.create(**body, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + plain.choices[0].text
    chunks = list(client.completions.create(**body, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text
    refused(lambda: client.completions.create(**body, echo=True, logprobs=1), "echo with logprobs")


def test_logit_bias_minus_100_bans_a_token(client):
    first = chat(client, n=1, logprobs=True, extra_body=NO_THINK).choices[0].logprobs.content[0]
    token_id = chat_token_id(client, first)
    again = chat(client, n=1, logprobs=True, logit_bias={str(token_id): -100}, extra_body=NO_THINK)
    assert again.choices[0].logprobs.content[0].token != first.token
    refused(lambda: chat(client, logit_bias={"abc": 1}), "not a token id")
    refused(lambda: chat(client, logit_bias={"5": -101}), "outside -100..100")


def chat_token_id(client, entry) -> int:
    """The id of a reply's token, from its bytes (the tiny checkpoint uses the real vocabulary)."""
    from qwen35_lite.text.tokenizer import Tokenizer

    table = Tokenizer.from_dir("/nonexistent").token_bytes(248320)[0]
    return table.index(bytes(entry.bytes))


def test_frequency_penalty_counts_each_repeat_and_seed_minus_1_is_random(client):
    """A +50 bias makes "Hello" the greedy pick; a frequency penalty of 30 takes 30 per time it was said:
    after one it still wins (+20), after two it does not (-10). A presence penalty takes 30 once only."""
    hello = {"9419": 50}
    said = chat(client, n=4, logprobs=True, logit_bias=hello, frequency_penalty=30, extra_body=NO_THINK)
    tokens = [e.token for e in said.choices[0].logprobs.content]
    assert tokens[:2] == ["Hello", "Hello"] and tokens[2] != "Hello"
    kept = chat(client, n=4, logprobs=True, logit_bias=hello, presence_penalty=30, extra_body=NO_THINK)
    assert [e.token for e in kept.choices[0].logprobs.content] == ["Hello"] * 4
    a, b = (chat(client, n=8, temperature=1.0, seed=-1, extra_body=NO_THINK) for _ in range(2))
    assert a.choices[0].message.content != b.choices[0].message.content


def test_request_fields_out_of_range_are_400s(client):
    refused(lambda: chat(client, top_logprobs=3), "top_logprobs needs logprobs")
    refused(lambda: chat(client, logprobs=True, top_logprobs=21), "top_logprobs")
    refused(lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, n=2), "n")
