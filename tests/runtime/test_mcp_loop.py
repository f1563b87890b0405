"""The agent loop (runtime/tool_loop.py) over a real session, its replies scripted (runtime/scripted.py):
prompts with MCP tools are transformers' apply_chat_template with the converted schemas; after a call and
its result the ids fed are transformers' rendering of the history with the assistant's call and the tool
message; refused, unknown, stopped and over-the-limit calls go back as error results; a saved agent chat
reloads to the same prompt."""

from __future__ import annotations

import json

import pytest
import torch

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.plan.options import EngineOptions
from qwen35_lite.runtime import scripted
from qwen35_lite.runtime.engine import Engine
from qwen35_lite.runtime.generate import Finished
from qwen35_lite.runtime.mcp import McpTool, ToolCallCancelled, ToolOutput
from qwen35_lite.runtime.sampling import SamplingParams
from qwen35_lite.runtime.session import ChatSession, ChatSettings
from qwen35_lite.runtime.tool_loop import REFUSED, STOPPED, CallDone, ToolLoop, TurnNote

# What the test server (tests/cli/mcp_test_server.py) lists for `add` and `echo`, as the SDK gives it.
ADD = {
    "properties": {"a": {"title": "A", "type": "integer"}, "b": {"title": "B", "type": "integer"}},
    "required": ["a", "b"],
    "type": "object",
    "title": "addArguments",
}
ECHO = {
    "properties": {"text": {"title": "Text", "type": "string"}},
    "required": ["text"],
    "type": "object",
    "title": "echoArguments",
}
TOOLS = [McpTool("add", "calc", "add", "Add two integers.", ADD), McpTool("echo", "calc", "echo", None, ECHO)]
CONVERTED = [
    {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": ADD}},
    {"type": "function", "function": {"name": "echo", "parameters": ECHO}},
]


def call_text(name: str, **args) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


class FakeHub:
    """The hub's interface over canned answers: what each tool returns, and the calls it was given."""

    def __init__(self, answers: dict, tools: list[McpTool] = TOOLS) -> None:
        self.answers, self.calls, self._tools = answers, [], tools

    def tools(self):
        return self._tools

    def find(self, name):
        return next((t for t in self._tools if t.name == name), None)

    def call(self, tool, arguments, cancel=None, timeout=None):
        self.calls.append((tool.remote, arguments))
        answer = self.answers[tool.remote]
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.fixture(scope="module")
def ckpt(module_tmp):
    out = module_tmp("loop") / "tiny"
    write_checkpoint(out, SyntheticSpec(), dtype=torch.float32, seed=3)
    return out


@pytest.fixture(scope="module")
def engine(ckpt) -> Engine:
    return Engine.load(str(ckpt), EngineOptions(device="cpu", offline=True, ctx=2048))


@pytest.fixture(scope="module")
def hf(ckpt):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture
def script(tmp_path, monkeypatch):
    """script(*replies): the next replies of this process, as text."""

    def use(*replies: str) -> None:
        path = tmp_path / "script.json"
        path.write_text(json.dumps(list(replies)))
        monkeypatch.setenv(scripted.ENV, str(path))
        scripted._state.update(file=None)

    return use


def hf_ids(hf, messages: list[dict]) -> list[int]:
    return hf.apply_chat_template(
        messages,
        tools=CONVERTED,
        add_generation_prompt=True,
        enable_thinking=False,
        tokenize=True,
        return_dict=False,
    )


def new_session(engine: Engine) -> ChatSession:
    settings = ChatSettings(params=SamplingParams(temperature=0.0), max_new_tokens=200, think="off")
    return ChatSession(engine, settings, tools=[t.openai() for t in TOOLS])


def run_turn(loop: ToolLoop, text: str) -> tuple[list, list[list[int]]]:
    """The turn's events, and the cache's ids at the end of each reply."""
    events, fed = [], []
    for event in loop.turn(text):
        events.append(event)
        if isinstance(event, Finished):
            fed.append(list(loop.session.cache.token_ids))
    return events, fed


@pytest.mark.slow  # the module's checkpoint, engine and transformers' tokenizer take ~10 s
def test_mcp_tools_are_given_to_the_template_as_transformers_renders_them(engine, hf):
    s = new_session(engine)
    assert [t.openai() for t in TOOLS] == CONVERTED
    assert s.prompt_ids("What is 2 + 40?") == hf_ids(hf, [{"role": "user", "content": "What is 2 + 40?"}])


@pytest.mark.slow
def test_after_a_call_the_ids_fed_are_transformers_rendering_of_the_history(engine, hf, script, tmp_path):
    script("Let me add.\n\n" + call_text("add", a=2, b=40), "It is 42.")
    s = new_session(engine)
    hub = FakeHub({"add": ToolOutput("42")})
    loop = ToolLoop(s, hub, approve=lambda call: "yes")
    events, fed = run_turn(loop, "What is 2 + 40?")
    assert hub.calls == [("add", {"a": 2, "b": 40})]  # typed by the schema, as sent
    call_id = s.messages[1]["tool_calls"][0]["id"]
    history = [
        {"role": "user", "content": "What is 2 + 40?"},
        {
            "role": "assistant",
            "content": "Let me add.",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "add", "arguments": {"a": 2, "b": 40}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "name": "add", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
    ]
    assert s.messages == history
    assert fed[0] + s.last_reply.prompt_ids == hf_ids(hf, history[:3])  # round 2's prompt, on round 1's cache
    assert [type(e).__name__ for e in events if not type(e).__name__ == "TokenEvent"] == [
        "Finished",
        "CallStarted",
        "CallDone",
        "Finished",
    ]
    saved = tmp_path / "agent.json"  # a saved agent chat reloads to the same prompt, rendered whole
    s.save(saved)
    again = new_session(engine)
    again.load(saved)
    assert again.messages == history
    assert again.prompt_ids("And 3 + 4?") == hf_ids(hf, [*history, {"role": "user", "content": "And 3 + 4?"}])


@pytest.mark.slow
def test_refused_unknown_and_stopped_calls_go_back_as_errors(engine, script):
    script(call_text("add", a=1, b=2) + "\n" + call_text("nosuch", x=1), "ok", call_text("echo", text="hi"))
    s = new_session(engine)
    hub = FakeHub({"add": ToolOutput("3"), "echo": ToolCallCancelled()})
    loop = ToolLoop(s, hub, approve=lambda call: "no")
    run_turn(loop, "first")
    assert hub.calls == []
    results = [m["content"] for m in s.messages if m["role"] == "tool"]
    assert results[0] == REFUSED and results[1].startswith("Error: no tool named 'nosuch'")
    assert s.messages[-1] == {"role": "assistant", "content": "ok"}
    loop.approve = lambda call: "yes"
    events, _ = run_turn(loop, "second")  # echo's call is stopped by Ctrl+C while it runs
    assert any(isinstance(e, TurnNote) and "stopped" in e.text for e in events)
    assert s.messages[-1]["role"] == "tool" and s.messages[-1]["content"] == STOPPED
    assert s.unsent == [s.messages[-1]]  # fed before the next message, so the history stays well-formed
    ids = s.prompt_ids("third")
    assert engine.tokenizer.decode(ids).count("<tool_response>\n" + STOPPED) == 1
    assert [r.decision for r in loop.transcript] == ["no", "auto", "stop"]


@pytest.mark.slow
def test_huge_output_is_cut_to_the_context_and_the_round_limit_ends_the_turn(engine, script):
    script(call_text("echo", text="a"), call_text("echo", text="b"))
    s = new_session(engine)
    hub = FakeHub({"echo": ToolOutput("word " * 100_000)})
    loop = ToolLoop(s, hub, approve=lambda call: "always", max_rounds=1)
    events, _ = run_turn(loop, "go")
    assert hub.calls == [("echo", {"text": "a"})]  # the second round's call is not run
    result = s.messages[2]["content"]
    assert result.startswith("word word") and result.endswith(" of 500000 characters]")
    assert "cut to fit the context" in result
    assert engine.max_context - s.cache.offset >= 60  # room was left for the reply (and it was written)
    assert any(isinstance(e, TurnNote) and "round limit (1)" in e.text for e in events)
    assert "round limit" in s.messages[-1]["content"] and s.messages[-1]["role"] == "tool"
    assert loop.always == {"echo"}
    assert [e.record.decision for e in events if isinstance(e, CallDone)] == ["always"]


@pytest.mark.slow
def test_an_image_result_goes_to_the_vision_tower(tmp_path, script):
    """A tool's image is seen as a user's is: round 2's prompt (on round 1's cache) is the processor's
    rendering of the history with the image in the tool message, and its greedy tokens are transformers'."""
    import test_multimodal
    from vision_helpers import build_tiny_vlm, load_tiny_vlm, make_image

    vlm = build_tiny_vlm(tmp_path / "vlm")
    processor = test_multimodal.processor._get_wrapped_function()(vlm)
    picture = tmp_path / "p.png"
    make_image(100, 70).save(picture)
    engine = Engine.load(str(vlm), test_multimodal.OPTS)
    script(call_text("picture", color="red"))
    s = ChatSession(
        engine,
        ChatSettings(params=SamplingParams(temperature=0.0), max_new_tokens=30, think="off"),
        tools=CONVERTED,
    )
    hub = FakeHub(
        {"picture": ToolOutput("a red square", images=[picture])},
        [McpTool("picture", "calc", "picture", None, ECHO)],
    )
    loop = ToolLoop(s, hub, approve=lambda call: "yes")
    _, fed = run_turn(loop, "Show me.")
    history = s.messages[:3]
    assert history[2]["content"] == [
        {"type": "image", "image": str(picture)},
        {"type": "text", "text": "a red square"},
    ]
    theirs = processor.apply_chat_template(
        history,
        tools=CONVERTED,
        tokenize=True,
        add_generation_prompt=True,
        enable_thinking=False,
        return_dict=True,
        return_tensors="pt",
    )
    ids = theirs["input_ids"][0].tolist()
    assert fed[0] + s.last_reply.prompt_ids == ids and ids.count(test_multimodal.IMAGE) > 0
    theirs_tokens = test_multimodal.hf_greedy(load_tiny_vlm(vlm, torch.float32), theirs, 30)
    ours = s.last_reply.tokens
    assert ours == theirs_tokens[: len(ours)] and (len(ours) == 30 or ours[-1] in engine.defaults.stop_ids)
