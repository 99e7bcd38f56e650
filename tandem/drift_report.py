"""``tandem drift report``'s figures: the payload log's live values against each version's reference
profile, per feature and for the predictions, counted in the reference's bins (``shared/profile_bins.py``,
the same counting as the app servers' gauges) and ranked by PSI, drifted features first.

The reference of each version comes from the registry (``reference_profile.json`` among the version's
files), so the report compares against the data that very version was trained on.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared import registry
from shared.profile_bins import ColumnBins
from shared.reference_profile import ProfileError, ReferenceProfile, parse, prediction_values

logger = logging.getLogger(__name__)

WARN, PAGE = 0.1, 0.25
"""PSI bands: under WARN stable, WARN to PAGE worth a look, over PAGE drifted (the alert rules' lines)."""
_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class ColumnDrift:
    name: str
    psi: float
    labels: list[str]
    reference: list[float]
    live: list[float]
    rows: int

    @property
    def band(self) -> str:
        return "drifted" if self.psi > PAGE else "watch" if self.psi >= WARN else "stable"


@dataclass
class VersionDrift:
    model: str
    version: str
    rows: int
    first: float
    last: float
    features: list[ColumnDrift] = field(default_factory=list)
    """Most drifted first."""
    prediction: ColumnDrift | None = None
    note: str = ""
    """Why there is nothing to compare against (no or a bad profile), else empty."""


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """``--since``: a duration back from now (``90m``, ``6h``, ``2d``) or an ISO 8601 time; epoch seconds."""
    if not text:
        return None
    now = time.time() if now is None else now
    m = _AGO.fullmatch(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration (30m, 6h, 2d) or an ISO 8601 time") from None
    return moment.timestamp()


def group(records: Iterable[Mapping[str, Any]], model: str) -> dict[str, list[Mapping[str, Any]]]:
    """The records of ``model``, by version."""
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("model") == model:
            out[str(r.get("version"))].append(r)
    return dict(out)


def compare(model: str, version: str, records: list[Mapping[str, Any]], profile: ReferenceProfile | None,
            note: str = "") -> VersionDrift:  # fmt: skip
    """Bin the records' instances and predictions against ``profile``; rank features by PSI."""
    times = [float(r.get("time", 0.0)) for r in records]
    out = VersionDrift(model, version, len(records), min(times, default=0.0), max(times, default=0.0), note=note)
    if profile is None:
        return out
    instances = [r.get("instance") or {} for r in records]
    for f in profile.features:
        bins = ColumnBins(f)
        out.features.append(_column(f.name, bins, bins.bins([i.get(f.name) for i in instances])))
    out.features.sort(key=lambda c: c.psi, reverse=True)
    if profile.prediction is not None:
        values = prediction_values(r.get("prediction") for r in records)
        if values is not None:
            bins = ColumnBins(profile.prediction)
            out.prediction = _column("prediction", bins, bins.bins(values))
    return out


def _column(name: str, bins: ColumnBins, binned: np.ndarray) -> ColumnDrift:
    counts = bins.counts(binned)
    total = max(int(counts.sum()), 1)
    return ColumnDrift(name, bins.psi(binned), bins.labels(), bins.expected.tolist(), (counts / total).tolist(), total)


ProfileSource = Callable[[str, str], ReferenceProfile]


def registry_profiles(uri: str, cache_dir: Path) -> ProfileSource:
    """Each version's stored profile, from its files in the registry (downloaded once into ``cache_dir``)."""

    def load(model: str, version: str) -> ReferenceProfile:
        try:
            ref = registry.get_version(uri, model, version)
        except Exception as exc:
            raise ProfileError(f"{model} v{version} is not in the registry at {uri}: {exc}") from None
        path = registry.model_files(registry.download(uri, ref, cache_dir))["reference_profile"]
        if not path.exists():
            raise ProfileError(f"{model} v{version} has no reference_profile.json (tandem register --reference DATA)")
        return parse(path.read_text())

    return load


def report(model: str, records: Iterable[Mapping[str, Any]], profiles: ProfileSource) -> list[VersionDrift]:
    """One comparison per version of ``model`` in the records, the version with most records first."""
    out = []
    for version, rows in sorted(group(records, model).items(), key=lambda kv: -len(kv[1])):
        try:
            out.append(compare(model, version, rows, profiles(model, version)))
        except ProfileError as exc:
            out.append(compare(model, version, rows, None, note=str(exc)))
    return out
