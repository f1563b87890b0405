"""Vision tower, placeholder expansion and 3-D positions against transformers on a tiny random VLM."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from vision_helpers import build_tiny_vlm, load_tiny_vlm, make_image

from qwen35_lite.errors import CheckpointError, InputError
from qwen35_lite.model.vision import (
    ImageProcessorConfig,
    VisionTower,
    expand_image_placeholders,
    mrope_positions,
    preprocess,
    scatter_image_features,
)
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.config import load_config

IMAGE, START, END = 248056, 248053, 248054
VIDEO = 248057


@pytest.fixture(scope="module")
def vlm_dir(module_tmp):
    return build_tiny_vlm(module_tmp("tiny_vlm"))


@pytest.fixture(scope="module")
def ref32(vlm_dir):
    return load_tiny_vlm(vlm_dir, torch.float32)


@pytest.fixture(scope="module")
def cfg(vlm_dir):
    return load_config(vlm_dir)


def tower(vlm_dir, cfg, dtype):
    return VisionTower.load(Checkpoint(vlm_dir), cfg.vision, "cpu", dtype)


def reference_features(model, pixel_values, grid):
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values, grid)
    return torch.cat(out.pooler_output)  # a tuple of per-image [tokens, out_hidden] in 5.23


def images_input(vlm_dir, sizes):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    return preprocess(images, ImageProcessorConfig.from_dir(vlm_dir))


@pytest.mark.parametrize("sizes", [[(100, 70)], [(190, 64), (64, 150)]], ids=["one", "two"])
def test_features_fp32(vlm_dir, cfg, ref32, sizes):
    pv, grid = images_input(vlm_dir, sizes)
    ours = tower(vlm_dir, cfg, torch.float32).encode(pv, grid)
    ref = reference_features(ref32, pv, grid)
    assert ours.shape == ref.shape == (int(grid.prod(-1).sum()) // 4, cfg.vision.out_hidden_size)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 1e-4


def test_features_video_like_grid(vlm_dir, cfg, ref32):
    """t = 2 frames: attention is per frame and positions repeat per frame."""
    grid = torch.tensor([[2, 4, 6], [1, 6, 2]])
    pv = torch.randn(int(grid.prod(-1).sum()), 1536, generator=torch.Generator().manual_seed(0))
    ours = tower(vlm_dir, cfg, torch.float32).encode(pv, grid)
    assert (ours - reference_features(ref32, pv, grid)).abs().max() < 1e-4


def test_features_bf16_bit_identical(vlm_dir, cfg):
    pv, grid = images_input(vlm_dir, [(300, 200), (64, 150)])
    ours = tower(vlm_dir, cfg, torch.bfloat16).encode(pv, grid)
    ref = reference_features(load_tiny_vlm(vlm_dir, torch.bfloat16), pv, grid)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, ref)


def test_no_vision_weights(tmp_path, cfg):
    save_file({"model.language_model.norm.weight": torch.zeros(4)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no vision weights") as e:
        VisionTower.load(Checkpoint(tmp_path), cfg.vision, "cpu", torch.float32)
    assert e.value.hint


def prompt_ids(grid, merge=2):
    """text, image, text, image, text, with the chat template's single placeholder per image."""
    ids = [11, 22, 33, START, IMAGE, END, 44, 55, START, IMAGE, END, 66, 77, 88]
    return ids, expand_image_placeholders(ids, grid, IMAGE, merge)


def test_positions_match_get_rope_index(ref32):
    grid = torch.tensor([[1, 4, 6], [1, 8, 2]])
    ids, expanded = prompt_ids(grid)
    assert len(expanded) == len(ids) - 2 + 6 + 4
    positions, delta = mrope_positions(expanded, grid, IMAGE, 2)
    input_ids = torch.tensor([expanded])
    mm_types = (input_ids == IMAGE).int()  # 0 text, 1 image
    ref_pos, ref_delta = ref32.model.get_rope_index(input_ids, mm_types, image_grid_thw=grid)
    assert positions.dtype == torch.long and positions.shape == (3, len(expanded))
    assert torch.equal(positions, ref_pos[:, 0])
    assert delta == int(ref_delta) and delta < 0


def test_video_positions_match_get_rope_index(ref32):
    """An image, then a video of 3 temporal groups (timestamps between them) and one of 2: each group is
    its own (1, h, w) block, as get_rope_index splits video_grid_thw."""
    from qwen35_lite.model.vision.video import expand_video_placeholders, video_placeholder_ids

    image_grid, video_grid = torch.tensor([[1, 4, 6]]), [(3, 4, 4), (2, 6, 2)]
    ids = [11, START, IMAGE, END, 22, START, VIDEO, END, 33, START, VIDEO, END, 44]
    expanded = expand_image_placeholders(ids, image_grid, IMAGE, 2)
    stamp = lambda text: [900 + len(text)]  # noqa: E731  (a timestamp's tokens: any text ids)
    clips = [video_placeholder_ids(g, [0.5, 1.5, 2.5], 2, stamp, VIDEO, START, END) for g in video_grid]
    expanded = expand_video_placeholders(expanded, clips, VIDEO)
    assert expanded.count(VIDEO) == 3 * 4 + 2 * 3
    positions, delta = mrope_positions(expanded, image_grid, IMAGE, 2, video_grid, VIDEO)
    input_ids = torch.tensor([expanded])
    mm_types = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
    ref_pos, ref_delta = ref32.model.get_rope_index(
        input_ids, mm_types, image_grid_thw=image_grid, video_grid_thw=torch.tensor(video_grid)
    )
    assert torch.equal(positions, ref_pos[:, 0])
    assert delta == int(ref_delta)


