"""The one-pass greedy pick (kernels/greedy_cpu.py) against torch's argmax, isinf and isnan, and the
sampler taking it for a plain greedy request only (the torch form stays its reference)."""

from __future__ import annotations

import math

import pytest
import torch

from qwen35_lite.errors import CheckpointError
from qwen35_lite.kernels import greedy_cpu
from qwen35_lite.runtime.sampling import SamplingParams, make_sampler

pytestmark = pytest.mark.skipif(greedy_cpu.library() is None, reason="no C compiler")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 248320])
def test_first_maximum_and_flags_equal_torch(dtype, n):
    g = torch.Generator().manual_seed(n)
    for trial in range(4):
        x = torch.randn(n, generator=g).to(dtype)
        if trial >= 1:  # ties: the first of several equal maxima, in and out of one lane, and in the tail
            top = x.max() + 1
            x[torch.randint(0, n, (3,), generator=g)] = top
            x[-1] = top
        if trial == 3:
            x[:] = -math.inf
        at, inf, nan = greedy_cpu.greedy_scan(x)
        assert at == int(x.argmax())
        assert (inf, nan) == (bool(x.isinf().any()), bool(x.isnan().any()))
    x = torch.randn(n, generator=g).to(dtype)
    x[n // 2] = math.inf
    assert greedy_cpu.greedy_scan(x) == (n // 2, True, False)
    x[-1] = math.nan
    assert greedy_cpu.greedy_scan(x)[1:] == (n > 1, True)


@pytest.mark.parametrize(
    "p, fast",
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(temperature=0.0, logprobs=2), False),
        (SamplingParams(temperature=0.0, repetition_penalty=1.3), False),
        (SamplingParams(temperature=0.0, logit_bias={5: 100.0}), False),
        (SamplingParams(temperature=0.8, seed=1), False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_takes_the_scan_for_plain_greedy_only(monkeypatch, p, fast, dtype):
    calls = []
    real = greedy_cpu.greedy_scan
    monkeypatch.setattr(greedy_cpu, "greedy_scan", lambda x: calls.append(1) or real(x))
    g = torch.Generator().manual_seed(7)
    ours, torch_form = make_sampler(p, [1, 2]), make_sampler(p, [1, 2])
    for _ in range(5):
        logits = torch.randn(3000, generator=g).to(dtype)
        got = ours(logits)
        with monkeypatch.context() as m:
            m.setattr(greedy_cpu, "library", lambda: None)
            assert got == torch_form(logits)
    assert len(calls) == (5 if fast else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_infinite_logits_through_the_scan(dtype):
    for bad, word in ((math.nan, "NaN"), (math.inf, "infinite"), (-math.inf, "infinite")):
        logits = torch.zeros(300, dtype=dtype)
        logits[3] = bad
        with pytest.raises(CheckpointError, match=f"computed {word} logits"):
            make_sampler(SamplingParams(temperature=0.0))(logits)
