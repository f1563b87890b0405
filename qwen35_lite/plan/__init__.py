"""The memory plan: what the process holds on each device for a model, budgets and context, computed from
config.json and the safetensors headers before anything heavy is read."""
