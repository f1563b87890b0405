"""Writing checkpoints: `quantize` (experts to compressed-tensors int4/int8) and random-weight ones (`make-checkpoint`)."""
