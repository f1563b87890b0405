"""qwen35_lite/heap.py: glibc's mmap threshold fixed at import, unless the environment set it."""

from __future__ import annotations

import platform

import pytest

from qwen35_lite.heap import fix_mmap_threshold


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_threshold_is_fixed_unless_the_environment_set_it(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert fix_mmap_threshold()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not fix_mmap_threshold()  # the user's choice stands
