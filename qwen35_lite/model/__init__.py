"""The Qwen3.5 text model: decoder layers (Gated DeltaNet, gated attention, MoE), their caches, and the
layers a GPU budget cannot hold."""
