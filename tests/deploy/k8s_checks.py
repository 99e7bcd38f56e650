"""Policy checks over rendered manifests. Each returns a list of problems; an empty list means it holds."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from k8s_manifests import (
    APP,
    MLFLOW,
    WORKER,
    Obj,
    containers,
    label_selector_matches,
    of_kind,
    pod_labels,
    pod_spec,
    port_named,
    prestop_sleep_s,
    probe_port,
    probes,
    selects,
    services_selecting,
    workloads,
    workloads_selected_by,
)

# How long each tier takes to drain after SIGTERM (tandem/cli.py: uvicorn timeout_graceful_shutdown=10;
# ml_worker/server.py: WorkerServer.drain(timeout_s=30)).
DRAIN_S = {"app-server": 10, "ml-worker": 30}


def _where(w: Obj, c: Obj | None = None) -> str:
    return f"{w['kind']}/{w['metadata']['name']}" + (f" container {c['name']}" if c else "")


def hardening(objs: list[Obj]) -> list[str]:
    """Resources, probes and a locked-down securityContext on every container."""
    problems = []
    for w in workloads(objs):
        pod_sc = pod_spec(w).get("securityContext", {})
        for c in containers(w):
            where = _where(w, c)
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{where}: no {kind}.{r}")
            for p in ("livenessProbe", "readinessProbe"):
                if p not in c:
                    problems.append(f"{where}: no {p}")
            sc = c.get("securityContext", {})
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot is not true")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities do not drop ALL")
            image = c.get("image", "")
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest":
                problems.append(f"{where}: image {image!r} is not pinned to a version")
        if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{_where(w)}: pod seccompProfile is not RuntimeDefault")
    return problems


def disruption_budgets(objs: list[Obj]) -> list[str]:
    """Every workload is covered by exactly one PodDisruptionBudget whose selector matches its pods."""
    problems = []
    pdbs = of_kind(objs, "PodDisruptionBudget")
    for w in workloads(objs):
        if not label_selector_matches(w["spec"]["selector"], pod_labels(w)):
            problems.append(f"{_where(w)}: its selector does not match its own pod template")
        covering = [p for p in pdbs if label_selector_matches(p["spec"]["selector"], pod_labels(w))]
        if len(covering) != 1:
            problems.append(f"{_where(w)}: {len(covering)} PodDisruptionBudgets select its pods (want 1)")
    for p in pdbs:
        if not [w for w in workloads(objs) if label_selector_matches(p["spec"]["selector"], pod_labels(w))]:
            problems.append(f"PodDisruptionBudget/{p['metadata']['name']}: selects no workload")
    return problems


def service_wiring(objs: list[Obj]) -> list[str]:
    """Services select pods, and their target ports are named container ports of those pods."""
    problems = []
    for s in of_kind(objs, "Service"):
        name = f"Service/{s['metadata']['name']}"
        selector = s["spec"].get("selector")
        targets = workloads_selected_by(objs, selector) if selector else []
        if not targets:
            problems.append(f"{name}: selects no pod template")
        for port in s["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if not isinstance(target, str):
                problems.append(f"{name} port {port.get('name')}: targetPort {target} is not a named port")
                continue
            if port.get("name") != target:
                problems.append(f"{name}: port named {port.get('name')!r} targets {target!r}; use one name")
            for w in targets:
                if not any(port_named(c, target) for c in containers(w)):
                    problems.append(f"{name}: {_where(w)} has no container port named {target!r}")
    return problems


def probe_ports(objs: list[Obj]) -> list[str]:
    """HTTP and TCP probes name a port the same container declares."""
    problems = []
    for w in workloads(objs):
        for c in containers(w):
            for kind, probe in probes(c).items():
                port = probe_port(probe)
                if port is None:
                    continue
                if not isinstance(port, str) or port_named(c, port) is None:
                    problems.append(f"{_where(w, c)}: {kind} port {port!r} is not one of its named ports")
    return problems


def drain(objs: list[Obj]) -> list[str]:
    """App servers and workers have a preStop pause and a grace period that covers it plus the drain."""
    problems = []
    for component, drain_s in DRAIN_S.items():
        for w in workloads(objs):
            if pod_labels(w).get("app.kubernetes.io/component") != component:
                continue
            grace = pod_spec(w).get("terminationGracePeriodSeconds", 30)
            for c in containers(w):
                sleep = prestop_sleep_s(c)
                if sleep is None:
                    problems.append(f"{_where(w, c)}: no preStop hook")
                elif sleep + drain_s > grace:
                    problems.append(
                        f"{_where(w, c)}: preStop {sleep} s + drain {drain_s} s exceeds the grace period {grace} s"
                    )
    return problems


def _peers_allowed(objs: list[Obj], labels: dict[str, str], port_name: str) -> list[Obj | None]:
    """Peers the NetworkPolicies let reach ``port_name`` of pods with ``labels``; None means anyone."""
    peers: list[Obj | None] = []
    for np in of_kind(objs, "NetworkPolicy"):
        if not label_selector_matches(np["spec"]["podSelector"], labels):
            continue
        for rule in np["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port_name for p in ports):
                continue
            peers.extend(rule.get("from") or [None])
    return peers


def _peer_admits(peer: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a peer admits pods of this namespace carrying ``labels``."""
    if peer is None or "ipBlock" in peer:
        return True
    if "podSelector" in peer:
        return label_selector_matches(peer["podSelector"], labels)
    return "namespaceSelector" in peer  # any pod of the selected namespaces


