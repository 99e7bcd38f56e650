"""Traffic policies from the registry with real workers, app servers and a real sqlite registry:
a sticky canary across replicas and restarts, bad policy values ignored, shadow comparison."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from procs import sample, wait_for, wait_ready

from shared import registry
from shared.settings import home_registry_uri

pytestmark = pytest.mark.slow

POLL = "0.3"
INSTANCE = {"amount": 42.0, "merchant_category": "travel", "channel": "web"}


@pytest.fixture(scope="module")
def v1_dir(demo_registry, tmp_path_factory) -> Path:
    return registry.download(demo_registry.uri, demo_registry.version, tmp_path_factory.mktemp("v1"))


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory) -> Path:
    """The --variant model: visibly different predictions."""
    from tandem.demo import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("v2") / "model", "small", seed=11, variant=True, rows=3000, epochs=1)


@pytest.fixture
def reg(tmp_path, v1_dir) -> str:
    uri = home_registry_uri(tmp_path / "registry")
    (tmp_path / "registry").mkdir()
    assert registry.register(uri, "demo", v1_dir).version == "1"
    return uri


def traffic(app_url: str) -> dict | None:
    return httpx.get(f"{app_url}/v1/models/demo", timeout=5).json()["traffic"]


def predict(client: httpx.Client, url: str, entity: str | None = None, headers: dict | None = None) -> dict:
    instance = {**INSTANCE, **({"entity_id": entity} if entity else {})}
    r = client.post(f"{url}/predict", json={"instances": [instance]}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def variants_of(urls: list[str], entities: list[str]) -> dict[str, str]:
    """Each entity's variant, asked round-robin over ``urls`` from four threads (a client each)."""

    def chunk(part: list[tuple[int, str]]) -> list[tuple[str, str]]:
        out = []
        with httpx.Client(timeout=10) as c:
            for i, entity in part:
                r = predict(c, urls[i % len(urls)], entity)
                assert r["model_version"] == ("2" if r["variant"] == "canary" else "1"), r
                out.append((entity, r["variant"]))
        return out

    numbered = list(enumerate(entities))
    with ThreadPoolExecutor(4) as pool:
        return {e: v for part in pool.map(chunk, [numbered[k::4] for k in range(4)]) for e, v in part}


def test_sticky_canary_share_across_replicas_and_restart_and_bad_values_ignored(stack, reg, v2_dir, v1_dir, tmp_path):
    w = stack.worker(reg, "--poll-interval", POLL)
    a, b = stack.app([w.endpoint]), stack.app([w.endpoint])
    wait_ready(a)
    wait_ready(b)
    v2 = registry.register(reg, "demo", v2_dir, alias_if_first=None)
    registry.set_alias(reg, "demo", "canary", v2.version)
    registry.set_model_tag(reg, "demo", "tandem.canary.percent", "20")
    for app in (a, b):
        wait_for(lambda app=app: (traffic(app.url) or {}).get("canary_percent") == 20, 20, what="canary at 20%")
    assert traffic(a.url)["versions"] == {"production": "1", "canary": "2", "shadow": None}

    entities = [f"acct-{i}" for i in range(2000)]
    first = variants_of([a.url, b.url], entities)
    share = sum(v == "canary" for v in first.values()) / len(first)
    assert 0.17 <= share <= 0.23, share
    probe = entities[:200]
    assert variants_of([b.url, a.url], probe) == {e: first[e] for e in probe}  # the other replica, each
    a.stop()
    c = stack.app([w.endpoint])
    wait_ready(c)
    wait_for(lambda: (traffic(c.url) or {}).get("canary_percent") == 20, 10, what="new replica sees the policy")
    assert variants_of([c.url], probe) == {e: first[e] for e in probe}  # and a fresh process
    assert c.counter("tandem_variant_requests_total", model="demo", variant="canary", outcome="ok") > 0

    # Bad values: ignored with a warning and a metric; the last good policy keeps serving.
    registry.set_model_tag(reg, "demo", "tandem.canary.percent", "150")
    registry.set_model_tag(reg, "demo", "tandem.sticky", "cookie")
    bad = registry.register(reg, "demo", _failing_checks(v1_dir, tmp_path / "bad"), alias_if_first=None)
    registry.set_alias(reg, "demo", "canary", bad.version)

    def counted(field: str) -> bool:
        return w.counter("tandem_policy_errors_total", model="demo", field=field) >= 1

    for field in ("tandem.canary.percent", "tandem.sticky", "canary"):
        wait_for(lambda field=field: counted(field), 20, what=f"policy error counted for {field}")
    log = w.log()
    assert "tandem.canary.percent ignored" in log and "tandem.sticky ignored" in log
    assert f"v{bad.version} failed to load or check" in log
    assert traffic(c.url) == {
        "versions": {"production": "1", "canary": "2", "shadow": None},
        "canary_percent": 20.0,
        "shadow_percent": 0.0,
        "sticky": "entity_id",
    }
    assert variants_of([c.url], probe) == {e: first[e] for e in probe}
    # One warning per bad value, not one per poll.
    assert w.counter("tandem_policy_errors_total", model="demo", field="tandem.sticky") == 1

    # Canary off: everybody on production within a poll.
    registry.set_model_tag(reg, "demo", "tandem.canary.percent", "0")
    wait_for(lambda: traffic(c.url)["canary_percent"] == 0, 10, what="canary at 0%")
    assert set(variants_of([c.url], probe).values()) == {"production"}


