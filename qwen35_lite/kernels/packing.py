"""compressed-tensors' packing of 4- and 8-bit integers into int32 words, undone (the numbers of
weights/packed.py, which re-exports these): element i of each word at bits i*bits.., stored as q + 2^(bits-1).
Little-endian hosts only (the words are read through a byte view)."""

from __future__ import annotations

import torch

INT4_OFFSET = 8  # stored nibble = q + 8
INT8_OFFSET = 128  # stored byte = q + 128


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [..., rows, words] -> int8 q [..., rows, in_features] in [-8, 7] (leading dims: a stack)."""
    lead = packed.shape[:-1]
    byte = packed.contiguous().view(torch.uint8)  # [..., rows, 4*words]
    nibbles = torch.stack((byte & 0xF, byte >> 4), dim=-1).view(*lead, -1)  # [..., rows, 8*words]
    return nibbles[..., :in_features].to(torch.int8) - INT4_OFFSET


def unpack_int8(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., rows, words] -> int8 q [..., rows, n] in [-128, 127] (leading dims: a stack)."""
    u = packed.contiguous().view(torch.uint8)[..., :n]  # [..., rows, n]: q + 128
    return (u ^ 0x80).view(torch.int8)  # flipping the top bit subtracts 128 in two's complement


UNPACK = {4: unpack_int4, 8: unpack_int8}