def network_policies(objs: list[Obj]) -> list[str]:
    """Default deny; only app servers reach the ZeroMQ port; only workers (not app servers) reach MLflow."""
    problems = []
    deny = [
        np
        for np in of_kind(objs, "NetworkPolicy")
        if np["spec"]["podSelector"] == {}
        and "Ingress" in np["spec"].get("policyTypes", [])
        and not np["spec"].get("ingress")
    ]
    if not deny:
        problems.append("no default-deny ingress NetworkPolicy (podSelector: {}, no ingress rules)")
    stranger = {"app.kubernetes.io/name": "someone-else"}
    rules: list[tuple[str, dict[str, str], str, dict[str, str], list[dict[str, str]]]] = [
        # (what, target pods, port, must be allowed, must be refused)
        ("worker zmq", WORKER, "zmq", APP, [stranger, MLFLOW]),
        ("mlflow http", MLFLOW, "http", WORKER, [stranger, APP]),
        ("app http", APP, "http", stranger, []),
    ]
    for what, target, port, allowed, refused in rules:
        peers = _peers_allowed(objs, target, port)
        if not any(_peer_admits(p, allowed) for p in peers):
            problems.append(f"{what}: {allowed} cannot reach it")
        for r in refused:
            if any(_peer_admits(p, r) for p in peers):
                problems.append(f"{what}: {r} can reach it")
    return problems


def autoscalers(objs: list[Obj]) -> list[str]:
    """HPAs target an existing Deployment, which then leaves ``replicas`` to the HPA."""
    problems = []
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = [w for w in workloads(objs) if w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"]]
        if not target:
            problems.append(f"HPA/{hpa['metadata']['name']}: no {ref['kind']}/{ref['name']}")
        elif "replicas" in target[0]["spec"]:
            problems.append(f"HPA/{hpa['metadata']['name']}: {ref['name']} also sets replicas (reset on each apply)")
    if not [h for h in of_kind(objs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "tandem-app"]:
        problems.append("no HPA for the app servers")
    return problems


def scrape_annotations(objs: list[Obj]) -> list[str]:
    """App and worker pods carry Prometheus scrape annotations naming their metrics port."""
    problems = []
    for labels, port_name in ((APP, "http"), (WORKER, "metrics")):
        for w in workloads_selected_by(objs, labels):
            notes: dict[str, Any] = w["spec"]["template"]["metadata"].get("annotations", {})
            port = next((port_named(c, port_name) for c in containers(w) if port_named(c, port_name)), None)
            if notes.get("prometheus.io/scrape") != "true" or notes.get("prometheus.io/port") != str(port):
                problems.append(f"{_where(w)}: scrape annotations do not name port {port_name} ({port})")
            if notes.get("prometheus.io/path") != "/metrics":
                problems.append(f"{_where(w)}: prometheus.io/path is not /metrics")
    return problems


def gpu_requests(objs: list[Obj]) -> dict[str, Any]:
    """``nvidia.com/gpu`` requests and limits of every container, by workload/container."""
    found = {}
    for w in workloads(objs):
        for c in containers(w):
            res = c.get("resources", {})
            gpu = {k: res.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}
            if any(v is not None for v in gpu.values()):
                found[_where(w, c)] = gpu
    return found


def endpoint_service(objs: list[Obj], url: str, pods: dict[str, str]) -> list[str]:
    """``url``'s host is a Service selecting ``pods`` and its port is a Service port of it."""
    parsed = urlparse(url.removeprefix("dns+"))
    host = (parsed.hostname or "").split(".")[0]
    services = [s for s in of_kind(objs, "Service") if s["metadata"]["name"] == host]
    if not services:
        return [f"{url}: no Service named {host!r}"]
    svc = services[0]
    targets = [w for w in workloads(objs) if selects(pods, pod_labels(w))]
    if not targets or not all(svc in services_selecting(objs, pod_labels(w)) for w in targets):
        return [f"{url}: Service {host} does not select the pods labelled {pods}"]
    if parsed.port not in [p["port"] for p in svc["spec"]["ports"]]:
        return [f"{url}: Service {host} has no port {parsed.port}"]
    return []
