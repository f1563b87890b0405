"""`quantize --scope all`: every Linear layer of the community recipe quantised (the experts, attention,
DeltaNet, the shared experts; lm_head with --head-bits), a config group per scheme whose targets select
exactly its layers as compressed-tensors matches them, and the output decoding transformers' fp32 tokens."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import greedy, load_ours
from ct_reference import decompress_ct_checkpoint, load_ct_reference
from test_quantize import fp8_source, one_error_line, quantize_cli, tensors  # noqa: F401 (a fixture)

from qwen35_lite.convert import quantize as q
from qwen35_lite.convert.quantize import quantize_checkpoint
from qwen35_lite.convert.recipe import EXPERT_TARGET, RECIPE_IGNORE, Recipe
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.experts.formats.registry import parse_quantization_config
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.fp8 import dequantize_fp8
from qwen35_lite.weights.packed import QuantScheme, describe

# hidden 64, experts 64 wide, shared expert 32 wide: group 32 divides every Linear's inputs, group 64 all
# but the shared experts' down_proj (per channel there)
SPEC = SyntheticSpec(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
G32 = QuantScheme(bits=4, group_size=32)
RESIDENT = ["self_attn.q_proj", "linear_attn.in_proj_qkv", "mlp.shared_expert.down_proj"]
KEPT = ["mlp.gate", "mlp.shared_expert_gate", "linear_attn.in_proj_a", "linear_attn.in_proj_b"]
PREFIX = "model.language_model.layers"


@pytest.fixture(scope="module")
def source(module_tmp) -> Path:
    """A checkpoint with fused experts, every tensor random, with the real tokenizer. fp32: transformers 5.23
    keeps dequantised experts in their scales' dtype whatever the model's, so bf16 scales would run its
    experts in bf16 against our fp32 (the numbers are the same either way: see the weight checks)."""
    return write_checkpoint(module_tmp("src"), SPEC, fused=True, dtype=torch.float32)


def _packed_modules(path: Path) -> dict[str, tuple[int, int]]:
    """module -> (bits, groups) of every packed Linear in the checkpoint."""
    t = tensors(path)
    out = {}
    for name, packed in t.items():
        if name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            in_f = int(t[module + ".weight_shape"][1])
            out[module] = (32 * packed.shape[1] // in_f, t[module + ".weight_scale"].shape[1])
    return out


def _quant_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


# ---- what is written: which layers, which schemes, the config --------------------------------------------


def test_all_quantises_the_recipes_layers_and_keeps_the_rest(source, tmp_path):
    out = quantize_checkpoint(source, tmp_path / "q", Recipe(G32, resident=G32)).out
    packed = _packed_modules(out)
    for m in RESIDENT:
        layer = 3 if m.startswith("self_attn") else 0  # layer 3 is the full-attention one
        assert packed[f"{PREFIX}.{layer}.{m}"] == (4, (32 if m.endswith("down_proj") else 64) // 32)
    got, src = tensors(out), tensors(source)
    kept = [f"{PREFIX}.0.{m}.weight" for m in KEPT] + [
        "lm_head.weight",
        "model.language_model.embed_tokens.weight",
    ]
    assert all(torch.equal(got[k], src[k]) for k in kept)  # as stored
    assert "lm_head.weight_packed" not in got
    qc = _quant_config(out)
    assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]]  # one scheme: the recipe
    assert qc["ignore"] == RECIPE_IGNORE


def test_bits_per_scope_give_a_group_per_scheme_that_selects_exactly_its_layers(source, tmp_path):
    """Experts 4-bit, resident 8-bit, lm_head 8-bit at group 64: the shared experts' down_proj (32 inputs)
    per channel. compressed-tensors' own matching, on transformers' module names, gives each Linear the
    scheme it was written with; every text Linear is targeted or ignored (vLLM refuses one that is neither);
    the experts (fused in transformers) match by their checkpoint names."""
    from compressed_tensors.utils.match import match_targets
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    g64 = QuantScheme(bits=4, group_size=64)
    recipe = Recipe(g64, resident=QuantScheme(bits=8, group_size=64), head=QuantScheme(bits=8, group_size=64))
    out = quantize_checkpoint(source, tmp_path / "q", recipe).out
    qc = _quant_config(out)
    schemes = {name: g["weights"] for name, g in qc["config_groups"].items()}
    assert [(w["num_bits"], w["group_size"]) for w in schemes.values()] == [(4, 64), (8, 64), (8, None)]
    assert qc["config_groups"]["group_0"]["targets"] == [EXPERT_TARGET]
    assert "lm_head" not in qc["ignore"]
    by_target = {t: name for name, g in qc["config_groups"].items() for t in g["targets"]}
    packed = _packed_modules(out)

    def scheme_of(module: str, linear: torch.nn.Module) -> tuple[int, int | None] | None:
        ignored = match_targets(module, linear, qc["ignore"])
        hits = match_targets(module, linear, by_target)
        if ignored or not hits:
            return None
        w = schemes[by_target[hits[0]]]
        return w["num_bits"], w["group_size"]

    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig.from_pretrained(out))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "visual" not in n}
    for name, linear in linears.items():
        want = scheme_of(name, linear)
        assert want is not None or any(match_targets(name, linear, qc["ignore"])), name  # vLLM's rule
        if name in packed:
            bits, groups = packed[name]
            group = 64 if linear.in_features % 64 == 0 else None  # per channel where 64 does not divide
            assert want == (bits, group) and groups == linear.in_features // (group or linear.in_features)
        else:
            assert want is None, name
    for proj in ("gate_proj", "up_proj", "down_proj"):
        expert = f"{PREFIX}.1.mlp.experts.2.{proj}"
        assert scheme_of(expert, torch.nn.Linear(1, 1)) == (4, 64) and packed[expert][0] == 4
    assert packed[f"{PREFIX}.0.mlp.shared_expert.down_proj"] == (8, 1)  # per channel: 64 does not divide 32
    assert len(packed) == sum(1 for n in linears if scheme_of(n, linears[n])) + 3 * SPEC.num_experts * 4


def test_the_experts_scope_targets_or_ignores_every_text_linear(source, tmp_path):
    """`--scope experts` (the default): every text Linear of transformers' model is either targeted (the
    experts, matched by their checkpoint names) or ignored, so vLLM finds a match for each."""
    from compressed_tensors.utils.match import match_targets
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    out = quantize_checkpoint(source, tmp_path / "q", G32).out
    qc = _quant_config(out)
    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig.from_pretrained(out))
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "visual" not in name:
            assert match_targets(name, m, qc["ignore"]), name
    expert = torch.nn.Linear(1, 1)
    assert match_targets(f"{PREFIX}.1.mlp.experts.2.up_proj", expert, [EXPERT_TARGET])
    assert not match_targets(f"{PREFIX}.1.mlp.experts.2.up_proj", expert, qc["ignore"])


def test_the_config_is_what_compressed_tensors_writes_for_those_groups(source, tmp_path):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    recipe = Recipe(G32, resident=QuantScheme(bits=8, group_size=32), head=QuantScheme(bits=8, group_size=32))
    out = quantize_checkpoint(source, tmp_path / "q", recipe).out
    ours = _quant_config(out)
    theirs_dir = tmp_path / "ct"
    theirs_dir.mkdir()
    (theirs_dir / "config.json").write_text("{}")
    groups = {name: QuantizationScheme.model_validate(g) for name, g in ours["config_groups"].items()}
    config = QuantizationConfig(
        config_groups=groups, format="pack-quantized", quantization_status="compressed", ignore=ours["ignore"]
    )
    ModelCompressor(quantization_config=config).update_config(str(theirs_dir))
    assert ours == json.loads((theirs_dir / "config.json").read_text())["quantization_config"]


def test_the_reader_takes_the_experts_scheme_from_a_config_of_several(source, tmp_path):
    recipe = Recipe(G32, resident=QuantScheme(bits=8, group_size=32))
    out = quantize_checkpoint(source, tmp_path / "q", recipe).out
    got = parse_quantization_config(_quant_config(out))
    assert got.scheme == G32
    ckpt = Checkpoint(out)
    assert ckpt.resident_format("layers.3.self_attn.o_proj.weight") == describe(QuantScheme(8, 32))


def test_two_schemes_on_the_experts_are_refused():
    from qwen35_lite.convert.recipe import recipe_config
    from qwen35_lite.errors import ConfigError

    qc = recipe_config({("mlp.experts", "gate_proj"): G32, ("self_attn", "q_proj"): QuantScheme(8, 32)})
    qc["config_groups"]["group_1"]["targets"].append("Linear")  # now selects the experts too, in int8
    with pytest.raises(ConfigError, match="several weight schemes for the routed experts"):
        parse_quantization_config(qc)


def test_a_large_matrix_quantises_a_block_of_rows_at_a_time_to_the_same_bytes(tmp_path, monkeypatch):
    """lm_head [4000, 64] in blocks of 256 rows (the last one short); asymmetric: the zero points are
    packed down the rows, so a block boundary inside a packed word would show."""
    small = write_checkpoint(tmp_path / "src", replace(SPEC, vocab_size=4000, num_hidden_layers=1))
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    recipe = Recipe(scheme, resident=scheme, head=QuantScheme(bits=8, group_size=32, symmetric=False))
    whole = quantize_checkpoint(small, tmp_path / "whole", recipe).out
    monkeypatch.setattr(q, "QUANT_BLOCK", 256 * 64 * 4)
    blocks = quantize_checkpoint(small, tmp_path / "blocks", recipe).out
    a, b = tensors(whole), tensors(blocks)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["lm_head.weight_packed"].shape == (4000, 64 // 4) and a["lm_head.weight_zero_point"].shape == (
        1000,
        2,
    )


def test_an_fp8_sources_resident_layers_are_dequantised_then_quantised(fp8_source, tmp_path):  # noqa: F811
    out = quantize_checkpoint(fp8_source, tmp_path / "q", Recipe(G32, resident=G32)).out
    src, got = tensors(fp8_source), tensors(out)
    w = "model.language_model.layers.3.self_attn.o_proj"
    bf16 = dequantize_fp8(src[w + ".weight"], src[w + ".weight_scale_inv"]).to(torch.bfloat16)
    packed, scale, _ = q.packed_format(4).quantize(bf16, G32)
    assert torch.equal(got[w + ".weight_packed"], packed) and torch.equal(got[w + ".weight_scale"], scale)
    assert not any(k.endswith("_scale_inv") for k in got)


@pytest.mark.slow
def test_the_cli_says_what_it_quantised_and_what_it_kept(source, tmp_path):
    r = quantize_cli(
        source, tmp_path / "q", "--scope", "all", "--bits", "4", "--group-size", "32", "--head-bits", "8"
    )
    assert r.exit_code == 0, r.output
    assert "int4 g32 symmetric: routed experts, attention, DeltaNet, shared experts" in r.stdout
    assert "int8 per-channel symmetric: lm_head" in r.stdout  # W8A16: one scale a row
    kept = next(line for line in r.stdout.splitlines() if "kept unquantised" in line)
    assert "router" in kept and "in_proj_a/b" in kept and "lm_head" not in kept
    r = quantize_cli(source, tmp_path / "e", "--group-size", "32")  # the default scope
    assert r.exit_code == 0 and "int4 g32 symmetric: routed experts\n" in r.stdout, r.output
    assert all(".mlp.experts." in m for m in _packed_modules(tmp_path / "e"))


@pytest.mark.parametrize(
    "args, words",
    [
        (["--resident-bits", "8"], ["--resident-bits", "--scope all"]),
        (["--head-bits", "8"], ["--head-bits", "--scope all"]),
        (["--scope", "all", "--resident-bits", "3"], ["--resident-bits 3", "4 (W4A16) or 8"]),
        (["--scope", "all", "--head-bits", "2"], ["--head-bits 2"]),
    ],
)
def test_bits_flags_out_of_place_are_one_error_line(source, tmp_path, args, words):
    one_error_line(quantize_cli(source, tmp_path / "q", "--group-size", "32", *args), *words)
    assert not (tmp_path / "q").exists()


# ---- the output decodes transformers' tokens --------------------------------------------------------------

# (CLI flags, whether transformers 5.23 loads it itself): it gives every non-expert layer one scheme when it
# dequantises, so a config whose non-expert layers have two (lm_head 8-bit beside 4-bit attention, a layer
# per channel) or asymmetric experts run on compressed-tensors' own decompression of the same files
CASES = [
    (["--bits", "4", "--group-size", "32"], True),
    (["--bits", "8", "--group-size", "32", "--head-bits", "8"], False),  # lm_head per channel
    (["--bits", "4", "--resident-bits", "8", "--group-size", "32"], True),
    (["--bits", "4", "--group-size", "32", "--head-bits", "8"], False),  # the llama.cpp benchmark's
    (["--bits", "8", "--group-size", "64"], False),  # the shared experts' down_proj per channel
    (["--bits", "4", "--group-size", "32", "--asymmetric"], False),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, direct", CASES, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_scope_all_output_decodes_transformers_greedy_tokens(source, tmp_path, args, direct):
    from transformers import Qwen3_5MoeForConditionalGeneration

    out = tmp_path / "q"
    r = quantize_cli(source, out, "--scope", "all", *args)
    assert r.exit_code == 0, r.output
    if direct:
        ref = load_ct_reference(out, torch.float32)
    else:
        dense = decompress_ct_checkpoint(out, tmp_path / "dense")
        ref = Qwen3_5MoeForConditionalGeneration.from_pretrained(dense, dtype=torch.float32).eval()
    ids = torch.randint(0, 248000, (24,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
        want_tokens = ref.generate(ids[None], max_new_tokens=6, do_sample=False)[0, 24:].tolist()
    ours = load_ours(out, torch.float32)
    torch.testing.assert_close(ours.forward(ours.make_cache(), ids, all_logits=True), want, rtol=0, atol=1e-4)
    assert greedy(ours, ids, 6)[0] == want_tokens
