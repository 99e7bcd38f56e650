"""Render the kustomize overlays of ``deploy/k8s`` and read what they declare.

Rendering uses ``kubectl kustomize`` (kustomize is built into kubectl; it renders offline, no cluster).
Without kubectl on PATH the render tests skip, except under CI, where a missing kubectl is a failure.
Each check returns a list of problems (empty when the manifests are right), so tests can also show that
a check catches a broken manifest.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "deploy" / "docker"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
GPU_OVERLAYS = [o for o in OVERLAYS if o.startswith("gpu")]
CPU_OVERLAYS = [o for o in OVERLAYS if o.startswith("cpu")]
NAMESPACE = "tandem"

Obj = dict[str, Any]
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
APP = {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "app-server"}
WORKER = {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "ml-worker"}
MLFLOW = {"app.kubernetes.io/name": "mlflow", "app.kubernetes.io/component": "registry"}


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not on PATH: CI must render the manifests (kubectl bundles kustomize)")
        pytest.skip("kubectl is not on PATH: install kubectl >= 1.27 to render the kustomize overlays")
    return exe


@functools.cache
def _render(path: str, exe: str) -> tuple[Obj, ...]:
    done = subprocess.run([exe, "kustomize", path], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{done.stderr}")
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(overlay: str) -> list[Obj]:
    """The objects of ``overlays/<overlay>`` (or ``base``), as plain dicts (a fresh copy each call)."""
    path = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    return copy.deepcopy(list(_render(str(path), kubectl())))


# -- reading objects ---------------------------------------------------------------------------------


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: Obj) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def containers(workload: Obj) -> Iterator[Obj]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def selects(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    """A matchLabels-style selector; an empty selector selects everything."""
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def label_selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    """A full LabelSelector (matchLabels and matchExpressions)."""
    if not selects(selector.get("matchLabels"), labels):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def tier(container: Obj) -> str | None:
    """``app`` or ``worker`` for a Tandem container (entry point ``tandem``), else None."""
    image = container.get("image", "")
    args = container.get("args") or []
    if image.split("/")[-1].startswith("tandem-") and args and args[0] in ("app", "worker"):
        return args[0]
    return None


def tandem_container(objs: list[Obj], which: str) -> tuple[Obj, Obj]:
    """The workload and container that run ``tandem <which>``."""
    found = [(w, c) for w in workloads(objs) for c in containers(w) if tier(c) == which]
    assert len(found) == 1, f"expected one container running `tandem {which}`, found {len(found)}"
    return found[0]


def container_env(objs: list[Obj], container: Obj) -> dict[str, str]:
    """Environment of a container: its ConfigMaps (envFrom) first, then ``env`` literals on top."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, f"container {container['name']}: only configMapRef envFrom is expected"
        env.update({k: str(v) for k, v in named(objs, "ConfigMap", ref["name"]).get("data", {}).items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env


def port_named(container: Obj, name: str) -> int | None:
    for p in container.get("ports", []):
        if p.get("name") == name:
            return int(p["containerPort"])
    return None


def probes(container: Obj) -> dict[str, Obj]:
    return {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in container}


def probe_port(probe: Obj) -> int | str | None:
    for action in ("httpGet", "tcpSocket", "grpc"):
        if action in probe:
            return probe[action]["port"]
    return None


def prestop_sleep_s(container: Obj) -> int | None:
    """Seconds of a ``preStop`` sleep (``exec: [sleep, N]`` or the native ``sleep`` action)."""
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return None
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0].rsplit("/", 1)[-1] == "sleep":
        return int(command[1])
    return 0


def services_selecting(objs: list[Obj], labels: dict[str, str]) -> list[Obj]:
    return [s for s in of_kind(objs, "Service") if s["spec"].get("selector") and selects(s["spec"]["selector"], labels)]


def workloads_selected_by(objs: list[Obj], selector: dict[str, str]) -> list[Obj]:
    return [w for w in workloads(objs) if selects(selector, pod_labels(w))]
