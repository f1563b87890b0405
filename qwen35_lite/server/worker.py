"""One generation at a time on the one model: a worker thread owns the engine and the model state, requests
wait in order in a bounded queue, and each job's events reach its HTTP handler on the event loop."""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from ..engine import Engine
from ..errors import Qwen35Error
from ..generate import Finished, GenerationRequest, TokenEvent, check_context, generate, prefill
from ..model.cache import ModelCache
from ..sampling import SamplingParams
from ..state_cache import PrefixCache
from ..tokenizer import StreamDecoder


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
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None

    def emit(self, event: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop closed (the server is shutting down): nobody is listening
            self.cancel.set()


class QueueFull(Exception):
    """Every place in the queue is taken: the request is answered 503 at once."""


class Worker:
    """Runs jobs one after another on a daemon thread. `capacity` counts waiting and running jobs."""

    def __init__(self, engine: Engine, prefix: PrefixCache, capacity: int = 8) -> None:
        self.engine, self.prefix, self.capacity = engine, prefix, capacity
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="qwen35-lite-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull
            self._pending += 1
        job.loop = asyncio.get_running_loop()
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if not job.cancel.is_set():  # its client left while it waited
                    self._run(job)
            except Qwen35Error as e:
                job.emit(e)
            except Exception as e:  # our bug: the request fails, the server keeps serving
                job.emit(e)
            finally:
                with self._lock:
                    self._pending -= 1

    def _run(self, job: Job) -> None:
        eng = self.engine
        model, ids = eng.model, job.prompt_ids
        embeds = positions = None
        delta = 0
        cache, hit = None, 0
        if job.images:
            from ..multimodal import image_prompt  # PIL and the tower only for prompts with images

            cache = model.make_cache()
            mm = image_prompt(eng, ids, job.images, cache)
            ids, embeds, positions, delta = mm.ids, mm.embeds, mm.positions, mm.rope_delta
        else:
            check_context(model.make_cache(), len(ids), eng.max_context, model.cfg.max_position_embeddings)
            cache, hit = self._resume(ids)
        job.emit(Started(hit, len(ids)))
        think_open, think_close = eng.tokenizer.token_id("<think>"), eng.tokenizer.token_id("</think>")
        req = GenerationRequest(
            prompt_ids=ids[cache.offset :],
            params=job.params,
            max_new_tokens=job.max_new_tokens,
            stop_ids=eng.defaults.stop_ids,
            think_ids=(think_open, think_close),
            start_in_thinking=job.start_in_thinking,
            embeds=embeds,
            positions=positions,
            rope_delta=delta,
            max_context=eng.max_context,
        )
        for event in generate(model, cache, req, StreamDecoder(eng.tokenizer), cancel=job.cancel):
            if isinstance(event, Finished) and not job.images:
                self.prefix.save(list(cache.token_ids), cache)  # a copy is kept: the next turn starts there
            job.emit(event)

    def _resume(self, ids: list[int]) -> tuple[ModelCache, int]:
        """The state to continue from and how many prompt tokens it already holds.

        DeltaNet state cannot be rewound, so snapshots are kept at the prompt less its last token (an
        identical resend then feeds one token and samples the same first token) and at the end of each
        reply. PrefixCache.match returns a copy of the longest kept proper prefix of `ids` and save keeps a
        copy, so the state handed back is this request's own (state_cache.py describes the protocol)."""
        model = self.engine.model
        cache, hit = self.prefix.match(ids)
        if cache is None:
            cache, hit = model.make_cache(), 0
        head = ids[:-1]
        if len(head) > hit:
            prefill(model, cache, GenerationRequest(prompt_ids=head[hit:]))
            self.prefix.save(list(head), cache)
        return cache, hit


TokenOrEnd = TokenEvent | Finished | Started | Exception
