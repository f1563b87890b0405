"""Broken and hostile files at the boundary: safetensors shards and their index, config.json,
generation_config.json and chat templates. Each must be one typed error naming the problem (a CLI line and a
hint, exit 1, no traceback), never a hang, a traceback or a silent misreading.

One tiny valid checkpoint is written per module; each case breaks one thing in a copy of it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qwen35_lite.cli import app
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.errors import CheckpointError, ConfigError, InputError
from qwen35_lite.plan.sizes import tensor_shapes
from qwen35_lite.runtime.engine import generation_defaults
from qwen35_lite.text import template_sandbox
from qwen35_lite.text.chat_template import ChatTemplate
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def tiny(module_tmp) -> Path:
    """A valid checkpoint in several shards; a small vocabulary keeps it at a few MB (every case here fails
    before a token is fed, so the real tokenizer's ids never index the embedding)."""
    out = module_tmp("hardening") / "tiny"
    write_checkpoint(out, SyntheticSpec(vocab_size=1024), dtype=torch.bfloat16, shard_bytes=256 << 10)
    return out


def broken_copy(tiny: Path, dst: Path) -> Path:
    """A copy to damage: the small files copied, the tokenizer linked (it is never damaged)."""
    dst.mkdir()
    for f in tiny.iterdir():
        if f.name == "tokenizer.json":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---- safetensors headers -------------------------------------------------------------------------------

GOOD = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
}


def write_shard(path: Path, header, data: bytes = bytes(16)) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def with_entry(name: str, **changes) -> dict:
    header = copy.deepcopy(GOOD)
    header[name].update(changes)
    return header


def without(name: str, key: str) -> dict:
    header = copy.deepcopy(GOOD)
    del header[name][key]
    return header


SHARD_CASES = {
    "header is a list": ([1, 2], bytes(16), "corrupt header"),
    "header is not JSON": (b"{not json", bytes(16), "corrupt header"),
    "header nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, b"", "corrupt header"),
    "no dtype": (without("a", "dtype"), bytes(16), "tensor a has no dtype"),
    "no shape": (without("b", "shape"), bytes(16), "tensor b has no shape"),
    "entry not an object": ({**GOOD, "a": "F32"}, bytes(16), "tensor a has no dtype"),
    "offsets are strings": (with_entry("a", data_offsets=["0", "8"]), bytes(16), "malformed data_offsets"),
    "offsets reversed": (with_entry("a", data_offsets=[8, 0]), bytes(16), "reversed data_offsets"),
    "offsets negative": (with_entry("a", data_offsets=[-8, 0]), bytes(16), "malformed data_offsets"),
    "one offset": (with_entry("a", data_offsets=[8]), bytes(16), "malformed data_offsets"),
    "shape negative": (with_entry("a", shape=[-2]), bytes(16), "malformed shape"),
    "shape of booleans": (with_entry("a", shape=[True, 2]), bytes(16), "malformed shape"),
    "dtype size vs bytes": (with_entry("a", dtype="F16"), bytes(16), "needs 4 bytes, not 8"),
    "shape vs bytes": (with_entry("a", shape=[3]), bytes(16), "needs 12 bytes, not 8"),
    "unknown dtype": (with_entry("a", dtype="Q4_K"), bytes(16), "unsupported dtype 'Q4_K'"),
    "overlapping": (with_entry("b", data_offsets=[4, 12]), bytes(16), "tensor b overlaps"),
    "gap": (with_entry("b", data_offsets=[12, 20]), bytes(20), "leaves a gap"),
    "data truncated": (GOOD, bytes(10), "truncated"),
    "bytes after the last tensor": (GOOD, bytes(24), "8 bytes after its last tensor"),
    "metadata not strings": ({**GOOD, "__metadata__": {"format": 1}}, bytes(16), "__metadata__"),
    "header longer than the file": (b"", b"", "truncated or not a safetensors file"),
    "5000-digit offset": (
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}",
        b"",
        "corrupt header",
    ),
}


