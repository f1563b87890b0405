"""Layer-by-layer prefill against its reference, the chunked forward; and its stats through the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, load_ours

from qwen35_lite.experts.cache import TieredExperts
from qwen35_lite.model.qwen35 import PREFILL_CHUNK


def _chunked_forward(model, ids: torch.Tensor) -> tuple[object, torch.Tensor]:
    cache = model.make_cache()
    for s in range(0, len(ids), PREFILL_CHUNK):
        logits = model.forward(cache, ids[s : s + PREFILL_CHUNK])
    return cache, logits


def _layered(model, ids: torch.Tensor, block: int) -> tuple[object, torch.Tensor]:
    cache = model.make_cache()
    for s in range(0, len(ids), block):
        logits = model.prefill(cache, ids[s : s + block])
    return cache, logits


@pytest.mark.slow
@pytest.mark.parametrize("block,dtype", [(512, torch.float32), (1024, torch.float32), (4096, torch.bfloat16)])
def test_layer_by_layer_prefill_equals_the_chunked_forward(hf_checkpoint, block, dtype):
    """The same last logits, bit for bit, and the same state after it (the next tokens decode alike), for
    prompts that cross the 512-token chunks and the blocks; fp32 and bf16, 2 attention layers, a 1-slot expert cache."""

    def factory(store, device, dtype):
        return TieredExperts(store, device, dtype, cpu_slots=1, prefetch=False)

    model = load_ours(hf_checkpoint("moe_2attn_gqa4_dkdv"), dtype, factory)
    ids = torch.randint(0, 248000, (1300,), generator=torch.Generator().manual_seed(block))
    ref_cache, ref = _chunked_forward(model, ids)
    cache, got = _layered(model, ids, block)
    assert torch.equal(got, ref)  # every matmul sees one chunk's rows: the same bits
    assert cache.offset == ref_cache.offset == len(ids)
    tokens = []
    for c, logits in ((ref_cache, ref), (cache, got)):
        out = [int(logits[-1].argmax())]
        for _ in range(4):
            out.append(int(model.forward(c, torch.tensor(out[-1:]))[-1].argmax()))
        tokens.append(out)
    assert tokens[0] == tokens[1]


def test_layer_by_layer_prefill_reads_a_layers_experts_once_a_block(hf_checkpoint):
    """With one slot per layer, the chunked forward streams every expert of a layer once a chunk; the
    layer-by-layer prefill once a block."""
    path = hf_checkpoint("moe_ratio2_gqa2")
    ids = torch.randint(0, 248000, (1536,), generator=torch.Generator().manual_seed(0))
    reads = {}
    for name, run in (("chunked", _chunked_forward), ("layered", lambda m, i: _layered(m, i, 2048))):
        model = load_ours(
            path, torch.float32, lambda s, d, t: TieredExperts(s, d, t, cpu_slots=1, prefetch=False)
        )
        run(model, ids)
        reads[name] = model.provider.stats()["experts_read"]
    cfg_experts = 4 * 8  # layers x experts of this shape: 1536 tokens x 3 picks touch them all
    assert reads["layered"] == cfg_experts and reads["chunked"] == 3 * cfg_experts


def test_greedy_after_a_layered_prefill_matches_transformers(hf_checkpoint):
    """The engine's generate path (layer-by-layer prefill) still decodes transformers' greedy tokens."""
    from hf_reference import load_reference

    path = hf_checkpoint("moe_ratio2_gqa2")
    ids = torch.randint(0, 248000, (600,), generator=torch.Generator().manual_seed(4))
    ref = load_reference(path, torch.float32)
    with torch.no_grad():
        want = ref.generate(ids[None], max_new_tokens=6, do_sample=False)[0, 600:].tolist()
    model = load_ours(path, torch.float32)
    cache, logits = _layered(model, ids, 4096)
    tokens = [int(logits[-1].argmax())]
    for _ in range(5):
        tokens.append(int(model.forward(cache, torch.tensor(tokens[-1:]))[-1].argmax()))
    assert tokens == want
    assert greedy(model, ids, 6)[0] == want  # and the chunked forward, its reference


@pytest.mark.slow
def test_run_json_reports_prefill_disk_bytes_and_speed(tmp_path):
    from typer.testing import CliRunner

    from qwen35_lite.cli import app
    from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint

    spec = SyntheticSpec(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)  # the real vocabulary
    ckpt = write_checkpoint(tmp_path / "ck", spec)
    args = [
        "run",
        "-m",
        str(ckpt),
        "--raw",
        "--json",
        "-n",
        "3",
        "--cpu-experts",
        "2",
        "--seed",
        "0",
        "hi " * 300,
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr
    import json

    stats = json.loads(r.stdout.strip().splitlines()[-1])["stats"]
    assert stats["prefill_disk_bytes"] > 0 and stats["prefill_tok_s"] > 0
    info = CliRunner().invoke(app, ["info", "-m", str(ckpt), "--json"])
    assert json.loads(info.stdout)["prefill_block"] >= 512
