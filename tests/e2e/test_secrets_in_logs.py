"""Credentials never reach a log: real worker and app processes given a password in every way they take
one (a URL on the command line, MLflow's environment variable, a URL in a mounted file), made to fail
on them (an unreachable registry and Redis), and their logs grepped."""

from __future__ import annotations

import httpx
from procs import sample, wait_for, wait_ready

REGISTRY_URL_SECRET = "s3cret-in-registry-url"
ENV_SECRET = "s3cret-in-mlflow-env"
REDIS_SECRET = "s3cret-in-redis-url"
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: every call fails at once


def test_no_credential_appears_in_either_process_log(stack, demo_registry, tmp_path):
    mlflow_env = {
        "MLFLOW_TRACKING_USERNAME": "tandem",
        "MLFLOW_TRACKING_PASSWORD": ENV_SECRET,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # fail each poll at once instead of backing off for minutes
    }
    debug = ("--log-level", "DEBUG")
    cut_off = stack.worker(
        f"http://tandem:{REGISTRY_URL_SECRET}@{UNREACHABLE}/", *debug, "--poll-interval", "0.2", env=mlflow_env
    )
    serving = stack.worker(demo_registry.uri, *debug, env=mlflow_env)  # so requests reach the feature store
    redis_file = tmp_path / "redis-url"
    redis_file.write_text(f"redis://:{REDIS_SECRET}@{UNREACHABLE}/0\n")
    app = stack.app([cut_off.endpoint, serving.endpoint], *debug, env={"TANDEM_REDIS_URL_FILE": str(redis_file)})
    wait_ready(app)  # an unreachable Redis does not keep the app from serving
    wait_for(
        lambda: sample(cut_off.metrics(), "tandem_registry_poll_errors_total") >= 2,
        30,
        what="the cut-off worker failing its polls",
    )
    r = httpx.post(f"{app.url}/v1/models/demo/predict", json={"instances": [{"entity_id": "a1"}]}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "feature_store_unavailable"
    assert REDIS_SECRET not in r.text
    for p in stack.procs:
        p.stop()
    logs = {p.name: p.log() for p in (cut_off, serving, app)}
    assert "registry poll failed" in logs[cut_off.name]
    assert f"http://tandem:***@{UNREACHABLE}/" in logs[cut_off.name]  # what the operator sees instead
    assert f"online features from redis://:***@{UNREACHABLE}/0" in logs[app.name]
    assert "feature store unreachable" in logs[app.name] or "feature_store_unavailable" in logs[app.name]
    for name, text in logs.items():
        for secret in (REGISTRY_URL_SECRET, ENV_SECRET, REDIS_SECRET):
            assert secret not in text, f"{secret} in the log of {name}"
