"""Shared fixtures: tiny checkpoints written once per test session, and a loader for our engine."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import hf_reference
import pytest
import torch

from qwen35_lite.experts.cache import UncachedExperts
from qwen35_lite.experts.store import ExpertStore
from qwen35_lite.model.qwen35 import Qwen35Model
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.config import load_config

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """module_tmp(name) -> a new folder for a module's fixtures, removed when the module's tests end.

    The tests write a few GB of checkpoints; kept to the session's end they filled CI's disk (13 GB in
    the slow run). Function-level tmp_path folders go when their test passes (tmp_path_retention_policy)."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(shape) -> path of a randomised transformers-written checkpoint (built once)."""
    built = {}

    def get(shape: str):
        if shape not in built:
            built[shape] = hf_reference.build(shape, tmp_path_factory.mktemp(shape))
        return built[shape]

    return get


def load_ours(path, dtype=torch.float32, provider_factory=UncachedExperts) -> Qwen35Model:
    cfg = load_config(path)
    ckpt = Checkpoint(path)
    provider = (
        provider_factory(ExpertStore(ckpt, cfg.text, raw_config=cfg.raw), torch.device("cpu"), dtype)
        if cfg.is_moe
        else None
    )
    return Qwen35Model.load(ckpt, cfg.text, provider, torch.device("cpu"), dtype)


def greedy(model: Qwen35Model, ids: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Our greedy decode: prefill `ids`, then n tokens one at a time; (tokens, the last logits)."""
    cache = model.make_cache()
    logits = model.forward(cache, ids)
    tokens: list[int] = []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits = model.forward(cache, torch.tensor(tokens[-1:]))
    return tokens, logits
