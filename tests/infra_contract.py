"""What every file under infra/ must agree on with the code, in one place for the infra tests.

The container image (infra/docker/Dockerfile) holds the repository at ``APP_ROOT``; manifests
name the image ``IMAGE`` (a registry prefix and a tag may be added) and run the job as
``python /app/jobs/<script>.py --config /app/configs/<name>.yaml ...``. The configs they submit
decode on vLLM, in the image's second environment ``VLLM_ENV`` (``check_vllm_decode``).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
APP_ROOT = "/app"
IMAGE = "resprune-pipeline"
MAIN_ENV = "/opt/venv"  # the image's environment of the driver and the other stages
VLLM_ENV = "/opt/vllm"  # the image's vLLM environment: the decode actors' interpreter
# The real-checkpoint configs, the ones a cluster runs (configs/local*.yaml are the tiny ones, on hf).
CLUSTER_CONFIGS = ("configs/llava-1.5-7b.yaml", "configs/llava-next-7b.yaml", "configs/qwen2.5-vl-7b.yaml")
# Every GPU config the cluster's node groups are sized for (their CPU pools: check_cpu_group).
SIZED_CONFIGS = (*CLUSTER_CONFIGS, "configs/qwen3-vl-8b.yaml", "configs/qwen3.5-9b.yaml")


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def requirement(name: str) -> Requirement:
    """The project's requirement on ``name`` (e.g. ``ray``), from pyproject.toml."""
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml does not depend on {name}")


def repo_path(path_in_image: str) -> Path:
    """``/app/x`` -> ``<repo>/x``; the file must exist in the repository."""
    assert path_in_image.startswith(APP_ROOT + "/"), f"{path_in_image}: not under {APP_ROOT}/"
    local = REPO / path_in_image[len(APP_ROOT) + 1 :]
    assert local.exists(), f"{path_in_image}: {local.relative_to(REPO)} is not in the repository"
    return local


def check_image(ref: str) -> None:
    """``[registry/]resprune-pipeline[:<project version>]``."""
    m = re.fullmatch(r"(?:(?P<registry>[^\s]+)/)?(?P<name>[a-z0-9._-]+)(?::(?P<tag>[\w.-]+))?", ref)
    assert m, f"image {ref!r} is not an image reference"
    assert m["name"] == IMAGE, f"image {ref!r}: the project's image is {IMAGE} (infra/docker/Dockerfile)"
    if m["tag"]:
        assert m["tag"] == project_version(), f"image {ref!r}: tag must be the project version {project_version()}"


