"""Image placeholders in the prompt and 3-D (M-RoPE) positions, as transformers' `get_rope_index`.

Positions during decode: after a prefill that returned `rope_delta`, a new token at cache length
`cache_len` (the number of tokens already in the KV/DeltaNet caches) gets the three positions
`(cache_len + rope_delta,) * 3`. rope_delta is <= 0 for prompts with images (an image block of
gh/m x gw/m tokens only advances the position counter by max(gh, gw)/m) and 0 for pure text.

A later prompt appended to a live cache (next chat turn): compute its positions and delta alone, then
add `cache.offset + cache.rope_delta` to the positions and add the delta to `cache.rope_delta`; this is
what recomputing over the whole conversation would give.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import InputError


def _grid_list(grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)


def tokens_per_image(grid: tuple[int, int, int], merge: int) -> int:
    t, h, w = grid
    return t * (h // merge) * (w // merge)


def expand_image_placeholders(
    ids: Sequence[int] | torch.Tensor,
    grid_thw: torch.Tensor | Sequence[Sequence[int]],
    image_token_id: int,
    merge: int,
) -> list[int]:
    """Replace the i-th single `<|image_pad|>` by tokens_per_image(grid i) copies of it."""
    ids = _as_list(ids)
    grids = _grid_list(grid_thw)
    n_pads = sum(1 for i in ids if i == image_token_id)
    if n_pads != len(grids):
        raise InputError(
            f"the prompt has {n_pads} image placeholder(s) but {len(grids)} image(s) were given",
            "give one image per <|image_pad|> (the chat template writes one per image part)",
        )
    out: list[int] = []
    it = iter(grids)
    for tok in ids:
        if tok == image_token_id:
            out.extend([image_token_id] * tokens_per_image(next(it), merge))
        else:
            out.append(tok)
    return out


def mrope_positions(
    input_ids: Sequence[int] | torch.Tensor,
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
    image_token_id: int,
    spatial_merge_size: int,
    video_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    video_token_id: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Expanded prompt ids -> (positions int64 [3, T] rows (t, h, w), rope_delta).

    A text token takes (cur, cur, cur) and advances cur by 1. The k-th image's block of
    t * gh/m * gw/m tokens takes, in raster order over (frame, row, col), (cur + frame, cur + row,
    cur + col); afterwards cur advances by max(gh, gw) / m (the frame count is not added).
    A video's grid (t, gh, gw) is split into t grids (1, gh, gw), one per temporal group (its
    timestamps separate them in the prompt), each a block like an image's, as get_rope_index does.
    rope_delta = max(position) + 1 - T, used for every later token (see the module docstring).
    """
    ids = _as_list(input_ids)
    m = spatial_merge_size
    blocks = {image_token_id: _grid_list(image_grid_thw)}
    if video_token_id is not None:
        blocks[video_token_id] = [(1, h, w) for t, h, w in _grid_list(video_grid_thw) for _ in range(t)]
    used = dict.fromkeys(blocks, 0)
    rows: list[torch.Tensor] = []
    cur, i = 0, 0
    while i < len(ids):
        if ids[i] not in blocks:
            j = i
            while j < len(ids) and ids[j] not in blocks:
                j += 1
            rows.append(torch.arange(cur, cur + j - i).expand(3, -1))  # [3, run]
            cur += j - i
            i = j
            continue
        tok = ids[i]
        kind = "image" if tok == image_token_id else "video"
        k = used[tok]
        if k >= len(blocks[tok]):
            raise InputError(
                f"the prompt has more {kind} tokens than the {kind}s given produce",
                f"do not type <|{kind}_pad|> in the prompt; attach {kind}s with --{kind}",
            )
        t, gh, gw = blocks[tok][k]
        n = tokens_per_image(blocks[tok][k], m)
        if ids[i : i + n] != [tok] * n:
            raise InputError(
                f"{kind} block {k + 1} needs {n} consecutive {kind} tokens in the prompt",
                "expand placeholders before computing positions",
            )
        frame, row, col = torch.meshgrid(
            torch.arange(t), torch.arange(gh // m), torch.arange(gw // m), indexing="ij"
        )  # each [t, gh/m, gw/m]
        rows.append(torch.stack([frame, row, col]).reshape(3, -1) + cur)  # [3, n]
        cur += max(gh, gw) // m
        i += n
        used[tok] = k + 1
    for tok, grids in blocks.items():
        if used[tok] != len(grids):
            kind = "image" if tok == image_token_id else "video frame group"
            raise InputError(
                f"{len(grids)} {kind}(s) given but the prompt has tokens for only {used[tok]}",
                "give one image per <|image_pad|> and one video per <|video_pad|> placeholder",
            )
    if not rows:
        return torch.zeros(3, 0, dtype=torch.long), 0
    positions = torch.cat(rows, dim=1)  # [3, T]
    return positions, int(positions.max()) + 1 - len(ids)


def scatter_image_features(
    embeds: torch.Tensor, input_ids: Sequence[int] | torch.Tensor, features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Write the vision tower's rows, in order, over the embeddings of the image tokens (masked_scatter)."""
    ids = torch.as_tensor(_as_list(input_ids), device=embeds.device)
    mask = ids == image_token_id  # [T]
    n = int(mask.sum())
    if n != features.shape[0]:
        raise InputError(
            f"the prompt has {n} image tokens but the images produce {features.shape[0]} features",
            "expand placeholders with expand_image_placeholders using the same image_grid_thw",
        )
    out = embeds.clone()
    out[mask] = features.to(embeds.device, embeds.dtype)
    return out
