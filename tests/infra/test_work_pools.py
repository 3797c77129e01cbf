"""The work-pool templates in infra/work-pools/: Prefect accepts them, and the Kubernetes one renders,
through prefect-kubernetes' own job-configuration code, into a job with the GPU limit, node selector,
tolerations and volumes the job variables set."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POOLS = ROOT / "infra" / "work-pools"


def _template(name: str) -> dict:
    return json.loads((POOLS / name).read_text())


def _render(values: dict) -> dict:
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async def go():
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(
            _template("kubernetes-gpu.json"), values)
        config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="editforge-render-test", flow_id=uuid.uuid4()))
        return config.job_manifest

    return asyncio.run(go())


def test_every_template_passes_prefects_own_validation():
    from prefect.server.schemas.actions import WorkPoolCreate

    for path in sorted(POOLS.glob("*.json")):
        kind = "kubernetes" if "kubernetes" in path.name else "process"
        WorkPoolCreate(name=path.stem, type=kind, base_job_template=json.loads(path.read_text()))


def test_the_kubernetes_job_has_what_the_job_variables_say():
    pvc = {"name": "runs", "persistentVolumeClaim": {"claimName": "editforge-runs"}}
    manifest = _render({"gpu": 2, "image": "registry.example/editforge:1", "node_selector": {"gpu": "h100"},
                        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                        "volumes": [pvc], "volume_mounts": [{"name": "runs", "mountPath": "/runs"}],
                        "env": {"EDITFORGE_HOME": "/opt/editforge"}})
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2 == container["resources"]["requests"]["nvidia.com/gpu"]
    assert container["image"] == "registry.example/editforge:1"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "dedicated"
    assert pod["volumes"] == [pvc] and container["volumeMounts"] == [{"name": "runs", "mountPath": "/runs"}]
    assert {"name": "EDITFORGE_HOME", "value": "/opt/editforge"} in container["env"]
    assert manifest["spec"]["backoffLimit"] == 0 and manifest["metadata"]["namespace"] == "editforge"


def test_the_kubernetes_defaults_hold_one_gpu_tolerate_gpu_nodes_and_mount_shared_memory():
    manifest = _render({})
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


@pytest.mark.parametrize("name", ["process.json", "kubernetes-gpu.json"])
def test_every_template_variable_has_a_title(name):
    """The server's schema validation reads every property's and definition's title."""
    variables = _template(name)["variables"]
    assert all("title" in p for p in variables["properties"].values())
    assert all("title" in d for d in variables.get("definitions", {}).values())
