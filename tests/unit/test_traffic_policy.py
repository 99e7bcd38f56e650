"""Traffic policy parsing and variant assignment: pure functions, table-tested."""

from __future__ import annotations

import random

import pytest

from shared.traffic import (
    BUCKETS,
    CANARY,
    PRODUCTION,
    TrafficPolicy,
    bucket,
    choose,
    merge,
    mirrored,
    parse_tags,
    sticky_key,
)

CANARY_20 = TrafficPolicy({"production": "1", "canary": "2"}, canary_percent=20)


@pytest.mark.parametrize(
    ("tags", "canary", "shadow", "sticky", "bad"),
    [
        ({}, 0.0, 0.0, "entity_id", set()),
        ({"tandem.canary.percent": "20", "tandem.shadow.percent": "100"}, 20.0, 100.0, "entity_id", set()),
        ({"tandem.canary.percent": "0.5"}, 0.5, 0.0, "entity_id", set()),
        ({"tandem.canary.percent": "150"}, None, 0.0, "entity_id", {"tandem.canary.percent"}),
        ({"tandem.canary.percent": "-1"}, None, 0.0, "entity_id", {"tandem.canary.percent"}),
        ({"tandem.shadow.percent": "lots"}, 0.0, None, "entity_id", {"tandem.shadow.percent"}),
        ({"tandem.canary.percent": "nan"}, None, 0.0, "entity_id", {"tandem.canary.percent"}),
        ({"tandem.sticky": "header:X-User"}, 0.0, 0.0, "header:X-User", set()),
        ({"tandem.sticky": "none"}, 0.0, 0.0, "none", set()),
        ({"tandem.sticky": "cookie"}, 0.0, 0.0, None, {"tandem.sticky"}),
        ({"tandem.sticky": "header:"}, 0.0, 0.0, None, {"tandem.sticky"}),
    ],
)
def test_parse_tags(tags, canary, shadow, sticky, bad):
    r = parse_tags(tags)
    assert (r.canary_percent, r.shadow_percent, r.sticky, set(r.problems)) == (canary, shadow, sticky, bad)


def test_a_bad_value_keeps_the_last_good_one():
    last = TrafficPolicy({"production": "1", "canary": "2"}, canary_percent=10, sticky="header:X-User")
    new = merge(last, parse_tags({"tandem.canary.percent": "150", "tandem.sticky": "bogus"}), {"production": "1"})
    assert (new.canary_percent, new.sticky, new.versions) == (10, "header:X-User", {"production": "1"})
    good = merge(last, parse_tags({"tandem.canary.percent": "30"}), last.versions)
    assert (good.canary_percent, good.sticky) == (30, "entity_id")


def test_wire_round_trip_and_malformed_heartbeats():
    p = TrafficPolicy({"production": "1", "canary": "2", "shadow": "3"}, 20, 50, "header:X-User")
    assert TrafficPolicy.from_wire(p.to_wire()) == p
    for raw in (None, "x", {"versions": "x"}, {"versions": {}, "canary_percent": 150}, {"versions": {}, "sticky": "?"}):
        assert TrafficPolicy.from_wire(raw) is None


def test_same_key_same_variant_and_the_share_matches_the_percent():
    keys = [f"acct-{i}" for i in range(20_000)]
    first = [choose(CANARY_20, "demo", k) for k in keys]
    assert first == [choose(CANARY_20, "demo", k) for k in keys]  # deterministic, no process salt
    share = first.count(CANARY) / len(keys)
    assert 0.18 < share < 0.22, share


def test_raising_the_percent_only_moves_callers_to_the_canary():
    keys = [f"acct-{i}" for i in range(5_000)]
    at = {p: {k for k in keys if choose(TrafficPolicy(CANARY_20.versions, p), "demo", k) == CANARY} for p in (1, 5, 25)}
    assert at[1] <= at[5] <= at[25]


def test_buckets_differ_per_model():
    same = sum(bucket("a", f"k{i}") == bucket("b", f"k{i}") for i in range(1000))
    assert same < 10
    assert all(0 <= bucket("a", f"k{i}") < BUCKETS for i in range(1000))


@pytest.mark.parametrize(
    "policy",
    [
        None,
        TrafficPolicy({"production": "1"}, canary_percent=50),  # no canary alias
        TrafficPolicy({"production": "1", "canary": "2"}, canary_percent=0),
        TrafficPolicy({"production": "2", "canary": "2"}, canary_percent=50),  # promoted: the same version
    ],
)
def test_no_canary_means_production(policy):
    assert {choose(policy, "demo", f"k{i}") for i in range(200)} == {PRODUCTION}


def test_no_key_is_random_per_request():
    rng = random.Random(1)
    picks = [choose(CANARY_20, "demo", None, rng) for _ in range(5000)]
    assert 0.17 < picks.count(CANARY) / len(picks) < 0.23


def test_sticky_keys():
    inst = [{"entity_id": "acct-7", "amount": 1}]
    assert sticky_key(CANARY_20, inst) == "acct-7"
    assert sticky_key(CANARY_20, [{"amount": 1}]) is None
    by_header = TrafficPolicy(CANARY_20.versions, 20, sticky="header:X-User")
    assert sticky_key(by_header, inst, {"X-User": "u1"}) == "u1"
    assert sticky_key(by_header, inst, {}) is None
    assert sticky_key(TrafficPolicy(CANARY_20.versions, 20, sticky="none"), inst) is None


def test_mirrored_share():
    rng = random.Random(2)
    p = TrafficPolicy({"production": "1", "shadow": "3"}, shadow_percent=30)
    share = sum(mirrored(p, rng) for _ in range(5000)) / 5000
    assert 0.27 < share < 0.33
    assert not mirrored(TrafficPolicy({"production": "1"}, shadow_percent=100), rng)
