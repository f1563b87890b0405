"""int4 pack-quantized codec against compressed-tensors 0.20.1 itself, and the quantization_config parser."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig
from ct_reference import ct_compress, ct_decompress, ct_scheme

from qwen35_lite.errors import ConfigError
from qwen35_lite.experts.formats.compressed import CompressedQuantization as Int4Quantization
from qwen35_lite.experts.formats.fp8 import Fp8Block
from qwen35_lite.experts.formats.int4 import (
    QuantScheme,
    dequantize_int4,
    pack_int4,
    pack_zero_point,
    quantize_int4,
    unpack_int4,
    unpack_zero_point,
)
from qwen35_lite.experts.formats.registry import parse_quantization_config

SCALE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_q(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(-8, 8, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def expert_weight(dtype: torch.dtype, rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[1, :32] = 0  # an all-zero group: the eps-scale path
    w[2, :64] = w[2, :64].abs()  # an all-positive group: an asymmetric zero-point at the clamp
    return w.to(dtype)


@pytest.mark.parametrize("cols", [8, 64, 36])
def test_pack_unpack_round_trip_and_layout_equal_compressed_tensors(cols):
    q = random_q(16, cols)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (16, -(-cols // 8))
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(unpack_int4(packed, cols), q)


def test_pack_puts_element_i_at_bits_4i_stored_plus_8():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]], dtype=torch.int8)
    word = int(pack_int4(q)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 1, 8, 9, 10, 11, 14, 15]


@pytest.mark.parametrize("rows", [16, 20])
def test_zero_point_packs_down_the_rows_as_compressed_tensors(rows):
    zp = random_q(rows, 4, seed=1)
    packed = pack_zero_point(zp)
    assert packed.shape == (-(-rows // 8), 4)
    assert torch.equal(packed, pack_to_int32(zp, 4, packed_dim=0))
    assert torch.equal(unpack_zero_point(packed, rows), zp)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size((rows, 4)), packed_dim=0), zp)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_dequantize_equals_compressed_tensors_decompress_bit_for_bit(symmetric, group_size, scale_dtype):
    scheme = ct_scheme(group_size, symmetric)
    state = ct_compress(expert_weight(scale_dtype), scheme)
    expected = ct_decompress(state, scheme)
    ours = dequantize_int4(
        state["weight_packed"],
        state["weight_scale"],
        state.get("weight_zero_point"),
        group_size,
        expected.dtype,
        tuple(state["weight_shape"].tolist()),
    )
    assert ours.dtype == scale_dtype
    assert torch.equal(ours, expected)
    # and a cast to the compute dtype is the cast of the same values
    as_fp32 = dequantize_int4(
        state["weight_packed"], state["weight_scale"], state.get("weight_zero_point"), group_size,
        torch.float32, (48, 256),
    )  # fmt: skip
    assert torch.equal(as_fp32, expected.float())


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_channel_strategy_equals_compressed_tensors(symmetric):
    scheme = ct_scheme(None, symmetric)
    state = ct_compress(expert_weight(torch.bfloat16), scheme)
    assert state["weight_scale"].shape == (48, 1)
    ours = dequantize_int4(
        state["weight_packed"], state["weight_scale"], state.get("weight_zero_point"), 256, torch.bfloat16,
        (48, 256),
    )  # fmt: skip
    assert torch.equal(ours, ct_decompress(state, scheme))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("dtype", SCALE_DTYPES)
def test_quantize_equals_compressed_tensors_quantiser(symmetric, group_size, dtype):
    w = expert_weight(dtype, seed=3)
    state = ct_compress(w, ct_scheme(group_size, symmetric))
    packed, scale, zero_point = quantize_int4(w, group_size, symmetric)
    assert torch.equal(packed, state["weight_packed"])
    assert scale.dtype == dtype and torch.equal(scale, state["weight_scale"])
    if symmetric:
        assert zero_point is None and "weight_zero_point" not in state
    else:
        assert torch.equal(zero_point, state["weight_zero_point"])


def test_quantize_error_is_round_to_nearest_small():
    w = expert_weight(torch.float32, seed=4)
    packed, scale, _ = quantize_int4(w, 32, True)
    back = dequantize_int4(packed, scale, None, 32, torch.float32, tuple(w.shape))
    step = scale.repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-7).all()  # no value is off by more than half a step


def ct_written_config(group_size: int, symmetric: bool) -> dict:
    cfg = QuantizationConfig(
        config_groups={"group_0": ct_scheme(group_size, symmetric)},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=["lm_head", "re:.*shared_expert.*"],
    )
    return cfg.model_dump()


@pytest.mark.parametrize("symmetric", [True, False])
def test_parse_accepts_what_compressed_tensors_writes(symmetric):
    got = parse_quantization_config(ct_written_config(64, symmetric))
    assert isinstance(got, Int4Quantization)
    assert got.scheme == QuantScheme(bits=4, group_size=64, symmetric=symmetric)
    assert got.covers("model.language_model.layers.0.mlp.experts.3.down_proj")
    assert not got.covers("model.language_model.layers.0.mlp.shared_expert.down_proj")
    assert not got.covers("model.language_model.layers.0.self_attn.q_proj")


def test_parse_targets_linear_and_ignore_list():
    raw = ct_written_config(128, True)
    raw["config_groups"]["group_0"]["targets"] = ["Linear"]
    got = parse_quantization_config(raw)
    assert got.covers("model.layers.0.self_attn.q_proj") and not got.covers("lm_head")


def test_parse_channel_strategy_has_no_group_size():
    assert parse_quantization_config(ct_written_config(None, False)).scheme.group_size is None


def test_parse_returns_a_marker_for_fp8_block_128_and_none_when_absent():
    fp8 = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    assert parse_quantization_config(fp8) == Fp8Block(128)
    assert parse_quantization_config(None) is None


def _edited(path: tuple[str, ...], value) -> dict:
    raw = ct_written_config(128, True)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


WEIGHTS = ("config_groups", "group_0", "weights")


@pytest.mark.parametrize(
    "raw, named",
    [
        (_edited(WEIGHTS + ("num_bits",), 2), "2-bit"),
        (_edited(WEIGHTS + ("num_bits",), 3), "3-bit"),
        (_edited(WEIGHTS + ("type",), "float"), '"float"'),
        (_edited(("format",), "int-quantized"), "'int-quantized'"),
        (_edited(("format",), "nvfp4-pack-quantized"), "nvfp4-pack-quantized"),
        (_edited(("quant_method",), "awq"), "'awq'"),
        (_edited(WEIGHTS + ("strategy",), "tensor"), "'tensor'"),
        (
            _edited(("config_groups", "group_0", "input_activations"), {"num_bits": 8, "type": "float"}),
            "input_activations",
        ),
        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "[64, 64]"),
    ],
)
def test_parse_refuses_other_schemes_naming_what_it_found(raw, named):
    with pytest.raises(ConfigError) as err:
        parse_quantization_config(raw)
    assert named in err.value.message
    assert "W4A16" in err.value.hint


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_never_loses_to_min_max_and_wins_somewhere(symmetric):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))  # Gaussian: outliers worth clipping

    def group_errors(mse_clip: bool) -> torch.Tensor:
        packed, scale, zp = quantize_int4(w, 32, symmetric, mse_clip)
        back = dequantize_int4(packed, scale, zp, 32, torch.float32, (64, 256))
        return (back - w).square().unflatten(-1, (8, 32)).sum(-1)

    rtn, mse = group_errors(False), group_errors(True)
    assert (mse <= rtn).all()
    assert mse.sum() < 0.95 * rtn.sum()


@pytest.mark.parametrize("rows,cols", [(64, 64), (128, 256)])
def test_kernel_layout_unpacks_back_to_the_stored_nibbles(rows, cols):
    from qwen35_lite.experts.formats import int4 as fmt4
    from qwen35_lite.weights.packed import unpack_int4

    g = torch.Generator().manual_seed(rows)
    packed = torch.randint(-(2**31), 2**31 - 1, (rows, cols // 8), dtype=torch.int32, generator=g)
    want = (unpack_int4(packed, cols).int() + fmt4.OFFSET).to(torch.uint8)
    assert torch.equal(fmt4.from_kernel_layout(fmt4.to_kernel_layout(packed)), want)


@pytest.mark.parametrize("symmetric", [True, False])
def test_many_rows_run_dequantised_once_as_the_kernel_computes(symmetric):
    """A prefill block's rows (>= DEQUANTISE_ROWS) go through the weights dequantised once and a bf16
    matmul: the kernel's numbers up to bf16 rounding of the weights, the same expert either way."""
    from qwen35_lite.experts.formats import int4 as fmt4

    g = torch.Generator().manual_seed(5)
    D, I, group = 256, 128, 32
    ws = [torch.randn(o, i, generator=g).bfloat16() / 8 for o, i in ((2 * I, D), (D, I))]
    parts = []
    for w in ws:
        packed, scale, zp = fmt4.quantize_int4(w, group, symmetric)
        zp_q = None if zp is None else fmt4.unpack_zero_point(zp, w.shape[0])
        parts.append((fmt4.to_kernel_layout(packed), fmt4.scales_zeros(scale, zp_q, torch.bfloat16)))
        dense = fmt4.dequantize_int4(packed, scale, zp, group, torch.float32, tuple(w.shape))
        torch.testing.assert_close(fmt4.kernel_dense(*parts[-1]).float(), dense, rtol=1e-2, atol=1e-3)
    (gu_w, gu_sz), (d_w, d_sz) = parts
    x = torch.randn(fmt4.DEQUANTISE_ROWS, D, generator=g).bfloat16()
    many = fmt4.kernel_ffn(x, gu_w, d_w, gu_sz, d_sz)  # dequantised once
    one_by_one = torch.cat([fmt4.kernel_ffn(x[t : t + 1], gu_w, d_w, gu_sz, d_sz) for t in range(len(x))])
    torch.testing.assert_close(
        many.float(), one_by_one.float(), rtol=2e-2, atol=2e-2 * float(one_by_one.abs().max())
    )
