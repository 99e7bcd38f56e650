"""Live drift: how far the instances and predictions an app server sees have moved from the version's
reference profile, as gauges (``tandem_feature_drift_psi``, ``tandem_prediction_drift_psi``).

Off the request path: a request only appends a reference to its (already parsed) instances and its
answer to a bounded queue (:meth:`DriftMonitor.offer`, a deque append). A thread wakes every
``drift_interval_s``, takes what queued up, turns each feature's values into the reference's bin
numbers a column at a time (``shared/profile_bins.py``), writes them into a ring buffer of the last
``drift_window`` rows per (model, version), and recomputes each column's PSI from bin counts of the
whole window (one ``bincount`` per column). Nothing is parsed twice, and nothing here can fail a request.

A version whose workers describe no reference profile, or one that does not fit its inputs (other
features, other kinds), has no drift gauges; that is logged once as a warning, and serving is the same.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from app_server import metrics
from shared.features import FeatureSpec
from shared.profile_bins import ColumnBins
from shared.reference_profile import (
    ProfileError,
    kinds_of_signature,
    kinds_of_spec,
    parse,
    prediction_values,
)

logger = logging.getLogger(__name__)

STALE_S = 600.0
"""A version whose window took no row for this long loses its gauges (a retired version must not keep an
alert firing); traffic brings it back with a fresh window."""
PENDING_MAX = 10_000
"""Requests waiting for the drift thread at most; beyond, the oldest are skipped (drift is a sample anyway)."""

Described = Callable[[str, str], Mapping[str, Any] | None]


class VersionWindow:
    """The last ``size`` rows of one (model, version), as bin numbers per column against its reference."""

    def __init__(self, model: str, version: str, columns: list[ColumnBins], prediction: ColumnBins | None, size: int):
        self.model, self.version = model, version
        self.columns = columns
        self.prediction = prediction
        self.size = size
        self.rows = np.zeros((size, len(columns)), dtype=np.int16)
        self.predicted = np.zeros(size, dtype=np.int16)
        self.filled = 0
        self.pos = 0
        self.last_row = 0.0
        """``time.monotonic()`` of the last rows added."""

    def add(self, instances: Sequence[Mapping[str, Any]], predictions: Sequence[Any]) -> None:
        """Bin a block of rows (all features at once) and write it into the ring."""
        n = len(instances)
        if n == 0:
            return
        block = np.empty((n, len(self.columns)), dtype=np.int16)
        for j, col in enumerate(self.columns):
            name = col.name
            block[:, j] = col.bins([inst.get(name) for inst in instances])
        preds = None
        if self.prediction is not None:
            values = prediction_values(predictions)
            if values is not None and len(values) == n:
                preds = self.prediction.bins(values)
        self._write(block, preds)

    def _write(self, block: np.ndarray, preds: np.ndarray | None) -> None:
        if len(block) > self.size:
            block = block[-self.size :]
            preds = preds[-self.size :] if preds is not None else None
        n = len(block)
        idx = (self.pos + np.arange(n)) % self.size
        self.rows[idx] = block
        if preds is not None:
            self.predicted[idx] = preds
        self.pos = (self.pos + n) % self.size
        self.filled = min(self.filled + n, self.size)

    def psi(self) -> tuple[dict[str, float], float | None]:
        """PSI of every feature, and of the predictions, over the rows in the window now."""
        rows = self.rows[: self.filled]
        features = {col.name: col.psi(rows[:, j]) for j, col in enumerate(self.columns)}
        pred = self.prediction.psi(self.predicted[: self.filled]) if self.prediction is not None else None
        return features, pred


def window_for(model: str, version: str, desc: Mapping[str, Any] | None, size: int) -> VersionWindow | None:
    """The window of a described version, or ``None`` (with a warning) when it has no usable profile."""
    if desc is None:
        return None
    where = f"{model} v{version}"
    stored = desc.get("reference_profile")
    if stored is None:
        logger.warning("%s has no reference_profile.json: no drift gauges for it (serving is not affected)", where)
        return None
    try:
        profile = parse(stored)
        if desc.get("feature_spec") is not None:
            kinds = kinds_of_spec(FeatureSpec.model_validate(desc["feature_spec"]))
        else:
            kinds = kinds_of_signature(desc.get("signature") or [])
        profile.check(kinds)
    except (ProfileError, ValueError) as exc:
        logger.warning("%s: its reference profile does not fit it, no drift gauges for it: %s", where, exc)
        return None
    columns = [ColumnBins(profile.feature(name)) for name in kinds]  # type: ignore[arg-type]
    prediction = ColumnBins(profile.prediction) if profile.prediction is not None else None
    return VersionWindow(model, version, columns, prediction, size)


class DriftMonitor:
    """Windows per (model, version), fed off the request path, exported as gauges by one thread."""

    def __init__(
        self, described: Described, *, window: int = 2000, sample: float = 1.0, interval_s: float = 2.0
    ) -> None:
        self.described = described
        self.window = window
        self.sample = sample
        self.interval_s = interval_s
        self.min_rows = min(500, window)
        """Rows a window needs before its PSI is exported: with fewer, noise alone reads as drift."""
        self._pending: collections.deque[tuple[str, str, Sequence[Any], Sequence[Any]]] = collections.deque(
            maxlen=PENDING_MAX
        )
        self._windows: dict[tuple[str, str], VersionWindow | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def offer(self, model: str, version: str, instances: Sequence[Any], predictions: Sequence[Any]) -> None:
        """Called on the event loop once per answered request: an append, nothing more."""
        if self.sample >= 1.0 or random.random() < self.sample:
            self._pending.append((model, version, instances, predictions))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tandem-drift", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # never let one bad batch end the gauges for good
                logger.exception("drift update failed")

    def tick(self, now: float | None = None) -> None:
        """Fold what queued up into the windows and export the PSI of every window that changed; drop
        the gauges of versions that have had no traffic for :data:`STALE_S`."""
        now = time.monotonic() if now is None else now
        grouped: dict[tuple[str, str], tuple[list[Any], list[Any]]] = {}
        pending = self._pending
        while pending:
            model, version, instances, predictions = pending.popleft()
            if len(predictions) != len(instances):
                continue
            rows, preds = grouped.setdefault((model, version), ([], []))
            rows.extend(instances)
            preds.extend(predictions)
        for (model, version), (rows, preds) in grouped.items():
            win = self._window(model, version)
            if win is None:
                continue
            win.add(rows, preds)
            win.last_row = now
            if win.filled >= self.min_rows:
                self._export(win)
        for key, win in list(self._windows.items()):
            if win is not None and now - win.last_row > STALE_S:
                self._forget(win)
                del self._windows[key]

    def _window(self, model: str, version: str) -> VersionWindow | None:
        key = (model, version)
        if key not in self._windows:
            desc = self.described(model, version)
            if desc is None:
                return None  # not described yet (an answer from elsewhere): asked again next time
            self._windows[key] = window_for(model, version, desc, self.window)
        return self._windows[key]

    def _export(self, win: VersionWindow) -> None:
        features, prediction = win.psi()
        for name, value in features.items():
            metrics.FEATURE_DRIFT_PSI.labels(win.model, win.version, name).set(value)
        if prediction is not None:
            metrics.PREDICTION_DRIFT_PSI.labels(win.model, win.version).set(prediction)
        metrics.DRIFT_WINDOW_ROWS.labels(win.model, win.version).set(win.filled)

    def _forget(self, win: VersionWindow) -> None:
        for col in win.columns:
            with contextlib.suppress(KeyError):
                metrics.FEATURE_DRIFT_PSI.remove(win.model, win.version, col.name)
        for gauge in (metrics.PREDICTION_DRIFT_PSI, metrics.DRIFT_WINDOW_ROWS):
            with contextlib.suppress(KeyError):
                gauge.remove(win.model, win.version)
        logger.info("%s v%s: no traffic for %.0f s, its drift gauges are gone", win.model, win.version, STALE_S)

    def snapshot(self) -> dict[tuple[str, str], tuple[dict[str, float], float | None]]:
        """PSI of every window now (for tests and debugging; the gauges are the interface)."""
        return {k: w.psi() for k, w in self._windows.items() if w is not None}
