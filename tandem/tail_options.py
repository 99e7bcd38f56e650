"""Options of the overload and tail-latency features: app-tier admission, hedged requests, and the
worker's fault injection for drills. Kept here so ``tandem/cli.py`` names each in one line."""

from __future__ import annotations

from typing import Annotated

import typer

FaultStallMs = Annotated[
    float | None, typer.Option(help="Drills: stall this long before --fault-stall-percent % of batches.")
]
FaultStallPercent = Annotated[float | None, typer.Option(help="Drills: share of batches stalled, in percent.")]
Admission = Annotated[
    bool | None,
    typer.Option("--admission/--no-admission", help="Adaptive concurrency limit and loop-lag guard (default on)."),
]
AdmissionMaxLagMs = Annotated[
    float | None, typer.Option(help="Refuse new predictions (503) while the event loop lags more than this.")
]
HedgeAfterMs = Annotated[
    float | None,
    typer.Option(help="Hedge a call unanswered this long (default: the model's rolling p95 round trip)."),
]
HedgeBudget = Annotated[float | None, typer.Option(help="Hedges as a share of requests, at most (0 turns them off).")]
ReusePort = Annotated[
    bool | None, typer.Option("--reuse-port", help="Bind with SO_REUSEPORT: several app servers share the port.")
]
Apps = Annotated[
    int, typer.Option(min=1, help="App server processes, sharing --port (SO_REUSEPORT): more cores for HTTP.")
]
