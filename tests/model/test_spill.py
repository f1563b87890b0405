"""Layers the GPU budget cannot hold run from host memory, copied into two device buffers as they run:
the same bits as resident layers, also after a forward that was cut short. (On the CPU the copies are
plain copies; the CUDA side stream is exercised in test_gpu.py.)"""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.experts.cache import UncachedExperts
from qwen35_lite.experts.store import ExpertStore
from qwen35_lite.model.qwen35 import Qwen35Model
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.config import load_config

SPEC = SyntheticSpec(num_hidden_layers=8, num_experts=8, num_experts_per_tok=2, vocab_size=4096)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def path(module_tmp):
    return write_checkpoint(module_tmp("spill") / "ck", SPEC, dtype=torch.float32)


def _load(path, device=CPU, **kw) -> Qwen35Model:
    cfg, ckpt = load_config(path).text, Checkpoint(path)
    provider = UncachedExperts(ExpertStore(ckpt, cfg), device, torch.float32)
    return Qwen35Model.load(ckpt, cfg, provider, device, torch.float32, **kw)


def _logits(model: Qwen35Model, steps: int = 4) -> list[torch.Tensor]:
    cache = model.make_cache()
    ids = torch.randint(0, SPEC.vocab_size, (90,), generator=torch.Generator().manual_seed(0))
    out = [model.forward(cache, ids, all_logits=True)]
    for _ in range(steps):
        out.append(model.forward(cache, out[-1][-1:].argmax(-1)))
    return out


@pytest.mark.parametrize("cpu_layers", [(7,), (5, 6, 7), (0, 2, 3, 6), tuple(range(8))])
def test_spilled_layers_give_the_resident_bits(path, cpu_layers):
    want = _logits(_load(path))
    model = _load(path, cpu_layers=cpu_layers)
    spilled = model.spilled
    assert sorted(spilled.packed) == list(cpu_layers)
    assert len(spilled.buffers) == min(2, len(cpu_layers))
    got = _logits(model)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # every spilled layer's weights are copied in once per forward
    assert spilled.bytes_copied == 5 * sum(b.numel() for b in spilled.packed.values())


def test_a_forward_cut_short_leaves_nothing_stale(path):
    want = _logits(_load(path))
    model = _load(path, cpu_layers=(1, 3, 5))
    model.spilled.before(1)  # started layer 3's copy, then the forward "stopped" (Ctrl+C, an error)
    model.spilled.before(3)  # ... and layer 5's, into layer 1's buffer
    got = _logits(model)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_spilled_layers_on_cuda_give_the_resident_logits(path):
    cuda = torch.device("cuda")
    want = _logits(_load(path, cuda))
    got = _logits(_load(path, cuda, cpu_layers=(2, 3, 4, 5, 6, 7)))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.fixture(scope="module")
def packed_path(path, module_tmp):
    """The same checkpoint with every Linear the community recipe quantises in int4 g32 (compressed-tensors)."""
    from ct_reference import make_ct_checkpoint

    return make_ct_checkpoint(path, module_tmp("spill_ct") / "ck", 32, False, all_linear=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_spilled_packed_layers_give_the_resident_bits(packed_path, dtype):
    """Compact Linears (kernels/) packed into a spilled layer's buffer as their tensors and rebuilt over
    the views: the bits of the resident layers, in the CPU int4 kernel's encoding (bf16) and the exact one."""

    def load(**kw) -> Qwen35Model:
        cfg, ckpt = load_config(packed_path), Checkpoint(packed_path)
        provider = UncachedExperts(ExpertStore(ckpt, cfg.text, raw_config=cfg.raw), CPU, dtype)
        return Qwen35Model.load(ckpt, cfg.text, provider, CPU, dtype, **kw)

    resident = load()
    assert not isinstance(resident.layers[0].mixer.w["in_proj_qkvzba"], torch.Tensor)  # held compact
    want = _logits(resident, 2)
    got = _logits(load(cpu_layers=(1, 2, 3)), 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
