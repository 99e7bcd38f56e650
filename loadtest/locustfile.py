"""Locust scenario for teams that already run Locust: POST the model's own input example to /predict.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 30s

Locust is closed-loop (a user waits for its answer before the next request), so its latencies hide
server stalls (coordinated omission) and on a small machine Locust itself tops out first (about 2.4k
req/s with ``FastHttpUser`` here). Use it for soak and functional load; take latency and capacity
figures from ``python -m loadtest.openloop`` / ``python -m loadtest.bench``.

The body is fetched once per user from ``GET /v1/models`` (``input_example``), so the scenario follows
whatever model version is being served. ``TANDEM_LOCUST_INSTANCES`` sets instances per request
(default 1); a wrong ``model_version`` is not an error, a non-200 answer is.
"""

from __future__ import annotations

import os

from locust import FastHttpUser, between, task


class PredictUser(FastHttpUser):
    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        models = self.client.get("/v1/models", name="/v1/models").json()["models"]
        example = models[0]["input_example"] if models and models[0]["input_example"] else [{}]
        k = max(1, int(os.environ.get("TANDEM_LOCUST_INSTANCES", "1")))
        self.body = {"instances": (example * k)[:k]}

    @task
    def predict(self) -> None:
        with self.client.post("/predict", json=self.body, name="/predict", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif "model_version" not in (r.json() or {}):
                r.failure("answer without model_version")
