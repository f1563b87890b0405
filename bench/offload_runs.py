"""What bench_offload.py runs: the checkpoint shapes, page-cache control, one timed configuration of
qwen35-lite or of transformers (+ accelerate), eviction-policy replay, and machine measurements.

Importable on its own (`from offload_runs import ...` with bench/ on sys.path); prints nothing.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from qwen35_lite.convert.synthetic import SyntheticSpec
from qwen35_lite.experts.cache import POLICIES, TieredExperts
from qwen35_lite.experts.store import ExpertStore, evict_page_cache
from qwen35_lite.model.qwen35 import Qwen35Model
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.config import load_config

_COMMON = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    shared_expert_intermediate_size=512,
    vocab_size=32768,
)
# Both ~1.5 GiB of bf16 experts over 8 layers, ~0.2 GiB resident.
# "e512": the real model's routing (Qwen3.5-397B: top-10 of 512), expert FFN 64 -> 384 KiB an expert.
#   A layer-granular offload moves or maps every expert of a layer, an expert cache only the routed
#   ones, so the routing shape decides the comparison: this is the representative one.
# "e128": top-8 of 128, expert FFN 256 -> 1.5 MiB an expert (the bench's first shape, kept for comparison).
SPECS = {
    "e512": SyntheticSpec(**_COMMON, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=64),
    "e128": SyntheticSpec(**_COMMON, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=256),
}


def prompt_ids(spec: SyntheticSpec, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def ckpt_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def expert_bytes(path: Path) -> int:
    ckpt = Checkpoint(path)
    return ckpt.nbytes("layers.") - sum(
        ckpt.info(n).nbytes for n in ckpt.names("layers.") if ".mlp.experts." not in n
    )


# ---- page cache --------------------------------------------------------------------------------


def warm_page_cache(files: list[Path]) -> None:
    """Read the files once so the timed run finds them in the page cache (this VM's DAMON pages out
    file pages idle for about a minute, so "warm" must be made right before the run)."""
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


@contextmanager
def page_cache(mode: str, files: list[Path]) -> Iterator[None]:
    """Hold the page cache in `mode` ("warm", "cold" or "uncached") around a timed generation."""
    if mode == "warm":
        yield
        return
    evict_page_cache(files)
    if mode == "cold":
        yield
        return
    stop = threading.Event()

    def evict_until_stopped() -> None:
        while not stop.wait(0.05):
            evict_page_cache(files)

    thread = threading.Thread(target=evict_until_stopped, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---- ours --------------------------------------------------------------------------------------


def greedy_ours(
    model: Qwen35Model, ids: torch.Tensor, n_new: int, after_prefill: Callable[[], None] | None = None
) -> tuple[list[int], list[float], float]:
    """Greedy tokens, the time each was produced, and the time the prompt went in."""
    start = time.perf_counter()
    cache = model.make_cache()
    logits = model.forward(cache, ids)
    if after_prefill:
        after_prefill()
    tokens, times = [], []
    for i in range(n_new):
        tokens.append(int(logits[-1].argmax()))
        times.append(time.perf_counter())
        if i + 1 < n_new:
            logits = model.forward(cache, torch.tensor(tokens[-1:]))
    return tokens, times, start


def run_ours(
    spec: SyntheticSpec,
    path: Path,
    quarter: bool,
    cache: str,
    prompt: int,
    n_new: int,
    repeats: int,
    prefetch: bool | None = None,
) -> list[dict]:
    cfg, ckpt = load_config(path).text, Checkpoint(path)
    store = ExpertStore(ckpt, cfg)
    slots = cfg.num_experts // 4 if quarter else cfg.num_experts
    provider = TieredExperts(store, "cpu", torch.bfloat16, cpu_slots=slots, prefetch=prefetch)
    if not quarter:
        provider.preload()
    model = Qwen35Model.load(ckpt, cfg, provider, torch.device("cpu"), torch.bfloat16)
    greedy_ours(model, prompt_ids(spec, prompt, seed=1), 3)  # warm-up
    runs = []
    for _ in range(repeats):
        with page_cache(cache, ckpt_files(path)):  # cache figures count the decode steps only
            tokens, times, start = greedy_ours(
                model, prompt_ids(spec, prompt, seed=0), n_new, provider.reset_stats
            )
        runs.append(
            {
                "tokens": tokens,
                "times": times,
                "start": start,
                "cache": provider.stats(),
                "slots_per_layer": slots,
            }
        )
    provider.close()
    return runs


# ---- transformers ------------------------------------------------------------------------------


class _TimingStreamer:
    """generate() calls put() with the prompt, then once per new token."""

    def __init__(self) -> None:
        self.start = time.perf_counter()  # made right before generate(): the prompt goes in now
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens += value.reshape(-1).tolist()

    def end(self) -> None:
        pass


def hf_placement(model) -> dict[str, int]:
    """How many modules accelerate's device map put on each device ({} when it made none)."""
    placement: dict[str, int] = {}
    for dev in getattr(model, "hf_device_map", {}).values():
        placement[str(dev)] = placement.get(str(dev), 0) + 1
    return placement


