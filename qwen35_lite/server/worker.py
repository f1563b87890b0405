"""One generation at a time on the one model: a worker thread owns the engine and the model state, requests
wait in order in a bounded queue, and each job's events reach its HTTP handler on the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import Qwen35Error
from ..model.cache import ModelCache
from ..runtime.constrain import answer_constraint
from ..runtime.engine import Engine
from ..runtime.generate import (
    Finished,
    GenerationRequest,
    check_context,
    check_vocab,
    generate,
    prefill,
)
from ..runtime.sampling import SamplingParams
from ..text.tokenizer import StreamDecoder
from .media import hide_paths
from .state_cache import PrefixCache


@dataclass
class Started:
    cached_tokens: int  # prompt tokens whose state was reused
    prompt_tokens: int  # the prompt's length (image placeholders expanded)


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    start_in_thinking: bool
    images: list[str] = field(default_factory=list)
    grammar: str | None = None  # the answer must follow it (protocol.answer_grammar)
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    client_left: bool = False  # set with cancel when its client disconnected
    kept: tuple[str, tuple[int, ...]] | None = None  # the PrefixCache name of the state it ended in

    def emit(self, event: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop closed (the server is shutting down): nobody is listening
            self.cancel.set()


class QueueFull(Exception):
    """Every place in the queue is taken: the request is answered 503 at once."""


class Skipped(Exception):
    """Emitted for a job cancelled before its reply began (while it waited, or in its prefill)."""


class _Stopped(Exception):
    """Raised from the prefill's and the vision tower's progress callbacks once the job is cancelled."""


def _stop_if(cancel: threading.Event) -> Callable[[int, int], None]:
    def check(done: int, total: int) -> None:
        if cancel.is_set():
            raise _Stopped

    return check


Script = Callable[[str], str]
"""Tests only: the reply text for a prompt text, spoken instead of the model's tokens (random weights never
call a tool or write JSON). Off unless create_app is given one (serve: QWEN35_LITE_TEST_SCRIPT)."""


class Worker:
    """Runs jobs one after another on a daemon thread. `capacity` counts waiting and running jobs.

    script: tests only (Script); the request runs as any other, only the reply's tokens are scripted."""

    def __init__(
        self, engine: Engine, prefix: PrefixCache, capacity: int = 8, script: Script | None = None
    ) -> None:
        self.engine, self.prefix, self.capacity, self.script = engine, prefix, capacity, script
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.closing = False  # set by cancel_all: the server is stopping
        self._running: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="qwen35-lite-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._pending >= self.capacity or self.closing:
                raise QueueFull
            self._pending += 1
        job.loop = asyncio.get_running_loop()
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def cancel_all(self) -> None:
        """Cancel the running job and every waiting one (the server is stopping). Safe in a signal
        handler: it takes no lock (the interrupted thread may hold one)."""
        self.closing = True
        for job in [self._running, *list(self._jobs.queue)]:
            if job is not None:
                job.cancel.set()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._running = job
            try:
                if job.cancel.is_set():  # its client left while it waited, or the server stops
                    job.emit(Skipped())
                else:
                    self._run(job)
            except _Stopped:  # nothing was kept: the state it was filling is dropped
                job.emit(Skipped())
            except Qwen35Error as e:
                job.emit(e)
            except Exception as e:  # our bug: the request fails, the server keeps serving
                job.emit(e)
            finally:
                self._running = None
                with self._lock:
                    self._pending -= 1

    def _run(self, job: Job) -> None:
        eng = self.engine
        model = eng.model
        prompt = Prompt(job.prompt_ids)
        if job.images:
            from ..runtime.multimodal import image_prompt  # PIL and the tower only for prompts with images

            # The whole prompt from position 0 (a fresh cache): a kept state resumes it part way.
            try:
                mm = image_prompt(
                    eng, job.prompt_ids, job.images, model.make_cache(), on_encode=_stop_if(job.cancel)
                )
            except Qwen35Error as e:  # named by their place in the request, not by the server's paths
                raise hide_paths(e, job.images) from None
            prompt = Prompt(mm.ids, image_key(job.images), mm.embeds, mm.positions, mm.rope_delta)
        # Checked whole here: the head is fed by prefill alone, which checks neither.
        check_context(model.make_cache(), len(prompt.ids), eng.max_context, model.cfg.max_position_embeddings)
        check_vocab(prompt.ids, model.cfg.vocab_size)
        cache, hit = self._resume(prompt, job.cancel)
        job.emit(Started(hit, len(prompt.ids)))
        think_open, think_close = eng.tokenizer.token_id("<think>"), eng.tokenizer.token_id("</think>")
        req = prompt.part(cache, len(prompt.ids))
        req.params, req.max_new_tokens, req.stop_ids = job.params, job.max_new_tokens, eng.defaults.stop_ids
        req.think_ids, req.start_in_thinking = (think_open, think_close), job.start_in_thinking
        req.max_context = eng.max_context
        req.constraint = answer_constraint(eng, job.grammar)
        if self.script is not None:
            req.script = self._scripted(prompt.ids, job.start_in_thinking)
        decoder = StreamDecoder(eng.tokenizer)
        for event in generate(model, cache, req, decoder, cancel=job.cancel, threads=eng.threads):
            if isinstance(event, Finished):  # a copy is kept: the next turn of the conversation starts there
                self.prefix.save(list(cache.token_ids), cache, prompt.key)
                job.kept = (prompt.key, tuple(cache.token_ids))
            job.emit(event)

    def _scripted(self, prompt_ids: list[int], thinking: bool) -> list[int]:
        """The script's reply for this prompt as token ids, which generate emits in place of sampled ones
        (GenerationRequest.script); a reply that starts in thinking closes it first, as the model does."""
        tokenizer = self.engine.tokenizer
        text = self.script(tokenizer.decode(prompt_ids))
        return tokenizer.encode(("</think>\n\n" if thinking else "") + text)

    def _resume(self, prompt: Prompt, cancel: threading.Event) -> tuple[ModelCache, int]:
        """The state to continue from and how many prompt tokens it already holds.

        DeltaNet state cannot be rewound, so snapshots are kept at the prompt less its last token (an
        identical resend then feeds one token and samples the same first token) and at the end of each
        reply. PrefixCache.match returns a copy of the longest kept proper prefix of the ids and save keeps
        a copy, so the state handed back is this request's own (state_cache.py describes the protocol)."""
        cache, hit = self.prefix.match(prompt.ids, prompt.key)
        if cache is None:
            cache, hit = self.engine.model.make_cache(), 0
        head = len(prompt.ids) - 1  # the template ends the prompt with text: every image is in the head
        if head > hit:
            # A long prompt's prefill stops at its next layer once the job is cancelled.
            prefill(self.engine.model, cache, prompt.part(cache, head), on_progress=_stop_if(cancel))
            self.prefix.save(prompt.ids[:head], cache, prompt.key)
        return cache, hit


@dataclass
class Prompt:
    """A prompt as fed: ids, and for images their embeddings, absolute positions and rope shift."""

    ids: list[int]
    key: str = ""  # PrefixCache key: the images' hash ("" for text), so states of other pictures never match
    embeds: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    rope_delta: int = 0

    def part(self, cache: ModelCache, end: int) -> GenerationRequest:
        """The request feeding ids[cache.offset:end] on top of `cache`; the rope shift still owed is what
        the whole prompt shifts less what the cache already carries."""
        start = cache.offset
        return GenerationRequest(
            prompt_ids=self.ids[start:end],
            embeds=None if self.embeds is None else self.embeds[start:end],
            positions=None if self.positions is None else self.positions[:, start:end],
            rope_delta=self.rope_delta - cache.rope_delta,
        )


def image_key(paths: list) -> str:
    """A hash of the images' and videos' bytes, in order, and of each video's sampling (fps, max_frames):
    equal placeholder ids do not mean equal pictures or equal frames."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).expanduser().read_bytes())
        if hasattr(path, "fps"):  # a runtime.video.Video: other sampling, other frames
            digest.update(repr((path.fps, path.max_frames)).encode())
        digest.update(b"\0")
    return digest.hexdigest()
