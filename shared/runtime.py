"""Process-level tuning shared by the long-running servers."""

from __future__ import annotations

import gc


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
