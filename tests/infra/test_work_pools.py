"""The work-pool templates in infra/work-pools/: Prefect accepts them, and the Kubernetes job of every
deployment of infra/prefect.yaml, rendered by prefect-kubernetes' own code as its worker does, is a Job
the Kubernetes API accepts — validated strictly (no unknown field anywhere) against the API schemas of
several minor versions that `kubernetes-validate` ships."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
POOLS = ROOT / "infra" / "work-pools"
KUBERNETES_VERSIONS = ("1.28", "1.30", "1.33", "1.37")  # oldest supported by cloud vendors .. newest shipped


def _template(name: str) -> dict:
    return json.loads((POOLS / name).read_text())


def _render_all(jobs: dict[str, tuple[str, dict]]) -> dict[str, dict]:
    """Each (template, job variables) rendered and prepared for a flow run, as the Kubernetes worker does."""
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async def go():
        out = {}
        for key, (template, values) in jobs.items():
            config = await KubernetesWorkerJobConfiguration.from_template_and_values(_template(template), values)
            flow_run = FlowRun(id=uuid.uuid4(), name="render[0-7]", flow_id=uuid.uuid4())
            config.prepare_for_flow_run(flow_run, flow=Flow(id=flow_run.flow_id, name="editforge-render"))
            out[key] = config.job_manifest
        return out

    return asyncio.run(go())


def _deployment_jobs() -> dict[str, tuple[str, dict]]:
    """Every deployment of infra/prefect.yaml on its Kubernetes pool (`make deploy POOL_TYPE=kubernetes`)."""
    from flows.deploy import prefect_file_for

    spec = yaml.safe_load(prefect_file_for(kubernetes=True))
    jobs = {}
    for d in spec["deployments"]:
        pool = d["work_pool"]["name"]
        assert pool.startswith("editforge-k8s-"), (d["name"], pool)
        template = "kubernetes-gpu.json" if pool.endswith("-gpu") else "kubernetes-cpu.json"
        jobs[d["name"]] = (template, d["work_pool"].get("job_variables") or {})
    return jobs


CUSTOM = {"gpu": 4, "image": "registry.example/editforge:0.1.0", "image_pull_policy": "Always",
          "image_pull_secrets": [{"name": "regcred"}], "node_selector": {"nvidia.com/gpu.product": "H100"},
          "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
          "env": {"EDITFORGE_LEASE_TTL_S": "600"}, "env_from": [{"secretRef": {"name": "s3-credentials"}}],
          "secret_env": [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai", "key": "api-key"}}}],
          "priority_class_name": "editforge-batch", "shm_size": "64Gi", "active_deadline_seconds": 7200,
          "output_volume": {"name": "output", "emptyDir": {}}, "models_mount_path": "/weights"}


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict]:
    wanted = {**_deployment_jobs(), "custom": ("kubernetes-gpu.json", CUSTOM)}
    return _render_all(wanted)


def _strict(manifest: dict, version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(manifest, version, strict=True)


def test_kubernetes_validate_ships_the_versions_validated_here():
    from kubernetes_validate.utils import all_versions

    shipped = {".".join(v.split(".")[:2]) for v in all_versions()}
    assert set(KUBERNETES_VERSIONS) <= shipped, shipped


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_deployments_kubernetes_job_is_valid_strictly(jobs, version):
    import kubernetes_validate

    for name, manifest in jobs.items():
        try:
            _strict(manifest, version)
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(f"{name} on Kubernetes {version}: {err.message} at "
                                 f"{'.'.join(str(p) for p in err.caught.absolute_path)}") from None


def test_the_strict_validation_rejects_the_job_fields_in_the_pod_spec(jobs):
    """The old template's error (parallelism/completions rendered into the pod spec) fails the check."""
    import kubernetes_validate

    bad = copy.deepcopy(jobs["paper-render"])
    bad["spec"]["template"]["spec"]["parallelism"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="Additional properties"):
        _strict(bad, "1.33")


