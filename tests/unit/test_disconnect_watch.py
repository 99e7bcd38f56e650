"""``DisconnectWatch``: a caller that leaves cancels its request; one that stays costs no garbage.

At thousands of requests per second, reference cycles left per request (a cancelled task, its
CancelledError and traceback) made 20-30 ms collector pauses: the p99 tail. So besides the behaviour,
this checks that an ordinary request leaves nothing for the cyclic collector.
"""

from __future__ import annotations

import asyncio
import gc

from starlette.requests import Request

from app_server.disconnect import WATCHERS, DisconnectWatch

SCOPE = {"type": "http", "method": "POST", "path": "/predict", "headers": []}


def _request(gone: asyncio.Event) -> Request:
    """``receive()`` as an ASGI server gives it once the body is read: ``http.disconnect`` when the
    client leaves or after the response was sent, nothing before."""

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    return Request(SCOPE, receive)


async def test_a_client_that_leaves_gets_its_request_cancelled():
    gone = asyncio.Event()

    async def handler() -> str:
        watch = DisconnectWatch(_request(gone), after_s=0.0)
        try:
            await asyncio.sleep(10)  # waiting on a worker
            return "answered"
        except asyncio.CancelledError:
            assert watch.fired
            asyncio.current_task().uncancel()
            return "cancelled"
        finally:
            watch.stop()

    task = asyncio.ensure_future(handler())
    await asyncio.sleep(0.01)
    gone.set()
    assert await asyncio.wait_for(task, 1) == "cancelled"


async def test_an_answered_request_ends_its_watcher_without_cancelling_anything_or_leaving_cycles():
    watchers: list[asyncio.Future[None]] = []

    async def handler(gone: asyncio.Event) -> bool:
        watch = DisconnectWatch(_request(gone), after_s=0.0)
        await asyncio.sleep(0.002)  # long enough for the watcher to start
        watchers.extend(WATCHERS)
        watch.stop()
        gone.set()  # the response went out: receive() now says http.disconnect
        await asyncio.sleep(0)
        return watch.fired

    await handler(asyncio.Event())  # first use: lazily built module state is not per-request garbage
    await asyncio.sleep(0.01)
    gc.collect()
    gc.disable()
    try:
        fired = [await handler(asyncio.Event()) for _ in range(50)]
        await asyncio.sleep(0.01)
        assert not any(fired)
        assert len(watchers) == 51 and not WATCHERS
        # Every watcher ended on its own; a cancelled one leaves its CancelledError's traceback holding
        # the frame that holds the watch: with a real server, the cycles that made the pauses.
        assert not any(w.cancelled() for w in watchers)
        # And nothing of theirs is left to the cyclic collector (other tests' leftovers may be).
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        mine = {id(w) for w in watchers}
        ours = [o for o in gc.garbage if isinstance(o, DisconnectWatch) or id(o) in mine]
        assert not ours
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_a_request_answered_before_the_delay_starts_no_watcher():
    watch = DisconnectWatch(_request(asyncio.Event()), after_s=0.05)
    watch.stop()
    await asyncio.sleep(0.1)
    assert not WATCHERS and not watch.fired