def _failing_checks(v1_dir: Path, dest: Path) -> Path:
    """v1 with expected predictions that its outputs do not match: refused at load."""
    folder = shutil.copytree(v1_dir, dest)
    path = registry.model_files(folder)["input_example"]
    example = json.loads(path.read_text())
    example["predictions"] = [p + 0.25 for p in example["predictions"]]
    path.write_text(json.dumps(example))
    return folder


def test_shadow_compares_outputs_and_callers_see_production_only(stack, reg, v1_dir, v2_dir):
    w = stack.worker(reg, "--poll-interval", POLL)
    a = stack.app([w.endpoint])
    wait_ready(a)
    same = registry.register(reg, "demo", v1_dir, alias_if_first=None)  # the same files: agrees row for row
    registry.set_alias(reg, "demo", "shadow", same.version)
    registry.set_model_tag(reg, "demo", "tandem.shadow.percent", "100")
    wait_for(lambda: (traffic(a.url) or {}).get("shadow_percent") == 100, 20, what="shadow at 100%")

    def run(n: int) -> set[tuple[str, str]]:
        seen = set()
        with httpx.Client(timeout=10) as client:
            for i in range(n):
                r = predict(client, a.url, f"e{i}")
                seen.add((r["variant"], r["model_version"]))
        return seen

    def shadow(outcome: str) -> float:
        return a.counter("tandem_shadow_requests_total", model="demo", outcome=outcome)

    assert run(100) == {("production", "1")}
    wait_for(lambda: shadow("agree") + shadow("shed") >= 100, 10, what="100 shadow outcomes")
    assert shadow("agree") >= 50 and shadow("differ") == 0 and shadow("error") == 0
    metrics = httpx.get(f"{a.url}/metrics").text
    assert sample(metrics, "tandem_shadow_abs_diff_count", model="demo") == shadow("agree")

    v2 = registry.register(reg, "demo", v2_dir, alias_if_first=None)
    registry.set_alias(reg, "demo", "shadow", v2.version)
    wait_for(lambda: traffic(a.url)["versions"]["shadow"] == v2.version, 20, what="shadow moved to the variant")
    agreed = shadow("agree")
    assert run(100) == {("production", "1")}  # callers never see the shadow's answers
    wait_for(lambda: shadow("differ") + shadow("shed") >= 50, 10, what="shadow outcomes for the variant")
    assert shadow("agree") == agreed and shadow("differ") >= 50 and shadow("error") == 0
    assert w.counter("tandem_worker_requests_total", model="demo", outcome="error") == 0


def test_shadow_copies_are_shed_first_when_the_worker_is_busy(stack, reg, v1_dir):
    w = stack.worker(reg, "--poll-interval", POLL, "--debug-delay-ms", "20")  # every batch 20 ms: busy at once
    a = stack.app([w.endpoint])
    wait_ready(a)
    same = registry.register(reg, "demo", v1_dir, alias_if_first=None)
    registry.set_alias(reg, "demo", "shadow", same.version)
    registry.set_model_tag(reg, "demo", "tandem.shadow.percent", "100")
    wait_for(lambda: (traffic(a.url) or {}).get("shadow_percent") == 100, 20, what="shadow at 100%")

    def hammer(k: int) -> set[tuple[int, str]]:
        seen = set()
        with httpx.Client(timeout=10) as c:
            for i in range(60):
                r = c.post(f"{a.url}/predict", json={"instances": [{**INSTANCE, "entity_id": f"{k}-{i}"}]})
                seen.add((r.status_code, r.json().get("variant", "")))
        return seen

    with ThreadPoolExecutor(8) as pool:
        seen = set().union(*pool.map(hammer, range(8)))
    assert seen == {(200, "production")}  # every caller answered, by production
    wait_for(lambda: w.counter("tandem_worker_shadow_shed_total", model="demo") > 0, 10, what="shadow shed")
    shed = a.counter("tandem_shadow_requests_total", model="demo", outcome="shed")
    assert shed >= w.counter("tandem_worker_shadow_shed_total", model="demo") > 0
    assert w.counter("tandem_worker_requests_total", model="demo", outcome="overloaded") == 0  # not counted as such
