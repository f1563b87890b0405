"""qwen35-lite: run Qwen3.5 mixture-of-experts models on one GPU plus CPU RAM plus NVMe."""

__version__ = "0.1.0"
