"""A conversation over one model cache (runtime/session.py): later turns feed only their new tokens and give
what the whole conversation fed at once gives; /system, /clear and /save + /load re-render the history."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.plan.options import EngineOptions
from qwen35_lite.runtime.engine import Engine
from qwen35_lite.runtime.generate import Finished
from qwen35_lite.runtime.sampling import SamplingParams
from qwen35_lite.runtime.session import ChatSession, ChatSettings


@pytest.fixture(scope="module")
def engine(module_tmp) -> Engine:
    out = module_tmp("session") / "tiny"
    write_checkpoint(out, SyntheticSpec(), dtype=torch.float32, seed=5)
    return Engine.load(str(out), EngineOptions(device="cpu", offline=True, ctx=1024))


def session(engine: Engine, **kw) -> ChatSession:
    return ChatSession(engine, ChatSettings(params=SamplingParams(temperature=0.0), max_new_tokens=4, **kw))


def turn(s: ChatSession, text: str) -> list[int]:
    done = [e for e in s.send(text) if isinstance(e, Finished)][-1]
    return done.tokens


def test_a_later_turn_feeds_only_the_closing_and_its_own_turn(engine):
    """The cache holds the first turn and its reply: the second feeds `<|im_end|>` closing the reply (cut
    by max_new_tokens) and the new user turn as the template renders it, and nothing of the history."""
    s = session(engine, think="off")
    turn(s, "first question")
    tok, fed = engine.tokenizer, s.cache.offset
    want = tok.encode("<|im_end|>\n") + tok.encode(
        engine.template.render(
            [{"role": "user", "content": "second question"}],
            add_generation_prompt=True,
            enable_thinking=False,
        )
    )
    assert s.prompt_ids("second question") == want
    turn(s, "second question")
    assert s.cache.offset == fed + len(want) + 4  # the second reply: max_new_tokens


def test_system_and_clear_re_render_the_history_from_its_start(engine):
    s = session(engine, think="off")
    turn(s, "hello")
    s.set_system("Answer in one word.")
    assert s.fresh and s.cache.offset == 0
    ids = s.prompt_ids("again")
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nAnswer in one word.") and "hello" in text
    s.clear()
    assert s.messages == [] and "hello" not in engine.tokenizer.decode(s.prompt_ids("again"))


def test_save_then_load_resumes_the_conversation_rendered_whole(engine, tmp_path: Path):
    """/load restores the history and settings; its next turn is the whole conversation rendered from its
    start, exactly the template's rendering of the saved messages and the new turn."""
    s = session(engine, think="off", system="Be brief.")
    turn(s, "one")
    s.save(tmp_path / "chat.json")
    resumed = session(engine)
    resumed.load(tmp_path / "chat.json")
    assert resumed.settings.system == "Be brief." and resumed.settings.think == "off"
    assert resumed.messages == s.messages
    history = [{"role": "system", "content": "Be brief."}, *s.messages, {"role": "user", "content": "two"}]
    text = engine.template.render(history, add_generation_prompt=True, enable_thinking=False)
    assert resumed.prompt_ids("two") == engine.tokenizer.encode(text)
    assert len(turn(resumed, "two")) == 4