@pytest.mark.parametrize("case", SHARD_CASES)
def test_bad_safetensors_header_is_one_checkpoint_error(tmp_path, case):
    header, data, words = SHARD_CASES[case]
    if case == "header longer than the file":
        (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    else:
        write_shard(tmp_path / "m.safetensors", header, data)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert words in err.value.message and "m.safetensors" in err.value.message
    assert err.value.hint


def test_valid_header_in_any_key_order_is_read(tmp_path):
    header = {"b": GOOD["b"], "__metadata__": {"format": "pt"}, "a": GOOD["a"]}
    write_shard(tmp_path / "m.safetensors", header, struct.pack("<2f", 1.5, -2.0) + bytes(8))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.read("a").tolist() == [1.5, -2.0]
    assert ckpt.info("b").shape == (2, 2) and ckpt.info("b").dtype == torch.bfloat16


def test_quantised_expert_dtypes_are_read_by_structure_not_refused(tmp_path):
    """int4-packed I32, U8/I8, F8_E4M3 and scale tensors (the coming quantised formats) pass the header
    checks; only the resident tensors are held to float dtypes."""
    tensors = {
        "model.layers.0.mlp.experts.0.down_proj.weight_packed": torch.zeros(4, 2, dtype=torch.int32),
        "model.layers.0.mlp.experts.0.down_proj.weight_scale": torch.ones(4, 1, dtype=torch.bfloat16),
        "model.layers.0.mlp.experts.0.down_proj.weight_shape": torch.tensor([4, 16], dtype=torch.int32),
        "model.layers.0.mlp.experts.1.down_proj.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
        "model.layers.0.mlp.experts.1.down_proj.weight_scale_inv": torch.ones(1, 1),
        "model.layers.0.mlp.experts.2.down_proj.weight": torch.zeros(4, dtype=torch.uint8),
        "model.layers.0.mlp.experts.3.down_proj.weight": torch.zeros(4, dtype=torch.int8),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.info("layers.0.mlp.experts.0.down_proj.weight_packed").dtype == torch.int32
    assert ckpt.read("layers.0.mlp.experts.0.down_proj.weight_shape").tolist() == [4, 16]


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    write_shard(tmp_path / "a.safetensors", GOOD)
    write_shard(tmp_path / "b.safetensors", GOOD)
    with pytest.raises(CheckpointError, match="tensor a is stored twice"):
        Checkpoint(tmp_path)


# ---- the index and the files it names -----------------------------------------------------------------


def index_with(tiny: Path, dst: Path, shard_name) -> Path:
    bad = broken_copy(tiny, dst)
    edit_json(bad / INDEX, lambda d: d["weight_map"].update({"model.language_model.norm.weight": shard_name}))
    return bad


@pytest.mark.parametrize(
    "name, words",
    [
        ("../../../../etc/passwd", "outside the checkpoint directory"),
        ("/etc/passwd", "outside the checkpoint directory"),
        ("sub/../../x.safetensors", "outside the checkpoint directory"),
        ("..", "outside the checkpoint directory"),
        ("config.json", "not a .safetensors file"),
    ],
)
def test_index_cannot_name_files_outside_the_checkpoint(tiny, tmp_path, monkeypatch, name, words):
    bad = index_with(tiny, tmp_path / "bad", name)
    opened = []
    real_open = os.open
    monkeypatch.setattr(
        os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k)
    )
    with pytest.raises(CheckpointError) as err:
        Checkpoint(bad)
    assert words in err.value.message and repr(name) in err.value.message
    assert not any("passwd" in p or "config.json" in p for p in opened)  # refused before anything is opened


@pytest.mark.parametrize(
    "weight_map, words",
    [
        (["model-00001-of-00002.safetensors"], "weight_map must map"),
        ({"norm.weight": 3}, "weight_map must map"),
        ({"norm.weight": None}, "weight_map must map"),
        ("model.safetensors", "weight_map must map"),
    ],
)
def test_index_weight_map_must_map_strings_to_strings(tiny, tmp_path, weight_map, words):
    bad = broken_copy(tiny, tmp_path / "bad")
    (bad / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=words):
        Checkpoint(bad)


@pytest.mark.parametrize("text", ["{oops", "[]", '{"metadata": {}}', "[" * 100_000 + "]" * 100_000])
def test_corrupt_index_is_one_error(tiny, tmp_path, text):
    bad = broken_copy(tiny, tmp_path / "bad")
    (bad / INDEX).write_text(text)
    with pytest.raises(CheckpointError, match=f"{INDEX} is corrupt"):
        Checkpoint(bad)


def test_fifo_named_like_a_shard_is_refused_without_hanging(tmp_path):
    write_shard(tmp_path / "a.safetensors", GOOD)
    fifo = tmp_path / "b.safetensors"
    os.mkfifo(fifo)
    outcome: list = []

    def load() -> None:
        try:
            Checkpoint(tmp_path)
        except CheckpointError as e:
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # it hangs in open(): give it a writer so the thread can end, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("opening a FIFO named *.safetensors hung the loader")
    assert outcome and "b.safetensors is not a regular file" in outcome[0].message


def test_directory_named_like_a_shard_is_refused(tmp_path):
    write_shard(tmp_path / "a.safetensors", GOOD)
    (tmp_path / "b.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="b.safetensors is not a regular file"):
        Checkpoint(tmp_path)


def test_symlink_loop_is_one_error(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.unlink()
    loop = bad / "loop"
    loop.symlink_to(shard.name)
    shard.symlink_to("loop")
    with pytest.raises(CheckpointError) as err:
        Checkpoint(bad)
    assert f"{shard.name} cannot be opened" in err.value.message
    assert "symbolic links" in err.value.message


def test_shard_symlinked_from_elsewhere_still_loads(tiny, tmp_path):
    """The hub cache stores shards as symlinks into its blobs/ folder: links out are followed, not refused."""
    linked = tmp_path / "snapshot"
    linked.mkdir()
    for f in tiny.iterdir():
        (linked / f.name).symlink_to(f)
    assert Checkpoint(linked).tensors.keys() == Checkpoint(tiny).tensors.keys()


# ---- resident tensors against config.json ---------------------------------------------------------------


def resident_check(path: Path) -> None:
    Checkpoint(path).check_resident(tensor_shapes(load_config(path).text))


def test_valid_checkpoint_passes_the_resident_check(tiny):
    resident_check(tiny)


def rewrite_tensor(ckpt_dir: Path, stored_name: str, tensor: torch.Tensor) -> None:
    weight_map = json.loads((ckpt_dir / INDEX).read_text())["weight_map"]
    shard = ckpt_dir / weight_map[stored_name]
    tensors = load_file(str(shard))
    tensors[stored_name] = tensor
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_integer_norm_weight_is_refused(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad")
    rewrite_tensor(bad, "model.language_model.norm.weight", torch.zeros(64, dtype=torch.int16))
    with pytest.raises(CheckpointError) as err:
        resident_check(bad)
    assert "norm.weight is stored as int16, not a float type" in err.value.message


def test_resident_shape_that_config_does_not_imply_is_refused(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad")
    edit_json(bad / "config.json", lambda d: d["text_config"].update(shared_expert_intermediate_size=48))
    with pytest.raises(CheckpointError) as err:
        resident_check(bad)
    assert "shared_expert" in err.value.message and "[48, 64]" in err.value.message


def test_missing_resident_tensor_is_named(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad")
    edit_json(bad / "config.json", lambda d: d["text_config"].update(num_hidden_layers=8, layer_types=None))
    with pytest.raises(CheckpointError, match="tensor layers.4.input_layernorm.weight is missing"):
        resident_check(bad)


# ---- config.json ----------------------------------------------------------------------------------------


def text_config() -> dict:
    return SyntheticSpec(vocab_size=1024).text_config()


def composite(**text_changes) -> dict:
    text = {**text_config(), **text_changes}
    return {"model_type": "qwen3_5_moe", "text_config": {k: v for k, v in text.items() if v is not DROP}}


DROP = object()
CONFIG_CASES = {
    "num_experts 0": (composite(num_experts=0), "text_config.num_experts is 0"),
    "top-k 0": (composite(num_experts_per_tok=0), "num_experts_per_tok is 0"),
    "top-k above the experts": (composite(num_experts_per_tok=9), "num_experts_per_tok (9) is more than"),
    "kv heads do not divide": (composite(num_attention_heads=3), "num_key_value_heads (2) does not divide"),
    "linear heads do not divide": (composite(linear_num_value_heads=3), "linear_num_key_heads (2) does not"),
    "heads do not divide hidden": (
        composite(head_dim=DROP, num_attention_heads=6),
        "num_attention_heads (6) does not divide text_config.hidden_size (64)",
    ),
    "negative size": (composite(hidden_size=-64), "text_config.hidden_size is -64"),
    "zero size": (composite(moe_intermediate_size=0), "moe_intermediate_size is 0"),
    "size as a string": (composite(hidden_size="64"), "hidden_size must be a whole number, not '64'"),
    "size as a float": (composite(num_hidden_layers=4.0), "num_hidden_layers must be a whole number"),
    "size as a boolean": (composite(num_experts=True), "num_experts must be a whole number"),
    "text_config null": ({"model_type": "qwen3_5_moe", "text_config": None}, "text_config must be an object"),
    "unknown layer type": (
        composite(
            layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"]
        ),
        "unknown layer type 'sliding_attention'",
    ),
    "layer types too short": (composite(layer_types=["full_attention"]), "one type per layer (4)"),
    "full_attention_interval 0": (
        composite(full_attention_interval=0, layer_types=DROP),
        "full_attention_interval is 0",
    ),
    "vocab 10^12": (composite(vocab_size=10**12), "vocab_size is 1000000000000, an implausible value"),
    "vocab 10^5000": (
        composite(vocab_size=10**5000),
        "vocab_size is an integer of 16610 bits, an implausible",
    ),
    "rope_theta 10^400": (composite(rope_parameters={"rope_theta": 10**400}), "rope_theta must be a number"),
    "missing num_experts": (composite(num_experts=DROP), "config.json has no text_config.num_experts"),
    "missing hidden_size": (composite(hidden_size=DROP), "has no text_config.hidden_size"),
    "max_position_embeddings 0": (composite(max_position_embeddings=0), "max_position_embeddings is 0"),
    "max_position_embeddings negative": (composite(max_position_embeddings=-1), "max_position_embeddings"),
    "rms_norm_eps a string": (composite(rms_norm_eps="tiny"), "rms_norm_eps must be a number above 0"),
    "rope_parameters a list": (composite(rope_parameters=[1]), "rope_parameters must be an object"),
    "rope_theta zero": (composite(rope_parameters={"rope_theta": 0}), "rope_theta must be a number above 0"),
    "odd rotary width": (
        composite(rope_parameters={"partial_rotary_factor": 0.3}),
        "rotary width of 9, which must be even",
    ),
    "mrope_section malformed": (composite(rope_parameters={"mrope_section": "11"}), "mrope_section must be"),
    "tie_word_embeddings a string": (composite(tie_word_embeddings="yes"), "tie_word_embeddings must be"),
    "image token id negative": ({**composite(), "image_token_id": -1}, "image_token_id is -1"),
    "vision_config a list": ({**composite(), "vision_config": [1]}, "vision_config must be an object"),
    "vision depth 0": ({**composite(), "vision_config": {"depth": 0}}, "vision_config.depth is 0"),
    "dense without intermediate_size": (
        {"model_type": "qwen3_5", "text_config": text_config()},
        "has no text_config.intermediate_size",
    ),
    "text-only config names the bare key": (
        {**{k: v for k, v in text_config().items() if k != "num_experts"}, "model_type": "qwen3_5_moe_text"},
        "config.json has no num_experts",
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_is_a_config_error_naming_the_key(case):
    config, words = CONFIG_CASES[case]
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    assert words in err.value.message
    assert err.value.hint


def test_valid_configs_still_parse():
    assert parse_config(composite()).text.num_experts == 8
    dense = {"model_type": "qwen3_5", "text_config": {**text_config(), "intermediate_size": 96}}
    assert parse_config(dense).text.intermediate_size == 96
    no_head_dim = parse_config(composite(head_dim=DROP))  # derived: hidden / heads
    assert no_head_dim.text.head_dim == 16


@pytest.mark.parametrize(
    "text", ["[" * 100_000 + "]" * 100_000, '{"a": ', b"\xff\xfe{}", '{"vocab_size": 1' + "0" * 5000 + "}"]
)
def test_unreadable_config_json_is_one_error(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match="config.json in .* is not valid JSON"):
        load_config(tmp_path)


# ---- generation_config.json --------------------------------------------------------------------------------


class FakeTokenizer:
    def token_id(self, token: str) -> int:
        return 7


GENERATION_CASES = {
    "not JSON": ('{"temperature": ', "generation_config.json in"),
    "nested too deep": ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
    "a list": ("[1, 2]", "is not a JSON object"),
    "max_new_tokens -5": ({"max_new_tokens": -5}, "max_new_tokens must be at least 1, not -5"),
    "max_new_tokens a float": ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number"),
    "temperature a string": ({"temperature": "hot"}, "temperature must be a number, not 'hot'"),
    "temperature negative": ({"temperature": -1}, "temperature must be at least 0"),
    "top_p above 1": ({"top_p": 2}, "top_p must be at least 0 and at most 1, not 2"),
    "top_k a float": ({"top_k": 1.5}, "top_k must be a whole number"),
    "min_p a list": ({"min_p": [0.1]}, "min_p must be a number"),
    "repetition_penalty 0": ({"repetition_penalty": 0}, "repetition_penalty must be above 0"),
    "presence_penalty a bool": ({"presence_penalty": True}, "presence_penalty must be a number"),
    "do_sample a string": ({"do_sample": "yes"}, "do_sample must be true or false"),
    "eos a string": ({"eos_token_id": "</s>"}, "eos_token_id must be a token id"),
    "eos list with a negative": ({"eos_token_id": [1, -2]}, "eos_token_id must be a token id"),
    "temperature past float": (
        {"temperature": 10**400},
        "temperature must be a plausible number, not an integer",
    ),
    "5000 digits": ('{"top_k": 1' + "0" * 5000 + "}", "is not valid JSON"),
}


@pytest.mark.parametrize("case", GENERATION_CASES)
def test_bad_generation_config_is_a_config_error_naming_the_key(tmp_path, case):
    content, words = GENERATION_CASES[case]
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError) as err:
        generation_defaults(tmp_path, FakeTokenizer())
    assert words in err.value.message and "generation_config.json" in err.value.message


def test_generation_config_values_and_nulls(tmp_path):
    config = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": None, "max_new_tokens": 64}
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [3, 5]}))
    d = generation_defaults(tmp_path, FakeTokenizer())
    assert (d.params.temperature, d.params.top_p, d.params.top_k, d.params.min_p) == (0.6, 0.95, 20, 0.0)
    assert d.max_new_tokens == 64 and d.stop_ids == (3, 5, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 3}))
    d = generation_defaults(tmp_path, FakeTokenizer())
    assert d.params.temperature == 0.0 and d.max_new_tokens == 2048 and d.stop_ids == (3, 7)


# ---- chat templates ------------------------------------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]
TEMPLATE_CASES = {
    "string repeated 10^11 times": ("{{ ('a' * 10**11)|length }}", "repeats a value 100000000000 times"),
    "string doubled with ~": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "builds a value of",
    ),
    "string doubled with +": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "joins values past",
    ),
    "huge power": ("{{ 10**(10**10) }}", "computes a power"),
    "integer squared 100 times": (
        "{% set ns = namespace(x=3) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
        "multiplies integers",
    ),
    "percent width": ("{{ '%0999999999d' % 1 }}", "field width of 999999999"),
    "format filter width": ("{{ '%999999999s'|format('x') }}", "field width of 999999999"),
    "str.format width": ("{{ '{:999999999}'.format('x') }}", "wider than"),
    "center filter": ("{{ 'a'|center(10**11) }}", "passes 100000000000"),
    "ljust method": ("{{ 'a'.ljust(10**11) }}", "passes 100000000000"),
    "tojson indent": ("{{ messages|tojson(indent=10**10) }}", "passes 10000000000"),
    "division by zero": ("{{ 1/0 }}", "division by zero"),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "ran out of stack"),
    "rejects the chat": ("{{ raise_exception('no system role') }}", "no system role"),
}


