"""The KubeRay manifests (infra/k8s/) validate against Kubernetes' and KubeRay's own schemas, with unknown
fields rejected, and agree with the code: image, entrypoints and their config, service account, secrets,
schedule and sizing. Offline: Kubernetes schemas from kubernetes-validate, KubeRay's CRD schemas vendored in
infra/k8s/schemas/ (see its README)."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
import zoneinfo
from collections.abc import Callable, Iterator
from fractions import Fraction
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version
from referencing import Registry, Resource

from pipeline.config import JobConfig

from .infra_contract import (
    CLUSTER_CONFIGS,
    CREDENTIAL,
    IMAGE,
    REPO,
    check_cpu_group,
    check_image,
    check_job_command,
    check_vllm_decode,
    image_ray_version,
    project_version,
    requirement,
)

K8S = REPO / "infra" / "k8s"
SCHEMAS = K8S / "schemas"
JOB_CONFIG = REPO / "configs" / "llava-1.5-7b.yaml"
# The oldest Kubernetes minor the manifests target: a field added after it fails. Every kubernetes-validate
# that pyproject allows (>= 1.31) ships its schemas.
K8S_VERSION = "1.31"
SECRETS = {"ray-auth-token", "hf-token"}  # created by the user (infra/README.md), never in a manifest
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
CACHE_ENV = {"HF_HOME": "/mnt/cache/huggingface", "RESPRUNE_CACHE": "/mnt/cache/resprune"}

Doc = dict[str, Any]


# --- loading ------------------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> list[tuple[str, Doc]]:
    """(file name, object) for every Kubernetes object kustomize applies: not the kustomization itself."""
    return [(p.name, d) for p in yaml_files() if p.name != "kustomization.yaml" for d in load_docs(p)]


def only(kind: str) -> Doc:
    found = [d for _, d in manifests() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in infra/k8s, found {len(found)}"
    return found[0]


def kustomization() -> Doc:
    (doc,) = load_docs(K8S / "kustomization.yaml")
    return doc


def job_specs() -> list[tuple[str, Doc]]:
    """Every RayJob spec: the RayJobs' and the RayCronJobs' templates."""
    out = []
    for _, d in manifests():
        if d["kind"] == "RayJob":
            out.append((f"RayJob/{d['metadata']['name']}", d["spec"]))
        elif d["kind"] == "RayCronJob":
            out.append((f"RayCronJob/{d['metadata']['name']}.jobTemplate", d["spec"]["jobTemplate"]))
    return out


def pod_templates(doc: Doc) -> list[tuple[str, Doc]]:
    """(where, PodTemplateSpec) for each pod template a Ray object embeds."""
    cluster_specs, jobs = [], []
    if doc["kind"] == "RayCluster":
        cluster_specs.append(doc["spec"])
    elif doc["kind"] in ("RayJob", "RayCronJob"):
        job = doc["spec"] if doc["kind"] == "RayJob" else doc["spec"]["jobTemplate"]
        jobs.append(job)
        if "rayClusterSpec" in job:
            cluster_specs.append(job["rayClusterSpec"])
    out = []
    for spec in cluster_specs:
        out.append(("headGroupSpec.template", spec["headGroupSpec"]["template"]))
        for group in spec.get("workerGroupSpecs", []):
            out.append((f"workerGroupSpecs[{group['groupName']}].template", group["template"]))
    out += [("submitterPodTemplate", j["submitterPodTemplate"]) for j in jobs if "submitterPodTemplate" in j]
    return out


def all_pod_templates() -> list[tuple[str, Doc]]:
    return [(f"{name_of(d)}.{where}", t) for _, d in manifests() for where, t in pod_templates(d)]


def name_of(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def worker_group(name: str) -> Doc:
    (group,) = [g for g in only("RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    return group


def ray_container(template: Doc) -> Doc:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


@cache
def job_config(command: str) -> JobConfig:
    return check_job_command(command)  # imports the job (torch, ray): once per command


def quantity(q: str | float) -> Fraction:
    """A Kubernetes resource quantity ("500m", "16", "160Gi", "32G") as a number."""
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", str(q))
    assert m, f"{q!r} is not a quantity this test knows"
    scale = {None: 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
             "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    return Fraction(m[1]) * scale[m[2]]


# --- 1. parse -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path.name}: no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
        for key in ("apiVersion", "kind"):
            assert isinstance(doc.get(key), str) and doc[key], f"{path.name}: a document has no {key}"
        assert (doc.get("metadata") or {}).get("name"), f"{path.name}: {doc['kind']} has no metadata.name"


def test_every_object_has_a_schema_here() -> None:
    # A kind with no schema in this test would go unvalidated: it must be added here first.
    for name, doc in manifests():
        core = "." not in doc["apiVersion"].split("/")[0] or doc["apiVersion"] == "v1"
        assert core or doc["apiVersion"] == "ray.io/v1", f"{name}: no schema for {doc['apiVersion']}"
        assert core or doc["kind"] in RAY_KINDS, f"{name}: no vendored schema for {doc['kind']}"


# --- 2. core Kubernetes schemas (kubernetes-validate) -------------------------------------------------------


def _k8s_schema_dir() -> Any:
    return resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"


@cache
def k8s_validator(definition: str) -> jsonschema.protocols.Validator:
    """A strict (unknown fields rejected) validator for one definition of kubernetes-validate's schemas, e.g.
    io.k8s.api.core.v1.PodTemplateSpec: the same files and resolution as kubernetes_validate.validate."""
    defs = json.loads((_k8s_schema_dir() / "_definitions.json").read_text())
    schema = {"$schema": defs["$schema"], "$id": "https://kubernetes.io/api/test-infra-k8s",
              "$ref": f"/api/_definitions.json#/$defs/{definition}"}
    registry = Resource.from_contents(defs) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_kubernetes_validate_ships_the_target_version() -> None:
    assert _k8s_schema_dir().is_dir(), f"kubernetes-validate {kubernetes_validate.__version__} lacks {K8S_VERSION}"
    assert "additionalProperties" in json.loads((_k8s_schema_dir() / "podtemplatespec-v1.json").read_text())


@pytest.mark.parametrize(
    "doc", [d for _, d in manifests() if d["apiVersion"] != "ray.io/v1"], ids=name_of
)
def test_core_objects_validate(doc: Doc) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError / SchemaNotFoundError


@pytest.mark.parametrize(("where", "template"), all_pod_templates(), ids=[w for w, _ in all_pod_templates()])
def test_pod_templates_validate(where: str, template: Doc) -> None:
    # KubeRay's CRDs embed the pod schema of the Kubernetes it was built against; this holds the templates to
    # the target version's, unknown fields rejected (e.g. a misspelled `tolerations`).
    k8s_validator("io.k8s.api.core.v1.PodTemplateSpec").validate(template)


def test_core_validation_bites() -> None:
    sa = copy.deepcopy(only("ServiceAccount"))
    sa["automountServiceAccountTokens"] = False  # misspelled
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sa, K8S_VERSION, strict=True)
    (_, template), *_ = pod_templates(only("RayCluster"))
    bad = copy.deepcopy(template)
    bad["spec"]["toleration"] = []
    with pytest.raises(jsonschema.ValidationError):
        k8s_validator("io.k8s.api.core.v1.PodTemplateSpec").validate(bad)
    bad = copy.deepcopy(template)
    ray_container(bad)["resources"]["limits"]["memory"] = ["16Gi"]  # a quantity is a string or a number
    with pytest.raises(jsonschema.ValidationError):
        k8s_validator("io.k8s.api.core.v1.PodTemplateSpec").validate(bad)


# --- 3. KubeRay CRD schemas (vendored) ----------------------------------------------------------------------


def strict_json_schema(node: Doc) -> Doc:
    """A CRD's structural OpenAPI v3 schema -> JSON Schema, with unknown fields rejected: the API server would
    prune them silently, here they fail."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):  # e.g. resource quantities: 16 or "16Gi"
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {name: strict_json_schema(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_json_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict_json_schema(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict_json_schema(s) for s in out[key]]
    if isinstance(out.get("not"), dict):
        out["not"] = strict_json_schema(out["not"])
    return out


INT_FORMATS = jsonschema.FormatChecker(formats=())


@INT_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@INT_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@cache
def kuberay_validator(kind: str) -> jsonschema.protocols.Validator:
    path = SCHEMAS / f"ray.io_{kind.lower()}s.v1.json.gz"
    assert path.exists(), f"no vendored schema for {kind}: {path.relative_to(REPO)} (see infra/k8s/schemas/README.md)"
    schema = strict_json_schema(json.loads(gzip.decompress(path.read_bytes())))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=INT_FORMATS)


def kuberay_errors(doc: Doc) -> list[jsonschema.ValidationError]:
    return sorted(kuberay_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))


