"""qwen35-lite: run Qwen3.5 mixture-of-experts models on one GPU plus CPU RAM plus NVMe."""

from .heap import fix_mmap_threshold
from .openmp import set_openmp_wait

set_openmp_wait()  # before any module imports torch (qwen35_lite/openmp.py says why)
fix_mmap_threshold()  # large freed blocks go back to the OS (qwen35_lite/heap.py says why)

__version__ = "0.1.0"
