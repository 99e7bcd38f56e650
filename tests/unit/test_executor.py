"""Model threads hand results and failures back to the event loop, once each."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ml_worker.executor import Executor


async def _outcome(threads: Executor, job) -> tuple[object, BaseException | None, str]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[object, BaseException | None, str]] = loop.create_future()
    ran_on: list[str] = []

    def wrapped():
        ran_on.append(threading.current_thread().name)
        return job()

    threads.submit(wrapped, lambda result, error: done.set_result((result, error, ran_on[0])))
    result, error, name = await asyncio.wait_for(done, 5)
    assert threading.current_thread() is threading.main_thread()  # the callback ran on the loop
    return result, error, name


async def test_a_result_comes_back_on_the_loop_from_an_executor_thread() -> None:
    threads = Executor(1)
    try:
        result, error, name = await _outcome(threads, lambda: 42)
    finally:
        threads.shutdown()
    assert (result, error) == (42, None)
    assert name.startswith("executor_")


async def test_an_exception_is_delivered_not_lost_and_the_thread_keeps_working() -> None:
    threads = Executor(1)
    try:

        def boom() -> None:
            raise ValueError("bad batch")

        result, error, _ = await _outcome(threads, boom)
        assert result is None and isinstance(error, ValueError)
        result, error, _ = await _outcome(threads, lambda: "next")
        assert (result, error) == ("next", None)
    finally:
        threads.shutdown()


async def test_shutdown_stops_every_thread() -> None:
    threads = Executor(3)
    await _outcome(threads, lambda: None)
    threads.shutdown()
    for t in threads._threads:
        t.join(5)
        assert not t.is_alive()


def test_submit_needs_a_running_loop() -> None:
    threads = Executor(1)
    try:
        with pytest.raises(RuntimeError):
            threads.submit(lambda: None, lambda result, error: None)
    finally:
        threads.shutdown()