def hf_greedy(model, ids: torch.Tensor, n: int) -> _TimingStreamer:
    """transformers' greedy decode of exactly n tokens after ids [T] (on the model's input device)."""
    streamer = _TimingStreamer()
    with torch.inference_mode():
        model.generate(
            ids[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer, pad_token_id=0
        )
    return streamer


def run_hf(
    spec: SyntheticSpec, path: Path, quarter: bool, cache: str, prompt: int, n_new: int, repeats: int
) -> list[dict]:
    from transformers import Qwen3_5MoeForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    kw: dict = {}
    offload = None
    if quarter:
        offload = Path(tempfile.mkdtemp(prefix="hf-offload-"))
        ckpt = Checkpoint(path)
        budget = ckpt.nbytes() - expert_bytes(path) + expert_bytes(path) // 4
        kw = dict(device_map="auto", max_memory={"cpu": budget}, offload_folder=str(offload))
    model = Qwen3_5MoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw).eval()
    placement = hf_placement(model)

    hf_greedy(model, prompt_ids(spec, prompt, seed=1), 3)  # warm-up
    offloaded = sorted(p for p in offload.rglob("*") if p.is_file()) if offload else []
    runs = []
    for _ in range(repeats):
        with page_cache(cache, ckpt_files(path) + offloaded):
            s = hf_greedy(model, prompt_ids(spec, prompt, seed=0), n_new)
        runs.append({"tokens": s.tokens, "times": s.times, "start": s.start, "placement": placement})
    if offload:
        shutil.rmtree(offload, ignore_errors=True)
    return runs


# ---- eviction policies on recorded routing -------------------------------------------------------


class _Recorder(TieredExperts):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.trace: list[tuple[int, list[int]]] = []

    def get(self, layer, experts, **kw):
        self.trace.append((layer, list(experts)))
        return super().get(layer, experts, **kw)


def simulate(trace: list[tuple[int, list[int]]], slots: int, policy: str) -> float:
    """Hit rate of per-layer pools of `slots` under `policy` replaying `trace` (no I/O)."""
    pools: dict[int, tuple] = {}
    hits = total = 0
    for layer, experts in trace:
        pol, resident = pools.setdefault(layer, (POLICIES[policy](), set()))
        need = set(experts)
        for e in sorted(need):
            total += 1
            if e in resident:
                hits += 1
            elif len(resident) >= slots:
                victim = pol.victim(need)
                resident.discard(victim)
                pol.remove(victim)
            resident.add(e)
            pol.touch(e)
    return hits / total


def zipf_trace(n_layers: int, n_experts: int, k: int, tokens: int, s: float = 1.0) -> list:
    """Synthetic skewed routing: per layer a random Zipf(s) popularity over the experts, k distinct per token."""
    g = torch.Generator().manual_seed(0)
    weights = [
        torch.arange(1, n_experts + 1, dtype=torch.float)[torch.randperm(n_experts, generator=g)] ** -s
        for _ in range(n_layers)
    ]
    return [
        (layer, torch.multinomial(weights[layer], k, generator=g).tolist())
        for _ in range(tokens)
        for layer in range(n_layers)
    ]


def policies(spec: SyntheticSpec, path: Path, tokens: int) -> str:
    """Markdown table: LRU vs LFU/LRU hit rates on this checkpoint's decode routing and a Zipf trace."""
    cfg, ckpt = load_config(path).text, Checkpoint(path)
    rec = _Recorder(ExpertStore(ckpt, cfg), "cpu", torch.bfloat16, cpu_slots=cfg.num_experts)
    rec.preload()
    model = Qwen35Model.load(ckpt, cfg, rec, torch.device("cpu"), torch.bfloat16)
    greedy_ours(model, prompt_ids(spec, 32, seed=0), 1)
    rec.trace.clear()  # decode steps only
    greedy_ours(model, prompt_ids(spec, 32, seed=0), tokens + 1)
    decode = [t for t in rec.trace if len(t[1]) <= cfg.num_experts_per_tok]
    E, k, L = cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    traces = {
        f"synthetic checkpoint ({tokens} decode tokens)": decode,
        "Zipf(1.0) popularity": zipf_trace(L, E, k, tokens),
    }
    lines = ["| routing | slots / layer | LRU hit rate | LFU/LRU hit rate |", "|---|---|---|---|"]
    for name, trace in traces.items():
        for slots in (E // 16, E // 8, E // 4, E // 2):
            lru, hyb = simulate(trace, slots, "lru"), simulate(trace, slots, "lfu-lru")
            lines.append(f"| {name} | {slots} ({100 * slots // E}%) | {lru:.3f} | {hyb:.3f} |")
    return "\n".join(lines)


# ---- the machine ---------------------------------------------------------------------------------


def memcpy_gbs(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """The machine's memory copy bandwidth (GB/s of bytes read), best of `repeats` copies of a buffer
    much larger than the caches, on all torch threads (what decode's weight reads can use)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def busy_jiffies() -> int:
    """CPU time (all cores, clock ticks) the whole machine spent busy since boot."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GB RAM, {gpu}; torch {torch.__version__}"
