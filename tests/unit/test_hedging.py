"""Hedged requests: the budget under a burst, the deadline check, and exactly one answer per request."""

from __future__ import annotations

import asyncio

import pytest

from app_server import metrics
from app_server.hedging import MAX_BALANCE, MIN_SAMPLES, HedgeBudget, Hedger, RoundTrips
from shared.protocol import Message, Status


def sample(model: str, outcome: str) -> float:
    return metrics.HEDGES.labels(model, outcome)._value.get()


def reply(worker: str, status: str = Status.OK) -> Message:
    return Message({"status": status, "worker": worker})


class Workers:
    """Two workers whose answers the test releases: ``answer[name].set()``; cancellations recorded."""

    def __init__(self, *names: str) -> None:
        self.answer = {n: asyncio.Event() for n in names}
        self.status = dict.fromkeys(names, Status.OK)
        self.fail: set[str] = set()
        self.called: list[str] = []
        self.cancelled: list[str] = []

    async def call(self, name: str) -> Message:
        self.called.append(name)
        try:
            await self.answer[name].wait()
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise
        if name in self.fail:
            raise ConnectionError(name)
        return reply(name, self.status[name])


def test_the_budget_never_exceeds_its_share_under_a_burst():
    budget = HedgeBudget(0.05)
    granted = 0
    for _ in range(1000):  # a burst of 1000 requests, every one of them slow enough to hedge
        budget.deposit()
        granted += budget.try_withdraw()
    assert granted == 50
    for _ in range(10_000):  # a long quiet spell banks only a few
        budget.deposit()
    assert budget.balance == MAX_BALANCE
    granted = sum(budget.try_withdraw() for _ in range(100))
    assert granted == MAX_BALANCE


def test_the_p95_needs_enough_samples_and_follows_them():
    rtts = RoundTrips()
    for _ in range(MIN_SAMPLES - 1):
        rtts.add(0.002)
    assert rtts.p95_s is None
    rtts.add(0.002)
    assert rtts.p95_s == pytest.approx(0.008)  # all alike: four times the median, not the p95
    for i in range(600):  # the window rolls: old samples leave; a long tail sets the p95
        rtts.add(0.080 if i % 10 == 0 else 0.010)
    assert rtts.p95_s == pytest.approx(0.080)


async def hedged(hedger: Hedger, workers: Workers, remaining: float = 10.0, second: str | None = "b") -> Message:
    return await hedger.call("m", "a", workers.call, lambda: second, lambda: remaining)


async def test_a_fast_answer_is_never_hedged():
    hedger, workers = Hedger(1.0, after_s=0.05), Workers("a", "b")
    workers.answer["a"].set()
    assert (await hedged(hedger, workers)).header["worker"] == "a"
    assert workers.called == ["a"]


async def test_a_slow_call_is_hedged_and_exactly_one_answer_comes_back():
    hedger, workers = Hedger(1.0, after_s=0.01), Workers("a", "b")
    task = asyncio.ensure_future(hedged(hedger, workers))
    await asyncio.sleep(0.05)
    assert workers.called == ["a", "b"]
    workers.answer["b"].set()
    workers.answer["a"].set()  # both answer in the same turn: still one answer, the other dropped
    won, lost = (sample("m", o) for o in ("won", "lost"))
    got = await task
    assert got.header["worker"] == "a"  # on a tie the first worker's answer, and only it
    assert (sample("m", "won") - won, sample("m", "lost") - lost) == (0, 1)
    assert not any(t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done())


async def test_the_hedge_wins_and_the_slow_call_is_cancelled_on_the_wire():
    hedger, workers = Hedger(1.0, after_s=0.01), Workers("a", "b")
    task = asyncio.ensure_future(hedged(hedger, workers))
    await asyncio.sleep(0.05)
    workers.answer["b"].set()
    assert (await task).header["worker"] == "b"
    assert workers.cancelled == ["a"]  # WorkerPool.call sends the cancel message on this cancellation


async def test_a_failed_first_call_leaves_the_hedge_to_answer():
    hedger, workers = Hedger(1.0, after_s=0.01), Workers("a", "b")
    workers.fail.add("a")
    task = asyncio.ensure_future(hedged(hedger, workers))
    await asyncio.sleep(0.05)
    workers.answer["a"].set()
    await asyncio.sleep(0.01)
    assert not task.done()  # a failure is not an answer while the hedge may still bring one
    workers.answer["b"].set()
    assert (await task).header["worker"] == "b"


async def test_an_overloaded_hedge_does_not_beat_a_good_first_answer():
    hedger, workers = Hedger(1.0, after_s=0.01), Workers("a", "b")
    workers.status["b"] = Status.OVERLOADED
    task = asyncio.ensure_future(hedged(hedger, workers))
    await asyncio.sleep(0.05)
    workers.answer["b"].set()
    await asyncio.sleep(0.01)
    workers.answer["a"].set()
    assert (await task).header["worker"] == "a"


async def test_no_hedge_when_the_deadline_cannot_cover_a_second_try():
    hedger, workers = Hedger(1.0, after_s=0.01), Workers("a", "b")
    task = asyncio.ensure_future(hedged(hedger, workers, remaining=0.005))
    await asyncio.sleep(0.05)
    workers.answer["a"].set()
    assert (await task).header["worker"] == "a"
    assert workers.called == ["a"]


async def test_no_hedge_without_budget_or_a_second_worker():
    hedger, workers = Hedger(0.05, after_s=0.01), Workers("a", "b")
    hedger.budgets["m"] = HedgeBudget(0.05, balance=0.0)
    task = asyncio.ensure_future(hedged(hedger, workers))
    await asyncio.sleep(0.05)
    workers.answer["a"].set()
    await task
    task = asyncio.ensure_future(hedged(Hedger(1.0, after_s=0.01), workers, second=None))
    await task
    assert workers.called == ["a", "a"]


async def test_a_caller_that_leaves_cancels_the_call_it_waits_for():
    hedger, workers = Hedger(1.0, after_s=10.0), Workers("a", "b")
    hedger.budgets["m"] = HedgeBudget(1.0)
    task = asyncio.ensure_future(hedged(hedger, workers))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert workers.cancelled == ["a"]
