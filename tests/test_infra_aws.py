"""infra/aws/cluster.yaml through Ray's own cluster-config validation (offline), and the image
definition (infra/docker/Dockerfile) checked statically against the code: it cannot be built here
(no Docker, no network beyond package registries)."""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

from .infra_contract import (
    APP_ROOT,
    CREDENTIAL,
    DOCKERFILE,
    MAIN_ENV,
    REPO,
    VLLM_ENV,
    check_cpu_group,
    check_image,
    check_job_command,
    check_vllm_decode,
    image_ray_version,
    requirement,
)

LAUNCHER = REPO / "infra" / "aws" / "cluster.yaml"
JOB_CONFIG = REPO / "configs" / "llava-1.5-7b.yaml"


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def ray_validates(config: dict) -> dict:
    """What `ray up` does before touching AWS: fill in the provider's defaults, then validate
    against Ray's schema (ray/autoscaler/ray-schema.json) and its own rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_passes_rays_validation() -> None:
    prepared = ray_validates(launcher())
    # Everything is in the image: Ray's default setup commands (pip install ray) must not creep in.
    assert prepared["setup_commands"] == prepared["head_setup_commands"] == prepared["worker_setup_commands"] == []
    assert set(prepared["available_node_types"]) == {"head", "cpu", "gpu"}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(available_node_type=c.pop("available_node_types")),  # misspelled top-level key
        lambda c: c["available_node_types"]["gpu"].update(min_worker=0),  # misspelled node-type key
        lambda c: c["available_node_types"]["gpu"].update(max_workers="16"),  # wrong type
        lambda c: c.update(head_node_type="gpu-head"),  # names no node type
    ],
)
def test_rays_validation_bites(mutate) -> None:
    config = launcher()
    mutate(config)
    with pytest.raises(Exception):  # noqa: B017 - jsonschema.ValidationError or ValueError, as `ray up` raises them
        ray_validates(config)


def test_launcher_agrees_with_the_code() -> None:
    config = launcher()
    check_image(config["docker"]["image"])
    assert any(f"-v /mnt/resprune-cache:{Path('/mnt/cache')}" == o for o in config["docker"]["run_options"])
    [line] = [ln for ln in LAUNCHER.read_text().splitlines() if ln.startswith("# job: ")]
    cfg = check_job_command(line.removeprefix("# job: "))
    assert cfg.output.incremental
    check_vllm_decode(cfg, "aws/cluster.yaml job")

    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}, "the head runs only the driver"
    gpu = nodes["gpu"]
    assert cfg.encode_stage.num_gpus + cfg.decode_stage.num_gpus <= gpu["resources"]["GPU"]
    assert cfg.encode_stage.num_cpus + cfg.decode_stage.num_cpus <= gpu["resources"]["CPU"]
    assert gpu["max_workers"] == cfg.encode_stage.max_pool_size == cfg.decode_stage.max_pool_size
    assert cfg.text_stage.num_cpus <= nodes["cpu"]["resources"]["CPU"]
    check_cpu_group(nodes["cpu"]["resources"]["CPU"], nodes["cpu"]["max_workers"], "aws/cluster.yaml cpu nodes")
    assert config["max_workers"] >= sum(n.get("max_workers", 0) for n in nodes.values())


def test_launcher_uses_roles_and_token_auth_never_credentials() -> None:
    config = launcher()
    for name, node in config["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), f"{name}: no instance role"
    text = LAUNCHER.read_text()
    hit = CREDENTIAL.search(text)
    assert not hit, f"looks like a credential: {hit[0]!r}"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN=" in start, f"{key}: token authentication"
        assert not re.search(r"echo[^;]*RAY_AUTH_TOKEN|set -x", start), f"{key}: never print the token"


# --- the image ---------------------------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_image_base_workdir_and_user() -> None:
    steps = instructions()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("nvidia/cuda:"), "a CUDA base image"
    assert ("WORKDIR", APP_ROOT) in steps, f"the repository at {APP_ROOT}, where the manifests run the job"
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert "HF_HOME=/mnt/cache/" in env and "RESPRUNE_CACHE=/mnt/cache/" in env, "weights cached under /mnt/cache"
    for op, arg in steps:
        if op in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|_KEY)\w*=", arg), f"{op} {arg}: no secrets in the image"


def test_image_copies_what_exists_and_is_not_ignored() -> None:
    ignored = dockerignore()
    assert {".venv", ".git"} <= set(ignored)
    copies = [shlex.split(arg) for op, arg in instructions() if op == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert not any(fnmatch.fnmatch(src.rstrip("/"), pat) for pat in ignored), f"COPY {src}: in .dockerignore"
    copied = {s.rstrip("/") for *sources, _ in copies for s in sources}
    for needed in ("pyproject.toml", "pipeline", "jobs", "configs"):  # the package and the manifests' entrypoint
        assert needed in copied, f"the image lacks {needed}"


def env_runs(env: str) -> str:
    """The RUN steps that install into ``env``: the vLLM environment's name its pip, the main one's do not."""
    steps = [arg for op, arg in instructions() if op == "RUN"]
    if env == VLLM_ENV:
        return " ".join(arg for arg in steps if VLLM_ENV in arg)
    return " ".join(arg for arg in steps if VLLM_ENV not in arg)


def test_image_pins_the_tested_versions() -> None:
    runs = env_runs(MAIN_ENV)
    torch_pin = re.search(r"torch==([\w.]+)", runs)
    make_pin = re.search(r"^TORCH_SPEC \?= torch==([\w.]+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert torch_pin and make_pin and torch_pin[1] == make_pin[1], "torch: the version the Makefile tests"
    assert "download.pytorch.org/whl/cu" in runs, "torch: a CUDA build"
    ray_version = image_ray_version()
    assert Version(ray_version) in requirement("ray").specifier, f"ray {ray_version} outside pyproject's range"
    assert ray_version == metadata.version("ray"), f"the image pins ray {ray_version}, the tests ran {metadata.version('ray')}"
    assert re.search(r"pip install \S*\[spacy-model\]", runs), "en_core_web_sm: the package's spacy-model extra"


# Runtime dependencies the decode actors import that neither vLLM nor Ray is sure to bring, with
# pyproject's ranges (the package itself goes in with --no-deps).
VLLM_ENV_RUNTIME_DEPS = ("pydantic", "pyyaml", "pyarrow", "boto3", "pillow", "numpy")


def test_image_has_the_vllm_environment() -> None:
    """The second environment the cluster configs decode in: vLLM pinned, the driver's Ray and Python, this package
    without its dependencies (they would replace vLLM's transformers pin), and the variable the driver reads."""
    from pipeline.engines.environment import VLLM_PYTHON_ENV

    steps = instructions()
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert f"{VLLM_PYTHON_ENV}={VLLM_ENV}/bin/python" in env, f"ENV {VLLM_PYTHON_ENV}={VLLM_ENV}/bin/python"
    runs, main = env_runs(VLLM_ENV), env_runs(MAIN_ENV)
    # The same interpreter builds both: Ray needs the driver's Python version in every worker.
    assert f"python3 -m venv {MAIN_ENV}" in main and f"python3 -m venv {VLLM_ENV}" in runs
    assert f"PATH={MAIN_ENV}/bin:" in env, "the main environment is the one on PATH (the driver, `ray`)"
    pins = re.findall(r"\bvllm==([\w.]+)", runs)
    assert len(pins) == 1, f"pin vllm==X exactly once in {VLLM_ENV}, found {pins}"
    assert f"vllm=={pins[0]}" in (REPO / "infra" / "README.md").read_text(), "infra/README.md names the vLLM pin"
    assert "vllm" not in re.sub(r"/opt/vllm|vllm==", "", main), f"vLLM only in {VLLM_ENV}"
    assert re.findall(r"\bray\[[^\]]*\]==([\w.]+)", runs) == [image_ray_version()], f"{VLLM_ENV}: the image's Ray pin"
    assert re.search(r"\btorch==[\w.]+", runs), f"{VLLM_ENV}: torch pinned (vLLM's own pin)"
    assert "--index-url" not in runs, f"{VLLM_ENV}: torch from where vLLM's wheel comes from, built against it"
    assert re.search(rf"{VLLM_ENV}/bin/pip install --no-deps {APP_ROOT}(\s|$)", runs), "this package with --no-deps"
    assert "transformers" not in runs, f"{VLLM_ENV}: transformers is vLLM's to pin"
    for name in VLLM_ENV_RUNTIME_DEPS:
        found = [Requirement(r) for r in re.findall(r'"([^"]+)"', runs) if Requirement(r).name == name]
        assert len(found) == 1, f"{VLLM_ENV}: install {name} once"
        assert found[0].specifier == requirement(name).specifier, f"{VLLM_ENV}: {name}{found[0].specifier} != pyproject"
