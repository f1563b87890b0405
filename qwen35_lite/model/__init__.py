"""The Qwen3.5 model: decoder layers (Gated DeltaNet, gated attention, MoE), their caches, the layers a GPU budget cannot hold, and the vision tower (model/vision/)."""
