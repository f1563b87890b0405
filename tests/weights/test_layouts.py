"""Both expert layouts (fused 3-D and per-expert), sharded, read identically; FP8 experts dequantise."""

from __future__ import annotations

import pytest
import torch
from conftest import load_ours
from hf_reference import load_reference
from safetensors.torch import save_file

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.experts.store import ExpertStore
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.config import load_config


@pytest.fixture(scope="module")
def layouts(module_tmp):
    spec = SyntheticSpec(num_hidden_layers=4, num_experts=6, num_experts_per_tok=2)
    root = module_tmp("layouts")
    return {
        fused: write_checkpoint(
            root / str(fused), spec, dtype=torch.float32, fused=fused, shard_bytes=40 << 20
        )
        for fused in (True, False)
    }


def test_both_layouts_give_identical_logits(layouts):
    ids = torch.randint(0, 248000, (90,), generator=torch.Generator().manual_seed(0))
    fused, per_expert = (load_ours(layouts[f]) for f in (True, False))
    assert ExpertStore(Checkpoint(layouts[True]), load_config(layouts[True]).text).format.fused
    assert not ExpertStore(Checkpoint(layouts[False]), load_config(layouts[False]).text).format.fused
    a = fused.forward(fused.make_cache(), ids, all_logits=True)
    b = per_expert.forward(per_expert.make_cache(), ids, all_logits=True)
    assert torch.equal(a, b)


def test_fused_sharded_checkpoint_matches_transformers(layouts):
    path = layouts[True]
    assert len(list(path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, 248000, (90,), generator=torch.Generator().manual_seed(1))
    ref = load_reference(path, torch.float32)
    with torch.no_grad():
        expected = ref(input_ids=ids[None]).logits[0]
    ours = load_ours(path)
    torch.testing.assert_close(
        ours.forward(ours.make_cache(), ids, all_logits=True), expected, atol=1e-4, rtol=0
    )


def test_fp8_per_expert_weights_are_dequantised_blockwise(tmp_path):
    """Block-wise FP8 (DeepSeek style, as the -FP8 releases): value = w · scale_inv[r // 128, c // 128]."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    scale_inv = torch.rand(3, 2, generator=g) + 0.5
    q = w.to(torch.float8_e4m3fn)
    save_file({"x.weight": q, "x.weight_scale_inv": scale_inv}, str(tmp_path / "model.safetensors"))
    got = Checkpoint(tmp_path).read("x.weight", torch.float32)
    expected = q.float() * scale_inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert torch.equal(got, expected)