@pytest.mark.parametrize("case", TEMPLATE_CASES)
def test_template_past_a_bound_is_one_input_error(case):
    text, words = TEMPLATE_CASES[case]
    start = time.monotonic()
    with pytest.raises(InputError) as err:
        ChatTemplate(text, "checkpoint", "chat_template.jinja").render(HI)
    assert words in err.value.message and err.value.hint
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "text",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    ],
    ids=["nested loops", "branching recursion"],
)
def test_template_that_runs_forever_stops_at_the_deadline(monkeypatch, text):
    monkeypatch.setattr(template_sandbox, "RENDER_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(InputError, match="ran for more than 0.5 s"):
        ChatTemplate(text, "checkpoint", "chat_template.jinja").render(HI)
    assert time.monotonic() - start < 3


def test_rendered_text_is_capped(monkeypatch):
    monkeypatch.setattr(template_sandbox, "MAX_CHARS", 10_000)
    text = "{% for i in range(1000) %}{{ 'x' * 100 }}{% endfor %}"
    with pytest.raises(InputError, match="renders more than 10000 characters"):
        ChatTemplate(text, "checkpoint", "chat_template.jinja").render(HI)


def test_bounds_change_nothing_for_loops_and_formats():
    text = (
        "{% for x in [1, 2, 3] %}{{ loop.length }}{{ loop.last }}{{ loop.revindex }}{% endfor %}|"
        "{% for x in range(3) if x > 0 %}{{ x }}{% else %}none{% endfor %}|"
        "{% for c in 'abc' %}{{ loop.nextitem }}{% endfor %}|{{ '%5d' % 3 }}|{{ '{:>4}'.format('x') }}|{{ 2**10 }}"
    )
    out = ChatTemplate(text, "checkpoint", "t").render(HI)
    assert out == "3False33False23True1|12|bc|    3|   x|1024"


def test_real_template_renders_a_long_chat_fast():
    template = ChatTemplate.builtin()
    chat = [{"role": "system", "content": "Be brief."}]
    for i in range(500):
        chat.append({"role": "user", "content": f"question {i} " * 20})
        chat.append({"role": "assistant", "content": f"<think>\nhm {i}\n</think>\n\nanswer {i} " * 5})
    start = time.monotonic()
    prompt = template.render(chat)
    bounded = time.monotonic() - start
    kwargs = dict(tools=None, documents=None, add_generation_prompt=True, enable_thinking=True)
    start = time.monotonic()
    unbounded = template._template.render(messages=chat, **kwargs)  # Jinja's own render: no deadline or cap
    assert prompt == unbounded and prompt.count("<|im_start|>") == 1002
    assert bounded < 2 * (time.monotonic() - start) + 0.5


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "is empty"),
        (b"  \n\t", "is empty"),
        (b"\xff\xfe{{ messages }}", "is not UTF-8 text"),
        (b"{% if %}", "does not compile"),
        (b"{{ " + b"(" * 5000 + b"1" + b")" * 5000 + b" }}", "does not compile"),
    ],
)
def test_unusable_template_file_is_a_checkpoint_error(tmp_path, content, words):
    (tmp_path / "chat_template.jinja").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        ChatTemplate.from_dir(tmp_path)
    assert words in err.value.message and "chat_template.jinja" in err.value.message


