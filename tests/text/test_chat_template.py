"""Chat template: our renderer + built-in Qwen3.5 template give exactly transformers' apply_chat_template text."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from qwen35_lite.errors import CheckpointError, InputError
from qwen35_lite.text.chat_template import BUILTIN_TEMPLATE, ChatTemplate
from qwen35_lite.text.tokenizer import PACKAGED_TOKENIZER

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city — «météo» <b>now</b>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "Hello! 你好"}],
    "system_multi_turn_thinking": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n2+2 = 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n6."},
        {"role": "user", "content": "Thanks, bye."},
    ],
    "reasoning_fields": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because.", "thinking": "Explain briefly."},
    ],
    "images": [
        {"role": "system", "content": [{"type": "text", "text": "Describe images."}]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What is this? And this: "},
                {"type": "image", "image": "file:///tmp/cat.png"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat and a dog."}]},
        {"role": "user", "content": [{"type": "text", "text": "Now this video."}, {"type": "video"}]},
    ],
    "tools": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Call the tool twice.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "東京", "n": 2}},
                },
            ],
        },
        {"role": "tool", "content": "sunny, 21°C"},
        {"role": "tool", "content": "rain, 14°C"},
    ],
}


@pytest.fixture(scope="module")
def checkpoint_dir(module_tmp):
    """A checkpoint dir with the real tokenizer and our template stored in tokenizer_config.json."""
    out = module_tmp("tok")
    with gzip.open(PACKAGED_TOKENIZER, "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": BUILTIN_TEMPLATE.read_text(encoding="utf-8"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(checkpoint_dir)


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_matches_transformers(checkpoint_dir, hf_tokenizer, name, thinking):
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tools" else None
    expected = hf_tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    template = ChatTemplate.from_dir(checkpoint_dir)
    assert template.source == "checkpoint"
    assert template.render(messages, tools=tools, enable_thinking=thinking) == expected
    assert ChatTemplate.builtin().render(messages, tools=tools, enable_thinking=thinking) == expected


def test_without_generation_prompt_matches_transformers(hf_tokenizer):
    messages = CONVERSATIONS["system_multi_turn_thinking"][:3]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert (
        ChatTemplate.builtin().render(messages, add_generation_prompt=False, add_vision_id=True) == expected
    )


def test_qwen35_layout(hf_tokenizer):
    template = ChatTemplate.builtin()
    one = [{"role": "user", "content": "Hi"}]
    assert template.render(one) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert template.render(one, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    text = template.render(CONVERSATIONS["system_multi_turn_thinking"])
    # Reasoning before the last user query is dropped; the answers stay.
    assert "Simple sum" not in text and "Add again" not in text
    assert "<|im_start|>assistant\n2+2 = 4.<|im_end|>\n" in text
    # After the last query (an agentic turn in progress) it is kept.
    kept = template.render(CONVERSATIONS["reasoning_fields"], add_generation_prompt=False)
    assert kept.endswith("<|im_start|>assistant\n<think>\nExplain briefly.\n</think>\n\nBecause.<|im_end|>\n")
    assert "Greet back" not in kept
    images = template.render(CONVERSATIONS["images"])
    assert images.count(IMAGE) == 2 and "<|video_pad|>" in images
    ids = hf_tokenizer(images, add_special_tokens=False)["input_ids"]
    assert ids.count(248056) == 2 and ids.count(248053) == 3 and ids.count(248057) == 1


def test_template_lookup_order(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    builtin = ChatTemplate.from_dir(tmp_path)
    assert builtin.source == "built-in"

    config = {"eos_token": {"content": "<|im_end|>"}, "chat_template": "config:{{ eos_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_dir(tmp_path).source == "checkpoint"
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "config:<|im_end|>"

    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "listed"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "listed"

    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages[0].content }}")
    template = ChatTemplate.from_dir(tmp_path)
    assert template.source == "checkpoint" and template.origin.endswith("chat_template.jinja")
    assert template.render([{"role": "user", "content": "x"}]) == "jinja:x"

    config["chat_template"] = [{"name": "tool_use", "template": "tools"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(CheckpointError):
        ChatTemplate.from_dir(tmp_path)


def test_raise_exception_is_an_input_error(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('only user turns, please') }}")
    with pytest.raises(InputError, match="only user turns, please"):
        ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}])

    builtin = ChatTemplate.builtin()
    late_system = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    with pytest.raises(InputError, match="first"):
        builtin.render(late_system)
    with pytest.raises(InputError, match="images"):
        builtin.render([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "a"}])
    with pytest.raises(InputError, match="role"):
        builtin.render([{"role": "robot", "content": "a"}])
    with pytest.raises(InputError):
        builtin.render([])


def test_bad_template_syntax_is_a_checkpoint_error(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(CheckpointError) as err:
        ChatTemplate.from_dir(tmp_path)
    assert err.value.hint


def test_template_helpers_match_transformers(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}|{{ ns.n }}|{{ dict(a=1) | tojson }}"
    )
    tools = [{"name": "<é>", "x": [1, 2]}]
    text = ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "a"}] * 3, tools=tools)
    assert (
        text
        == '[{"name": "<é>", "x": [1, 2]}]|'
        + json.dumps(tools[0], indent=2, ensure_ascii=False)
        + '|4|1|{"a": 1}'
    )


def test_sandbox_blocks_internals(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(InputError):
        ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "a"}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}{{ ''.__class__ }}")
    with pytest.raises(InputError):
        ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "a"}])


def test_rich_objects_become_placeholders():
    class Picture:
        def save(self, path):  # a method the sandbox must never reach
            raise AssertionError("called")

    messages = [
        {"role": "user", "content": [{"type": "image", "image": Picture()}, {"type": "text", "text": "?"}]}
    ]
    assert IMAGE + "?" in ChatTemplate.builtin().render(messages)
