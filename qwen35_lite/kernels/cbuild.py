"""Small C kernels built on first use with the machine's C compiler and loaded through ctypes: nothing to
build at `pip install`, and None (the caller's torch path) without a compiler or when a build fails.

`cc -O3 -march=native -fopenmp`: OpenMP resolves to the libgomp torch has loaded already (same soname),
so the kernels share torch's threads and its `set_num_threads`. Libraries are cached under
$XDG_CACHE_HOME/qwen35-lite/kernels, keyed by the source, the compiler, its target and the CPU's flags; QWEN35_LITE_NO_KERNELS=1
turns them all off. A source that does not build on this machine (one that needs an instruction set the CPU
lacks says so with #error) leaves a `.failed` file beside where its library would be, so later processes
do not try again.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

# bf16 <-> fp32 for the C sources that include it: widening is exact; narrowing rounds to nearest even,
# as torch's .to(torch.bfloat16) does, and keeps a NaN a NaN
BF16_C = r"""
#include <stdint.h>
#include <string.h>
static inline float bf16_float(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t float_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
"""
CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "i64": ctypes.c_int64, "f": ctypes.c_float}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "qwen35-lite" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux): -march=native code built on one CPU must not load on another (a
    cache shared between machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


@functools.cache
def build(name: str, source: str, symbol: str, args: tuple[str, ...]) -> Callable | None:
    """The C function `symbol` of `source` (argument kinds: "p" pointer, "i" int, "i64" int64, "f" float), built
    once per source and machine; None without a compiler or when the build or the load fails."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or os.environ.get("QWEN35_LITE_NO_KERNELS"):
        return None
    try:
        target = subprocess.run(
            [cc, "-march=native", "-dumpmachine"], capture_output=True, text=True, timeout=30
        )
        parts = [source, cc, target.stdout, _cpu_flags(), *FLAGS]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        lib = _cache_dir() / f"{name}_{key}.so"
        failed = lib.with_suffix(".failed")  # a source this machine cannot build (e.g. an ISA it lacks)
        if failed.exists():
            return None
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                cmd = [cc, *FLAGS, str(src), "-o", str(out), "-lm"]
                done = subprocess.run(cmd, capture_output=True, timeout=300)
                if done.returncode:
                    failed.write_bytes(done.stderr[-4000:])  # not retried by every process
                    return None
                os.replace(out, lib)  # atomic: another process may be building the same file
        fn = getattr(ctypes.CDLL(str(lib)), symbol)
    except (OSError, subprocess.SubprocessError, AttributeError):
        return None
    fn.restype = None
    fn.argtypes = [CTYPES[a] for a in args]
    return fn


def flags(name: str, source: str, symbol: str, n: int) -> tuple[bool, ...]:
    """The n flags a source's `void symbol(int* out)` reports about how it was built on this machine (which
    fast paths its preprocessor kept); all False where it does not build."""
    fn = build(name, source, symbol, ("p",))
    if fn is None:
        return (False,) * n
    out = (ctypes.c_int * n)()
    fn(ctypes.addressof(out))
    return tuple(bool(v) for v in out)
