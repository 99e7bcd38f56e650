"""Versions a traffic policy names stay resident beside the live one, count against the memory budget,
and retire like a replaced version once the policy stops naming them."""

from __future__ import annotations

from test_residency import slot, version_of

from ml_worker.residency import MB, Residency


def test_a_pinned_version_is_not_retired_and_a_promoted_canary_keeps_the_old_one_briefly() -> None:
    s = slot("demo", 100, used=1.0)
    s.add_pinned(version_of("demo", "2", 50))
    assert sorted(s.versions) == ["1", "2"] and s.resident_bytes == 150 * MB
    assert s.retire_due(1000.0) == [] and s.retiring_bytes == 0
    # Promotion: v2 goes live; v1 is an ordinary previous version now, retired after the grace period.
    s.swap(s.get("2"), 10.0)
    s.pin(set(), 10.0)
    assert s.live_version == "2" and [v.version for v in s.retire_due(39.0)] == []
    assert [v.version for v in s.retire_due(41.0)] == ["1"]
    assert s.versions == ["2"]


def test_dropping_a_canary_retires_it_after_the_grace_period() -> None:
    s = slot("demo", 100, used=1.0)
    s.add_pinned(version_of("demo", "2", 50))
    s.pin({"2"}, 0.0)
    s.pin(set(), 5.0)
    assert [v.version for v in s.retire_due(36.0)] == ["2"]
    assert s.live_version == "1" and s.versions == ["1"]


def test_pinned_versions_count_against_the_budget_and_leave_with_their_model() -> None:
    a, b = slot("a", 100, used=2.0), slot("b", 100, used=1.0)
    b.add_pinned(version_of("b", "2", 100))
    assert Residency(250).make_room([a, b], need=0) == 0
    # b (least recently used, idle) was unloaded whole, its canary too: the policy watch loads it again.
    assert b.live is None and b.versions == [] and b.pinned == set()
    assert a.live is not None
