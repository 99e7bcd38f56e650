"""Process-level tuning shared by the long-running servers."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any


def tune_gc() -> None:
    """Fewer, cheaper garbage collections on the request path.

    Everything imported and built at start-up (MLflow, pydantic models, ONNX Runtime bindings) is
    moved out of the collector's sight with ``gc.freeze()``, and the young-generation threshold is
    raised so per-request garbage (mostly freed by reference counting anyway) does not trigger a
    collection every few hundred allocations: each collection is a pause every request in flight
    waits out.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def freeze_long_lived() -> None:
    """Move everything alive now out of the collector's sight, without collecting first.

    For objects built after start-up that live as long as the process or a model version does (a
    loaded model, the registry client and its SQL metadata): left in the oldest generation, every
    full collection walks them all, a pause of about 100 ms on the request path measured with the
    large demo model. Frozen objects are still freed by reference counting when dropped; only
    reference cycles among them would wait for an unfreeze, which nothing here relies on.
    """
    gc.freeze()


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a server's event loop on uvloop when installed (``uvicorn[standard]`` brings it), the loop
    uvicorn already gives the app server, so both tiers run the same loop. Measured for the worker at
    50 req/s against asyncio's own loop: no difference in latency (docs/benchmarks.md); its callbacks
    and thread-safe wake-ups are cheaper per call, which is what the worker's loop mostly does."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency of uvicorn[standard]
        asyncio.run(main)
        return
    uvloop.run(main)
