"""int8 experts (compressed-tensors pack-quantized W8A16) against compressed-tensors itself and
transformers: packing, dequantisation, quantisation, the CPU int8 kernel, end to end, `info` and `quantize`."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
from conftest import greedy, load_ours
from ct_reference import ct_compress, ct_decompress, ct_scheme, per_expert
from test_info_bench import ok_json
from test_plan import CONFIG_397B

from qwen35_lite.convert.quantize import quantization_config
from qwen35_lite.experts.formats import DenseFormat, QuantScheme, expert_format
from qwen35_lite.experts.formats.compressed import quantize
from qwen35_lite.experts.formats.int8 import Int8Format, dequantize_int8, pack_int8, unpack_int8
from qwen35_lite.experts.formats.registry import parse_quantization_config
from qwen35_lite.kernels import int8_cpu as kernel_int8

CT_W8 = quantization_config(
    QuantScheme(bits=8, group_size=None, symmetric=True)
)  # channel, as `quantize --bits 8`
SCHEMES = [(None, True), (None, False), (32, True), (64, False)]  # (group size or channel, symmetric)


def weight(rows: int = 48, cols: int = 256, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[1, :64] = 0  # an all-zero group: the eps-scale path
    w[2, :64] = w[2, :64].abs()  # an all-positive group: an asymmetric zero point at the clamp
    return w.to(dtype)


@pytest.mark.parametrize("cols", [4, 64, 37])
def test_pack_unpack_equal_compressed_tensors(cols):
    q = torch.randint(-128, 128, (5, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.int8)
    packed = pack_int8(q)
    assert torch.equal(packed, pack_to_int32(q, 8))
    assert torch.equal(unpack_int8(packed, cols), q)
    assert torch.equal(unpack_from_int32(packed, 8, torch.Size((5, cols))), q)


@pytest.mark.parametrize("group, symmetric", SCHEMES)
def test_quantize_and_dequantize_equal_compressed_tensors_bit_for_bit(group, symmetric):
    w = weight()
    scheme = ct_scheme(group, symmetric, bits=8)
    want = ct_compress(w, scheme)
    ours = Int8Format.quantize(w, QuantScheme(bits=8, group_size=group, symmetric=symmetric))
    names = ["weight_packed", "weight_scale", "weight_shape"] + ([] if symmetric else ["weight_zero_point"])
    for name, t in zip(names, ours):
        assert torch.equal(t, want[name]), name
    zp = None if symmetric else want["weight_zero_point"]
    got = dequantize_int8(want["weight_packed"], want["weight_scale"], zp, torch.float32, tuple(w.shape))
    assert torch.equal(got, ct_decompress(want, scheme).to(torch.float32))
    q, _, _ = quantize(w, 8, group or w.shape[1], symmetric)
    assert int(q.min()) >= -128 and int(q.max()) <= 127 and int(q.abs().max()) > 100  # the 8-bit range


def test_parse_and_formats_from_config_alone():
    """The 397B expert (D 4096, I 1024): int8 channel is half of bf16 plus a scale per row; the CPU
    kernel takes symmetric channel scales in bf16, everything else runs the exact path."""
    D, I = 4096, 1024
    assert parse_quantization_config(CT_W8).scheme == QuantScheme(bits=8, group_size=None, symmetric=True)
    bf16 = expert_format({}, D, I, "cuda", torch.bfloat16, stored=torch.bfloat16)
    w8 = expert_format({"quantization_config": CT_W8}, D, I, "cuda", torch.bfloat16)
    assert isinstance(w8, Int8Format) and w8.direct and not w8.uses_cpu_kernel
    assert w8.slot_nbytes == 3 * D * I + 2 * (2 * I + D)
    assert 1.99 < bf16.slot_nbytes / w8.slot_nbytes < 2.0
    cpu = expert_format({"quantization_config": CT_W8}, D, I, "cpu", torch.bfloat16)
    assert (
        cpu.uses_cpu_kernel and not cpu.direct and cpu.name == "int8 per-channel symmetric (CPU int8 kernel)"
    )
    c_kernel = kernel_int8.library() is not None  # group scales and zero points: the C kernel only
    for change in ({"group_size": 128, "strategy": "group"}, {"symmetric": False}):
        group = {**CT_W8["config_groups"]["group_0"]}
        group["weights"] = {**group["weights"], **change}
        qc = {**CT_W8, "config_groups": {"group_0": group}}
        fmt = expert_format({"quantization_config": qc}, D, I, "cpu", torch.bfloat16)
        assert isinstance(fmt, Int8Format) and fmt.uses_cpu_kernel == c_kernel and fmt.direct != c_kernel
        if c_kernel:  # int8 matrices, a bf16 scale per row and group (and an int8 zero point)
            groups = (D // 128, I // 128) if "group_size" in change else (1, 1)
            zeros = 0 if "group_size" in change else 2 * I + D
            assert fmt.slot_nbytes >= 3 * D * I + 2 * (2 * I * groups[0] + D * groups[1]) + zeros


def _random_slot(fmt: Int8Format, seed: int) -> torch.Tensor:
    """A prepared kernel slot from random raw int8 bytes and scales."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.empty(fmt.raw_nbytes, dtype=torch.uint8)
    for part in fmt.raw:
        view = part.view(raw)
        if part.dtype == torch.int32:
            view.copy_(torch.randint(-(2**31), 2**31 - 1, part.shape, generator=g, dtype=torch.int64))
        else:
            view.copy_(torch.rand(part.shape, generator=g) / 400 + 1e-4)
    slot = torch.empty(fmt.slot_nbytes, dtype=torch.uint8)
    fmt.prepare(fmt.raw_views(raw), slot)
    return raw, slot