def _caption_cli():
    spec = importlib.util.spec_from_file_location("caption_corpus", REPO / "jobs" / "caption_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_job_command(command: str):
    """A job command line as a manifest runs it: the script exists, its CLI accepts the arguments,
    and the config loads with the command line's overrides. Returns the loaded JobConfig."""
    from pipeline.config import load_config

    argv = shlex.split(command)
    assert argv[0] == "python", f"{command!r}: run the job with python"
    script = repo_path(argv[1])
    assert script.relative_to(REPO).as_posix() == "jobs/caption_corpus.py", f"{command!r}: unknown entrypoint"
    cli = _caption_cli()
    try:
        args = cli.build_parser().parse_args(argv[2:])
    except SystemExit as e:  # argparse rejected the arguments
        raise AssertionError(f"{command!r}: jobs/caption_corpus.py rejects these arguments") from e
    config = repo_path(args.config)
    return load_config(config, cli.overrides_from(args))


DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
# What a credential looks like in a manifest: AWS keys, a Ray token or Hugging Face token written out,
# a private key.
CREDENTIAL = re.compile(
    r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|auth_token:\s*\S|hf_[A-Za-z0-9]{30,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY",
    re.IGNORECASE,
)


def image_ray_version() -> str:
    """The image's Ray version: its ``ray[...]==X`` pins (one per environment) must agree, as Ray
    needs the same version in the driver and every worker, the vLLM decode actors' included."""
    assert DOCKERFILE.exists(), f"{DOCKERFILE.relative_to(REPO)} is missing"
    pins = set(re.findall(r"\bray\[[^\]]*\]==([0-9][\w.]*)", DOCKERFILE.read_text()))
    assert len(pins) == 1, f"{DOCKERFILE.relative_to(REPO)} must pin one ray[...]==X version, has {sorted(pins)}"
    return pins.pop()


def _max_visual_tokens(cfg) -> int:
    """The most visual tokens an image can bring (every token kept: method none), over a few shapes."""
    from pipeline.models import token_counts

    arch = str(REPO / cfg.model.architecture)
    sizes = [(336, 336), (672, 672), (4032, 3024), (3024, 4032), (8000, 1000), (1000, 8000)]
    return max(token_counts(arch, cfg.model, w, h, cfg.model.family)[0] for w, h in sizes)


def check_vllm_decode(cfg, where: str) -> None:
    """A cluster config decodes on vLLM in the image's vLLM environment, sized within the decode
    actor's share of the GPU, and every row it accepts fits vLLM's max_model_len."""
    import json

    stage = cfg.decode_stage
    assert stage.engine == "vllm", f"{where}: decode_stage.engine must be vllm on the cluster (infra/README.md)"
    assert stage.vllm.python is None, (
        f"{where}: leave decode_stage.vllm.python unset: the image's RESPRUNE_VLLM_PYTHON names {VLLM_ENV}"
    )
    assert 0 < stage.num_gpus < 1 and stage.vllm.gpu_memory_utilization <= stage.num_gpus, (
        f"{where}: vllm.gpu_memory_utilization {stage.vllm.gpu_memory_utilization} over the decode actor's "
        f"num_gpus {stage.num_gpus}: the encode actor on the same GPU would run out of memory"
    )
    assert stage.vllm.max_num_seqs <= stage.batch_size, (
        f"{where}: vllm.max_num_seqs {stage.vllm.max_num_seqs} > decode_stage.batch_size {stage.batch_size}: one "
        "Ray batch is one generate call, so the extra sequences never run"
    )
    assert cfg.model.architecture, f"{where}: model.architecture (its config.json) is needed to size the engine"
    text = json.loads((REPO / cfg.model.architecture / "config.json").read_text())
    context = text.get("text_config", text)["max_position_embeddings"]
    max_len = stage.vllm.max_model_len or context
    assert max_len <= context, f"{where}: vllm.max_model_len {max_len} over the checkpoint's context {context}"
    if max_len < context:
        # The decode stage bounds prompts by the context (input.max_prompt_tokens when set): without
        # the bound, a prompt between the two limits would fail in vLLM (decode failed), not as
        # `prompt too long`. Room for the template's image markers: 16 tokens.
        prompt = cfg.input.max_prompt_tokens
        need = None if prompt is None else prompt + _max_visual_tokens(cfg) + cfg.generation.max_new_tokens + 16
        assert need is not None and need <= max_len, (
            f"{where}: vllm.max_model_len {max_len} < the context {context} needs input.max_prompt_tokens with "
            f"prompt + visual tokens + max_new_tokens within it (needs {need})"
        )


def check_cpu_group(pod_cpus: float, pods: int, where: str) -> None:
    """The CPU worker group (``pods`` of ``pod_cpus``) holds every sized config's CPU-only pools at
    full size, the noun and preparation stages (max_pool_size x num_cpus), and each of their actors
    fits one pod."""
    from pipeline.config import load_config

    for path in SIZED_CONFIGS:
        cfg = load_config(REPO / path)
        stages = (cfg.text_stage, cfg.prepare_stage)
        assert all(s.num_gpus == 0 and s.num_cpus <= pod_cpus for s in stages), (
            f"{where}: a text_stage / prepare_stage actor of {path} does not fit a {pod_cpus:g}-CPU pod")
        need = sum((s.max_pool_size or s.pool_size) * s.num_cpus for s in stages)
        assert need <= pods * pod_cpus, (
            f"{where}: {path}'s text and prepare pools take {need:g} CPUs at full size; the cpu group has "
            f"{pods} x {pod_cpus:g}")
