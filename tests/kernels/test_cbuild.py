"""kernels/cbuild.py: a kernel source the machine cannot build is remembered, not rebuilt by every process."""

import shutil

import pytest

from qwen35_lite.kernels import cbuild


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_a_source_that_does_not_build_leaves_a_marker_and_is_not_compiled_again(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = '#error "needs an instruction set this CPU lacks"\n'
    assert cbuild.build("needs_isa", source, "f", ("p",)) is None
    markers = list((tmp_path / "qwen35-lite" / "kernels").glob("needs_isa_*.failed"))
    assert len(markers) == 1 and b"needs an instruction set" in markers[0].read_bytes()
    cbuild.build.cache_clear()  # as a new process: the marker answers, no compile is run
    real = cbuild.subprocess.run

    def run(cmd, *args, **kwargs):
        assert "-dumpmachine" in cmd, "compiled again"
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(cbuild.subprocess, "run", run)
    assert cbuild.build("needs_isa", source, "f", ("p",)) is None
    cbuild.build.cache_clear()