@pytest.mark.parametrize("tokens", [1, 5])
def test_cpu_kernel_equals_dequantise_then_linear(tokens):
    """`_weight_int8pack_mm` against its reference beside it (q * scale, then F.linear), and both against
    the exact path on the raw bytes (compressed-tensors' dequantisation) in fp32."""
    qc = {"quantization_config": CT_W8}
    fmt = expert_format(qc, 256, 128, "cpu", torch.bfloat16)
    exact = expert_format(qc, 256, 128, "cpu", torch.float32)
    assert fmt.uses_cpu_kernel and not exact.uses_cpu_kernel
    raw, slot = _random_slot(fmt, tokens)
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(9))
    got = fmt.bind(slot)(x.bfloat16()).float()
    ref = fmt.dequantised_ffn(slot)(x.bfloat16()).float()
    want = exact.bind(raw)(x)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert (got - want).norm() <= 0.01 * want.norm() and (ref - want).norm() <= 0.01 * want.norm()


@pytest.fixture(scope="module")
def w8_checkpoints(hf_checkpoint, module_tmp):
    """{(group, symmetric): path} of W8A16 checkpoints that compressed-tensors itself quantised."""
    from ct_reference import make_ct_checkpoint

    src = hf_checkpoint("moe_int4")
    root = module_tmp("ct8")
    return {key: make_ct_checkpoint(src, root / f"{key}", *key, bits=8) for key in [(None, True), (32, True)]}


@pytest.mark.slow
@pytest.mark.parametrize("key", [(None, True), (32, True)])
def test_int8_checkpoint_matches_transformers_in_fp32(w8_checkpoints, key):
    """Greedy tokens and logits of a W8A16 checkpoint compressed-tensors wrote, against transformers +
    compressed-tensors (channel and group strategies)."""
    from ct_reference import load_ct_reference

    path = w8_checkpoints[key]
    ids = torch.randint(0, 248000, (80,), generator=torch.Generator().manual_seed(6))
    ref = load_ct_reference(path, torch.float32)
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
        want_tokens = ref.generate(ids[None], max_new_tokens=8, do_sample=False)[0, 80:].tolist()
    ours = load_ours(path, torch.float32)
    assert isinstance(ours.provider.store.format, Int8Format)
    torch.testing.assert_close(ours.forward(ours.make_cache(), ids, all_logits=True), want, rtol=0, atol=1e-4)
    assert greedy(ours, ids, 8)[0] == want_tokens


