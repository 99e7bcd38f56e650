"""The images of deploy/docker, read statically (no Docker engine here), and how the manifests use them."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from k8s_manifests import DOCKER, OVERLAYS, REPO, containers, pod_spec, render, workloads

IMAGES = {"tandem-app": "app.Dockerfile", "tandem-worker": "worker.Dockerfile", "tandem-mlflow": "mlflow.Dockerfile"}


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def stages(name: str) -> list[list[tuple[str, str]]]:
    """Instructions per stage; stage 0 holds what comes before the first FROM (global ARGs)."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(name):
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def base_images(name: str) -> list[str]:
    defaults = dict(a.split("=", 1) for op, a in stages(name)[0] if op == "ARG" and "=" in a)
    images = []
    for stage in stages(name)[1:]:
        image = stage[0][1].split()[0]
        images.append(re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), image))
    return images


@pytest.mark.parametrize("name", IMAGES.values())
def test_multi_stage_on_pinned_bases(name: str) -> None:
    images = base_images(name)
    assert len(images) >= 2, "build and runtime stages"
    for image in images:
        repo, _, tag = image.rpartition(":")
        assert repo and re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin an exact version"


@pytest.mark.parametrize("name", IMAGES.values())
def test_runs_as_a_numeric_non_root_user(name: str) -> None:
    users = [a for op, a in stages(name)[-1] if op == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so the kubelet can check runAsNonRoot"


@pytest.mark.parametrize("name", ["app.Dockerfile", "worker.Dockerfile"])
def test_entrypoint_is_tandem(name: str) -> None:
    entry = [a for op, a in stages(name)[-1] if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["tandem"]


def test_app_image_installs_the_cpu_torch_before_the_project() -> None:
    runs = [a for op, a in instructions("app.Dockerfile") if op == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch]
    assert torch < project
    assert "[gpu]" not in " ".join(runs)


def test_worker_image_is_cuda_with_onnxruntime_gpu() -> None:
    assert all(i.startswith("nvidia/cuda:") and "cudnn-runtime" in i for i in base_images("worker.Dockerfile"))
    runs = " ".join(a for op, a in instructions("worker.Dockerfile") if op == "RUN")
    assert 'pip install ".[gpu,trees]"' in runs
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in runs, "the CPU onnxruntime must not shadow the GPU one"


def test_mlflow_image_has_the_postgres_driver() -> None:
    runs = " ".join(a for op, a in instructions("mlflow.Dockerfile") if op == "RUN")
    assert "psycopg2-binary==" in runs and "mlflow==" in runs


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".tandem"} <= ignored


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_the_images(overlay: str) -> None:
    """Pods of our images run as the image's user and open only ports the image declares."""
    for w in workloads(render(overlay)):
        for c in containers(w):
            image = c["image"].rsplit("/", 1)[-1].split(":")[0]
            if image not in IMAGES:
                continue
            last = stages(IMAGES[image])[-1]
            uid = int(next(a for op, a in reversed(last) if op == "USER").split(":")[0])
            assert pod_spec(w)["securityContext"]["runAsUser"] == uid, f"{w['metadata']['name']}: uid"
            exposed = {int(p) for op, a in last if op == "EXPOSE" for p in shlex.split(a)}
            assert {p["containerPort"] for p in c.get("ports", [])} <= exposed, f"{w['metadata']['name']}: ports"
