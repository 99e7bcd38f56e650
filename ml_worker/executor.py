"""The executor: the threads that run batches, shared by every model a worker serves, and the
shortest way back to the event loop.

A batch goes in as a job; its result comes back as one callback on the loop. ``run_in_executor``
does the same with more hops: a concurrent future, an asyncio future chained to it and a task
awaiting that, so the code after the model resumes two loop turns after the thread finished, and
each piece is allocated per batch. At low load, where every request is its own batch, that
bookkeeping was a visible share of the worker's time per request (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Done = Callable[[Any, BaseException | None], None]
"""Called on the loop with ``(result, None)`` or ``(None, error)``."""
Job = tuple[asyncio.AbstractEventLoop, Callable[[], Any], Done]


class Executor:
    """``n`` threads taking jobs from one queue: as many batches run at once as there are threads.

    Which model's batch runs next is decided before a job gets here (``sharing.FairShare``); this only
    runs what it is given.
    """

    def __init__(self, n: int, name: str = "executor") -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()  # None: exit
        # Daemon threads: a model stuck in native code must not keep a stopping worker alive.
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[], Any], done: Done) -> None:
        """Run ``job`` on an executor thread; ``done`` gets its outcome on the calling event loop."""
        self._jobs.put((asyncio.get_running_loop(), job, done))

    def shutdown(self) -> None:
        """Let the threads finish their current job and exit; jobs still queued are not run."""
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            loop, job, done = item
            try:
                result, error = job(), None
            except BaseException as exc:  # every batch is answered, whatever the model raised
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop closed while the model ran: nobody is left to answer
                logger.warning("event loop closed before a batch's result could be delivered")
                return
