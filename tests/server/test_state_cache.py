"""The prefix cache of model states: resuming equals recomputing, snapshots stay intact, LRU within bounds."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, load_ours

from qwen35_lite.model.cache import DeltaNetState, KVCache, ModelCache
from qwen35_lite.server.state_cache import PrefixCache

SHAPE = "moe_2attn_gqa4_dkdv"  # 8 layers: 2 attention (KV) and 6 DeltaNet, dk != dv, conv kernel 3
BIG = 1 << 30


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_ours(hf_checkpoint(SHAPE), torch.float32)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 248000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _feed(model, cache: ModelCache, ids: list[int]) -> torch.Tensor:
    """Feed ids as the engine does (prefill for several, forward for one); last logits [1, V]."""
    t = torch.tensor(ids)
    return model.prefill(cache, t) if len(ids) > 1 else model.forward(cache, t)


def _decode(model, cache: ModelCache, logits: torch.Tensor, n: int) -> list[int]:
    """Greedy as generate() runs it: every sampled token is fed but the last."""
    tokens = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        tokens.append(int(model.forward(cache, torch.tensor(tokens[-1:]))[-1].argmax()))
    return tokens


def test_resuming_from_a_snapshot_equals_the_cold_run_and_leaves_the_snapshot_intact(model):
    """Prompt, then the rest of the request: resumed from the prompt's snapshot, the logits are bit for bit
    those of a cold run fed in the same two steps, twice over (the first resume did not touch the
    snapshot); greedy tokens equal the single-pass run over the whole sequence."""
    prompt, rest = _ids(40, 1), _ids(9, 2)
    cold = model.make_cache()
    _feed(model, cold, prompt)
    cold_logits = _feed(model, cold, rest)
    cold_tokens = _decode(model, cold, cold_logits, 6)

    live = model.make_cache()
    _feed(model, live, prompt)
    prefixes = PrefixCache(BIG)
    prefixes.save(prompt, live)
    _feed(model, live, _ids(30, 3))  # the live cache moves on to another request
    for _ in range(2):
        state, n = prefixes.match(prompt + rest)
        assert n == len(prompt) and state.offset == n and state.token_ids == prompt
        logits = _feed(model, state, rest)
        assert torch.equal(logits, cold_logits)
        assert _decode(model, state, logits, 6) == cold_tokens
    assert greedy(model, torch.tensor(prompt + rest), 6)[0] == cold_tokens


def test_an_identical_resend_feeds_only_the_last_prompt_token(model):
    """The protocol for resends: save the state after prompt[:-1] (match never returns the whole request:
    its last logits need one token fed). A resend resumes there and feeds one token: the same logits as
    the first request. A snapshot of the whole prompt alone gives no hit."""
    prompt = _ids(25, 4)
    prefixes = PrefixCache(BIG)
    live = model.make_cache()
    _feed(model, live, prompt[:-1])
    prefixes.save(prompt[:-1], live)
    first = _feed(model, live, prompt[-1:])
    prefixes.save(prompt, live)

    state, n = prefixes.match(prompt)
    assert n == len(prompt) - 1
    assert torch.equal(_feed(model, state, prompt[n:]), first)

    whole_only = PrefixCache(BIG)
    whole_only.save(prompt, live)
    assert whole_only.match(prompt) == (None, 0)
    assert whole_only.match(prompt + [7])[1] == len(prompt)


def test_an_agent_loop_resumes_from_the_reply_snapshot(model):
    """prompt1 -> reply1 (snapshots after prompt1[:-1] and after the reply) -> prompt2 = prompt1 + reply1 +
    tool result: the match is the reply's snapshot, and the reply to prompt2 equals the cold run's."""
    prompt1 = _ids(30, 5)
    prefixes = PrefixCache(BIG)
    live = model.make_cache()
    _feed(model, live, prompt1[:-1])
    prefixes.save(prompt1[:-1], live)
    reply1 = _decode(model, live, _feed(model, live, prompt1[-1:]), 5)
    fed = prompt1 + reply1[:-1]  # the last sampled token is never fed
    prefixes.save(fed, live)
    assert len(prefixes) == 2

    prompt2 = prompt1 + reply1 + _ids(12, 6)
    state, n = prefixes.match(prompt2)
    assert n == len(fed)
    resumed = _decode(model, state, _feed(model, state, prompt2[n:]), 5)
    assert resumed == greedy(model, torch.tensor(prompt2), 5)[0]


def _state(n: int, rope_delta: int = 0) -> ModelCache:
    """A hand-made state after n tokens: one KV layer of 32 bytes a token, one DeltaNet layer of 16 bytes."""
    kv = KVCache(1, 4, torch.float32, torch.device("cpu"))
    kv.append(torch.randn(1, n, 4), torch.randn(1, n, 4))
    delta = DeltaNetState(1, 2, 1, 1, 2, torch.float32, torch.device("cpu"))
    delta.recurrent.normal_()
    return ModelCache([kv, delta], offset=n, rope_delta=rope_delta)


def _seq(n: int, first: int = 0) -> list[int]:
    return list(range(first, first + n))


def test_a_snapshot_is_a_compact_copy_with_offset_rope_delta_and_ids():
    """KV copied up to its length (not the grown buffer), and the copy does not change when the live cache
    is written in place afterwards; offset, rope_delta and token ids come back."""
    live = _state(10, rope_delta=-3)
    assert live.layers[0].k.shape[1] == 256 and live.used_nbytes == 10 * 32 + 16
    saved = [live.layers[0].k[:, :10].clone(), live.layers[1].recurrent.clone(), live.layers[1].conv.clone()]
    prefixes = PrefixCache(BIG)
    prefixes.save(_seq(10), live)
    assert prefixes.nbytes == 10 * 32 + 16
    live.layers[0].k.fill_(0)
    live.layers[1].recurrent.fill_(0)
    live.layers[1].conv.fill_(1)
    live.layers[1].started = True
    state, n = prefixes.match(_seq(11))
    assert n == 10 and (state.offset, state.rope_delta, state.token_ids) == (10, -3, _seq(10))
    assert state.layers[0].k.shape[1] == 10 and torch.equal(state.layers[0].k, saved[0])
    assert torch.equal(state.layers[1].recurrent, saved[1]) and torch.equal(state.layers[1].conv, saved[2])
    assert state.layers[1].started is False
    with torch.inference_mode():  # the copy is made of inference tensors, like those the model writes
        state.layers[0].k.fill_(5)  # nor does writing the returned copy
    assert torch.equal(prefixes.match(_seq(11))[0].layers[0].k, saved[0])


def test_the_longest_kept_prefix_wins_and_keys_must_match():
    prefixes = PrefixCache(BIG)
    prefixes.save(_seq(4), _state(4))
    prefixes.save(_seq(8), _state(8))
    prefixes.save(_seq(6, first=100), _state(6))
    assert prefixes.match(_seq(20))[1] == 8
    assert prefixes.match(_seq(8))[1] == 4  # an identical request needs one token to feed
    assert prefixes.match(_seq(4) + [99, 98])[1] == 4
    assert prefixes.match(_seq(3)) == (None, 0)
    assert prefixes.match([5, 6, 7]) == (None, 0)

    prefixes.save(_seq(12), _state(12), key="images-a")
    assert prefixes.match(_seq(20))[1] == 8  # text requests never resume an image request's state
    assert prefixes.match(_seq(20), key="images-b") == (None, 0)
    assert prefixes.match(_seq(20), key="images-a")[1] == 12


def test_least_recently_used_entries_go_first_within_max_bytes():
    prefixes = PrefixCache((3 * 32 + 16) + (7 * 32 + 16))  # room for the 3- and 7-token states only
    prefixes.save(_seq(3), _state(3))
    prefixes.save(_seq(5, first=50), _state(5))
    prefixes.match(_seq(4))  # touches the first
    prefixes.save(_seq(7, first=90), _state(7))
    assert len(prefixes) == 2 and prefixes.holds(_seq(3)) and not prefixes.holds(_seq(5, first=50))
    assert prefixes.match(_seq(4))[1] == 3
    assert prefixes.match(_seq(6, first=50)) == (None, 0)
    prefixes.save(_seq(3), _state(3))  # saving the same ids again replaces, it does not duplicate
    assert len(prefixes) == 2 and prefixes.nbytes == (3 * 32 + 16) + (7 * 32 + 16)


def test_bytes_are_the_only_bound_on_how_many_states_are_kept():
    prefixes = PrefixCache(BIG)
    for i in range(40):
        prefixes.save(_seq(2, first=10 * i), _state(2))
    assert len(prefixes) == 40 and prefixes.holds(_seq(2)) and not prefixes.holds(_seq(2), key="x")


def test_max_bytes_evicts_the_oldest_and_a_too_large_state_is_not_kept():
    size = {n: n * 32 + 16 for n in (2, 3, 4, 20)}
    prefixes = PrefixCache(size[2] + size[3] + size[4] - 1)
    prefixes.save(_seq(2), _state(2))
    prefixes.save(_seq(3, first=10), _state(3))
    prefixes.save(_seq(4, first=20), _state(4))  # does not fit with both others: the oldest goes
    assert prefixes.nbytes == size[3] + size[4] <= prefixes.max_bytes
    assert prefixes.match(_seq(3)) == (None, 0)
    assert prefixes.match(_seq(5, first=20))[1] == 4

    prefixes.save(_seq(20, first=200), _state(20))  # larger than max_bytes alone
    assert len(prefixes) == 2 and prefixes.nbytes == size[3] + size[4]
    assert prefixes.match(_seq(21, first=200)) == (None, 0)

    prefixes.clear()
    assert prefixes.nbytes == 0 and prefixes.match(_seq(5, first=20)) == (None, 0)


def test_a_state_saved_under_other_ids_is_refused():
    with pytest.raises(ValueError, match="fed 5 tokens"):
        PrefixCache(BIG).save(_seq(4), _state(5))


def test_a_videos_sampling_is_part_of_its_state_key(tmp_path):
    """One clip sampled at another fps or max_frames gives other frames: its states must not match."""
    from qwen35_lite.runtime.video import Video
    from qwen35_lite.server.worker import image_key

    clip = tmp_path / "c.mp4"
    clip.write_bytes(b"not decoded here")
    keys = {
        image_key([Video(str(clip), fps, frames)]) for fps, frames in [(None, None), (1.0, None), (None, 8)]
    }
    assert len(keys) == 3
    assert image_key([Video(str(clip), 1.0, None)]) == image_key([Video(str(clip), 1.0, None)])
