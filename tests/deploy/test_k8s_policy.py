"""Production policies over every overlay, and proof that each check catches what it is for."""

from __future__ import annotations

import k8s_checks as checks
import pytest
from k8s_manifests import CPU_OVERLAYS, GPU_OVERLAYS, OVERLAYS, Obj, containers, named, pod_spec, render

POLICIES = [
    checks.hardening,
    checks.disruption_budgets,
    checks.service_wiring,
    checks.probe_ports,
    checks.drain,
    checks.network_policies,
    checks.autoscalers,
    checks.scrape_annotations,
]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("policy", POLICIES, ids=lambda f: f.__name__)
def test_policy_holds(overlay: str, policy) -> None:
    problems = policy(render(overlay))
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_gives_each_worker_one_gpu(overlay: str) -> None:
    objs = render(overlay)
    assert checks.gpu_requests(objs) == {
        "Deployment/tandem-worker container worker": {"requests": 1, "limits": 1},
    }
    tolerations = pod_spec(named(objs, "Deployment", "tandem-worker")).get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


@pytest.mark.parametrize("overlay", CPU_OVERLAYS)
def test_cpu_overlay_requests_no_gpu(overlay: str) -> None:
    objs = render(overlay)
    assert checks.gpu_requests(objs) == {}
    worker = named(objs, "Deployment", "tandem-worker")
    assert "cuda" not in next(containers(worker))["image"]
    assert "tolerations" not in pod_spec(worker)


# -- each check can fail --------------------------------------------------------------------------------


@pytest.fixture
def objs() -> list[Obj]:
    return render(GPU_OVERLAYS[0])


def _container(objs: list[Obj], deployment: str) -> Obj:
    return pod_spec(named(objs, "Deployment", deployment))["containers"][0]


def test_hardening_catches_a_missing_probe_limit_and_root(objs: list[Obj]) -> None:
    app = _container(objs, "tandem-app")
    del app["readinessProbe"]
    del app["resources"]["limits"]["memory"]
    app["securityContext"]["readOnlyRootFilesystem"] = False
    named(objs, "Deployment", "tandem-app")["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    app["securityContext"].pop("runAsNonRoot")
    problems = "\n".join(checks.hardening(objs))
    for expected in ("no readinessProbe", "no limits.memory", "readOnlyRootFilesystem", "runAsNonRoot"):
        assert expected in problems


def test_pdb_check_catches_a_selector_that_matches_nothing(objs: list[Obj]) -> None:
    pdb = named(objs, "PodDisruptionBudget", "tandem-worker")
    pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "ml-wroker"
    problems = checks.disruption_budgets(objs)
    assert any("tandem-worker: 0 PodDisruptionBudgets" in p for p in problems)
    assert any("selects no workload" in p for p in problems)


def test_service_check_catches_a_renamed_container_port(objs: list[Obj]) -> None:
    _container(objs, "tandem-worker")["ports"][0]["name"] = "zeromq"
    problems = checks.service_wiring(objs) + checks.probe_ports(objs)
    assert any("no container port named 'zmq'" in p for p in problems)


def test_probe_check_catches_a_numeric_probe_port(objs: list[Obj]) -> None:
    _container(objs, "tandem-worker")["readinessProbe"]["httpGet"]["port"] = 9100
    assert checks.probe_ports(objs)


def test_drain_check_catches_a_short_grace_period(objs: list[Obj]) -> None:
    pod_spec(named(objs, "Deployment", "tandem-worker"))["terminationGracePeriodSeconds"] = 20
    del _container(objs, "tandem-app")["lifecycle"]
    problems = "\n".join(checks.drain(objs))
    assert "exceeds the grace period 20 s" in problems
    assert "tandem-app container app: no preStop hook" in problems


def test_network_check_catches_an_open_worker_port(objs: list[Obj]) -> None:
    policy = named(objs, "NetworkPolicy", "tandem-worker")
    policy["spec"]["ingress"][0].pop("from")
    assert any("worker zmq" in p for p in checks.network_policies(objs))


def test_network_check_catches_app_servers_reaching_mlflow(objs: list[Obj]) -> None:
    policy = named(objs, "NetworkPolicy", "mlflow")
    policy["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tandem"}}})
    assert any("mlflow http" in p and "app-server" in p for p in checks.network_policies(objs))


def test_network_check_catches_a_missing_default_deny(objs: list[Obj]) -> None:
    objs.remove(named(objs, "NetworkPolicy", "default-deny-ingress"))
    assert any("default-deny" in p for p in checks.network_policies(objs))


def test_autoscaler_check_catches_replicas_beside_an_hpa(objs: list[Obj]) -> None:
    named(objs, "Deployment", "tandem-app")["spec"]["replicas"] = 3
    assert checks.autoscalers(objs)


def test_gpu_check_sees_a_gpu(objs: list[Obj]) -> None:
    cpu = render(CPU_OVERLAYS[0])
    _container(cpu, "tandem-worker")["resources"]["limits"]["nvidia.com/gpu"] = 1
    assert checks.gpu_requests(cpu)
