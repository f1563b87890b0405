"""Constrained decoding: a reply that must be JSON (of a schema) or a Qwen3.5 tool call, enforced per token.

llguidance (a CPU library, no torch or transformers underneath) turns a grammar into the set of tokens
allowed next; that set comes as a bitmask of the vocabulary, which is copied to the logits' device and
applied there in a few elementwise ops, so the only value read back per token is still the sampled id.

Grammars are llguidance's Lark text, built here from what a request asks for:
- `json_grammar(schema)`: JSON of a schema (None: any object), on one line with ", " and ": "
  (flexible whitespace would let a weak model write whitespace for ever);
- `tool_grammar(tools, ...)`: one or more calls in the chat template's markup, of the given tools, each
  parameter written as the template writes it (a string as raw text, anything else as JSON of the
  parameter's schema), so `text/tool_calls.py` reads them back to arguments that match the schema.

Thinking: the constraint starts when the `<think>` block closes (generate.py switches it on once the
model writes `</think>`; with thinking off the template has closed it already), so the reasoning is free
and only the answer is held to the grammar; a leading blank line is allowed for the model's own "\\n\\n"
after `</think>`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping

import numpy
import torch

from ..errors import InputError
from ..text.tokenizer import Tokenizer
from ..text.tool_calls import STRING_TYPES
from .engine import Engine

# llguidance options for JSON: one line, with the separators json.dumps uses.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
LEAD = r"/\n{0,2}/"  # what may come before the answer: the blank line a model writes after </think>
# A string parameter's raw text may hold anything but the markup that ends or splits a parameter.
MARKUP = r"(.|\n)*(<\/parameter>|<parameter=|<\/function>|<\/tool_call>)(.|\n)*"
CLOSE = json.dumps("\n</parameter>\n")
SCHEMA_HINT = 'give a JSON Schema object (https://json-schema.org), e.g. {"type": "object", ...}'


def json_grammar(schema: Mapping | None) -> str:
    """Lark text for JSON matching `schema` (None: any JSON object, OpenAI's json_object)."""
    return f"start: {LEAD} {_json(schema if schema is not None else {'type': 'object'})}\n"


def tool_grammar(
    tools: list[dict],
    token_id,
    parallel: bool = True,
    content_schema: Mapping | None | bool = False,
) -> str:
    """Lark text for a reply that is tool calls of `tools` (OpenAI-style, already checked), one or more
    when `parallel`; content_schema: False for calls only, else the reply may instead be JSON of that
    schema (None: any object). token_id(text) -> the id of a special token, or None."""
    lines = [f"start: {LEAD} answer", "calls: call" + (' ("\\n" call)*' if parallel else "")]
    lines.append("answer: calls" + ("" if content_schema is False else f" | {_json(content_schema)}"))
    lines.append("call: " + " | ".join(f"call{i}" for i in range(len(tools))))
    opening, closing = _tag(token_id, "<tool_call>"), _tag(token_id, "</tool_call>")
    for i, tool in enumerate(tools):
        function = tool["function"]
        params = _parameters(function.get("parameters") or {}, f"p{i}_", lines)
        head = json.dumps(f"\n<function={function['name']}>\n")
        lines.append(f'call{i}: {opening} {head} {params} "</function>\\n" {closing}')
    return "\n".join(lines) + "\n"


def _tag(token_id, text: str) -> str:
    """A markup tag as its one special token where the vocabulary has it (as the model writes it), else
    as text."""
    i = token_id(text)
    return f"<[{i}]>" if i is not None else json.dumps(text)


def _parameters(schema: Mapping, prefix: str, lines: list[str]) -> str:
    """The rule body for a function's parameters, in the schema's order: the required ones always, the
    others optional; each rule is appended to `lines`."""
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}  # for $ref inside a property
    parts = []
    for j, (name, prop) in enumerate(properties.items()):
        rule = f"{prefix}{j}"
        open_tag = json.dumps(f"<parameter={name}>\n")
        lines.append(f"{rule}: {open_tag} {_value(prop, rule.upper(), defs, lines)}")
        parts.append(rule if name in required else f"{rule}?")
    return " ".join(parts) or '""'


def _value(prop: object, terminal: str, defs: dict, lines: list[str]) -> str:
    """One parameter's value and closing tag, as the template writes them: a string (or a schema the
    reader keeps as a string: one naming a string type, or none) as raw text; any other type as JSON of
    its schema.

    Free text and its closing tag are one terminal: as two, the text's lexeme (greedy) would swallow the
    start of the tag and leave no way to close it."""
    prop = prop if isinstance(prop, Mapping) else {}
    declared = prop.get("type")
    types = [
        t.lower() for t in (declared if isinstance(declared, list) else [declared]) if isinstance(t, str)
    ]
    if types and not any(t in STRING_TYPES for t in types):
        return f"{_json({**defs, **prop})} {CLOSE}"
    choices = prop.get("enum", [prop["const"]] if "const" in prop else None)
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        return "(" + " | ".join(json.dumps(c) for c in choices) + f") {CLOSE}"
    low = prop.get("minLength", 0) if isinstance(prop.get("minLength"), int) else 0
    high = prop.get("maxLength") if isinstance(prop.get("maxLength"), int) else None
    count = f"{{{low},{'' if high is None else high}}}"
    lines.append(f"{terminal}: (/(.|\\n){count}/ & ~/{MARKUP}/) {CLOSE}")
    return terminal