def test_vendored_schemas_are_documented() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    for kind in RAY_KINDS:
        name = f"ray.io_{kind.lower()}s.v1.json.gz"
        assert (SCHEMAS / name).exists() and name in readme, f"{name}: missing, or not in schemas/README.md"
    assert re.search(r"\b[0-9a-f]{40}\b", readme), "schemas/README.md names no KubeRay commit"


@pytest.mark.parametrize(
    "doc", [d for _, d in manifests() if d["apiVersion"] == "ray.io/v1"], ids=name_of
)
def test_kuberay_objects_validate(doc: Doc) -> None:
    errors = kuberay_errors(doc)
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # The CRDs leave metadata to the API server: hold it to ObjectMeta.
    k8s_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta").validate(doc["metadata"])


def _set(path: str, value: object) -> Callable[[Doc], None]:
    """A mutation of a copy of the RayCluster: set the dotted `path` (list indices as numbers) to `value`."""

    def mutate(doc: Doc) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        pytest.param(_set("spec.workerGroupSpecs.0.minReplica", 0), "spec.workerGroupSpecs.0", id="misspelled-field"),
        pytest.param(_set("spec.enableInTreeAutoscaler", True), "spec", id="misspelled-spec-field"),
        pytest.param(_set("spec.workerGroupSpecs.0.maxReplicas", "8"), "spec.workerGroupSpecs.0.maxReplicas",
                     id="wrong-type"),
        pytest.param(_set("spec.workerGroupSpecs.1.maxReplicas", 2**31), "spec.workerGroupSpecs.1.maxReplicas",
                     id="int32-overflow"),
        pytest.param(_set("spec.workerGroupSpecs.1.rayStartParams.object-store-memory", 32_000_000_000),
                     "spec.workerGroupSpecs.1.rayStartParams.object-store-memory", id="rayStartParams-not-string"),
        pytest.param(_set("spec.authOptions.mode", "tokens"), "spec.authOptions.mode", id="enum"),
        pytest.param(_set("spec.headGroupSpec.template.spec.toleration", []), "spec.headGroupSpec.template.spec",
                     id="misspelled-pod-field"),
        pytest.param(_set("spec.headGroupSpec.template.spec.containers.0.resources.limits.cpu", "four"),
                     "spec.headGroupSpec.template.spec.containers.0.resources.limits.cpu", id="bad-quantity"),
    ],
)
def test_kuberay_validation_bites(mutate: Callable[[Doc], None], where: str) -> None:
    doc = copy.deepcopy(only("RayCluster"))
    assert not kuberay_errors(doc)
    mutate(doc)
    errors = kuberay_errors(doc)
    assert any(".".join(map(str, e.absolute_path)) == where for e in errors), (
        f"expected an error at {where}, got {[('.'.join(map(str, e.absolute_path)), e.message) for e in errors]}"
    )


