"""Every overlay renders, and every object it renders is valid against the Kubernetes OpenAPI schemas."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from k8s_manifests import CPU_OVERLAYS, GPU_OVERLAYS, NAMESPACE, OVERLAYS, Obj, named, render

# The oldest Kubernetes the manifests support, and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
# Custom resources validated only by their operators; kubernetes-validate has no schema for them.
CRD_GROUPS = {"monitoring.coreos.com"}


def validate(obj: Obj, version: str) -> str | None:
    """None when valid (or a known CRD), else the validator's message."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        if obj["apiVersion"].split("/")[0] not in CRD_GROUPS:
            return f"{obj['kind']} {obj['apiVersion']}: no schema (not a known CRD group)"
    except kubernetes_validate.ValidationError as exc:
        return f"{obj['kind']}/{obj['metadata']['name']}: {exc}"
    return None


def test_overlays_exist() -> None:
    assert GPU_OVERLAYS and CPU_OVERLAYS, f"need gpu and cpu overlays, found {OVERLAYS}"


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(overlay: str, version: str) -> None:
    objs = render(overlay)
    assert objs, f"{overlay} rendered nothing"
    problems = [p for o in objs if (p := validate(o, version))]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_one_namespace(overlay: str) -> None:
    objs = render(overlay)
    assert named(objs, "Namespace", NAMESPACE)
    stray = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objs
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE
    ]
    assert stray == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_names_are_unique(overlay: str) -> None:
    keys = [(o["kind"], o["metadata"]["name"]) for o in render(overlay)]
    assert len(keys) == len(set(keys))


def test_strict_validation_rejects_an_unknown_field() -> None:
    objs = render(GPU_OVERLAYS[0])
    worker = copy.deepcopy(named(objs, "Deployment", "tandem-worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"httpGet": {"port": "metrics"}}
    assert validate(worker, K8S_VERSIONS[0]) is not None


def test_validation_rejects_a_wrong_type() -> None:
    objs = render(GPU_OVERLAYS[0])
    svc = copy.deepcopy(named(objs, "Service", "tandem-worker"))
    svc["spec"]["ports"][0]["port"] = "five thousand"
    assert validate(svc, K8S_VERSIONS[-1]) is not None