def _json(schema: Mapping) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


# ---- checking and compiling --------------------------------------------------------------------------


def check_grammar(grammar: str, what: str) -> None:
    """InputError naming `what` when llguidance cannot enforce the grammar (an invalid or unsupported
    schema); cheap: no tokenizer is needed."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar))
    if error:
        raise InputError(f"{what} cannot be enforced: {_first_line(error)}", SCHEMA_HINT)


def check_schema(schema: object, what: str) -> dict:
    """A JSON schema as a request or --json-schema gives it: an object llguidance can enforce."""
    if not isinstance(schema, Mapping):
        raise InputError(f"{what} must be a JSON object, not {type(schema).__name__}", SCHEMA_HINT)
    check_grammar(json_grammar(schema), what)
    return dict(schema)


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0][:300] if error.strip() else "invalid grammar"


_LOCK = threading.Lock()
_TOKENIZERS: dict[tuple, tuple[object, object]] = {}


def ll_tokenizer(tokenizer: Tokenizer, n_vocab: int, eos: list[int]):
    """llguidance's view of our tokenizer (every id's bytes, the special ids, the end tokens), built once
    per tokenizer and vocabulary size: it takes a few seconds."""
    import llguidance

    key = (id(tokenizer), n_vocab, tuple(eos))
    with _LOCK:
        if key not in _TOKENIZERS:
            tokens, special = tokenizer.token_bytes(n_vocab)
            bridge = _Bridge(tokenizer, tokens, special, eos[0])
            ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(bridge), n_vocab=n_vocab, eos_token=eos)
            _TOKENIZERS[key] = (tokenizer, ll)  # the tokenizer is kept alive so its id is never reused
        return _TOKENIZERS[key][1]


class _Bridge:
    """What llguidance.TokenizerWrapper reads from a tokenizer."""

    bos_token_id = None

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], special: list[int], eos: int) -> None:
        self.tokenizer, self.tokens, self.special_token_ids, self.eos_token_id = (
            tokenizer,
            tokens,
            special,
            eos,
        )

    def __call__(self, text: str | bytes) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


class GrammarConstraint:
    """One reply's grammar state: `mask(logits)` sets every token the grammar forbids next to -inf (on the
    logits' device), `accept(id)` advances past the sampled token. generate() calls them only while
    `engaged` (after the think block)."""

    def __init__(self, grammar: str, tokenizer: Tokenizer, eos: list[int]) -> None:
        self.grammar, self.tokenizer, self.eos = grammar, tokenizer, eos
        self.matcher = None
        self.engaged = True

    def _start(self, n_vocab: int, device: torch.device) -> None:
        import llguidance

        ll = ll_tokenizer(self.tokenizer, n_vocab, self.eos)
        self.matcher = llguidance.LLMatcher(
            ll, llguidance.LLMatcher.grammar_from_lark(self.grammar), log_level=0
        )
        self._raise_if_failed()
        words = (n_vocab + 31) // 32
        self.host = torch.empty(words, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.shifts = torch.arange(32, dtype=torch.int32, device=device)
        self.n_vocab = n_vocab

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> logits with the forbidden tokens at -inf (a new tensor, same device)."""
        if self.matcher is None:
            self._start(logits.numel(), logits.device)
        self.matcher.unsafe_compute_mask_ptr(self.host.data_ptr(), self.host.numel() * 4)
        self._raise_if_failed()
        if logits.device.type == "cpu":  # numpy unpacks the bits in one pass
            bits = numpy.unpackbits(self.host.numpy().view(numpy.uint8), bitorder="little")
            allowed = torch.from_numpy(bits[: self.n_vocab]).bool()
        else:  # the 31 KiB of words go down (from pinned memory, no sync) and are unpacked there
            words = self.host.to(logits.device, non_blocking=True)  # bit b of word w: id 32w + b
            allowed = ((words.unsqueeze(1) >> self.shifts) & 1).view(-1)[: self.n_vocab].bool()
        return torch.where(allowed, logits, float("-inf"))

    def accept(self, token: int) -> None:
        if self.matcher is not None and not self.matcher.is_stopped():
            self.matcher.consume_token(token)
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.matcher.is_error():
            raise InputError(
                f"the response format cannot be enforced: {_first_line(self.matcher.get_error())}",
                SCHEMA_HINT,
            )


def answer_constraint(engine: Engine, grammar: str | None) -> GrammarConstraint | None:
    """A fresh constraint for one reply (None without a grammar), ending at <|im_end|> or a stop id."""
    if grammar is None:
        return None
    first = engine.tokenizer.token_id("<|im_end|>")
    ends = [first] if first is not None else []
    return GrammarConstraint(
        grammar, engine.tokenizer, ends + [i for i in engine.defaults.stop_ids if i not in ends]
    )
