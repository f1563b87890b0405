"""qwen35-lite: run Qwen3.5 mixture-of-experts models on one GPU plus CPU RAM plus NVMe."""

from .openmp import wait_passively

wait_passively()  # before any module imports torch (qwen35_lite/openmp.py says why)

__version__ = "0.1.0"