def test_tokenizer_config_nested_too_deep_is_one_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
        ChatTemplate.from_dir(tmp_path)


# ---- end to end through the CLI: one error line, a hint, exit 1, no traceback ------------------------------------


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception  # an unexpected error is a bug: show its traceback
    return result.exit_code, result.stderr


def assert_one_error_line(code: int, stderr: str, *words: str) -> None:
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), stderr
    assert "Traceback" not in stderr
    for w in words:
        assert w in lines[0], stderr


def test_cli_index_naming_a_file_outside(tiny, tmp_path):
    bad = index_with(tiny, tmp_path / "bad", "../../../../etc/passwd")
    assert_one_error_line(*run_cli("-m", bad, "hi"), "outside the checkpoint directory")


def test_cli_config_with_no_experts(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad")
    edit_json(bad / "config.json", lambda d: d["text_config"].update(num_experts=0))
    assert_one_error_line(*run_cli("-m", bad, "hi"), "num_experts is 0")


def test_cli_implausible_vocab_is_not_a_memory_problem(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad")
    edit_json(bad / "config.json", lambda d: d["text_config"].update(vocab_size=10**12))
    code, stderr = run_cli("-m", bad, "hi")
    assert_one_error_line(code, stderr, "vocab_size", "implausible")
    assert "--cpu-mem" not in stderr


def test_cli_config_that_does_not_match_the_weights(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad")
    edit_json(bad / "config.json", lambda d: d["text_config"].update(hidden_size=128))
    assert_one_error_line(*run_cli("-m", bad, "hi"), "config.json implies")


def test_cli_negative_max_new_tokens_in_generation_config(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad")
    edit_json(bad / "generation_config.json", lambda d: d.update(max_new_tokens=-5))
    assert_one_error_line(*run_cli("-m", bad, "hi"), "max_new_tokens must be at least 1")


def test_cli_template_that_never_ends(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(template_sandbox, "RENDER_SECONDS", 0.5)
    bad = broken_copy(tiny, tmp_path / "bad")
    (bad / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )
    start = time.monotonic()
    assert_one_error_line(*run_cli("-m", bad, "hi"), "ran for more than 0.5 s")
    assert time.monotonic() - start < 30  # the load, then the half-second render


def test_cli_symlink_loop(tiny, tmp_path):
    bad = broken_copy(tiny, tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(shard.name)
    assert_one_error_line(*run_cli("-m", bad, "hi"), shard.name, "symbolic links")


def test_cli_fifo_shard_in_a_real_process(tiny, tmp_path):
    """In a real interpreter, with a timeout: a FIFO named like a shard must not block the process."""
    bad = broken_copy(tiny, tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.unlink()
    os.mkfifo(shard)
    p = subprocess.run(
        [sys.executable, "-m", "qwen35_lite.cli", "run", "-m", str(bad), "hi"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_error_line(p.returncode, p.stderr, shard.name, "is not a regular file")
    assert p.stdout == ""
