"""Load-time rewriting of one layer's resident tensors: projections that read the same input fused into
one matrix (one matmul a step instead of several), constants the layers would recompute every step
precomputed.

It runs on the host tensors, before they move to the device or into a spilled layer's packed buffer
(spill.py), so the layers never build a tensor out of their weights. A Linear stored pack-quantized
arrives as a kernels.PackedWeight: parts of one scheme fuse by concatenating their packed rows, parts held
differently (the community recipe keeps DeltaNet's in_proj_b/a and the shared-expert gate bf16) fuse into
runs called one after the other (kernels.fuse_rows). The plan counts bytes by the checkpoint's names; a
fused matrix holds exactly its parts' bytes, and the fp32 factors (norms, decay rate, dt_bias) take a few
KiB a layer more than their sources.
"""

from __future__ import annotations

import torch

from ..kernels import CompactLinear, PackedWeight, fuse_rows

Weight = torch.Tensor | CompactLinear

# (fused name, its parts in row order), relative to "layers.{i}.": each part's rows, one after the other.
# k before q in attention, and q_proj regrouped first (queries, then gates: `_ungroup_q_gate`), so the
# keys and the queries come out side by side and are normalised and rotated as one tensor.
FUSED: list[tuple[str, list[str]]] = [
    (
        "linear_attn.in_proj_qkvzba.weight",
        [
            "linear_attn.in_proj_qkv.weight",
            "linear_attn.in_proj_z.weight",
            "linear_attn.in_proj_b.weight",
            "linear_attn.in_proj_a.weight",
        ],
    ),
    (
        "self_attn.kqv_proj.weight",
        ["self_attn.k_proj.weight", "self_attn.q_proj.weight", "self_attn.v_proj.weight"],
    ),
    # the MoE block's shared expert and its sigmoid gate read the block's input: [gate | up | gate row]
    # (not the router, mlp.gate: it stays resident in spilled layers and feeds the lookahead)
    (
        "mlp.shared_in_proj.weight",
        [
            "mlp.shared_expert.gate_proj.weight",
            "mlp.shared_expert.up_proj.weight",
            "mlp.shared_expert_gate.weight",
        ],
    ),
    ("mlp.gate_up_proj.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),  # the dense family's MLP
]


def norm_scale(w: torch.Tensor) -> torch.Tensor:
    """The factor a zero-centred RMSNorm applies, (1 + w) in fp32, twice over (layers.rms_norm_1p)."""
    return (1.0 + w.float()).repeat(2)


def prepare_layer(prefix: str, w: dict[str, Weight]) -> dict[str, Weight]:
    """One layer's tensors (full names under `prefix`, as read) -> the tensors its code uses."""
    w = dict(w)
    for name in ("input_layernorm", "post_attention_layernorm"):
        w[f"{prefix}{name}.scale"] = norm_scale(w.pop(f"{prefix}{name}.weight"))
    if f"{prefix}linear_attn.A_log" in w:
        _prepare_deltanet(prefix + "linear_attn.", w)
    if f"{prefix}self_attn.q_proj.weight" in w:
        _prepare_attention(prefix + "self_attn.", w)
    for fused, parts in FUSED:
        if all(prefix + p in w for p in parts):
            w[prefix + fused] = fuse_rows([w.pop(prefix + p) for p in parts])
    return w


def prepare_top(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors outside the layers: the final norm's factor precomputed like the layers' norms."""
    w = dict(w)
    if "norm.weight" in w:
        w["norm.scale"] = norm_scale(w.pop("norm.weight"))
    return w


def _prepare_deltanet(p: str, w: dict[str, torch.Tensor]) -> None:
    w[p + "neg_A"] = -w.pop(p + "A_log").float().exp()  # the decay rate: g = neg_A · softplus(a + dt_bias)
    w[p + "dt_bias"] = w[p + "dt_bias"].float()  # added to an fp32 value: promoted there anyway
    conv = w[p + "conv1d.weight"]  # [C, 1, K]
    w[p + "conv1d_f32"] = conv.float().reshape(conv.shape[0], conv.shape[-1], 1)  # decode: [C, K, 1] fp32
    w[p + "norm_f32"] = w[p + "norm.weight"].float()  # the CPU decode step's output norm (deltanet_cpu)


def _prepare_attention(p: str, w: dict[str, Weight]) -> None:
    q_norm, k_norm = w.pop(p + "q_norm.weight"), w.pop(p + "k_norm.weight")
    hd = q_norm.shape[0]
    w[p + "q_proj.weight"] = _ungroup_q_gate(w[p + "q_proj.weight"], hd)
    heads_q, heads_kv = w[p + "q_proj.weight"].shape[0] // (2 * hd), w[p + "k_proj.weight"].shape[0] // hd
    # one row of norm factors per head of the fused [keys | queries] output
    w[p + "kq_norm.scale"] = torch.cat(
        [(1.0 + k_norm.float()).expand(heads_kv, hd), (1.0 + q_norm.float()).expand(heads_q, hd)]
    )


def _ungroup_q_gate(q_proj: Weight, hd: int) -> Weight:
    """q_proj's rows interleave per head [query_h (hd) | gate_h (hd)]: regroup them as all queries, then
    all gates (a packed q_proj: its packed rows, scales and zero points, in the same order)."""
    heads = q_proj.shape[0] // (2 * hd)
    if isinstance(q_proj, PackedWeight):
        order = torch.arange(q_proj.shape[0]).view(heads, 2, hd).transpose(0, 1).reshape(-1)
        return q_proj.select_rows(order)
    return q_proj.view(heads, 2, hd, -1).transpose(0, 1).reshape(2 * heads * hd, -1)
