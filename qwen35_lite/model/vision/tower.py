"""The Qwen3.5 vision tower: patches -> image-token embeddings in the text model's hidden size.

Follows transformers' `Qwen3_5MoeVisionModel` operation for operation (architecture notes 4.2 and 7):
patch embedding through F.conv3d (the equivalent F.linear rounds differently in bf16), bias-adds fused in
F.linear, position-table resampling weights in fp32, rotary in fp32, attention per frame through SDPA
with the reference's tensor layouts, so fp32 agrees to ~1e-6 and bf16 to the bit (CPU, torch 2.13).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...errors import CheckpointError
from ...weights.checkpoint import Checkpoint
from ...weights.config import VisionConfig
from ..layers import rotate_half

LN_EPS = 1e-6
ROPE_THETA = 10000.0  # vision_config.rope_parameters.rope_theta default (VisionConfig does not carry it)

BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
)  # fmt: skip
TOP_KEYS = (
    "patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed.weight",
    "merger.norm.weight", "merger.norm.bias", "merger.linear_fc1.weight", "merger.linear_fc1.bias",
    "merger.linear_fc2.weight", "merger.linear_fc2.bias",
)  # fmt: skip


def tower_dtype(device: torch.device | str, text_dtype: torch.dtype) -> torch.dtype:
    """The dtype the tower computes in: the text model's, except on the CPU, where it is fp32.

    An image encode is compute-bound (thousands of patches through 27 blocks), and CPUs without bf16
    matrix units run bf16 matmuls 4-7x slower than fp32 (docs/benchmarks.md, "Vision encode"); the
    image rows are rounded to the text dtype once, when they replace the placeholder embeddings. The
    price is the tower's weights at twice the bytes in RAM (1.8 GB for the 397B), which the plan counts.
    """
    return torch.float32 if torch.device(device).type == "cpu" else text_dtype


def vision_weight_names(cfg: VisionConfig) -> list[str]:
    blocks = [f"blocks.{i}.{k}" for i in range(cfg.depth) for k in BLOCK_KEYS]
    return ["visual." + n for n in (*TOP_KEYS, *blocks)]


def vision_tensor_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tower tensor (names without `visual.`), from vision_config alone."""
    h, i, c = cfg.hidden_size, cfg.intermediate_size, cfg
    m = h * c.spatial_merge_size**2  # the merger sees 2x2 patches concatenated
    top = {
        "patch_embed.proj.weight": (h, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size),
        "patch_embed.proj.bias": (h,), "pos_embed.weight": (c.num_position_embeddings, h),
        "merger.norm.weight": (h,), "merger.norm.bias": (h,), "merger.linear_fc1.weight": (m, m),
        "merger.linear_fc1.bias": (m,), "merger.linear_fc2.weight": (c.out_hidden_size, m),
        "merger.linear_fc2.bias": (c.out_hidden_size,),
    }  # fmt: skip
    block = {
        "norm1.weight": (h,), "norm1.bias": (h,), "norm2.weight": (h,), "norm2.bias": (h,),
        "attn.qkv.weight": (3 * h, h), "attn.qkv.bias": (3 * h,), "attn.proj.weight": (h, h),
        "attn.proj.bias": (h,), "mlp.linear_fc1.weight": (i, h), "mlp.linear_fc1.bias": (i,),
        "mlp.linear_fc2.weight": (h, i), "mlp.linear_fc2.bias": (h,),
    }  # fmt: skip
    out = {k: top[k] for k in TOP_KEYS}
    for b in range(c.depth):
        out.update({f"blocks.{b}.{k}": block[k] for k in BLOCK_KEYS})
    return out