def test_kuberay_operator_rules() -> None:
    # Rules KubeRay's operator enforces in Go (ray-operator/controllers/ray/utils/validation.go), not in the CRD.
    for where, job in job_specs():
        assert job.get("clusterSelector"), f"{where}: submit to the long-lived cluster (clusterSelector)"
        assert "rayClusterSpec" not in job, f"{where}: clusterSelector and rayClusterSpec: the cluster is written once"
        assert not job.get("backoffLimit"), f"{where}: backoffLimit is incompatible with clusterSelector"
        assert not job.get("suspend"), f"{where}: clusterSelector mode cannot be suspended"
        assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode", f"{where}: submissionMode K8sJobMode"
        assert job.get("shutdownAfterJobFinishes") is False, f"{where}: never shut down the shared cluster"
        assert not job.get("ttlSecondsAfterFinished"), f"{where}: no TTL without shutdownAfterJobFinishes"
        assert 0 < job["activeDeadlineSeconds"], f"{where}: activeDeadlineSeconds must be positive"
    for _, doc in manifests():
        if doc["kind"] == "RayCronJob":
            # The child RayJob's name is the RayCronJob's plus a suffix (MaxRayCronJobNameLength = 63 - 6 - 11).
            assert len(doc["metadata"]["name"]) <= 46, f"{doc['metadata']['name']}: RayCronJob name too long"
            assert "TZ" not in doc["spec"]["schedule"], "use timeZone, not TZ= in the schedule"
    for group in only("RayCluster")["spec"]["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], f"{group['groupName']}: minReplicas > maxReplicas"


# --- 4. agreement with the code -----------------------------------------------------------------------------


def test_ray_version_matches_the_image() -> None:
    ray_version = only("RayCluster")["spec"]["rayVersion"]
    wanted = requirement("ray")
    assert Version(ray_version) in wanted.specifier, f"rayVersion {ray_version}: pyproject.toml wants {wanted}"
    pinned = image_ray_version()
    assert pinned == ray_version, f"rayVersion {ray_version} but the image pins ray {pinned}"


def test_images() -> None:
    templates = all_pod_templates()
    assert templates
    for where, template in templates:
        spec = template["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            check_image(container["image"])
            assert ":" not in container["image"], f"{where}: leave the tag to kustomization.yaml (images:)"
    images = kustomization()["images"]
    assert [i["name"] for i in images] == [IMAGE], f"kustomization images: set {IMAGE} only"
    assert images[0]["newTag"] == project_version(), f"kustomization newTag: the project version {project_version()}"
    check_image(f"{images[0]['newName']}:{images[0]['newTag']}")


def test_kustomization_lists_every_manifest() -> None:
    listed = kustomization()["resources"]
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    on_disk = {p.relative_to(K8S).as_posix() for p in yaml_files() if p.name != "kustomization.yaml"} - {
        p.relative_to(K8S).as_posix() for p in SCHEMAS.rglob("*.yaml")
    }
    assert sorted(listed) == sorted(on_disk), f"kustomization.yaml resources {listed} != files {sorted(on_disk)}"


def test_entrypoints_run_the_job() -> None:
    jobs = dict(job_specs())
    (backfill,) = [j for w, j in jobs.items() if w.startswith("RayJob/")]
    (nightly,) = [j for w, j in jobs.items() if w.startswith("RayCronJob/")]
    for where, job in jobs.items():
        cfg = job_config(job["entrypoint"])
        assert cfg.input.path.startswith("s3://") and cfg.output.path.startswith("s3://"), f"{where}: S3 in and out"
        assert shlex.split(job["entrypoint"])[3] == "/app/configs/llava-1.5-7b.yaml", f"{where}: the cluster config"
    assert "--resume" in shlex.split(backfill["entrypoint"])
    assert job_config(backfill["entrypoint"]).output.mode == "resume"
    assert "--incremental" in shlex.split(nightly["entrypoint"])
    assert job_config(nightly["entrypoint"]).output.incremental


def test_submitted_configs_decode_on_vllm() -> None:
    # The image's vLLM environment is what the GPU pods decode with; every config a manifest submits uses it.
    for where, job in job_specs():
        config = shlex.split(job["entrypoint"])[3].removeprefix("/app/")
        assert config in CLUSTER_CONFIGS, f"{where}: submits {config}, not one of the cluster configs"
        check_vllm_decode(job_config(job["entrypoint"]), where)


@pytest.mark.parametrize("config", CLUSTER_CONFIGS)
def test_cluster_configs_decode_on_vllm_within_their_gpu_share(config: str) -> None:
    from pipeline.config import load_config

    cfg = load_config(REPO / config)
    check_vllm_decode(cfg, config)
    assert cfg.encode_stage.num_gpus + cfg.decode_stage.num_gpus == 1, f"{config}: a replica fills one GPU"


def test_vllm_sizing_check_bites() -> None:
    from pipeline.config import load_config

    cfg = load_config(JOB_CONFIG)
    stage = cfg.decode_stage
    bad = [
        cfg.model_copy(update={"decode_stage": stage.model_copy(update={"engine": "hf"})}),
        cfg.model_copy(update={"decode_stage": stage.model_copy(
            update={"vllm": stage.vllm.model_copy(update={"gpu_memory_utilization": 0.9})})}),
        cfg.model_copy(update={"decode_stage": stage.model_copy(
            update={"vllm": stage.vllm.model_copy(update={"max_num_seqs": stage.batch_size + 1})})}),
        cfg.model_copy(update={"decode_stage": stage.model_copy(
            update={"vllm": stage.vllm.model_copy(update={"python": "/usr/bin/python3"})})}),
        cfg.model_copy(update={"decode_stage": stage.model_copy(
            update={"vllm": stage.vllm.model_copy(update={"max_model_len": 1024})})}),  # no prompt bound
    ]
    for config in bad:
        with pytest.raises(AssertionError):
            check_vllm_decode(config, "mutated")


def test_jobs_select_the_cluster() -> None:
    cluster = only("RayCluster")["metadata"]["name"]
    for where, job in job_specs():
        assert job["clusterSelector"] == {"ray.io/cluster": cluster}, f"{where}: clusterSelector must name {cluster}"


def test_pods_run_as_the_service_account() -> None:
    sa = only("ServiceAccount")
    role = sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role), f"ServiceAccount: IRSA role ARN, got {role!r}"
    for where, template in all_pod_templates():
        assert template["spec"].get("serviceAccountName") == sa["metadata"]["name"], f"{where}: serviceAccountName"


def _secret_refs(node: object, path: str = "") -> Iterator[tuple[str, str]]:
    """(where, secret name) for every reference to a Secret: secretName, secretKeyRef / secretRef names."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if key == "secretName" and isinstance(value, str):
                yield where, value
            elif key in ("secretKeyRef", "secretRef") and isinstance(value, dict):
                yield where, value.get("name", "")
            else:
                yield from _secret_refs(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _secret_refs(item, f"{path}[{i}]")


def test_secrets_are_referenced_never_written() -> None:
    refs = [(f"{name}:{where}", secret) for name, doc in manifests() for where, secret in _secret_refs(doc)]
    for where, secret in refs:
        assert secret in SECRETS, f"{where}: secret {secret!r} is not one of {sorted(SECRETS)} (infra/README.md)"
    auth = only("RayCluster")["spec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "ray-auth-token"}, f"authOptions: {auth}"
    assert {s for _, s in refs} == SECRETS
    for name, doc in manifests():
        assert doc["kind"] != "Secret", f"{name}: a Secret in a manifest"
    for where, template in all_pod_templates():
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if re.search(r"TOKEN|SECRET|PASSWORD|KEY", env["name"]):
                    assert "value" not in env, f"{where}: {env['name']} as a literal value"
    for path in yaml_files():
        hit = CREDENTIAL.search(path.read_text())
        assert not hit, f"{path.relative_to(REPO)}: looks like a credential: {hit[0]!r}"


def test_pods_cache_weights_and_read_the_hf_token() -> None:
    for where, template in all_pod_templates():
        container = ray_container(template)
        env = {e["name"]: e for e in container.get("env", [])}
        for name, value in CACHE_ENV.items():
            assert env.get(name, {}).get("value") == value, f"{where}: {name}={value}"
        assert env.get("HF_TOKEN", {}).get("valueFrom") == {
            "secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}
        }, f"{where}: HF_TOKEN from secret hf-token, key token, optional (only gated checkpoints need it)"
        for kind in ("cpu", "memory", "nvidia.com/gpu"):
            requests, limits = (container["resources"].get(k, {}).get(kind) for k in ("requests", "limits"))
            assert requests == limits, f"{where}: {kind} requests {requests} != limits {limits}"
    cluster = only("RayCluster")["spec"]
    for where, template in [("head", cluster["headGroupSpec"]["template"]), ("gpu", worker_group("gpu")["template"])]:
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in ray_container(template).get("volumeMounts", [])}
        assert "/mnt/cache" in mounts, f"{where}: mount the node cache at /mnt/cache"
        host_path = volumes[mounts["/mnt/cache"]].get("hostPath")
        assert host_path == {"path": "/mnt/resprune-cache", "type": "DirectoryOrCreate"}, f"{where}: {host_path}"


def cron_period_s(schedule: str) -> int:
    """The period of a daily `m h * * *` schedule; anything else fails (add it here if you need it)."""
    fields = schedule.split()
    assert len(fields) == 5, f"{schedule!r}: not a 5-field cron schedule"
    minute, hour, *rest = fields
    assert minute.isdigit() and int(minute) < 60 and hour.isdigit() and int(hour) < 24 and rest == ["*"] * 3, (
        f"{schedule!r}: only daily schedules (m h * * *) are understood here"
    )
    return 86400


def test_cron_deadline_is_shorter_than_the_period() -> None:
    (cron,) = [d for _, d in manifests() if d["kind"] == "RayCronJob"]
    period = cron_period_s(cron["spec"]["schedule"])
    deadline = cron["spec"]["jobTemplate"].get("activeDeadlineSeconds")
    assert deadline and deadline < period, f"activeDeadlineSeconds {deadline} must be under the period {period} s"
    zoneinfo.ZoneInfo(cron["spec"]["timeZone"])  # a real zone; without it the operator's local zone is used
    with pytest.raises(AssertionError):
        cron_period_s("*/30 * * * *")


def test_sizing_matches_the_config() -> None:
    cfg = job_config(only("RayJob")["spec"]["entrypoint"])
    head, cpu, gpu = only("RayCluster")["spec"]["headGroupSpec"], worker_group("cpu"), worker_group("gpu")
    assert head["rayStartParams"].get("num-cpus") == "0", "head: num-cpus 0, the driver runs there"

    # The GPU group: one replica (an encode and a decode actor) per one-GPU pod, as many pods as pool actors.
    gpu_res = ray_container(gpu["template"])["resources"]["requests"]
    assert quantity(gpu_res["nvidia.com/gpu"]) == 1, "gpu pod: one GPU"
    assert gpu["maxReplicas"] == cfg.encode_stage.max_pool_size == cfg.decode_stage.max_pool_size, (
        f"gpu maxReplicas {gpu['maxReplicas']} != encode/decode max_pool_size "
        f"{cfg.encode_stage.max_pool_size}/{cfg.decode_stage.max_pool_size}"
    )
    assert cfg.encode_stage.num_gpus + cfg.decode_stage.num_gpus == 1, "a replica must fill exactly one GPU"
    replica_cpus = cfg.encode_stage.num_cpus + cfg.decode_stage.num_cpus
    assert replica_cpus <= quantity(gpu_res["cpu"]), f"a replica's {replica_cpus} CPUs do not fit a gpu pod"
    store = quantity(gpu["rayStartParams"]["object-store-memory"])
    assert store < quantity(gpu_res["memory"]), "the object store (in /dev/shm) counts against the pod's memory"
    assert "H100" in gpu["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert cfg.cost.accelerator.startswith("h100"), "cost.accelerator prices the GPU the gpu group asks for"
    assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
               for t in gpu["template"]["spec"].get("tolerations", [])), "gpu pods tolerate the nvidia.com/gpu taint"

    # The CPU group: no GPU; the noun and preparation stages' actors fit, and their pools at full size.
    cpu_res = ray_container(cpu["template"])["resources"]["requests"]
    assert "nvidia.com/gpu" not in cpu_res and cfg.text_stage.num_gpus == 0
    assert cfg.text_stage.num_cpus <= quantity(cpu_res["cpu"]), "a text_stage actor does not fit a cpu pod"
    check_cpu_group(float(quantity(cpu_res["cpu"])), cpu["maxReplicas"], "raycluster.yaml cpu group")

    # The sizing comment at the top of the config names the same pods.
    text = JOB_CONFIG.read_text()
    m_gpu = re.search(r"GPU node \(pod\):\s*(\d+)\s*x\s*H100[^,]*,\s*(\d+)\s*CPUs", text)
    m_cpu = re.search(r"CPU node \(pod\):\s*(\d+)\s*CPUs", text)
    assert m_gpu and m_cpu, f"{JOB_CONFIG.name}: the sizing comment (GPU node / CPU node) is gone"
    assert (quantity(m_gpu[1]), quantity(m_gpu[2])) == (quantity(gpu_res["nvidia.com/gpu"]), quantity(gpu_res["cpu"]))
    assert quantity(m_cpu[1]) == quantity(cpu_res["cpu"]), f"{JOB_CONFIG.name} says CPU pods have {m_cpu[1]} CPUs"
