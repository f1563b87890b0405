"""Test checkpoints in the official FP8 layout: block-128 FP8 routed experts (per expert, with
`weight_scale_inv`), made from any of our or transformers' checkpoints; optionally its dequantised twin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwen35_lite.convert.synthetic import FP8_CONFIG
from qwen35_lite.weights.fp8 import dequantize_fp8


def expert_matrices(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(per-expert weight name, [out, in]) of a fused [E, out, in] expert tensor, or of a per-expert one."""
    if t.dim() == 2:
        return [(name, t)]
    base = name.rsplit(".", 1)[0]
    out = []
    for e, w in enumerate(t):
        if name.endswith("gate_up_proj"):
            gate, up = w.chunk(2, 0)
            out += [(f"{base}.{e}.gate_proj.weight", gate), (f"{base}.{e}.up_proj.weight", up)]
        else:
            out.append((f"{base}.{e}.down_proj.weight", w))
    return out


def fp8_copy(src: Path, dst: Path, dense_twin: Path | None = None, seed: int = 1) -> Path:
    """`src` with its routed experts as FP8 + random block scales (quantization_config says fp8); the twin
    holds the same experts dequantised to fp32. Other tensors and files are copied as they are."""
    outs = [dst] + ([dense_twin] if dense_twin else [])
    for d in outs:
        d.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy(f, d / f.name)
    fp8, dense = {}, {}
    g = torch.Generator().manual_seed(seed)
    for f in sorted(src.glob("*.safetensors")):
        for name, t in load_file(f).items():
            if ".mlp.experts." not in name:
                fp8[name] = dense[name] = t
                continue
            for matrix_name, m in expert_matrices(name, t):
                q = m.float().to(torch.float8_e4m3fn)
                s = torch.rand(-(-m.shape[0] // 128), -(-m.shape[1] // 128), generator=g) + 0.5
                fp8[matrix_name], fp8[matrix_name + "_scale_inv"] = q, s
                if dense_twin:
                    dense[matrix_name] = dequantize_fp8(q, s)
    save_file(fp8, str(dst / "model.safetensors"))
    if dense_twin:
        save_file(dense, str(dense_twin / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = FP8_CONFIG
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