def _patch_rows_cols(t: int, h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch of one image in merge-block order, repeated for each of its t frames."""
    k = torch.arange(h * w)
    blocks_w = w // merge
    row = (k // (merge * merge * blocks_w)) * merge + (k // merge) % merge
    col = ((k // (merge * merge)) % blocks_w) * merge + k % merge
    return row.repeat(t), col.repeat(t)  # each [t*h*w]


def _bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_corners=True linear taps [n, 2] and weights [n, 2] into a `side`-long table, fp32 as the reference."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class VisionTower:
    """Weights held as plain tensors on `device` in `dtype`; `encode` is the whole forward pass."""

    def __init__(
        self,
        cfg: VisionConfig,
        weights: dict[str, torch.Tensor],
        device: torch.device | str,
        dtype: torch.dtype,
        rope_theta: float = ROPE_THETA,
    ) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.w = weights  # canonical names without the "visual." prefix
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.side = int(cfg.num_position_embeddings**0.5)
        half = self.head_dim // 2
        self.inv_freq = 1.0 / (rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))

    @classmethod
    def load(
        cls,
        ckpt: Checkpoint,
        cfg: VisionConfig,
        device: torch.device | str,
        dtype: torch.dtype,
        rope_theta: float = ROPE_THETA,
    ) -> VisionTower:
        """Read every `visual.*` tensor in `dtype` onto `device` (rope_theta: vision_config.rope_parameters)."""
        if "visual.patch_embed.proj.weight" not in ckpt:
            raise CheckpointError(
                "checkpoint has no vision weights",
                "use a checkpoint with a vision tower (e.g. Qwen/Qwen3.5-35B-A3B), or drop --image",
            )
        weights = {n[len("visual.") :]: ckpt.read(n, dtype).to(device) for n in vision_weight_names(cfg)}
        expected = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        got = tuple(weights["patch_embed.proj.weight"].shape)
        if got != expected:
            raise CheckpointError(
                f"visual.patch_embed.proj.weight has shape {got}, config.json implies {expected}",
                "config.json and the weights disagree: re-download the checkpoint",
            )
        return cls(cfg, weights, device, dtype, rope_theta)

    def _position_embedding(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Learned pos_embed bilinearly resampled to each grid -> [N, hidden] in the model dtype."""
        idx, wts = [], []
        for t, h, w in grids:
            row, col = _patch_rows_cols(t, h, w, self.cfg.spatial_merge_size)
            h_taps, h_w = _bilinear_taps(row, h, self.side)
            w_taps, w_w = _bilinear_taps(col, w, self.side)
            idx.append((h_taps[:, :, None] * self.side + w_taps[:, None, :]).reshape(-1, 4))  # [n, 4]
            wts.append((h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4))  # [n, 4]
        idx_t, wts_t = torch.cat(idx).to(self.device), torch.cat(wts).to(self.device)
        # bf16 table rows times fp32 weights promote to fp32; summed in fp32, cast once (as the reference).
        pos = (self.w["pos_embed.weight"][idx_t] * wts_t[:, :, None]).sum(1)  # [N, hidden]
        return pos.to(self.dtype)

    def _rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary over the full head dim: cos, sin [N, head_dim] fp32, laid out (h, w, h, w)."""
        rc = [torch.stack(_patch_rows_cols(t, h, w, self.cfg.spatial_merge_size), -1) for t, h, w in grids]
        pos = torch.cat(rc).to(self.device)  # [N, 2]
        freqs = pos[..., None].float() * self.inv_freq.to(self.device)  # [N, 2, head_dim/4]
        out = []
        for f in (freqs.cos(), freqs.sin()):
            hw = torch.cat([f[:, 0], f[:, 1]], dim=-1)  # [N, head_dim/2]
            out.append(torch.cat([hw, hw], dim=-1))  # [N, head_dim]
        return out[0], out[1]

    def _attention(self, x: torch.Tensor, p: str, cos, sin, lengths: list[int]) -> torch.Tensor:
        n, heads = x.shape[0], self.cfg.num_heads
        qkv = F.linear(x, self.w[p + "attn.qkv.weight"], self.w[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # each [N, H, hd]
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [N, 1, hd]
        qf, kf = q.float(), k.float()
        q = (qf * c + rotate_half(qf) * s).to(x.dtype)
        k = (kf * c + rotate_half(kf) * s).to(x.dtype)
        q, k, v = (y.transpose(0, 1).unsqueeze(0) for y in (q, k, v))  # [1, H, N, hd]
        # Bidirectional attention inside each frame of each image only.
        outs = [
            F.scaled_dot_product_attention(qs, ks, vs, scale=self.head_dim**-0.5).transpose(1, 2).contiguous()
            for qs, ks, vs in zip(*(torch.split(y, lengths, dim=2) for y in (q, k, v)))
        ]  # each [1, n_frame, H, hd]
        o = torch.cat(outs, dim=1).reshape(n, -1)  # [N, hidden]
        return F.linear(o, self.w[p + "attn.proj.weight"], self.w[p + "attn.proj.bias"])

    def _block(self, x: torch.Tensor, i: int, cos, sin, lengths: list[int]) -> torch.Tensor:
        p, w, d = f"blocks.{i}.", self.w, (self.cfg.hidden_size,)
        h = F.layer_norm(x, d, w[p + "norm1.weight"], w[p + "norm1.bias"], LN_EPS)
        x = x + self._attention(h, p, cos, sin, lengths)
        h = F.layer_norm(x, d, w[p + "norm2.weight"], w[p + "norm2.bias"], LN_EPS)
        h = F.gelu(
            F.linear(h, w[p + "mlp.linear_fc1.weight"], w[p + "mlp.linear_fc1.bias"]), approximate="tanh"
        )
        return x + F.linear(h, w[p + "mlp.linear_fc2.weight"], w[p + "mlp.linear_fc2.bias"])

    @torch.inference_mode()
    def encode(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        on_block: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """pixel_values [N, C*T*P*P], grid_thw [n_images, 3] -> [N / merge², out_hidden_size] in the model dtype.

        Rows are the image tokens of all images in order, each image's in raster order of its merged grid.
        on_block(blocks done, depth) after each block (a 1344² image takes ~1.5 min on a 2-core CPU).
        """
        cfg, w = self.cfg, self.w
        grids = [(int(t), int(h), int(ww)) for t, h, ww in grid_thw.tolist()]
        m = cfg.spatial_merge_size
        if pixel_values.shape[0] != sum(t * h * ww for t, h, ww in grids) or any(
            h % m or ww % m for _, h, ww in grids
        ):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match grid_thw {grids}")
        x = pixel_values.to(self.device, self.dtype)
        # Conv3d with kernel == stride is one linear map per patch; kept as a conv to round as the reference does.
        wp = w["patch_embed.proj.weight"]  # [hidden, C, T, P, P]
        x = F.conv3d(x.view(-1, *wp.shape[1:]), wp, w["patch_embed.proj.bias"], stride=wp.shape[2:])
        x = x.view(-1, cfg.hidden_size)  # [N, hidden]
        x = x + self._position_embedding(grids)
        cos, sin = self._rotary(grids)
        lengths = [h * ww for t, h, ww in grids for _ in range(t)]  # one attention segment per frame
        for i in range(cfg.depth):
            x = self._block(x, i, cos, sin, lengths)
            if on_block:
                on_block(i + 1, cfg.depth)
        d = (cfg.hidden_size,)
        x = F.layer_norm(x, d, w["merger.norm.weight"], w["merger.norm.bias"], LN_EPS)
        x = x.view(-1, cfg.hidden_size * cfg.spatial_merge_size**2)  # [N/4, 4*hidden]: one merge block a row
        x = F.gelu(F.linear(x, w["merger.linear_fc1.weight"], w["merger.linear_fc1.bias"]))
        return F.linear(x, w["merger.linear_fc2.weight"], w["merger.linear_fc2.bias"])