def test_the_job_has_what_the_job_variables_say(jobs):
    manifest = jobs["custom"]
    spec, pod = manifest["spec"], manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["parallelism"] == spec["completions"] == 1 and "parallelism" not in pod
    assert spec["activeDeadlineSeconds"] == 7200 and spec["ttlSecondsAfterFinished"] == 3600 and spec["backoffLimit"] == 0
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4 == container["resources"]["requests"]["nvidia.com/gpu"]
    assert container["image"] == "registry.example/editforge:0.1.0" and container["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["priorityClassName"] == "editforge-batch"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"} and pod["tolerations"][0]["key"] == "dedicated"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "openai", "key": "api-key"}
    assert env["EDITFORGE_LEASE_TTL_S"]["value"] == "600" and "PREFECT__FLOW_RUN_ID" in env  # Prefect's own too
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}
    assert volumes["output"] == {"name": "output", "emptyDir": {}}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/weights", "readOnly": True}
    assert mounts["dshm"]["mountPath"] == "/dev/shm" and mounts["output"]["mountPath"] == "/runs"


def test_the_defaults_run_non_root_on_a_versioned_image_with_models_read_only_and_secrets_from_secrets(jobs):
    for name in ("paper-render", "paper-filter", "paper"):
        manifest = jobs[name]
        pod = manifest["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        tag = container["image"].rsplit(":", 1)[-1]
        assert ":" in container["image"] and tag != "latest" and container["imagePullPolicy"] == "IfNotPresent", name
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and volumes["dshm"]["emptyDir"]["sizeLimit"]
        assert container["envFrom"] == [{"secretRef": {"name": "editforge-env", "optional": True}}]
        assert not [e for e in container["env"] if any(k in e["name"] for k in ("SECRET", "KEY", "PASSWORD", "TOKEN"))]
        assert manifest["spec"]["activeDeadlineSeconds"] > 0 and manifest["spec"]["ttlSecondsAfterFinished"] > 0
    gpu, cpu = (jobs[n]["spec"]["template"]["spec"] for n in ("paper-render", "paper-filter"))
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"] and cpu["tolerations"] == []


def test_the_training_deployment_asks_for_its_gpus_and_a_large_shared_memory(jobs):
    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    (train,) = [d for d in spec["deployments"] if d["name"] == "paper-train"]
    wanted = train["work_pool"]["job_variables"]
    pod = jobs["paper-train"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == wanted["gpu"]
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    default = _template("kubernetes-gpu.json")["variables"]["properties"]["shm_size"]["default"]
    assert dshm["emptyDir"]["sizeLimit"] == wanted["shm_size"] != default
    # `processes: auto` launches one process per GPU the pod gets: the paper's 1024 = 32 x 4 x 8 processes
    from tasks.common.config import load_config

    paper = load_config("paper", [f"train.processes={wanted['gpu']}"]).train
    assert wanted["gpu"] == 8 and paper.accumulation(wanted["gpu"]) == 4
    assert paper.batch_line(wanted["gpu"]) == "total batch 1024 = 32 × 4 × 8 processes"


def test_every_template_passes_prefects_own_validation():
    from prefect.server.schemas.actions import WorkPoolCreate

    for path in sorted(POOLS.glob("*.json")):
        kind = "kubernetes" if "kubernetes" in path.name else "process"
        WorkPoolCreate(name=path.stem, type=kind, base_job_template=json.loads(path.read_text()))


@pytest.mark.parametrize("name", ["process.json", "kubernetes-gpu.json", "kubernetes-cpu.json"])
def test_every_template_variable_has_a_title(name):
    """The server's schema validation reads every property's and definition's title."""
    variables = _template(name)["variables"]
    assert all("title" in p for p in variables["properties"].values())
    assert all("title" in d for d in variables.get("definitions", {}).values())