def test_positions_text_only():
    positions, delta = mrope_positions([5, 6, 7, 8], None, IMAGE, 2)
    assert torch.equal(positions, torch.arange(4).expand(3, 4)) and delta == 0


def test_placeholder_count_mismatch():
    grid = torch.tensor([[1, 4, 4]])
    with pytest.raises(InputError):
        expand_image_placeholders([1, IMAGE, 2, IMAGE], grid, IMAGE, 2)
    with pytest.raises(InputError):
        mrope_positions([1, IMAGE, IMAGE, 2], grid, IMAGE, 2)  # 2 tokens where the image needs 4
    with pytest.raises(InputError):
        mrope_positions([1, 2], grid, IMAGE, 2)  # an image without tokens


def reference_logits(model, ids, pv, grid):
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        return model(
            input_ids=input_ids,
            pixel_values=pv,
            image_grid_thw=grid,
            mm_token_type_ids=(input_ids == IMAGE).int(),
            use_cache=True,
        )


def our_prefill(model, vt, cache, ids, pv, grid):
    """What the engine must do: expanded ids -> embeddings with image rows scattered in, 3-D positions
    shifted by what the cache already holds, and the cache's rope_delta advanced for later decode steps."""
    positions, delta = mrope_positions(ids, grid, IMAGE, 2)
    embeds = model.embed_ids(torch.tensor(ids))
    if grid is not None:
        embeds = scatter_image_features(embeds, ids, vt.encode(pv, grid), IMAGE)
    positions = positions + cache.offset + cache.rope_delta
    logits = model.forward(cache, embeds=embeds, positions=positions, all_logits=True)
    cache.rope_delta += delta
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_and_decode_logits_match(vlm_dir, cfg, ref32, dtype):
    """Image prompt prefill then two decode steps at offset + rope_delta: ~1e-5 in fp32; in bf16 the prefill
    bit-equal, the decode steps within bf16 rounding (their dense rows run another kernel than transformers')."""
    from conftest import load_ours

    ref = ref32 if dtype == torch.float32 else load_tiny_vlm(vlm_dir, dtype)
    pv, grid = images_input(vlm_dir, [(130, 90), (64, 160)])
    _, expanded = prompt_ids(grid)
    model, vt = load_ours(vlm_dir, dtype), tower(vlm_dir, cfg, dtype)
    cache = model.make_cache()
    ours = [our_prefill(model, vt, cache, expanded, pv, grid)]
    steps = [int(ours[0][-1].argmax()), 7]
    ours += [model.forward(cache, ids=torch.tensor([t])) for t in steps]

    out = reference_logits(ref, expanded, pv, grid)
    theirs, past = [out.logits[0]], out.past_key_values
    for t in steps:
        with torch.no_grad():
            out = ref(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
        theirs.append(out.logits[0, -1:])
        past = out.past_key_values
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if dtype == torch.float32:
            assert (a - b).abs().max() < 1e-4
        elif i == 0:
            assert torch.equal(a, b)  # prefill: the same GEMMs as transformers
        else:  # decode: dense bf16 rows through dense_cpu's kernel (fp32 sums in another order)
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05)
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_second_turn_with_image(vlm_dir, cfg, ref32):
    """A later prompt (with an image) appended to a live cache = the whole conversation at once."""
    from conftest import load_ours

    pv1, grid1 = images_input(vlm_dir, [(100, 70)])
    pv2, grid2 = images_input(vlm_dir, [(64, 190)])
    turn1 = expand_image_placeholders([11, START, IMAGE, END, 22, 33], grid1, IMAGE, 2)
    turn2 = expand_image_placeholders([44, START, IMAGE, END, 55], grid2, IMAGE, 2)
    model, vt = load_ours(vlm_dir, torch.float32), tower(vlm_dir, cfg, torch.float32)
    cache = model.make_cache()
    our_prefill(model, vt, cache, turn1, pv1, grid1)
    ours = our_prefill(model, vt, cache, turn2, pv2, grid2)
    ref = reference_logits(ref32, turn1 + turn2, torch.cat([pv1, pv2]), torch.cat([grid1, grid2]))
    assert (ours - ref.logits[0, len(turn1) :]).abs().max() < 1e-4
