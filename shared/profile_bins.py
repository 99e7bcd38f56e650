"""Live values into a reference profile's bins, a column at a time: shared by the app servers' drift gauges
and ``tandem drift report``, so both count exactly the same way.

Numbers fall in the decile bins of the reference (``searchsorted`` on its edges); text and booleans in
the bin of their value, or ``other``; a missing value (absent, null, NaN) in the last bin of either.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.reference_profile import CategoricalProfile, NumericProfile, category, psi


class ColumnBins:
    """How one column's values are counted against its reference."""

    def __init__(self, profile: NumericProfile | CategoricalProfile) -> None:
        self.profile = profile
        self.name = profile.name
        self.expected = profile.expected
        self.size = self.expected.size
        self.missing_bin = self.size - 1
        if isinstance(profile, NumericProfile):
            self._edges: np.ndarray | None = np.asarray(profile.edges, dtype=np.float64)
            self._index: dict[Any, int] = {}
        else:
            self._edges = None
            self._index = {v: i for i, v in enumerate(profile.frequencies)}
            if "true" in self._index:  # request booleans arrive as bools: find them without a str() per value
                self._index[True] = self._index["true"]
            if "false" in self._index:
                self._index[False] = self._index["false"]
            self._other = len(profile.frequencies)

    def bins(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        """The bin of each value (int16)."""
        if self._edges is not None:
            x = _floats(values)
            out = np.searchsorted(self._edges, x, side="right").astype(np.int16)
            out[~np.isfinite(x)] = self.missing_bin
            return out
        index, other, missing = self._index, self._other, self.missing_bin
        return np.fromiter(
            (missing if v is None else index.get(v, index.get(category(v), other)) for v in values),
            np.int16,
            len(values),
        )

    def counts(self, bins: np.ndarray) -> np.ndarray:
        return np.bincount(bins, minlength=self.size)

    def psi(self, bins: np.ndarray) -> float:
        return psi(self.expected, self.counts(bins))

    def labels(self) -> list[str]:
        """A name per bin, for a report's axis."""
        if self._edges is not None:
            e = [f"{v:.3g}" for v in self._edges]
            if not e:
                return ["all", "missing"]
            return [f"< {e[0]}", *(f"{a} to {b}" for a, b in itertools.pairwise(e)), f"≥ {e[-1]}", "missing"]
        return [*self._index_names(), "other", "missing"]

    def _index_names(self) -> list[str]:
        assert isinstance(self.profile, CategoricalProfile)
        return list(self.profile.frequencies)


def _floats(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Floats with NaN for missing; a value that is no number (a string sent for a number) counts as missing."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        return values.astype(np.float64, copy=False)
    try:
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return np.fromiter((_float(v) for v in values), np.float64, len(values))


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
