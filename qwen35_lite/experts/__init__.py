"""Routed experts: their formats (experts/formats/, one module each), the store that reads them, the tiered slot caches, prefetch, and the lookup a MoE layer runs its experts through."""
