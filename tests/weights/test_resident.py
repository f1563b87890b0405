"""Resident Linear layers stored pack-quantized (W4A16 / W8A16, the community recipe: every Linear but the
router, the shared-expert gate, DeltaNet's in_proj_a/b, embeddings, lm_head and the vision tower):
held packed (kernels/), in fp32 computing compressed-tensors' dequantisation bit for bit and decoding
transformers' tokens and logits, in bf16 running the CPU kernels;
unsupported schemes refused naming the layer; `info` showing the resident bytes by format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import greedy, load_ours
from safetensors.torch import load_file
from test_info_bench import assert_refused, cli, ok_json
from test_plan import CONFIG_397B

from qwen35_lite.errors import CheckpointError
from qwen35_lite.weights.checkpoint import Checkpoint, TensorInfo
from qwen35_lite.weights.resident import PackedLinear, other_format

# (bits, group size or None for channel, symmetric): every width, strategy and symmetry at least once
SCHEMES = [(4, 32, True), (4, None, False), (8, None, True), (8, 32, False)]
QKV = "layers.0.linear_attn.in_proj_qkv"


@pytest.fixture(scope="module")
def all_linear(hf_checkpoint, module_tmp):
    """{(bits, group, symmetric): path} of checkpoints compressed-tensors quantised on every Linear layer."""
    from ct_reference import make_ct_checkpoint

    src = hf_checkpoint("moe_int4")
    root = module_tmp("ct_all")
    built: dict = {}

    def get(key, head: bool = False) -> Path:
        if (key, head) not in built:
            bits, group, sym = key
            out = root / f"w{bits}-g{group}-{sym}-{head}"
            built[(key, head)] = make_ct_checkpoint(src, out, group, sym, bits, all_linear=True, head=head)
        return built[(key, head)]

    return get


def _reference(path: Path, symmetric: bool, tmp: Path):
    """transformers + compressed-tensors in fp32; asymmetric: transformers on the checkpoint compressed-tensors'
    `decompress` made dense (transformers 5.23 drops the experts' zero points when it decompresses them)."""
    from ct_reference import decompress_ct_checkpoint, load_ct_reference
    from transformers import Qwen3_5MoeForConditionalGeneration

    if symmetric:
        return load_ct_reference(path, torch.float32)
    dense = decompress_ct_checkpoint(path, tmp / "dense")
    return Qwen3_5MoeForConditionalGeneration.from_pretrained(dense, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("key", SCHEMES, ids=lambda k: f"w{k[0]}-g{k[1]}-{'sym' if k[2] else 'asym'}")
def test_all_linear_checkpoint_decodes_transformers_tokens_and_logits(all_linear, key, tmp_path):
    path = all_linear(key)
    ckpt = Checkpoint(path)
    assert isinstance(ckpt.resident(QKV + ".weight"), PackedLinear)
    assert not ckpt.is_packed("layers.0.linear_attn.in_proj_a.weight")  # the recipe keeps it bf16
    ids = torch.randint(0, 248000, (40,), generator=torch.Generator().manual_seed(11))
    ref = _reference(path, key[2], tmp_path)
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
        want_tokens = ref.generate(ids[None], max_new_tokens=6, do_sample=False)[0, 40:].tolist()
    ours = load_ours(path, torch.float32)
    torch.testing.assert_close(ours.forward(ours.make_cache(), ids, all_logits=True), want, rtol=0, atol=1e-4)
    assert greedy(ours, ids, 6)[0] == want_tokens


@pytest.mark.slow
def test_a_quantized_lm_head_loads_and_decodes_transformers_tokens(all_linear):
    path = all_linear((8, None, True), head=True)
    assert Checkpoint(path).is_packed("lm_head.weight")
    ids = torch.randint(0, 248000, (30,), generator=torch.Generator().manual_seed(12))
    ref = _reference(path, True, path)
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
    ours = load_ours(path, torch.float32)
    torch.testing.assert_close(ours.forward(ours.make_cache(), ids, all_logits=True), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("key", [(4, None, False), (8, 32, True)])
def test_a_resident_layer_reads_as_compressed_tensors_decompresses_it(all_linear, key):
    """Bit for bit, in the scales' dtype and cast to fp32; the plan counts its packed bytes on disk."""
    from ct_reference import ct_decompress, ct_scheme

    path = all_linear(key)
    ckpt = Checkpoint(path)
    stored = "model.language_model." + QKV + "."
    tensors = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    state = {k[len(stored) :]: v for k, v in tensors.items() if k.startswith(stored)}
    want = ct_decompress(state, ct_scheme(key[1], key[2], key[0]))
    assert torch.equal(ckpt.read(QKV + ".weight"), want)
    assert torch.equal(ckpt.read(QKV + ".weight", torch.float32), want.float())
    assert ckpt.stored_nbytes(QKV + ".weight") == sum(t.nbytes for t in state.values())


def _with_group(path: Path, tmp: Path, change: dict, name: str) -> Path:
    """A copy of `path` whose config group's weights (or the group itself: key `group`) are changed."""
    out = tmp / name
    shutil.copytree(path, out)
    config = json.loads((out / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group.update(change.pop("group", {}))
    group["weights"].update(change)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_bits": 3}, "3-bit weights"),
        ({"group": {"input_activations": {"num_bits": 8, "type": "int"}}}, "input_activations"),
        ({"strategy": "tensor"}, "strategy 'tensor'"),
    ],
)
def test_an_unsupported_resident_scheme_is_one_error_naming_the_layer(all_linear, tmp_path, change, words):
    path = _with_group(all_linear((4, 32, True)), tmp_path, dict(change), "bad")
    r = cli("info", "-m", path, "--cpu-mem", 8)
    assert_refused(r, "resident layer layers.0.linear_attn.in_proj_qkv", words)
    assert "incomplete" not in r.stderr


def test_another_quantisation_format_on_a_resident_layer_names_it():
    """e.g. GPTQ's own layout (qweight, qzeros, scales): named with the layer, not 'missing'."""
    info = TensorInfo("model.layers.0.self_attn.o_proj.qweight", Path("x"), torch.int32, (8, 8), 0, 256)
    tensors = {f"layers.0.self_attn.o_proj.{s}": info for s in ("qweight", "qzeros", "scales")}
    with pytest.raises(CheckpointError) as err:
        other_format(tensors, {"quant_method": "gptq"}, "layers.0.self_attn.o_proj")
    assert "layers.0.self_attn.o_proj is stored as qweight, qzeros, scales (quant_method 'gptq')" in str(
        err.value.message
    )


def test_info_shows_resident_bytes_by_format(all_linear):
    """The packed Linears on disk and in memory at their packed size (held compact: kernels/), the rest
    (norms, embeddings, router, head) as stored."""
    path = all_linear((4, 32, True))
    plan = ok_json("info", "-m", path, "--cpu-mem", 8, "--dtype", "float32")
    rows = plan["resident_by_format"]
    packed, dense = rows.pop("int4 g32 symmetric"), rows.pop("float32")  # transformers wrote it in fp32
    assert not rows
    # fp32: the exact encoding, as stored (weight_shape not held)
    assert packed["disk_bytes"] - 16 * packed["tensors"] == packed["memory_bytes"]
    assert dense["disk_bytes"] == dense["memory_bytes"]
    assert packed["memory_bytes"] + dense["memory_bytes"] == plan["weights_cpu"]
    bf16 = ok_json("info", "-m", path, "--cpu-mem", 8, "--dtype", "bfloat16")["resident_by_format"]
    kernel = bf16["int4 g32 symmetric"]  # the CPU int4 kernel's layout and (scale, zero) table
    assert packed["memory_bytes"] < kernel["memory_bytes"] < 0.3 * 4 * packed["disk_bytes"]
    table = cli("info", "-m", path, "--cpu-mem", 8).stdout
    assert "resident weights by format" in table and "in memory" in table


@pytest.mark.slow
@pytest.mark.parametrize("key", [(4, 32, False), (8, 32, True), (8, None, True)])
def test_a_bf16_run_on_the_kernels_decodes_like_the_dequantised_weights(all_linear, key, tmp_path):
    """bf16 on the CPU: the resident Linears run by the int4 / int8 kernels (fused, held compact) are as far
    from the fp32 logits of compressed-tensors' dequantised weights as the same dense weights in bf16 are
    (this random model amplifies bf16 rounding: both are ~15% of the largest logit)."""
    from ct_reference import decompress_ct_checkpoint

    from qwen35_lite.kernels import CompactLinear

    path = all_linear(key)
    ours = load_ours(path, torch.bfloat16)
    assert isinstance(ours.layers[0].mixer.w["out_proj"], CompactLinear)
    dense_path = decompress_ct_checkpoint(path, tmp_path / "dense")
    ids = torch.randint(0, 248000, (40,), generator=torch.Generator().manual_seed(13))
    logits = {}
    for name, model in [
        ("ours", ours),
        ("bf16", load_ours(dense_path, torch.bfloat16)),
        ("fp32", load_ours(dense_path, torch.float32)),
    ]:
        logits[name] = model.forward(model.make_cache(), ids, all_logits=True).float()
    err = (logits["ours"] - logits["fp32"]).abs().max()
    bf16_err = (logits["bf16"] - logits["fp32"]).abs().max()
    assert err <= 2 * bf16_err  # the kernels round as bf16 does (here 0.98 against 0.78 on w4 g32 asym)
    # a layer-by-layer prefill (each packed weight dequantised once a block) has the forward's bits
    assert torch.equal(ours.prefill(ours.make_cache(), ids), ours.forward(ours.make_cache(), ids))


def test_info_on_the_397b_config_with_an_all_linear_w4a16_config():
    """From config.json alone: the recipe's Linears counted packed on disk and in memory (bf16 on a GPU:
    the exact encoding, held as stored)."""
    import tempfile

    from qwen35_lite.convert.quantize import quantization_config
    from qwen35_lite.weights.packed import QuantScheme

    qc = quantization_config(QuantScheme(bits=4, group_size=128, symmetric=True))
    from ct_reference import RECIPE_IGNORE

    qc["config_groups"]["group_0"]["targets"] = ["Linear"]
    qc["ignore"] = RECIPE_IGNORE
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps({**CONFIG_397B, "quantization_config": qc}))
        plan = ok_json("info", "-m", d, "--device", "cuda", "--gpu-mem", 22.5, "--cpu-mem", 110)
    rows = plan["resident_by_format"]
    packed = rows["int4 g128 symmetric"]
    assert packed["memory_bytes"] <= packed["disk_bytes"]  # weight_shape is not held
    assert packed["disk_bytes"] > 3 * 2**30  # attention, DeltaNet and shared experts: most of the path


def test_packed_parts_of_another_shape_than_the_config_implies_are_refused(all_linear):
    from qwen35_lite.plan.sizes import tensor_shapes
    from qwen35_lite.weights.config import load_config

    path = all_linear((4, 32, True))
    ckpt = Checkpoint(path)
    shapes = tensor_shapes(load_config(path).text)
    ckpt.check_resident(shapes)
    out_f, in_f = shapes[QKV + ".weight"]
    with pytest.raises(CheckpointError) as err:
        ckpt.check_resident({**shapes, QKV + ".weight": (out_f, 2 * in_f)})
    assert f"{QKV}.weight_packed" in err.value.message and "int4 g32 symmetric" in err.value.message


def test_a_packed_layer_without_a_quantization_config_is_named(all_linear, tmp_path):
    out = tmp_path / "noqc"
    shutil.copytree(all_linear((4, 32, True)), out)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    assert_refused(cli("info", "-m", out, "--cpu-mem", 8), QKV, "no quantization_config")
