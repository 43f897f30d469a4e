"""What every file under infra/ must agree on with the code, in one place for the infra tests.

The container image (infra/docker/Dockerfile) holds the repository at ``APP_ROOT``; manifests
name the image ``IMAGE`` (a registry prefix and a tag may be added) and run the job as
``python /app/jobs/<script>.py --config /app/configs/<name>.yaml ...``.
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
    """The one ``ray[...]==X`` pin of the image (infra/docker/Dockerfile)."""
    assert DOCKERFILE.exists(), f"{DOCKERFILE.relative_to(REPO)} is missing"
    pins = set(re.findall(r"\bray\[[^\]]*\]==([0-9][\w.]*)", DOCKERFILE.read_text()))
    assert len(pins) == 1, f"{DOCKERFILE.relative_to(REPO)} must pin ray[...]==X exactly once, has {sorted(pins)}"
    return pins.pop()
