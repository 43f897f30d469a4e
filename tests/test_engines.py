"""The engine contract without vLLM itself: where the engine runs, config errors, the engine
registry that config validation, the environment probe, the loader, the planner and the command
lines read, and the Qwen2.5-VL position rule the vLLM model class uses, against transformers' own."""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, DecodeStageConfig, ModelConfig, VLLMConfig, validate_config
from pipeline.engines import engine_environment, engine_names, engine_spec
from pipeline.job import run_identity
from pipeline.models import load_adapter
from pipeline.models.qwen2_5_vl import kept_mrope_positions


def test_the_hf_engine_runs_in_the_drivers_interpreter() -> None:
    env = engine_environment(DecodeStageConfig())
    assert (env.engine, env.package, env.python) == ("hf", "transformers", sys.executable)
    assert env.runtime_env() == {}


def test_a_missing_vllm_environment_is_a_config_error_naming_the_field(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"decode_stage\.vllm\.python: .* does not exist"):
        engine_environment(DecodeStageConfig(engine="vllm", vllm=VLLMConfig(python=str(tmp_path / "python"))))
    # The main environment has no vLLM (it pins an older transformers): named, with the way out.
    with pytest.raises(ConfigError, match=r"decode_stage\.vllm\.python: no vLLM in .*make vllm-env"):
        engine_environment(DecodeStageConfig(engine="vllm", vllm=VLLMConfig(python=sys.executable)))


def test_engine_is_a_validated_field_and_part_of_a_runs_identity() -> None:
    raw = {"input": {"path": "in"}, "output": {"path": "out"}, "model": {"path": "tiny:llava"}}
    with pytest.raises(ConfigError, match=r"decode_stage\.engine: Input should be 'hf' or 'vllm'"):
        validate_config({**raw, "decode_stage": {"engine": "tgi"}})
    with pytest.raises(ConfigError, match=r"decode_stage\.vllm\.max_num_seqs"):
        validate_config({**raw, "decode_stage": {"engine": "vllm", "vllm": {"max_num_seqs": 0}}})
    hf, vllm = validate_config(raw), validate_config({**raw, "decode_stage": {"engine": "vllm"}})
    assert run_identity(hf)["engine"] == "hf" and run_identity(vllm)["engine"] == "vllm"  # resume refuses a switch


REPO = Path(__file__).resolve().parents[1]


def _cli(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_registry_entry_names_a_class_that_agrees_with_it() -> None:
    """The registry is read without importing the engines (config validation, the planner); what
    it states of each class must be what the class is. Both classes import here: vLLM itself only
    when an engine is built."""
    assert engine_names() == ("hf", "vllm")
    for name in engine_names():
        spec = engine_spec(name)
        cls = spec.load_class()
        assert (cls.name, cls.schedules_batches) == (spec.name, spec.schedules_batches), name
        takes = list(inspect.signature(cls.__init__).parameters)[1:]
        assert takes == (["adapter", "stage"] if spec.takes_stage else ["adapter"]), name
    assert engine_spec("vllm").interpreter.config_field == "vllm.python" and engine_spec("hf").interpreter is None
    with pytest.raises(ValueError, match=r"unknown decode engine 'tgi'; known: hf, vllm"):
        engine_spec("tgi")


def test_the_command_lines_offer_the_registered_engines() -> None:
    action = next(a for a in _cli("caption_corpus").build_parser()._actions if "--engine" in a.option_strings)
    assert tuple(action.choices) == engine_names()


# An engine added by its registry entry alone (an out-of-tree one, registered before use): the
# config, the environment probe, the loader, the planner and both command lines take it. In a
# process of its own: the registry is process-wide, and the other tests see only the built-in two.
_ADDED_ENGINE = """
import sys
from pipeline.engines import EngineSpec, engine_environment, load_engine, register
from pipeline.engines.hf import HFEngine

register(EngineSpec(name="hf2", title="HF again", summary="the HF engine under a second name.",
                    engine_class="pipeline.engines.hf:HFEngine", adapter_part="language", takes_stage=False,
                    distributions=("no-such-dist", "transformers"), schedules_batches=False))

from pipeline.config import ConfigError, ModelConfig, validate_config
from pipeline.cost import planner

raw = {"input": {"path": "in"}, "output": {"path": "out"}, "model": {"path": "tiny:llava"}}
cfg = validate_config({**raw, "decode_stage": {"engine": "hf2"}})
try:
    validate_config({**raw, "decode_stage": {"engine": "tgi"}})
except ConfigError as e:
    assert "decode_stage.engine: Input should be 'hf', 'vllm' or 'hf2'" in str(e), e
else:
    raise AssertionError("tgi validated")
env = engine_environment(cfg.decode_stage)
assert (env.engine, env.package, env.python) == ("hf2", "transformers", sys.executable), env
engine = load_engine(ModelConfig(path="tiny:llava", device="cpu"), cfg.decode_stage)
assert type(engine) is HFEngine, engine
assert planner.paid_tokens("hf2", 8, 32) == 32  # static batches: an image pays for the cap

import csv, importlib.util, pathlib, tempfile
def cli(name):
    spec = importlib.util.spec_from_file_location(name, "jobs/" + name + ".py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
caption = cli("caption_corpus")
assert caption.overrides_from(caption.build_parser().parse_args(["--config", "c.yaml", "--engine", "hf2"])) == {
    "decode_stage.engine": "hf2"}
out = pathlib.Path(tempfile.mkdtemp())
assert cli("plan_cost").main(["--model", "configs/llava-1.5-7b.yaml", "--accelerator", "h100-sxm", "--images", "10",
                              "--budgets", "128", "--engine", "hf2", "--out", str(out)]) == 0
assert [r["engine"] for r in csv.DictReader(open(out / "plan.csv"))] == ["hf2"]
assert "the HF again decode engine (decode_stage.engine: hf2): static batches" in (out / "plan.md").read_text()
print("ok")
"""


def test_an_engine_is_one_registry_entry() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _ADDED_ENGINE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_kept_token_positions_equal_transformers_positions_of_the_full_sequence() -> None:
    adapter = load_adapter(ModelConfig(path="tiny:qwen2_5_vl", device="cpu"), "language")
    layout = [1, 12, 20]  # t, h, w patches: 60 merged tokens on a 6 x 10 grid
    n = 60
    prompt = "What colour is the square?"
    ids = adapter.prompt_ids(prompt)
    start = ids.index(adapter.image_token_id)
    width = adapter.config.text_config.hidden_size
    for kept in (torch.arange(n), torch.tensor([0, 5, 17, 30, 59]), torch.tensor([1, 2, 3]), torch.tensor([59])):
        _, want = adapter.prompt_inputs(prompt, torch.zeros(len(kept), width), kept, layout)
        got, delta = kept_mrope_positions(len(ids) - 1 + len(kept), [(start, layout, kept)], adapter.merge)
        assert torch.equal(got, want), kept
        assert delta == int(want.max()) + 1 - want.shape[1]
    # Text after the image continues after the FULL grid (here max(1, 6, 10) = 10 positions on).
    got, _ = kept_mrope_positions(len(ids), [(start, layout, torch.tensor([0]))], adapter.merge)
    assert got[0, start + 1] == start + 10
