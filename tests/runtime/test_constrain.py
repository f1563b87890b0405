"""Constrained decoding (runtime/constrain.py): whatever the logits say, a constrained reply is JSON of its
schema, or a call of an allowed tool whose arguments match the tool's schema once text/tool_calls.py reads
them back. Random logits stand for random weights here (the sampler and mask are the ones generate()
runs); tests/server/test_structured.py runs the model itself."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from qwen35_lite.errors import InputError
from qwen35_lite.runtime.constrain import GrammarConstraint, check_schema, json_grammar, tool_grammar
from qwen35_lite.runtime.sampling import SamplingParams, make_sampler
from qwen35_lite.text.tokenizer import Tokenizer
from qwen35_lite.text.tool_calls import parse_tool_calls

V = 248320  # the real checkpoints' padded vocabulary
SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": -5, "maximum": 500},
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["n", "ok", "colour"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "detail": {
                        "type": "object",
                        "properties": {"wind": {"type": "boolean"}},
                        "required": ["wind"],
                        "additionalProperties": False,  # else random logits write keys for ever
                    },
                },
                "required": ["city", "unit"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir("/nonexistent")  # the packaged Qwen3.5 tokenizer


def ends(tok: Tokenizer) -> list[int]:
    return [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]


def constrained_reply(tok, grammar: str, seed: int, params: SamplingParams | None = None, cap: int = 120):
    """Sample from random logits through the mask until an end token: (text, ended)."""
    constraint = GrammarConstraint(grammar, tok, ends(tok))
    sample = make_sampler(params or SamplingParams(temperature=1.0, seed=seed), constraint=constraint)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(cap):
        token = sample(torch.randn(V, generator=g) * 4)
        if token in ends(tok):
            return tok.decode(out), True
        out.append(token)
    return tok.decode(out), False


def masked_greedy_reply(tok, grammar: str, seed: int, cap: int = 80) -> tuple[str, bool]:
    """The mask alone over random logits, argmax: the grammar's guarantee at a fraction of the sampler's
    cost per token."""
    constraint = GrammarConstraint(grammar, tok, ends(tok))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(cap):
        token = int(constraint.mask(torch.randn(V, generator=g)).argmax())
        constraint.accept(token)
        if token in ends(tok):
            return tok.decode(out), True
        out.append(token)
    return tok.decode(out), False


@pytest.mark.slow
def test_json_schema_replies_always_parse_and_validate(tok):
    """100 seeds of random logits: every reply ends by itself and is JSON valid against the schema."""
    grammar = json_grammar(SCHEMA)
    for seed in range(100):
        text, ended = masked_greedy_reply(tok, grammar, seed)
        assert ended, (seed, text)
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.slow
def test_a_few_json_schema_replies_parse(tok):
    grammar = json_grammar(SCHEMA)
    for seed in range(2):
        text, ended = constrained_reply(tok, grammar, seed)
        assert ended and "\n" not in text.strip()  # one line: no whitespace for a weak model to loop in
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.slow
def test_json_object_is_an_object(tok):
    """Any JSON object (OpenAI's json_object); a bias towards closing keeps random logits from writing keys
    for ever, and shows logit_bias acting together with the mask."""
    bias = {tok.encode(s)[0]: 12.0 for s in ("{}", "}", '"}', '",', '":')}
    for seed in range(4):
        params = SamplingParams(temperature=1.0, seed=seed, logit_bias=bias)
        text, ended = constrained_reply(tok, json_grammar(None), seed, params)
        assert ended and isinstance(json.loads(text), dict)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_replies_are_calls_of_the_tools_with_valid_arguments(tok, parallel):
    grammar = tool_grammar(TOOLS, tok.token_id, parallel=parallel)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    counts = []
    for seed in range(8):
        text, ended = constrained_reply(tok, grammar, seed, cap=200)
        assert ended, (seed, text)
        content, calls = parse_tool_calls(text, TOOLS)
        assert content == "" and calls, (seed, text)
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        counts.append(len(calls))
    assert max(counts) > 1 if parallel else set(counts) == {1}


@pytest.mark.slow
def test_a_named_tool_is_the_only_one_called(tok):
    grammar = tool_grammar(TOOLS[:1], tok.token_id, parallel=False)
    for seed in range(2):
        text, _ = constrained_reply(tok, grammar, seed, cap=200)
        assert [c.name for c in parse_tool_calls(text, TOOLS)[1]] == ["get_weather"]


@pytest.mark.slow
def test_calls_or_json_with_tool_choice_auto_and_a_schema(tok):
    grammar = tool_grammar(TOOLS, tok.token_id, content_schema=SCHEMA)
    for seed in range(6):
        text, ended = constrained_reply(tok, grammar, seed, cap=200)
        content, calls = parse_tool_calls(text, TOOLS)
        assert ended and (calls or jsonschema.validate(json.loads(content), SCHEMA) is None)


def test_the_markup_tags_are_their_special_tokens(tok):
    """<tool_call> is one token in Qwen3.5's vocabulary: the grammar names it by id, as the model writes it."""
    grammar = tool_grammar(TOOLS, tok.token_id)
    assert f"<[{tok.token_id('<tool_call>')}]>" in grammar
    assert '"<tool_call>"' in tool_grammar(TOOLS, lambda text: None)


def test_an_unconstrained_sampler_is_unchanged(tok):
    """No constraint: the same ids as before, greedy or sampled (the mask code never runs)."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(V, generator=g) for _ in range(5)]
    for p in (SamplingParams(), SamplingParams(temperature=0.8, top_k=40, seed=3)):
        a, b = make_sampler(p), make_sampler(p, constraint=None)
        assert [a(x) for x in logits] == [b(x) for x in logits]
    assert make_sampler(SamplingParams())(logits[0]) == int(logits[0].argmax())


def test_the_mask_is_applied_on_the_logits_device_and_only_when_engaged(tok):
    constraint = GrammarConstraint(json_grammar({"type": "boolean"}), tok, ends(tok))
    logits = torch.zeros(V)
    masked = constraint.mask(logits)
    allowed = set(torch.nonzero(masked > float("-inf")).flatten().tolist())
    assert allowed and all(
        tok.decode([i]).strip() in ("", "t", "f", "true", "false", "tr", "fa", "fal", "tru", "fals")
        or "\n" in tok.decode([i])
        for i in allowed
    )
    constraint.engaged = False
    sample = make_sampler(SamplingParams(), constraint=constraint)
    logits[tok.encode("hello")[0]] = 5.0
    assert sample(logits) == tok.encode("hello")[0]  # not engaged (thinking): the mask is not applied


@pytest.mark.parametrize(
    "schema, words",
    [
        ([1, 2], "must be a JSON object"),
        ({"type": "frobnicate"}, "cannot be enforced"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "cannot be enforced"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused_in_one_line(schema, words):
    with pytest.raises(InputError, match=words) as e:
        check_schema(schema, "the schema")
    assert "\n" not in e.value.message and e.value.hint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_mask_is_unpacked_there_with_one_read_per_token(tok):
    """The bitmask goes down to the GPU and is unpacked there: the ids equal the CPU path's, and each
    token still costs one host read (the sampled id)."""
    from qwen35_lite.runtime.op_profile import count_host_reads

    grammar = json_grammar(SCHEMA)
    on_cpu = make_sampler(SamplingParams(), constraint=GrammarConstraint(grammar, tok, ends(tok)))
    on_gpu = make_sampler(SamplingParams(), constraint=GrammarConstraint(grammar, tok, ends(tok)))
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        logits = torch.randn(V, generator=g)
        with count_host_reads() as reads:
            token = on_gpu(logits.cuda())
        assert token == on_cpu(logits) and sum(reads.values()) == 1
        if token in ends(tok):
            break
