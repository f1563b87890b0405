"""Reading a checkpoint: config.json, the safetensors headers and byte ranges, the hub, the FP8 numbers."""
