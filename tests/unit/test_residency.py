"""The memory budget's choices, on model slots holding stand-in versions of known sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml_worker.batcher import Pending, SimpleBatcher
from ml_worker.residency import MB, Residency
from ml_worker.slots import ModelSlot
from ml_worker.versions import LoadedVersion, WireInput
from shared.features import FeatureSpec, NumericFeature
from shared.model_targets import ModelTarget

SPEC = FeatureSpec(features=[NumericFeature(name="x")])


class StandIn:
    device = "cpu"
    input_name = "input"
    input_width = 1
    output_names = ["probability"]
    output_shapes = [[-1, 1]]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"probability": x}


def slot(name: str, mb: float, *, used: float, version: str = "1") -> ModelSlot:
    s = ModelSlot(ModelTarget(name), SimpleBatcher(), keep_previous_s=30.0)
    s.swap(version_of(name, version, mb), 0.0)
    s.last_used = used
    return s


def version_of(name: str, version: str, mb: float) -> LoadedVersion:
    v = LoadedVersion(
        name, version, StandIn(), SPEC, {"instances": [{"x": 1.0}]}, Path("/nowhere"), WireInput("input", 1)
    )
    v.size_bytes = int(mb * MB)
    return v


def test_no_budget_unloads_nothing() -> None:
    slots = [slot("a", 500, used=1.0), slot("b", 500, used=2.0)]
    assert Residency(0).make_room(slots, need=10**12) == 0
    assert all(s.live is not None for s in slots)


def test_least_recently_used_idle_model_goes_first_and_only_as_many_as_needed() -> None:
    a, b, c = slot("a", 100, used=3.0), slot("b", 100, used=1.0), slot("c", 100, used=2.0)
    over = Residency(350).make_room([a, b, c], need=100 * MB)
    assert over == 0
    assert b.live is None and a.live is not None and c.live is not None
    assert b.unloaded is not None and b.live_version == "1"  # still served: loaded again on demand
    assert b.describe(None) is not None and b.unloaded.wire_input.width == SPEC.width


def test_previous_versions_go_before_any_live_one() -> None:
    a, b = slot("a", 100, used=1.0), slot("b", 100, used=2.0)
    b.swap(version_of("b", "2", 100), 5.0)  # b's v1 stays for stragglers
    assert b.versions == ["1", "2"] and b.resident_bytes == 200 * MB
    assert Residency(250).make_room([a, b], need=0) == 0
    assert b.versions == ["2"] and a.live is not None  # the straggler copy went, nobody's live one


def test_busy_models_are_never_unloaded_and_the_shortfall_is_reported() -> None:
    a, b = slot("a", 100, used=1.0), slot("b", 100, used=2.0)
    a.batcher.offer(Pending("q", "1", np.zeros((1, 1), np.float32), 0.0, 1.0), 0.0)
    b.running = 1
    assert Residency(150).make_room([a, b], need=0) == 50 * MB
    assert a.live is not None and b.live is not None


def test_the_model_about_to_load_is_never_its_own_victim() -> None:
    a, b = slot("a", 100, used=1.0), slot("b", 100, used=2.0)
    over = Residency(150).make_room([a, b], need=100 * MB, keep=a)  # a is loading a new version
    assert a.live is not None and b.live is None
    assert over == 50 * MB  # a alone with its new version exceeds the budget: served anyway
