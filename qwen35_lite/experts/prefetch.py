"""The prefetch thread of TieredExperts: runs the newest hint per layer in the background.

`submit(layer, experts)` replaces that layer's pending job; `cancel(layer)` (called by every `get` of the
layer) stops it between two expert reads. The job is a bound method given at construction
(`job(layer, experts, cancel)`), held weakly so a dropped cache is freed.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

Job = Callable[[int, list[int], threading.Event], None]


class Prefetcher:
    def __init__(self, job: Job) -> None:
        self._job = weakref.WeakMethod(job)
        self._jobs: OrderedDict[int, tuple[list[int], threading.Event]] = OrderedDict()
        self._active: tuple[int, threading.Event] | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.errors = 0

    def submit(self, layer: int, experts: list[int]) -> None:
        with self._cv:
            old = self._jobs.pop(layer, None)
            if old:
                old[1].set()
            self._jobs[layer] = (experts, threading.Event())
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="expert-prefetch", daemon=True)
                self._thread.start()
            self._cv.notify()

    def cancel(self, layer: int) -> None:
        with self._cv:
            job = self._jobs.pop(layer, None)
            if job:
                job[1].set()
            if self._active and self._active[0] == layer:
                self._active[1].set()

    def wait_idle(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self._jobs and self._active is None)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for _, cancel in self._jobs.values():
                cancel.set()
            self._jobs.clear()
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs or self._closed)
                if self._closed:
                    return
                layer, (experts, cancel) = self._jobs.popitem(last=False)
                self._active = (layer, cancel)
            job = self._job()
            try:
                if job is None:
                    return
                job(layer, experts, cancel)
            except Exception:  # a failed prefetch is only a later miss: the get reads it again
                self.errors += 1
            finally:
                del job
                with self._cv:
                    self._active = None
                    self._cv.notify_all()
