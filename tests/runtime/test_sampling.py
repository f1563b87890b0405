"""Sampling on the logits' device (issue 11): one host read per token, the same tokens as the sampler it
replaced (copied below as the reference), penalties kept as device masks equal to `apply_penalties`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_ours

import qwen35_lite.runtime.generate as generate_module
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.errors import CheckpointError, InputError
from qwen35_lite.kernels import greedy_cpu
from qwen35_lite.runtime.generate import Finished, GenerationRequest, TokenEvent, generate
from qwen35_lite.runtime.op_profile import count_host_reads
from qwen35_lite.runtime.sampling import Penalties, SamplingParams, apply_penalties, make_sampler

V = 500
PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.3, top_k=20, seed=2),
    SamplingParams(temperature=0.9, top_p=0.8, seed=3),
    SamplingParams(temperature=1.0, min_p=0.05, seed=4),
    SamplingParams(temperature=0.6, top_k=40, top_p=0.9, min_p=0.02, seed=2**64 - 1),
]


def reference_sampler(p: SamplingParams):
    """The sampler before issue 11 (CPU generator, torch.multinomial on the CPU): the ids to reproduce."""
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else torch.Generator()

    def sample(logits: torch.Tensor) -> int:
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs.cpu() / probs.sum(), 1, generator=gen))

    return sample


def fixed_logits(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(V, generator=g) * 3 for _ in range(n)]


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_the_same_ids_as_the_reference_sampler_on_fixed_logits(p):
    ours, ref = make_sampler(p), reference_sampler(p)
    logits = fixed_logits(40)
    got = [ours(x) for x in logits]
    assert got == [ref(x) for x in logits]
    if p.temperature > 0:  # a seeded run repeats itself; another seed draws otherwise
        again, other = make_sampler(p), make_sampler(SamplingParams(**{**vars(p), "seed": 12345}))
        assert [again(x) for x in logits] == got
        assert [other(x) for x in logits] != got


def test_greedy_takes_the_first_maximum_on_ties():
    logits = torch.zeros(V)
    logits[[7, 42, 300]] = 5.0
    assert make_sampler(SamplingParams())(logits) == 7


def test_incremental_penalties_equal_apply_penalties():
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.7)
    history = [3, 9, 9, 250, 499, 0]
    state = Penalties(p, history, V, torch.device("cpu"))
    generated: list[int] = []
    for i, logits in enumerate(fixed_logits(12, seed=1)):
        want = apply_penalties(logits.clone(), torch.tensor(history + generated), torch.tensor(generated), p)
        assert torch.equal(state.apply(logits), want), i
        token = torch.tensor((i * 37) % 20 if i % 3 else 9)  # repeats, history ids and new ids
        state.add(token)
        generated.append(int(token))


def test_a_penalised_sampler_draws_as_the_reference_loop_did():
    p = SamplingParams(temperature=0.8, top_p=0.95, seed=7, repetition_penalty=1.5, presence_penalty=1.0)
    history = list(range(0, V, 7))
    ours, ref = make_sampler(p, history), reference_sampler(p)
    generated: list[int] = []
    for logits in fixed_logits(30, seed=2):
        seen, reply = torch.tensor(history + generated), torch.tensor(generated)
        want = ref(apply_penalties(logits.clone(), seen, reply, p))
        assert ours(logits) == want
        generated.append(want)


@pytest.mark.parametrize("p", [PARAMS[0], PARAMS[5], SamplingParams(temperature=0.7, repetition_penalty=1.2)])
def test_nan_and_infinite_logits_name_themselves(p):
    for bad, word in ((math.nan, "NaN"), (math.inf, "infinite"), (-math.inf, "infinite")):
        logits = torch.zeros(V)
        logits[3] = bad
        with pytest.raises(CheckpointError, match=f"computed {word} logits") as e:
            make_sampler(p, [1, 2])(logits)
        assert "\n" not in e.value.message and e.value.hint


class Decoder:
    """The StreamDecoder interface without a tokenizer: ids as text."""

    def push(self, token: int) -> str:
        return f"<{token}>"

    def flush(self) -> str:
        return ""


@pytest.fixture(scope="module")
def small_model(module_tmp):
    spec = SyntheticSpec(hidden_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)
    return load_ours(write_checkpoint(module_tmp("sd") / "ck", spec, dtype=torch.float32))


@pytest.mark.parametrize(
    "p",
    [SamplingParams(), SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=0, repetition_penalty=1.1)],
    ids=["greedy", "sampled-penalised"],
)
def test_one_host_read_per_sampled_token_in_a_decode(small_model, monkeypatch, p):
    reads_per_call: list[int] = []
    real = generate_module.make_sampler

    def counting(params, history=(), constraint=None):
        sample = real(params, history, constraint)

        def counted(logits):
            with count_host_reads() as reads:
                token = sample(logits)
            reads_per_call.append(sum(reads.values()))
            return token

        return counted

    monkeypatch.setattr(generate_module, "make_sampler", counting)
    req = GenerationRequest(prompt_ids=list(range(100, 120)), params=p, max_new_tokens=6, stop_ids=())
    events = list(generate(small_model, small_model.make_cache(), req, Decoder()))
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == "length"
    assert [e.id for e in events if isinstance(e, TokenEvent)] == done.tokens
    # a plain greedy pick on the CPU reads nothing back: the C scan returns the id (kernels/greedy_cpu.py)
    scanned = p.temperature == 0 and greedy_cpu.library() is not None
    assert reads_per_call == [0 if scanned else 1] * 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_sampler_stays_there_and_a_seed_repeats():
    p = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, seed=5, repetition_penalty=1.2)
    logits = [x.cuda() for x in fixed_logits(20)]
    first, second = make_sampler(p, [1, 2, 3]), make_sampler(p, [1, 2, 3])
    with count_host_reads() as reads:
        got = [first(x) for x in logits]
    assert sum(reads.values()) == len(logits) and first.penalties.seen.is_cuda
    assert [second(x) for x in logits] == got
    assert make_sampler(SamplingParams())(logits[0]) == int(logits[0].argmax())
    bad = logits[0].clone()
    bad[3] = math.nan
    with pytest.raises(CheckpointError, match="NaN"):  # caught from the read, no device-side assert
        make_sampler(p)(bad)
    assert make_sampler(p)(logits[1]) >= 0  # the CUDA context is still usable


# ---- issue 19: logit_bias, frequency_penalty, logprobs, seed -1 -------------------------------------


def test_logit_bias_adds_and_minus_100_bans():
    logits = fixed_logits(1)[0]
    top = int(logits.argmax())
    assert make_sampler(SamplingParams(logit_bias={top: -100.0}))(logits) != top
    second = int(logits.topk(2).indices[1])
    assert make_sampler(SamplingParams(logit_bias={second: 50.0}))(logits) == second
    everything = {i: -100.0 for i in range(V)}
    with pytest.raises(InputError, match="no token is left"):
        make_sampler(SamplingParams(logit_bias=everything))(logits)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        make_sampler(SamplingParams(logit_bias={V: 1.0}))(logits)


def test_frequency_penalty_counts_repeats_as_apply_penalties_does():
    p = SamplingParams(frequency_penalty=0.9, presence_penalty=0.2)
    state = Penalties(p, [1, 2], V, torch.device("cpu"))
    generated: list[int] = []
    for i, logits in enumerate(fixed_logits(10, seed=4)):
        want = apply_penalties(logits.clone(), torch.tensor([1, 2, *generated]), torch.tensor(generated), p)
        assert torch.allclose(state.apply(logits), want), i
        token = torch.tensor([3, 3, 7][i % 3])
        state.add(token)
        generated.append(int(token))
    assert p.penalised and not SamplingParams().penalised


def test_logprobs_are_the_log_softmax_before_penalties_and_bias_in_the_one_read():
    logits = fixed_logits(1)[0]
    p = SamplingParams(logprobs=4, repetition_penalty=1.5, logit_bias={5: 3.0})
    sample = make_sampler(p, [int(logits.argmax())])
    with count_host_reads() as reads:
        token = sample(logits)
    assert sum(reads.values()) == 1
    want = torch.log_softmax(logits, -1)
    assert sample.last.logprob == pytest.approx(float(want[token]), abs=1e-6)
    assert [i for i, _ in sample.last.top] == want.topk(4).indices.tolist()
    assert [v for _, v in sample.last.top] == pytest.approx(want.topk(4).values.tolist(), abs=1e-6)
    assert make_sampler(SamplingParams()).last is None


def test_seed_minus_1_draws_fresh_randomness():
    logits = fixed_logits(30)
    draws = [[make_sampler(SamplingParams(temperature=1.0, seed=-1))(x) for x in logits] for _ in range(2)]
    assert draws[0] != draws[1]
