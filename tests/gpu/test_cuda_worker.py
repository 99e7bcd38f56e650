"""A real ``tandem worker`` process on the device: what it reports, what it answers, several batches in
flight, and a hot swap, each checked against a CPU session of the same version."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from shared import registry

pytestmark = pytest.mark.cuda


def rows(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """Random encoded rows: any float32 row is a valid input to the network, and distinct rows make a
    mix-up between requests visible in the answers."""
    return rng.normal(size=(n, width)).astype(np.float32)


def test_the_worker_reports_its_device_and_answers_like_the_cpu(
    device, tolerance, gpu_registry, start_worker, client_for, versions
):
    w = start_worker(gpu_registry)
    client = client_for(w)
    hb = client.ping()
    assert hb["device"] == device
    assert {k: hb["models"]["demo"][k] for k in ("live", "loaded")} == {"live": "1", "loaded": True}
    assert w.counter("tandem_model_info", model="demo", version="1", device=device) == 1
    v1 = versions["1"]
    rng = np.random.default_rng(1)
    for n in (1, 3, 64, 100):  # 100: more rows than --max-batch-size (64) in one request
        x = rows(rng, n, v1.width)
        client.send_infer(x)
        reply = client.recv()
        assert reply.header["status"] == "ok" and reply.header["version"] == "1", reply.header
        np.testing.assert_allclose(reply.tensors["probability"], v1.expected(x), **tolerance)


def test_batches_in_flight_each_answer_their_own_rows(tolerance, gpu_registry, start_worker, client_for, versions):
    # Three batches run at once (each held 20 ms before its model call), so the runner is entered from
    # several executor threads with batches of different sizes: on CUDA, one I/O binding and one set of
    # device buffers per size are shared by all of them.
    flags = ("--batches-in-flight", "3", "--batcher", "simple", "--max-batch-size", "16", "--debug-delay-ms", "20")
    w = start_worker(gpu_registry, *flags)
    client, watcher = client_for(w), client_for(w)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(watcher.ping()["in_flight"])
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    v1, rng = versions["1"], np.random.default_rng(2)
    sent = {}
    for i in range(240):
        x = rows(rng, 1 + i % 7, v1.width)
        sent[client.send_infer(x)] = x
    replies = [client.recv() for _ in sent]
    stop.set()
    thread.join(5)
    assert [r.header["status"] for r in replies] == ["ok"] * len(sent)
    got = np.concatenate([r.tensors["probability"] for r in replies])
    want = np.concatenate([v1.expected(sent[r.id]) for r in replies])
    np.testing.assert_allclose(got, want, **tolerance)
    assert max(seen) >= 2, f"never more than one batch in flight: {sorted(set(seen))}"
    batches = w.counter("tandem_batch_size_count", model="demo")
    total_rows = sum(len(x) for x in sent.values())
    assert total_rows / 16 <= batches < len(sent), batches  # requests shared batches of at most 16 rows


def test_a_hot_swap_on_the_device_fails_nothing(device, tolerance, gpu_registry, start_worker, client_for, versions):
    w = start_worker(gpu_registry, "--poll-interval", "0.3")
    try:
        answers, sent = swap_under_load(client_for(w), gpu_registry, versions)
        statuses = [r.header["status"] for r in answers]
        assert statuses == ["ok"] * len(answers), {s: statuses.count(s) for s in set(statuses)}
        by_version = {v: [r for r in answers if r.header["version"] == v] for v in ("1", "2")}
        assert by_version["1"] and by_version["2"], "the swap was not seen under load"
        for v, replies in by_version.items():
            got = np.concatenate([r.tensors["probability"] for r in replies])
            want = np.concatenate([versions[v].expected(sent[r.id]) for r in replies])
            np.testing.assert_allclose(got, want, **tolerance)
        assert w.counter("tandem_model_info", model="demo", version="2", device=device) == 1
        assert w.counter("tandem_model_swaps_total", model="demo", result="ok") == 2
        assert w.counter("tandem_model_swaps_total", model="demo", result="failed") == 0
    finally:
        registry.set_alias(gpu_registry, "demo", "production", "1")  # as the module's other tests expect


def swap_under_load(client, registry_uri: str, versions) -> tuple[list, dict[str, np.ndarray]]:
    """Promote v2 half a second into a stream of requests (four in flight at every moment) for the live
    version; stop one second after the first answer from v2. Returns the answers and each one's rows."""
    width, rng = versions["1"].width, np.random.default_rng(3)
    assert versions["2"].width == width  # rows encoded once serve either version
    promoter = threading.Timer(0.5, registry.set_alias, (registry_uri, "demo", "production", "2"))
    promoter.start()
    sent, answers, first_v2 = {}, [], None
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and (first_v2 is None or time.monotonic() - first_v2 < 1.0):
            window = []
            for _ in range(4):
                x = rows(rng, 4, width)
                window.append(client.send_infer(x))
                sent[window[-1]] = x
            for _ in window:
                answers.append(client.recv())
                if answers[-1].header.get("version") == "2" and first_v2 is None:
                    first_v2 = time.monotonic()
    finally:
        promoter.join(10)
    return answers, sent
