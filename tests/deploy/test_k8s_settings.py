"""The settings in the manifests are the code's settings (shared/settings.py), and the ports agree."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import k8s_checks as checks
import pytest
from k8s_manifests import (
    MLFLOW,
    OVERLAYS,
    WORKER,
    Obj,
    container_env,
    named,
    pod_spec,
    port_named,
    prestop_sleep_s,
    probe_port,
    probes,
    render,
    tandem_container,
)
from pydantic_settings import BaseSettings

from shared.settings import AppSettings, WorkerSettings

SETTINGS: dict[str, type[BaseSettings]] = {"app": AppSettings, "worker": WorkerSettings}
PREFIX = "TANDEM_"


def unknown_settings(objs: list[Obj], which: str) -> list[str]:
    """TANDEM_* variables of the ``tandem <which>`` container that name no field of its settings class."""
    _, container = tandem_container(objs, which)
    fields = {PREFIX + f.upper() for f in SETTINGS[which].model_fields}
    return sorted(k for k in container_env(objs, container) if k.startswith(PREFIX) and k not in fields)


def settings_of(objs: list[Obj], which: str, monkeypatch: pytest.MonkeyPatch):
    """The settings object the container would build from its environment (validated by pydantic)."""
    _, container = tandem_container(objs, which)
    for key in [k for k in os.environ if k.startswith(PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in container_env(objs, container).items():
        monkeypatch.setenv(key, value)
    return SETTINGS[which]()


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("which", ["app", "worker"])
def test_every_tandem_variable_is_a_setting(overlay: str, which: str) -> None:
    assert unknown_settings(render(overlay), which) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("which", ["app", "worker"])
def test_settings_parse(overlay: str, which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(render(overlay), which, monkeypatch)
    assert settings.models == "*"
    assert settings.log_format == "json"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_agree_with_settings(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objs = render(overlay)
    app = settings_of(objs, "app", monkeypatch)
    worker = settings_of(objs, "worker", monkeypatch)
    _, app_c = tandem_container(objs, "app")
    _, worker_c = tandem_container(objs, "worker")

    assert port_named(app_c, "http") == app.port
    assert port_named(worker_c, "zmq") == urlparse(worker.bind).port
    assert worker.metrics_port and port_named(worker_c, "metrics") == worker.metrics_port
    assert app.models == worker.models, "app servers wait for the models the workers serve"

    # Workers' probes are on their metrics port: the only HTTP a worker serves.
    assert {probe_port(p) for p in probes(worker_c).values()} == {"metrics"}
    assert {probe_port(p) for p in probes(app_c).values()} == {"http"}

    # Discovery: dns+tcp://<headless Service of the workers>:<its zmq port>.
    (url,) = app.worker_endpoints()
    assert url.startswith("dns+tcp://")
    assert checks.endpoint_service(objs, url, WORKER) == []
    assert named(objs, "Service", urlparse(url.removeprefix("dns+")).hostname)["spec"]["clusterIP"] == "None"

    assert checks.endpoint_service(objs, worker.resolved_registry_uri(), MLFLOW) == []
    assert app.redis_url and checks.endpoint_service(objs, app.redis_url, {"app.kubernetes.io/name": "redis"}) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_cache_and_tmp_are_writable_volumes(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objs = render(overlay)
    worker = settings_of(objs, "worker", monkeypatch)
    for which in ("app", "worker"):
        _, c = tandem_container(objs, which)
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{which}: a read-only root needs a writable /tmp"
    _, c = tandem_container(objs, "worker")
    assert str(worker.cache_dir) in {m["mountPath"] for m in c["volumeMounts"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_links_in_tandem_pods(overlay: str) -> None:
    """Service links would add TANDEM_*-looking variables (TANDEM_WORKER_PORT=tcp://...) to the pods."""
    objs = render(overlay)
    for which in ("app", "worker"):
        workload, _ = tandem_container(objs, which)
        assert pod_spec(workload).get("enableServiceLinks") is False


def test_preStop_sleeps_are_longer_than_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker keeps serving until every app server has re-resolved the headless Service without it."""
    objs = render(OVERLAYS[0])
    app = settings_of(objs, "app", monkeypatch)
    _, worker_c = tandem_container(objs, "worker")
    assert prestop_sleep_s(worker_c) >= app.dns_refresh_s + 3 * app.heartbeat_interval


def test_unknown_setting_is_caught() -> None:
    objs = render(OVERLAYS[0])
    _, container = tandem_container(objs, "worker")
    container.setdefault("env", []).append({"name": "TANDEM_METRICS_PROT", "value": "9100"})
    assert unknown_settings(objs, "worker") == ["TANDEM_METRICS_PROT"]


def test_app_setting_on_a_worker_is_caught() -> None:
    objs = render(OVERLAYS[0])
    _, container = tandem_container(objs, "worker")
    container.setdefault("env", []).append({"name": "TANDEM_WORKER_URLS", "value": "tcp://x:5555"})
    assert unknown_settings(objs, "worker") == ["TANDEM_WORKER_URLS"]
