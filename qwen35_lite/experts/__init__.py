"""Routed-expert storage formats and the code that reads them (bf16, FP8 block-128, int4 compressed-tensors)."""