def test_int8_kernel_run_is_as_close_to_fp32_as_the_exact_bf16_path(w8_checkpoints):
    """bf16 on the CPU runs the int8 kernel (scales in bf16 inside the matmul): its logits are as close to
    the exact fp32 run as the exact path's in bf16 (dequantised as compressed-tensors does, then F.linear)."""
    from qwen35_lite.experts.cache import UncachedExperts
    from qwen35_lite.experts.store import ExpertStore
    from qwen35_lite.weights.checkpoint import Checkpoint
    from qwen35_lite.weights.config import load_config

    path = w8_checkpoints[(None, True)]
    ids = torch.randint(0, 248000, (40,), generator=torch.Generator().manual_seed(7))
    kernel = load_ours(path, torch.bfloat16)
    fmt = kernel.provider.store.format
    assert fmt.uses_cpu_kernel
    exact_fmt = Int8Format(fmt.D, fmt.I, torch.bfloat16, fmt.scheme, fmt.scale_dtype, kernel=False)
    store = ExpertStore(Checkpoint(path), load_config(path).text, exact_fmt)
    exact = load_ours(path, torch.bfloat16, lambda _s, device, dt: UncachedExperts(store, device, dt))
    fp32 = load_ours(path, torch.float32)
    logits = {
        k: m.forward(m.make_cache(), ids, all_logits=True).float()
        for k, m in {"kernel": kernel, "exact": exact, "fp32": fp32}.items()
    }
    ref = logits["fp32"]
    err = {k: ((logits[k] - ref).norm() / ref.norm()).item() for k in ("kernel", "exact")}
    top1 = {k: (logits[k].argmax(-1) == ref.argmax(-1)).float().mean().item() for k in ("kernel", "exact")}
    assert err["kernel"] <= 1.25 * err["exact"], err
    assert top1["kernel"] >= top1["exact"] - 0.03, top1


def test_quantize_bits_8_writes_what_compressed_tensors_writes(hf_checkpoint, tmp_path):
    """`quantize --bits 8` output: compressed-tensors' own bytes for each expert, its config, and it loads
    in transformers with the tokens we decode."""
    from ct_reference import load_ct_reference
    from safetensors.torch import load_file

    from qwen35_lite.convert.quantize import quantize_checkpoint

    src = hf_checkpoint("moe_int4")
    out = tmp_path / "w8"
    quantize_checkpoint(src, out, QuantScheme(bits=8, group_size=32, symmetric=True))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    source = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    experts = {m: w for name, t in source.items() for m, w in per_expert(name, t)}
    module = next(m for m in experts if m.endswith("layers.1.mlp.experts.2.down_proj"))
    want = ct_compress(experts[module].contiguous(), ct_scheme(32, True, bits=8))
    for name, t in want.items():
        assert torch.equal(got[f"{module}.{name}"], t), name
    ids = torch.randint(0, 248000, (50,), generator=torch.Generator().manual_seed(4))
    ref = load_ct_reference(out, torch.float32)
    with torch.no_grad():
        want_tokens = ref.generate(ids[None], max_new_tokens=6, do_sample=False)[0, 50:].tolist()
    assert greedy(load_ours(out, torch.float32), ids, 6)[0] == want_tokens


def test_info_on_the_397b_config_with_int8_has_twice_the_bf16_slots(tmp_path):
    budgets = ["--device", "cuda", "--gpu-mem", 22.5, "--cpu-mem", 110, "--ctx", 8192]
    plans = {}
    for name, qc in [("bf16", None), ("w8", CT_W8)]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps({**CONFIG_397B, **({"quantization_config": qc} if qc else {})})
        )
        plans[name] = ok_json("info", "-m", d, *budgets)
    bf16, w8 = plans["bf16"], plans["w8"]
    assert w8["expert_format"] == "int8 per-channel symmetric"
    assert 1.9 <= w8["cpu_slots"] / bf16["cpu_slots"] <= 2.05
    assert 1.99 < bf16["expert_slot_bytes"] / w8["expert_slot_bytes"] < 2.0
    assert isinstance(expert_format({}, 64, 32, "cpu", None, stored=torch.bfloat16), DenseFormat)
